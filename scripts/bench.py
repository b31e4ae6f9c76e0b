"""Run the benchmark (same as `edge-agent bench`); see agent/tools/bench/benchmark.py and docs/benchmarks.md."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.tools.bench.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
