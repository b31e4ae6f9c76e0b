"""What `--help` and error messages tell a new user (issue #12, item 12)."""

from __future__ import annotations

import re

import pytest
from agent_process import ROOT, cli

from agent.cli import main


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_packaging_help_lists_choices_and_required_options(capsys):
    create = help_text(capsys, "create-model")
    assert "--kind {auto,anomalib,anomalib_v1,classification,segmentation}" in create
    required = create[create.index("required (on the command line or in --cli-input-json)"):]
    assert "--project-name PROJECT_NAME" in required and "--onnx ONNX" in required
    assert "ModelFile (required)" in create
    job = help_text(capsys, "start-model-packaging-job")
    assert "ModelVersion (required)" in job and "Configuration (JSON text or file://path) (required)" in job


def test_every_option_has_help(capsys):
    for command in ("deploy", "detect", "status", "start-model", "stop-model", "describe-model", "list-models",
                    "create-model", "serve"):
        text = help_text(capsys, command)
        # argparse prints "  --flag METAVAR" alone on a line when help follows on the next one, and nothing
        # after it when there is no help: every option line must be followed by text.
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^  -", line) and not re.match(r"^  \S.*\S {2,}\S", line):
                following = lines[i + 1] if i + 1 < len(lines) else ""
                assert following.startswith(" " * 10), f"{command}: {line.strip()} has no help"
    deploy = help_text(capsys, "deploy")
    assert "deploymentName" in deploy and "AWS region" in deploy and "CreateDeployment" in deploy
    assert "DEADLINE_EXCEEDED" in help_text(capsys, "detect")


def test_detect_help_says_rgb_not_bgr(capsys):
    text = help_text(capsys, "detect")
    assert "RGB888" in text and "BGR" in text and "independent" in text


def test_configuration_errors_name_the_flag_or_variable():
    flag = cli("serve", "--max-concurrent-inferences", "0", timeout=60)
    assert flag.returncode == 2
    assert "--max-concurrent-inferences '0'" in flag.stderr and "max_concurrency" not in flag.stderr
    env = cli("serve", env={"EDGE_AGENT_MAX_QUEUED_REQUESTS": "-1"}, timeout=60)
    assert env.returncode == 2 and "EDGE_AGENT_MAX_QUEUED_REQUESTS='-1'" in env.stderr


def test_packaging_command_without_its_required_option_says_which(short_tmp):
    result = cli("describe-project", env={"EDGE_AGENT_HOME": str(short_tmp)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("edge-agent: ValidationException: describe-project needs --project-name "
                                     "(or ProjectName in --cli-input-json)")


def test_greengrass_doc_mentions_only_what_exists():
    text = (ROOT / "docs" / "greengrass.md").read_text()
    assert "--options" not in text
    for path in re.findall(r"`((?:agent|tests|scripts|docs|shared)/[\w./-]+)`", text):
        assert (ROOT / path.split(":")[0]).exists(), f"docs/greengrass.md names {path}, which is not in the repo"
