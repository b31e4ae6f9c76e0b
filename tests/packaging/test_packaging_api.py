"""StartModelPackagingJob / DescribeModelPackagingJob / ListModelPackagingJobs: every seed rule."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
import zipfile
from datetime import datetime
from pathlib import Path

import pytest
from packaging_helpers import REPO, greengrass, wait_until

from agent.packaging import (
    AccessDeniedException,
    Client,
    ConflictException,
    InternalServerException,
    LookoutVisionError,
    PackagingSettings,
    ResourceNotFoundException,
    ServiceQuotaExceededException,
    ThrottlingException,
    ValidationException,
)
from agent.packaging.jobs import run_job
from agent.tools.modelgen import build_anomalib_v2


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_anomalib_v2(tmp_path_factory.mktemp("model") / "model.onnx", image_size=(64, 64))


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recording:
    """An executor that only records: jobs stay CREATED until the test runs them."""

    def __init__(self, registry, output_factory) -> None:
        self.registry, self.output_factory, self.submitted = registry, output_factory, []

    def submit(self, project, name, expected_owner) -> None:
        self.submitted.append((project, name, expected_owner))

    def wait(self, timeout=None) -> bool:
        return True


def make_client(home: Path, executor="inline", **settings) -> Client:
    return Client(settings=PackagingSettings(home=home, mode="local", **settings), executor=executor, env={})


@pytest.fixture()
def client(tmp_path: Path, onnx_model: Path) -> Client:
    c = make_client(tmp_path / "home")
    c.create_project(ProjectName="demo")
    c.create_model(ProjectName="demo", ModelFile=onnx_model, Description="first")
    return c


def start(client: Client, **kwargs):
    request = {"ProjectName": "demo", "ModelVersion": "1", "Configuration": greengrass()}
    request.update(kwargs)
    return client.start_model_packaging_job(**request)


def describe(client: Client, name: str, project: str = "demo") -> dict:
    return client.describe_model_packaging_job(ProjectName=project, JobName=name)["ModelPackagingDescription"]


# ---------------------------------------------------------------------------------------------
# Request validation: each case breaks exactly one rule of the seeds


def _nvidia(options: dict | None) -> dict:
    gg = {"TargetPlatform": {"Os": "LINUX", "Arch": "ARM64", "Accelerator": "NVIDIA"}}
    if options is not None:
        gg["CompilerOptions"] = json.dumps(options)
    return greengrass(**gg)


NV = {"gpu-code": "sm_72", "trt-ver": "8.2.1", "cuda-ver": "10.2"}

INVALID = [
    ("no configuration", {"Configuration": None}, "Configuration is required"),
    ("no greengrass", {"Configuration": {}}, "Greengrass is required"),
    ("unknown configuration key", {"Configuration": {"Greengrass": greengrass()["Greengrass"], "X": 1}}, "unknown"),
    ("device and platform", {"Configuration": greengrass(TargetDevice="jetson_xavier")}, "not both"),
    ("neither device nor platform", {"Configuration": greengrass(TargetPlatform=None)}, "TargetDevice"),
    ("unsupported device", {"Configuration": greengrass(TargetPlatform=None, TargetDevice="jetson_nano")},
     "jetson_xavier"),
    ("compiler options with device", {"Configuration": greengrass(
        TargetPlatform=None, TargetDevice="jetson_xavier", CompilerOptions=json.dumps(NV))},
     "can't be specified with TargetDevice"),
    ("os", {"Configuration": greengrass(TargetPlatform={"Os": "WINDOWS", "Arch": "X86_64"})}, "Os must be LINUX"),
    ("arch", {"Configuration": greengrass(TargetPlatform={"Os": "LINUX", "Arch": "ARM_64"})}, "ARM64 or X86_64"),
    ("accelerator", {"Configuration": greengrass(TargetPlatform={"Os": "LINUX", "Arch": "X86_64",
                                                                 "Accelerator": "TPU"})}, "NVIDIA"),
    ("nvidia without options", {"Configuration": _nvidia(None)}, "needs CompilerOptions"),
    ("nvidia without cuda-ver", {"Configuration": _nvidia({"gpu-code": "sm_72", "trt-ver": "8.2.1"})},
     "missing ['cuda-ver']"),
    ("nvidia without gpu-code", {"Configuration": _nvidia({"trt-ver": "8.2.1", "cuda-ver": "10.2"})},
     "missing ['gpu-code']"),
    ("nvidia trt-ver x.y", {"Configuration": _nvidia({**NV, "trt-ver": "8.2"})}, "x.y.z"),
    ("nvidia with mcpu", {"Configuration": _nvidia({**NV, "mcpu": "carmel"})}, "not options for an NVIDIA"),
    ("options not json", {"Configuration": greengrass(CompilerOptions="{mcpu: x}")}, "not valid JSON"),
    ("options too short", {"Configuration": greengrass(CompilerOptions="{}")}, "3 to 1024"),
    ("options not an object", {"Configuration": greengrass(CompilerOptions='["mcpu"]')}, "JSON object"),
    ("gpu options on cpu", {"Configuration": greengrass(CompilerOptions=json.dumps(NV))},
     "not options for a CPU target"),
    ("x86 mcpu on arm", {"Configuration": greengrass(TargetPlatform={"Os": "LINUX", "Arch": "ARM64"},
                                                     CompilerOptions='{"mcpu": "skylake-avx512"}')},
     "not a CPU of the target architecture"),
    ("mattr not a list", {"Configuration": greengrass(CompilerOptions='{"mattr": "+avx2"}')}, "list of CPU flags"),
    ("arm mattr on x86", {"Configuration": greengrass(CompilerOptions='{"mattr": ["+neon"]}')}, "not flags"),
    ("no s3 location", {"Configuration": greengrass(S3OutputLocation=None)}, "S3OutputLocation is required"),
    ("no bucket", {"Configuration": greengrass(S3OutputLocation={"Prefix": "x"})}, "Bucket is required"),
    ("bucket too short", {"Configuration": greengrass(S3OutputLocation={"Bucket": "ab"})}, "3 to 63"),
    ("bucket chars", {"Configuration": greengrass(S3OutputLocation={"Bucket": "my/bucket"})}, "pattern"),
    ("prefix dotdot", {"Configuration": greengrass(S3OutputLocation={"Bucket": "bkt", "Prefix": "a/../../etc"})},
     "'..'"),
    ("prefix chars", {"Configuration": greengrass(S3OutputLocation={"Bucket": "bkt", "Prefix": "/abs"})},
     "pattern"),
    ("no component name", {"Configuration": greengrass(ComponentName=None)}, "ComponentName is required"),
    ("component name chars", {"Configuration": greengrass(ComponentName="com/model")}, "pattern"),
    ("component name length", {"Configuration": greengrass(ComponentName="m" * 129)}, "1 to 128"),
    ("component name hidden", {"Configuration": greengrass(ComponentName=".model")}, "start with a letter"),
    ("component version not semver", {"Configuration": greengrass(ComponentVersion="1.0")}, "ComponentVersion"),
    ("component version too wide", {"Configuration": greengrass(ComponentVersion="1234567.0.0")},
     "ComponentVersion"),
    ("component description chars", {"Configuration": greengrass(ComponentDescription="<b>")}, "pattern"),
    ("tag aws prefix", {"Configuration": greengrass(Tags=[{"Key": "aws:x", "Value": "v"}])}, "reserved"),
    ("tag without value", {"Configuration": greengrass(Tags=[{"Key": "k"}])}, "Key and Value"),
    ("tag twice", {"Configuration": greengrass(Tags=[{"Key": "k", "Value": "1"}, {"Key": "k", "Value": "2"}])},
     "twice"),
    ("too many tags", {"Configuration": greengrass(Tags=[{"Key": f"k{i}", "Value": ""} for i in range(201)])},
     "at most 200"),
    ("job name chars", {"JobName": "job_1"}, "JobName"),
    ("job name length", {"JobName": "j" * 65}, "1 to 64"),
    ("description length", {"Description": "d" * 257}, "1 to 256"),
    ("client token chars", {"ClientToken": "tok en"}, "ClientToken"),
    ("project name", {"ProjectName": "-demo"}, "ProjectName"),
    ("model version", {"ModelVersion": "0"}, "ModelVersion"),
    ("no model version", {"ModelVersion": None}, "ModelVersion is required"),
    ("unknown parameter", {"Tags": []}, "unknown parameter"),
]


@pytest.mark.parametrize("case,change,message", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_requests_raise_validation_exception(client: Client, case: str, change: dict, message: str) -> None:
    request = {"ProjectName": "demo", "ModelVersion": "1", "Configuration": greengrass()}
    for key, value in change.items():
        if value is None:
            request.pop(key, None)
        else:
            request[key] = value
    with pytest.raises(ValidationException) as info:
        client.start_model_packaging_job(**request)
    assert message in info.value.message
    assert info.value.response["Error"]["Code"] == "ValidationException"
    assert client.list_model_packaging_jobs(ProjectName="demo")["ModelPackagingJobs"] == []  # nothing recorded


@pytest.mark.parametrize("gg,arch,accelerator", [
    (greengrass(TargetPlatform=None, TargetDevice="jetson_xavier"), "aarch64", "NVIDIA"),
    (_nvidia(NV), "aarch64", "NVIDIA"),
    (greengrass(TargetPlatform={"Os": "LINUX", "Arch": "X86_64", "Accelerator": "NVIDIA"},
                CompilerOptions=json.dumps({"gpu-code": "sm_75", "trt-ver": "7.1.3", "cuda-ver": "10.2"})),
     "amd64", "NVIDIA"),
    (greengrass(TargetPlatform={"Os": "LINUX", "Arch": "ARM64"}, CompilerOptions='{"mattr": ["+neon", "+vfpv4"]}'),
     "aarch64", "CPU"),
    (greengrass(), "amd64", "CPU"),
])
def test_valid_targets_succeed_with_their_platform(client: Client, gg: dict, arch: str, accelerator: str) -> None:
    name = start(client, Configuration=gg)["JobName"]
    desc = describe(client, name)
    assert desc["Status"] == "SUCCEEDED", desc["StatusMessage"]
    recipe = (client.registry.home / "greengrass" / "recipes" / "demo.model-1.0.0.yaml").read_text()
    assert f"architecture: {arch}" in recipe
    zip_path = next((client.registry.home / "greengrass" / "artifacts" / "demo.model" / "1.0.0").iterdir())
    manifest = json.loads(zipfile.ZipFile(zip_path).read("manifest.json"))
    assert manifest["compilation"]["target"]["accelerator"] == accelerator
    assert manifest["compilation"]["target"]["architecture"] == arch


# ---------------------------------------------------------------------------------------------
# Behaviour


def test_describe_returns_the_whole_description(client: Client) -> None:
    gg = greengrass(ComponentDescription="Demo model (v1)", Tags=[{"Key": "team", "Value": "qa"}])
    name = start(client, Configuration=gg, JobName="job-1", Description="nightly build")["JobName"]
    assert name == "job-1"
    desc = describe(client, name)
    assert desc["JobName"] == "job-1" and desc["ProjectName"] == "demo" and desc["ModelVersion"] == "1"
    assert desc["ModelPackagingJobDescription"] == "nightly build"
    assert desc["ModelPackagingMethod"] == "Greengrass"
    assert desc["Status"] == "SUCCEEDED"
    assert "demo.model" in desc["StatusMessage"]
    echoed = desc["ModelPackagingConfiguration"]["Greengrass"]
    assert echoed["ComponentDescription"] == "Demo model (v1)"
    assert echoed["Tags"] == [{"Key": "team", "Value": "qa"}]
    assert echoed["S3OutputLocation"] == {"Bucket": "my-bucket", "Prefix": "models/demo"}
    out = desc["ModelPackagingOutputDetails"]["Greengrass"]
    assert out == {"ComponentName": "demo.model", "ComponentVersion": "1.0.0",
                   "ComponentVersionArn": "arn:aws:greengrass:us-east-1:000000000000:components:demo.model:versions:"
                                          "1.0.0"}
    assert isinstance(desc["CreationTimestamp"], datetime) and desc["CreationTimestamp"].tzinfo is not None
    assert desc["LastUpdatedTimestamp"] >= desc["CreationTimestamp"]
    recipe = (client.registry.home / "greengrass" / "recipes" / "demo.model-1.0.0.yaml").read_text()
    assert "ComponentDescription: Demo model (v1)" in recipe
    with sqlite3.connect(client.registry.db_path) as db:  # tags kept with the local component
        assert json.loads(db.execute("SELECT tags FROM components").fetchone()[0]) == [{"Key": "team", "Value": "qa"}]


def test_status_moves_created_running_succeeded(tmp_path: Path, onnx_model: Path) -> None:
    c = make_client(tmp_path / "home", executor=Recording)
    c.create_project(ProjectName="demo")
    c.create_model(ProjectName="demo", ModelFile=onnx_model)
    name = start(c)["JobName"]
    assert describe(c, name)["Status"] == "CREATED"
    seen = []
    factory = c._output_factory

    def observing(job):
        output = factory(job)
        publish = output.publish

        def spy(pub, progress):
            seen.append(describe(c, name)["Status"])
            return publish(pub, progress)

        output.publish = spy
        return output

    project, job, owner = c._executor.submitted[0]
    assert run_job(c.registry, project, job, expected_owner=owner, output_factory=observing)
    assert seen == ["RUNNING"]
    assert describe(c, name)["Status"] == "SUCCEEDED"
    # A second runner can't claim a finished job.
    assert not run_job(c.registry, project, job, expected_owner=owner, output_factory=observing)


def test_component_version_defaults_to_model_version(client: Client, onnx_model: Path) -> None:
    client.create_model(ProjectName="demo", ModelFile=onnx_model)
    name = start(client, ModelVersion="2")["JobName"]
    assert describe(client, name)["ModelPackagingOutputDetails"]["Greengrass"]["ComponentVersion"] == "2.0.0"
    assert (client.registry.home / "greengrass" / "recipes" / "demo.model-2.0.0.yaml").is_file()


def test_existing_component_version_is_refused(client: Client) -> None:
    start(client)
    with pytest.raises(ConflictException, match="same component name and component version"):
        start(client)
    assert describe(client, start(client, Configuration=greengrass(ComponentVersion="1.0.1"))["JobName"])[
        "Status"] == "SUCCEEDED"


def test_failed_job_has_a_useful_message_and_frees_the_version(client: Client) -> None:
    model_file = client.registry.model_dir("demo", 1) / "model.onnx.data"
    good = model_file.read_bytes()
    model_file.write_bytes(good[:-8] + b"corrupt!")
    desc = describe(client, start(client)["JobName"])
    assert desc["Status"] == "FAILED"
    assert "model.onnx.data" in desc["StatusMessage"] and "sha256" in desc["StatusMessage"]
    assert "ComponentVersionArn" not in desc["ModelPackagingOutputDetails"]["Greengrass"]
    assert not (client.registry.home / "greengrass" / "recipes" / "demo.model-1.0.0.yaml").exists()
    model_file.write_bytes(good)
    assert describe(client, start(client)["JobName"])["Status"] == "SUCCEEDED"


def test_job_name_is_generated_when_absent(client: Client) -> None:
    first = start(client)["JobName"]
    second = start(client, Configuration=greengrass(ComponentVersion="1.0.1"))["JobName"]
    assert first != second
    for name in (first, second):
        assert 1 <= len(name) <= 64 and all(ch.isalnum() or ch == "-" for ch in name)


def test_duplicate_job_name_in_project_conflicts(client: Client) -> None:
    start(client, JobName="nightly")
    with pytest.raises(ConflictException, match="nightly"):
        start(client, JobName="nightly", Configuration=greengrass(ComponentVersion="1.0.1"))
    client.create_project(ProjectName="other")
    client.create_model(ProjectName="other", ModelFile=client.registry.model_dir("demo", 1) / "model.onnx")
    assert start(client, ProjectName="other", JobName="nightly",
                 Configuration=greengrass(ComponentName="other.model"))["JobName"] == "nightly"


def test_client_token_same_parameters_same_job(client: Client) -> None:
    first = start(client, ClientToken="token-1")
    again = start(client, ClientToken="token-1")
    assert again == first
    assert len(client.list_model_packaging_jobs(ProjectName="demo")["ModelPackagingJobs"]) == 1


def test_client_token_with_different_parameters_is_an_error(client: Client) -> None:
    start(client, ClientToken="token-1")
    with pytest.raises(ConflictException, match="different parameters"):
        start(client, ClientToken="token-1", Configuration=greengrass(ComponentVersion="1.0.1"))
    assert len(client.list_model_packaging_jobs(ProjectName="demo")["ModelPackagingJobs"]) == 1


def test_client_token_expires_after_8_hours(tmp_path: Path, onnx_model: Path) -> None:
    clock = Clock()
    c = Client(settings=PackagingSettings(home=tmp_path / "home", mode="local"), executor="inline", env={},
               clock=clock)
    c.create_project(ProjectName="demo")
    c.create_model(ProjectName="demo", ModelFile=onnx_model)
    start(c, ClientToken="tok")
    clock.now += 8 * 3600 - 1
    with pytest.raises(ConflictException):
        start(c, ClientToken="tok", Configuration=greengrass(ComponentVersion="1.0.1"))
    clock.now += 2
    assert start(c, ClientToken="tok", Configuration=greengrass(ComponentVersion="1.0.1"))
    assert len(c.list_model_packaging_jobs(ProjectName="demo")["ModelPackagingJobs"]) == 2


def test_unknown_project_model_or_job_is_not_found(client: Client) -> None:
    with pytest.raises(ResourceNotFoundException, match="project 'nope'"):
        start(client, ProjectName="nope")
    with pytest.raises(ResourceNotFoundException, match="model version '7'"):
        start(client, ModelVersion="7")
    with pytest.raises(ResourceNotFoundException, match="job 'missing'"):
        describe(client, "missing")
    with pytest.raises(ResourceNotFoundException):
        client.list_model_packaging_jobs(ProjectName="nope")


def test_latest_model_version(client: Client, onnx_model: Path) -> None:
    client.create_model(ProjectName="demo", ModelFile=onnx_model)
    assert describe(client, start(client, ModelVersion="latest")["JobName"])["ModelVersion"] == "2"


def test_list_paginates(client: Client) -> None:
    names = [start(client, Configuration=greengrass(ComponentVersion=f"1.0.{i}"))["JobName"] for i in range(3)]
    page = client.list_model_packaging_jobs(ProjectName="demo", MaxResults=2)
    assert [j["JobName"] for j in page["ModelPackagingJobs"]] == names[:2]
    assert set(page["ModelPackagingJobs"][0]) >= {"JobName", "ProjectName", "ModelVersion", "ModelPackagingMethod",
                                                  "Status", "StatusMessage", "CreationTimestamp",
                                                  "LastUpdatedTimestamp"}
    rest = client.list_model_packaging_jobs(ProjectName="demo", MaxResults=2, NextToken=page["NextToken"])
    assert [j["JobName"] for j in rest["ModelPackagingJobs"]] == names[2:]
    assert "NextToken" not in rest
    with pytest.raises(ValidationException, match="MaxResults"):
        client.list_model_packaging_jobs(ProjectName="demo", MaxResults=0)
    with pytest.raises(ValidationException, match="NextToken"):
        client.list_model_packaging_jobs(ProjectName="demo", NextToken="bm90LWEtdG9rZW4=")


def test_quota_of_active_jobs(tmp_path: Path, onnx_model: Path) -> None:
    c = make_client(tmp_path / "home", executor=Recording, max_active_jobs=1)
    c.create_project(ProjectName="demo")
    c.create_model(ProjectName="demo", ModelFile=onnx_model)
    start(c)
    with pytest.raises(ServiceQuotaExceededException):
        start(c, Configuration=greengrass(ComponentVersion="1.0.1"))


def test_busy_registry_throttles(client: Client, tmp_path: Path, onnx_model: Path) -> None:
    c = make_client(client.registry.home, busy_timeout_s=0.2)
    holder = sqlite3.connect(client.registry.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(ThrottlingException, match="busy"):
            start(c)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert start(c)["JobName"]


# An unreadable or unwritable home (as root too): test_packaging_cli_robust.test_an_unusable_home_is_access_denied


def test_read_only_registry_is_access_denied(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root ignores file modes, so the database's own refusal is simulated at the connection."""

    class ReadOnly:
        def __init__(self, db) -> None:
            self.db = db

        def execute(self, sql, *args):
            if sql.startswith("INSERT"):
                raise sqlite3.OperationalError("attempt to write a readonly database")
            return self.db.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.db, name)

    connect = client.registry._connect
    monkeypatch.setattr(client.registry, "_connect", lambda: ReadOnly(connect()))
    with pytest.raises(AccessDeniedException, match="cannot be written"):
        start(client)


def test_damaged_registry_model_is_an_internal_error(client: Client) -> None:
    (client.registry.model_dir("demo", 1) / "manifest.json").write_text("{")
    with pytest.raises(InternalServerException, match="damaged"):
        client.describe_model(ProjectName="demo", ModelVersion="1")


def test_errors_share_one_base_with_code_and_message(client: Client) -> None:
    with pytest.raises(LookoutVisionError) as info:
        describe(client, "missing")
    assert info.value.error_code == "ResourceNotFoundException"
    assert isinstance(info.value, client.exceptions.ResourceNotFoundException)
    assert info.value.response["Error"] == {"Code": "ResourceNotFoundException", "Message": info.value.message}


# ---------------------------------------------------------------------------------------------
# The registry


def test_create_model_versions_and_metadata(client: Client, onnx_model: Path) -> None:
    meta = client.create_model(ProjectName="demo", ModelFile=onnx_model, Description="second")["ModelMetadata"]
    assert meta["ModelVersion"] == "2" and meta["Status"] == "TRAINED" and meta["Description"] == "second"
    assert meta["ModelArn"] == "arn:aws:lookoutvision:us-east-1:000000000000:model/demo/2"
    assert [m["ModelVersion"] for m in client.list_models(ProjectName="demo")["Models"]] == ["1", "2"]
    desc = client.describe_model(ProjectName="demo", ModelVersion="2")["ModelDescription"]
    assert desc["ModelKind"] == "anomalib" and desc["ImageSize"] == [64, 64]
    files = sorted(p.name for p in client.registry.model_dir("demo", 2).iterdir())
    assert files == ["manifest.json", "model.onnx", "model.onnx.data"]
    assert [p["ProjectName"] for p in client.list_projects()["Projects"]] == ["demo"]
    with pytest.raises(ConflictException):
        client.create_project(ProjectName="demo")


@pytest.mark.parametrize("bad", ["not-onnx", "missing-data"])
def test_bad_model_import_leaves_nothing(client: Client, tmp_path: Path, onnx_model: Path, bad: str) -> None:
    if bad == "not-onnx":
        path = tmp_path / "bad.onnx"
        path.write_bytes(b"\x08\x01garbage" * 10)
    else:
        path = tmp_path / "nodata" / "model.onnx"
        path.parent.mkdir()
        path.write_bytes(onnx_model.read_bytes())  # its model.onnx.data is not beside it
    models_dir = client.registry.home / "projects" / "demo" / "models"
    before = sorted(p.name for p in models_dir.iterdir())
    with pytest.raises(ValidationException, match="can't be imported"):
        client.create_model(ProjectName="demo", ModelFile=path)
    assert sorted(p.name for p in models_dir.iterdir()) == before
    assert [m["ModelVersion"] for m in client.list_models(ProjectName="demo")["Models"]] == ["1"]


# ---------------------------------------------------------------------------------------------
# Persistence, crashes, concurrency


def test_jobs_and_tokens_survive_a_restart(client: Client) -> None:
    first = start(client, ClientToken="restart-token", JobName="persisted")
    home = client.registry.home
    del client
    again = make_client(home)
    assert describe(again, "persisted")["Status"] == "SUCCEEDED"
    assert start(again, ClientToken="restart-token", JobName="persisted") == first
    assert len(again.list_model_packaging_jobs(ProjectName="demo")["ModelPackagingJobs"]) == 1


CRASHING_WORKER = """
import sys, time
from agent.packaging import Client, PackagingSettings
from agent.packaging.output import LocalOutput
settings = PackagingSettings(home=sys.argv[1], mode="local")

class Hanging(LocalOutput):
    def publish(self, pub, progress):
        progress("uploading (hangs)")
        time.sleep(60)

def factory(registry, output_factory):
    from agent.packaging.jobs import InlineExecutor
    return InlineExecutor(registry, lambda job: Hanging(registry.home, registry.component_arn))

c = Client(settings=settings, executor=factory, env={})
c.start_model_packaging_job(ProjectName="demo", ModelVersion="1", JobName="crashy",
                            Configuration={"Greengrass": %r})
"""


def test_a_job_interrupted_by_a_crash_ends_failed(client: Client) -> None:
    home = client.registry.home
    script = CRASHING_WORKER % greengrass()["Greengrass"]
    proc = subprocess.Popen([sys.executable, "-c", script, str(home)], cwd=REPO,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    try:
        observer = Client(
            settings=PackagingSettings(home=home, mode="local"), executor="inline", env={}, recover_jobs=False)

        def running() -> bool:
            try:
                return observer.registry.get_job("demo", "crashy").status_message == "uploading (hangs)"
            except ResourceNotFoundException:
                return False

        wait_until(running, 20, "the worker to reach the upload")
        assert observer.registry.get_job("demo", "crashy").status == "RUNNING"
    finally:
        proc.kill()
        proc.wait(10)
    desc = describe(client, "crashy")  # describe checks the owner of a RUNNING job
    assert desc["Status"] == "FAILED"
    assert "interrupted" in desc["StatusMessage"]


ORPHAN_CREATOR = """
import sys
from agent.packaging import Client, PackagingSettings

class Nothing:
    def __init__(self, registry, output_factory): pass
    def submit(self, *a): pass
    def wait(self, timeout=None): return True

c = Client(settings=PackagingSettings(home=sys.argv[1], mode="local"), executor=Nothing, env={})
print(c.start_model_packaging_job(ProjectName="demo", ModelVersion="1", JobName="orphan",
                                  Configuration={"Greengrass": %r})["JobName"])
"""


def test_a_created_job_whose_creator_exited_is_resumed(client: Client) -> None:
    home = client.registry.home
    out = subprocess.run([sys.executable, "-c", ORPHAN_CREATOR % greengrass()["Greengrass"], str(home)], cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "orphan", out.stderr
    assert client.registry.get_job("demo", "orphan").status == "CREATED"
    resumed = make_client(home)  # recovery on open runs it (inline executor: before the constructor returns)
    assert describe(resumed, "orphan")["Status"] == "SUCCEEDED"


def test_concurrent_starts_with_one_token_create_one_job(client: Client) -> None:
    home = client.registry.home
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def worker() -> None:
        try:
            c = make_client(home, executor=Recording)
            find = c.registry.find_token

            def slow_find(*args, **kwargs):  # widen the check-then-insert window to provoke the race
                found = find(*args, **kwargs)
                time.sleep(0.05)
                return found

            c.registry.find_token = slow_find
            barrier.wait(10)
            results.append(start(c, ClientToken="same-token")["JobName"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(results) == 6 and len(set(results)) == 1
    assert len(client.list_model_packaging_jobs(ProjectName="demo")["ModelPackagingJobs"]) == 1


CONCURRENT_STARTER = """
import sys
from agent.packaging import Client, PackagingSettings

class Nothing:
    def __init__(self, registry, output_factory): pass
    def submit(self, *a): pass
    def wait(self, timeout=None): return True

c = Client(settings=PackagingSettings(home=sys.argv[1], mode="local"), executor=Nothing, env={}, recover_jobs=False)
print(c.start_model_packaging_job(ProjectName="demo", ModelVersion="1", ClientToken="proc-token",
                                  Configuration={"Greengrass": %r})["JobName"])
"""


def test_concurrent_processes_with_one_token_create_one_job(client: Client) -> None:
    home = client.registry.home
    script = CONCURRENT_STARTER % greengrass()["Greengrass"]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(home)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
             for _ in range(4)]
    names = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        names.append(out.strip())
    assert len(set(names)) == 1
    assert len(client.list_model_packaging_jobs(ProjectName="demo")["ModelPackagingJobs"]) == 1
