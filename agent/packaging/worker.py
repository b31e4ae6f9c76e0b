"""The detached worker the CLI starts for each packaging job: ``python -m agent.packaging.worker``.

Kept out of agent.packaging's imports so ``-m`` runs it as a fresh module.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from agent.packaging.errors import LookoutVisionError
from agent.packaging.jobs import default_output_factory, run_job
from agent.packaging.registry import Registry

log = logging.getLogger("agent.packaging.worker")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.packaging.worker",
                                     description="run one model packaging job (started by the CLI)")
    parser.add_argument("--home", required=True, type=Path)
    parser.add_argument("--project", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--account", required=True)
    parser.add_argument("--expect-owner")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        registry = Registry(args.home, clock=time.time, region=args.region, account=args.account)
        ran = run_job(registry, args.project, args.job, expected_owner=args.expect_owner,
                      output_factory=default_output_factory(registry))
        job = registry.get_job(args.project, args.job)
    except LookoutVisionError as exc:
        # The registry itself failed (damaged, newer, busy): nothing to record the outcome in. The
        # next Client that opens the registry recovers the job (its owner is dead by then).
        log.error("job %s/%s: %s", args.project, args.job, exc)
        return exc.exit_code
    log.info("job %s/%s: %s%s: %s", args.project, args.job, job.status, "" if ran else " (run elsewhere)",
             job.status_message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
