"""End to end through the CLI: registry → packaging job (local mode, detached worker) → the artifact
unpacked and installed the way Greengrass would → `edge-agent serve` answers DetectAnomalies."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
from packaging_helpers import REPO, cli_env, greengrass, run_cli, wait_until

from agent.client import channel, detect
from agent.packaging import Client, PackagingSettings
from agent.packaging.recipe import AGENT_COMPONENT
from agent.serving.grpc._generated import edge_agent_pb2 as pb
from agent.serving.grpc._generated import edge_agent_pb2_grpc as pb_grpc
from agent.tools.modelgen import build_anomalib_v2


def _json(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cli_errors_print_the_exception_name_and_exit_non_zero(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    res = run_cli(["describe-model-packaging-job", "--project-name", "nope", "--job-name", "j"], env)
    assert res.returncode != 0 and res.stdout == ""
    assert "ResourceNotFoundException" in res.stderr and "'nope'" in res.stderr
    res = run_cli(["start-model-packaging-job", "--cli-input-json",
                   json.dumps({"ProjectName": "p", "ModelVersion": "1", "Configuration": {}})], env)
    assert res.returncode != 0 and "ValidationException: Configuration.Greengrass is required" in res.stderr


def test_package_install_serve_detect(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = cli_env(home)
    onnx_path = build_anomalib_v2(tmp_path / "export" / "model.onnx", image_size=(64, 64))

    assert _json(run_cli(["create-project", "--project-name", "demo"], env))["ProjectMetadata"]["ProjectName"] == "demo"
    meta = _json(run_cli(["create-model", "--project-name", "demo", "--onnx", str(onnx_path), "--description",
                          "first"], env))["ModelMetadata"]
    assert meta["ModelVersion"] == "1" and meta["Status"] == "TRAINED"
    models = _json(run_cli(["list-models", "--project-name", "demo"], env))["Models"]
    assert [m["ModelVersion"] for m in models] == ["1"]

    # --cli-input-json from a file, with an option given on the command line overriding it.
    request = {"ProjectName": "demo", "ModelVersion": "1", "JobName": "from-json",
               "Configuration": greengrass(), "ClientToken": "e2e-token"}
    (tmp_path / "req.json").write_text(json.dumps(request))
    started = _json(run_cli(["start-model-packaging-job", "--cli-input-json", f"file://{tmp_path / 'req.json'}",
                             "--job-name", "cli-job", "--description", "from the CLI"], env))
    assert started == {"JobName": "cli-job"}  # returns at once: the job runs in a worker process

    # Poll in-process (each CLI start costs a second or two); then describe once through the CLI.
    observer = Client(settings=PackagingSettings(home=home, mode="local"), env={}, recover_jobs=False)
    wait_until(lambda: observer.registry.get_job("demo", "cli-job").status in ("SUCCEEDED", "FAILED"), 30,
               "the packaging job", interval=0.05)
    desc = _json(run_cli(["describe-model-packaging-job", "--project-name", "demo", "--job-name", "cli-job"],
                         env))["ModelPackagingDescription"]
    assert desc["Status"] == "SUCCEEDED", desc["StatusMessage"]
    assert desc["ModelPackagingJobDescription"] == "from the CLI"
    jobs = _json(run_cli(["list-model-packaging-jobs", "--project-name", "demo"], env))["ModelPackagingJobs"]
    assert [j["JobName"] for j in jobs] == ["cli-job"]

    # The local tree: S3 copy, recipe and artifact as greengrass-cli takes them.
    zip_name = "demo.model-1.0.0_greengrass_model_component.zip"
    assert (home / "s3" / "my-bucket" / "models" / "demo" / zip_name).is_file()
    artifact = home / "greengrass" / "artifacts" / "demo.model" / "1.0.0" / zip_name
    recipe_text = (home / "greengrass" / "recipes" / "demo.model-1.0.0.yaml").read_text()
    # The agent's own component is not in this store (test_packaging_cli_robust covers --agent-build).
    local = run_cli(["deploy", "--local", "--component", "demo.model=1.0.0", "--home", str(home), "--no-agent"], env)
    assert local.returncode == 0 and f"--recipeDir {home}/greengrass/recipes" in local.stdout
    assert "--merge demo.model=1.0.0" in local.stdout and AGENT_COMPONENT not in local.stdout

    # What the nucleus does: unarchive to artifacts-unarchived/<name>/<version>/<zip stem>/, run Install.
    decompressed = tmp_path / "gg" / "packages" / "artifacts-unarchived" / "demo.model" / "1.0.0"
    with zipfile.ZipFile(artifact) as zf:
        zf.extractall(decompressed / zip_name[:-4])
    agent_work = tmp_path / "gg" / "work" / AGENT_COMPONENT
    import yaml

    recipe = yaml.safe_load(recipe_text)
    install = recipe["Manifests"][0]["Lifecycle"]["install"]["Script"]
    install = install.replace("{artifacts:decompressedPath}", str(decompressed)).replace(
        "{kernel:rootPath}", str(tmp_path / "gg")).replace("{work:path}", str(tmp_path / "gg" / "work" / "demo.model"))
    subprocess.run(["sh", "-c", install], check=True, timeout=10)

    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "serve", "--models-dir", str(agent_work / "models"),
         "--socket", f"unix://{socket_path}", "--work-dir", str(tmp_path / "agent-work"), "--warmup-runs", "1"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with channel(f"unix://{socket_path}") as ch:
            stub = pb_grpc.EdgeAgentStub(ch)

            def listed() -> bool:
                try:
                    models = stub.ListModels(pb.ListModelsRequest(), timeout=2).models
                except grpc.RpcError:
                    return False
                return any(m.model_component == "demo.model" for m in models)

            wait_until(listed, 30, "the agent to list demo.model", interval=0.1)
            stub.StartModel(pb.StartModelRequest(model_component="demo.model"), timeout=10)

            def running() -> bool:
                d = stub.DescribeModel(pb.DescribeModelRequest(model_component="demo.model"), timeout=5)
                if d.model_description.status == pb.FAILED:
                    raise AssertionError(d.model_description.status_message)
                return d.model_description.status == pb.RUNNING

            wait_until(running, 30, "demo.model to be RUNNING", interval=0.1)
            described = stub.DescribeModel(pb.DescribeModelRequest(model_component="demo.model"), timeout=5)
            assert described.model_description.lookout_vision_model_arn == meta["ModelArn"]

            grey = np.full((64, 64, 3), 128, np.uint8)
            result, _ = detect(stub, "demo.model", grey, use_shm=False)
            assert not result.is_anomalous
            defect = grey.copy()
            defect[20:36, 20:36] = (255, 0, 0)
            result, mask = detect(stub, "demo.model", defect, use_shm=False)
            assert result.is_anomalous and result.anomaly_score > result.anomaly_threshold
    finally:
        agent.terminate()
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(5)


@pytest.mark.parametrize("flag", ["--cli-input-json", "--configuration"])
def test_json_arguments_must_be_valid(tmp_path: Path, flag: str) -> None:
    res = run_cli(["start-model-packaging-job", "--project-name", "p", "--model-version", "1", flag, "{bad"],
                  cli_env(tmp_path / "home"))
    assert res.returncode != 0 and "ValidationException" in res.stderr and "not valid JSON" in res.stderr
