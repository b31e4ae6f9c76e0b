"""README.md's "Using the agent" block, run as written: model build → serve → start-model --wait → detect → ...

Only the environment differs from a user's shell: EDGE_AGENT_SOCKET / _METRICS_PORT / _WORK_DIR keep this run
off the machine-wide LFV socket, port 8002 and ~/.local/state (every command reads the same variables), and
`.venv/bin/edge-agent` is this interpreter."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys

from agent_process import ROOT
from conftest import grey_with_square
from PIL import Image


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using the agent"):]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "no bash block in README's 'Using the agent'"
    return match.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_readme_using_the_agent_runs_as_written(model_files, short_tmp):
    block = readme_block()
    for step in ("model build", "serve --models-dir models &", "start-model my-model --wait", "detect"):
        assert step in block
    cwd = short_tmp / "user"
    export = cwd / "export" / "weights" / "onnx"
    export.mkdir(parents=True)
    for item in model_files["anomalib"].parent.iterdir():
        shutil.copy(item, export / item.name)
    Image.fromarray(grey_with_square(box=(8, 8, 24, 24))).save(cwd / "part.png")
    venv = cwd / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "edge-agent").write_text(f'#!/bin/sh\nexec {sys.executable} -m agent "$@"\n')
    (venv / "edge-agent").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_AGENT_SOCKET": f"unix://{short_tmp}/readme.sock",
           "EDGE_AGENT_METRICS_PORT": str(free_port()), "EDGE_AGENT_WORK_DIR": str(cwd / "state")}
    script = ("set -euo pipefail\n"
              "trap 'kill $(jobs -p) 2>/dev/null || true; wait || true' EXIT\n" + block)
    result = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"

    # The agent in the background logs to the same terminal: keep the commands' own output.
    out = [line for line in result.stdout.splitlines() if not re.match(r"\d{4}-\d\d-\d\dT\S+ [A-Z]+ ", line)]
    text = "\n".join(out) + "\n"
    built = json.loads(out[0])
    assert built["name"] == "my-model" and built["kind"] == "anomalib"
    assert out[1] == "RUNNING"
    detected = json.loads(out[2])
    assert detected["image"] == "part.png" and detected["is_anomalous"] is True
    assert detected["overlay"] == "overlays/part.png" and (cwd / "overlays" / "part.png").is_file()
    listing = text[text.index("{\n"):]
    models = json.loads(listing[:listing.index("\n}\n") + 3])["models"]
    assert [(m["model_component"], m["status"]) for m in models] == [("my-model", "RUNNING")]
    status = out[out.index(next(line for line in out if line.startswith("edge agent "))):]
    assert f"on unix://{short_tmp}/readme.sock" in status[0] and ", up " in status[0]
    assert any(line.split()[:2] == ["my-model", "RUNNING"] for line in status), status
    assert out[-1] == "STOPPED"
    assert "Traceback" not in result.stderr and "EP Error" not in result.stderr
