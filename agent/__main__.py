"""Entry point: the only place that calls sys.exit."""

import sys

from agent.cli import main as _main


def main() -> None:
    sys.exit(_main())


if __name__ == "__main__":
    main()
