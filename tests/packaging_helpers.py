"""Shared helpers of the packaging tests (plain functions; each test module has its fixtures)."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def greengrass(**overrides: Any) -> dict[str, Any]:
    """A valid Greengrass configuration (CPU, x86_64), with overrides; None removes a key."""
    gg: dict[str, Any] = {
        "TargetPlatform": {"Os": "LINUX", "Arch": "X86_64"},
        "S3OutputLocation": {"Bucket": "my-bucket", "Prefix": "models/demo"},
        "ComponentName": "demo.model",
    }
    for key, value in overrides.items():
        if value is None:
            gg.pop(key, None)
        else:
            gg[key] = value
    return {"Greengrass": copy.deepcopy(gg)}


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05,
               log: Path | None = None) -> Any:
    """The predicate's first true value, polled every `interval` s; AssertionError after `timeout` s naming
    `what` (with the end of `log`, a process's log file, when given). The tests' one poll-until helper."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}" + (f"\n{tail}" if tail else ""))
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "EDGE_AGENT_"))}
    env.update({"PYTHONPATH": str(REPO), "EDGE_AGENT_HOME": str(home), "EDGE_AGENT_PACKAGING_MODE": "local"})
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
