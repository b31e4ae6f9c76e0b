"""`edge-agent serve` and the other commands as real processes (what a user runs), for the CLI tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "agent"]


def cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `edge-agent ARGS` to completion."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT,
                          env={**os.environ, **(env or {})})


class AgentProcess:
    """`edge-agent serve --models-dir DIR` on a socket in `root`, logging JSON lines to root/agent-N.log."""

    count = 0

    def __init__(self, root: Path, models_dir: Path, *extra: str, work_dir: Path | None = None,
                 wrapper: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        """`wrapper`: a command the agent runs under (e.g. setpriv dropping capabilities)."""
        AgentProcess.count += 1
        self.root = root
        self.socket = f"unix://{root}/agent.sock"
        self.log_path = root / f"agent-{AgentProcess.count}.log"
        args = [*wrapper, *CLI, "serve", "--socket", self.socket, "--models-dir", str(models_dir),
                "--execution-providers", "cpu", "--work-dir", str(work_dir or root / "work"), "--metrics-port", "0",
                "--log-format", "json", "--model-scan-interval-seconds", "0.2", "--warmup-runs", "1", *extra]
        self._log = open(self.log_path, "w")  # a file, not a pipe: a chatty agent never blocks on it
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                        env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 60.0) -> AgentProcess:
        """Until the log says it serves (and its first scan is done: the socket answers ListModels)."""
        deadline = time.monotonic() + timeout
        while not any("serving on" in m for m in self.messages()):
            assert self.process.poll() is None, f"agent exited {self.process.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"agent did not come up:\n{self.output()}"
            time.sleep(0.05)
        return self

    def output(self) -> str:
        return self.log_path.read_text()

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.output().splitlines() if line.startswith("{")]

    def messages(self) -> list[str]:
        return [entry["message"] for entry in self.logs()]

    @property
    def metrics_url(self) -> str:
        found = [m for m in (re.search(r"metrics at (\S+)", msg) for msg in self.messages()) if m]
        assert found, self.output()
        return found[0].group(1)

    def describe(self, name: str) -> dict[str, Any]:
        result = cli("describe-model", name, "--socket", self.socket)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def wait_status(self, name: str, status: str, timeout: float = 30.0) -> dict[str, Any]:
        """Poll describe-model until `status`; a model not discovered yet (NOT_FOUND) is waited for too."""
        deadline = time.monotonic() + timeout
        while True:
            result = cli("describe-model", name, "--socket", self.socket)
            found = result.returncode == 0
            assert found or "NOT_FOUND" in result.stderr, result.stderr
            desc = json.loads(result.stdout) if found else {"status": "NOT_FOUND"}
            if desc["status"] == status or time.monotonic() > deadline:
                return desc
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


def build_model(onnx: Path, out: Path, name: str, *extra: str) -> None:
    built = cli("model", "build", "--onnx", str(onnx), "--name", name, "--out", str(out), *extra)
    assert built.returncode == 0, built.stderr


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


__all__: Sequence[str] = ["AgentProcess", "build_model", "cli", "json_lines"]
