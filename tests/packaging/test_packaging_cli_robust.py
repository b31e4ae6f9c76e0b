"""The packaging CLI under hostile input, damaged registries and killed workers, through the real
`python -m agent` (EDGE_AGENT_HOME in a temp dir): one stderr line and a documented exit code for
every failure, jobs whose worker died (even as an unreaped zombie) end FAILED with their scratch
files removed, the registry database migrates, `--wait` reports a failed job, `deploy --local`
prints only commands that work."""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from packaging_helpers import REPO, cli_env, greengrass, run_cli, wait_until

from agent import __version__
from agent.packaging import Client, PackagingSettings
from agent.packaging.errors import (
    EXIT_ACCESS_DENIED,
    EXIT_CODES,
    EXIT_CONFLICT,
    EXIT_INVALID_REQUEST,
    EXIT_JOB_FAILED,
    EXIT_NOT_FOUND,
    EXIT_SERVICE_ERROR,
)
from agent.packaging.jobs import owner_id, process_alive
from agent.packaging.recipe import AGENT_COMPONENT, AGENT_VERSION_REQUIREMENT
from agent.packaging.registry import SCHEMA_VERSION
from agent.packaging.versions import compatible_requirement, satisfies
from agent.tools.modelgen import build_anomalib_v2

START_KEYS = "ProjectName, ModelVersion, JobName, Configuration, Description, ClientToken"


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_anomalib_v2(tmp_path_factory.mktemp("model") / "model.onnx", image_size=(64, 64))


@pytest.fixture()
def home(tmp_path: Path, onnx_model: Path) -> Path:
    """A registry with project demo and model version 1."""
    home = tmp_path / "home"
    client = Client(settings=PackagingSettings(home=home, mode="local"), executor="inline", env={})
    client.create_project(ProjectName="demo")
    client.create_model(ProjectName="demo", ModelFile=onnx_model)
    return home


def one_line_error(res: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    """The command failed with exit code `code` and said so in exactly one stderr line."""
    assert res.returncode == code, (res.returncode, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-agent: "), res.stderr
    assert "Traceback" not in res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def start_args(**overrides: str) -> list[str]:
    args = {"--project-name": "demo", "--model-version": "1", "--configuration": json.dumps(greengrass())}
    args.update(overrides)
    return ["start-model-packaging-job", *[x for kv in args.items() for x in kv]]


# ---------------------------------------------------------------------------------------------
# 1. one line, documented exit code


def test_unknown_cli_input_json_key_is_named_like_the_aws_cli(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    res = run_cli(["start-model-packaging-job", "--cli-input-json", json.dumps({"ProjectName": "p", "Bogus": 1})],
                  env)
    one_line_error(res, EXIT_INVALID_REQUEST, 'Parameter validation failed: Unknown parameter in input: "Bogus", '
                                              f"must be one of: {START_KEYS}")
    res = run_cli(["describe-project", "--cli-input-json", json.dumps({"ProjectName": ["p"]})], env)
    one_line_error(res, EXIT_INVALID_REQUEST, "Invalid type for parameter ProjectName", "valid types: str")
    res = run_cli(["list-projects", "--cli-input-json", '{"X": 1}'], env)
    one_line_error(res, EXIT_INVALID_REQUEST, 'Unknown parameter in input: "X"')


@pytest.mark.parametrize("where", ["argument", "file"])
def test_json_nested_100000_deep_is_refused(tmp_path: Path, where: str) -> None:
    env = cli_env(tmp_path / "home")
    deep = "[" * 100_000 + "]" * 100_000
    if where == "file":
        (tmp_path / "deep.json").write_text(deep)
        args = ["--cli-input-json", f"file://{tmp_path / 'deep.json'}"]
    else:
        args = ["--cli-input-json", "[" * 100_000]  # 100 kB: fits one argv string (128 kB)
    one_line_error(run_cli(["start-model-packaging-job", *args], env), EXIT_INVALID_REQUEST,
                   "ValidationException", "nested more than 32 levels")
    # Under Python's recursion limit, but still deeper than any request: refused the same way.
    one_line_error(run_cli(start_args(**{"--configuration": '{"Greengrass": ' + "[" * 500 + "]" * 500 + "}"}), env),
                   EXIT_INVALID_REQUEST, "--configuration is nested more than 32 levels")


def test_bad_json_arguments_are_invalid_requests(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    one_line_error(run_cli(start_args(**{"--configuration": "file:///missing"}), env), EXIT_INVALID_REQUEST,
                   "--configuration: cannot read /missing: No such file or directory")
    one_line_error(run_cli(start_args(**{"--configuration": "{bad"}), env), EXIT_INVALID_REQUEST,
                   "--configuration is not valid JSON")
    one_line_error(run_cli(["start-model-packaging-job", "--cli-input-json", "[1]"], env), EXIT_INVALID_REQUEST,
                   "must be a JSON object")
    one_line_error(run_cli(start_args(**{"--configuration": '{"n": ' + "1" * 5000 + "}"}), env),
                   EXIT_INVALID_REQUEST, "--configuration is not valid JSON")
    (tmp_path / "latin1.json").write_bytes(b'{"ProjectName": "\xe9"}')
    one_line_error(run_cli(["describe-project", "--cli-input-json", f"file://{tmp_path / 'latin1.json'}"], env),
                   EXIT_INVALID_REQUEST, "is not UTF-8 text")
    # argparse's own usage errors share the code (and print usage, as argparse does).
    assert run_cli(["list-model-packaging-jobs", "--max-results", "x"], env).returncode == EXIT_INVALID_REQUEST


def test_a_database_that_is_not_one_is_a_service_error(tmp_path: Path, home: Path) -> None:
    env = cli_env(home)
    db = home / "registry.db"
    good = db.read_bytes()
    assert run_cli(["list-projects"], env).returncode == 0

    # Truncated (a partial copy) and checkpointed first, so the file alone holds the data.
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    db.write_bytes(good[: len(good) // 2])
    line = one_line_error(run_cli(["describe-project", "--project-name", "demo"], env), EXIT_SERVICE_ERROR,
                          "InternalServerException", str(db), "is damaged")
    assert "restore it from a backup" in line

    db.write_bytes(os.urandom(4096))  # not a database at all
    one_line_error(run_cli(["list-projects"], env), EXIT_SERVICE_ERROR, "file is not a database")
    one_line_error(run_cli(start_args(), env), EXIT_SERVICE_ERROR, "is damaged")


def _drop_dac_capabilities() -> None:
    """Root reads everything; without CAP_DAC_OVERRIDE/READ_SEARCH (after exec) it obeys file modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_an_unusable_home_is_access_denied(tmp_path: Path) -> None:
    locked, read_only = tmp_path / "locked", tmp_path / "read-only"
    locked.mkdir(mode=0o000)
    read_only.mkdir(mode=0o500)
    try:
        for home in (locked, locked / "sub", read_only / "sub"):
            res = subprocess.run([sys.executable, "-m", "agent", "list-projects"], env=cli_env(home), cwd=REPO,
                                 capture_output=True, text=True, timeout=60,
                                 preexec_fn=_drop_dac_capabilities if os.geteuid() == 0 else None)
            one_line_error(res, EXIT_ACCESS_DENIED, "AccessDeniedException", str(home), "Permission denied")
    finally:
        locked.chmod(0o700)
    a_file = tmp_path / "file"
    a_file.write_text("")
    one_line_error(run_cli(["list-projects"], cli_env(a_file)), EXIT_ACCESS_DENIED, "is not a directory")


def test_exit_codes_of_service_errors(tmp_path: Path, home: Path) -> None:
    env = cli_env(home)
    one_line_error(run_cli(["describe-model-packaging-job", "--project-name", "demo", "--job-name", "nope"], env),
                   EXIT_NOT_FOUND, "ResourceNotFoundException")
    one_line_error(run_cli(["create-project", "--project-name", "demo"], env), EXIT_CONFLICT, "ConflictException")


# ---------------------------------------------------------------------------------------------
# 2. liveness of job owners, scratch files


def _proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_process_alive_treats_zombies_and_reused_pids_as_dead() -> None:
    me = owner_id()
    host, pid, ticks = me.split(":")
    assert host == socket.gethostname() and process_alive(int(pid), ticks)
    assert not process_alive(int(pid), str(int(ticks) + 1))  # same pid, another start time: reused
    child = subprocess.Popen(["true"])
    try:
        wait_until(lambda: _proc_state(child.pid) == "Z", 10, "the child to be a zombie", interval=0.01)
        assert not process_alive(child.pid)
    finally:
        child.wait()
    assert not process_alive(child.pid)


class StallingAws(BaseHTTPRequestHandler):
    """One endpoint for greengrassv2 and S3: DescribeComponent says "no such component"; the first
    S3 call (GetBucketLocation, made after the artifact is built) is held open, so the worker waits
    there with its scratch folder full, which is where the test kills it."""

    s3_reached = threading.Event()
    release = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/greengrass/"):
            body = b'{"message": "not found"}'
            self.send_response(404)
            self.send_header("x-amzn-ErrorType", "ResourceNotFoundException")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.s3_reached.set()
        self.release.wait(60)


def test_killed_unreaped_worker_fails_its_job_and_loses_its_scratch(home: Path) -> None:
    """The real worker (`python -m agent.packaging.worker`, started by the process executor of
    this test process, which never reaps it), SIGKILLed mid-job with its scratch files on disk."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), StallingAws)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    env = cli_env(home, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
    settings = PackagingSettings(home=home, mode="aws", account="123456789012", s3_endpoint_url=url,
                                 greengrass_endpoint_url=url)
    worker_pid = 0
    try:
        client = Client(settings=settings, executor="process", env=env)
        job = client.start_model_packaging_job(ProjectName="demo", ModelVersion="1", JobName="victim",
                                               Configuration=greengrass())["JobName"]
        scratch = home / "work" / "demo" / job
        assert StallingAws.s3_reached.wait(60), "the worker never reached S3"
        record = client.registry.get_job("demo", job)
        assert record.status == "RUNNING" and list(scratch.glob("*.zip")), record
        worker_pid = int(record.owner.split(":")[1])
        assert worker_pid != os.getpid()
        os.kill(worker_pid, signal.SIGKILL)
        wait_until(lambda: _proc_state(worker_pid) == "Z", 10, "the worker to be a zombie", interval=0.01)

        began = time.monotonic()
        res = run_cli(["describe-model-packaging-job", "--project-name", "demo", "--job-name", job], env)
        assert res.returncode == 0, res.stderr
        desc = json.loads(res.stdout)["ModelPackagingDescription"]
        assert time.monotonic() - began < 10
        assert desc["Status"] == "FAILED"
        assert desc["StatusMessage"].startswith(f"interrupted: the process running this job ({record.owner}) ended "
                                                "before the job finished (killed or crashed)")
        assert not scratch.exists()
        assert _proc_state(worker_pid) == "Z"  # judged dead while still an unreaped zombie
    finally:
        StallingAws.release.set()
        server.shutdown()
        if worker_pid:
            os.waitpid(worker_pid, 0)


def test_a_running_job_owned_by_a_reused_pid_is_failed(home: Path) -> None:
    client = Client(settings=PackagingSettings(home=home, mode="local"), executor="thread", env={})
    client._executor = type("Held", (), {"submit": lambda *a: None, "wait": lambda *a: True})()
    job = client.start_model_packaging_job(ProjectName="demo", ModelVersion="1", Configuration=greengrass())["JobName"]
    host, pid, ticks = owner_id().split(":")
    impostor = f"{host}:{pid}:{int(ticks) + 7}"  # this live pid, but another process's start time
    assert client.registry.claim_job("demo", job, impostor)
    (home / "work" / "demo" / job).mkdir(parents=True)
    res = run_cli(["list-model-packaging-jobs", "--project-name", "demo"], cli_env(home))
    jobs = json.loads(res.stdout)["ModelPackagingJobs"]
    assert [(j["JobName"], j["Status"]) for j in jobs] == [(job, "FAILED")]
    assert impostor in jobs[0]["StatusMessage"] and not (home / "work" / "demo" / job).exists()


def test_orphaned_scratch_folders_are_removed_at_start_up(home: Path) -> None:
    client = Client(settings=PackagingSettings(home=home, mode="local"), executor="inline", env={})
    done = client.start_model_packaging_job(ProjectName="demo", ModelVersion="1", JobName="done",
                                            Configuration=greengrass())["JobName"]
    assert client.describe_model_packaging_job(ProjectName="demo", JobName=done)[
        "ModelPackagingDescription"]["Status"] == "SUCCEEDED"
    # A live job (owned by this test process) keeps its folder; the others' folders are leftovers.
    client._executor = type("Held", (), {"submit": lambda *a: None, "wait": lambda *a: True})()
    live = client.start_model_packaging_job(ProjectName="demo", ModelVersion="1", JobName="live",
                                            Configuration=greengrass(ComponentVersion="2.0.0"))["JobName"]
    assert client.registry.claim_job("demo", live, owner_id())
    for name in (done, live, "never-a-job"):
        (home / "work" / "demo" / name / "compiled").mkdir(parents=True)
        (home / "work" / "demo" / name / "compiled" / "model.onnx").write_bytes(b"\0" * 1024)
    assert run_cli(["list-projects"], cli_env(home)).returncode == 0
    assert sorted(p.name for p in (home / "work" / "demo").iterdir()) == ["live"]


# ---------------------------------------------------------------------------------------------
# 3. schema version

# The registry's tables exactly as edge-agent 0.1.0 created them (no user_version): frozen here.
V0_SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (
    name TEXT PRIMARY KEY, arn TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    project TEXT NOT NULL, version INTEGER NOT NULL, arn TEXT NOT NULL, status TEXT NOT NULL,
    status_message TEXT NOT NULL, description TEXT NOT NULL, kind TEXT NOT NULL, source TEXT NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (project, version));
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL, name TEXT NOT NULL, model_version TEXT NOT NULL,
    configuration TEXT NOT NULL, description TEXT, status TEXT NOT NULL, status_message TEXT NOT NULL,
    component_name TEXT NOT NULL, component_version TEXT NOT NULL, component_arn TEXT,
    settings TEXT NOT NULL, owner TEXT, heartbeat REAL, created REAL NOT NULL, updated REAL NOT NULL,
    UNIQUE (project, name));
CREATE TABLE IF NOT EXISTS tokens (
    operation TEXT NOT NULL, token TEXT NOT NULL, request_hash TEXT NOT NULL, result TEXT NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (operation, token));
CREATE TABLE IF NOT EXISTS components (
    name TEXT NOT NULL, version TEXT NOT NULL, arn TEXT NOT NULL, project TEXT NOT NULL, job TEXT NOT NULL,
    tags TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (name, version));
"""


def _schema(db_path: Path) -> tuple[int, list[tuple[str, str]]]:
    with sqlite3.connect(db_path) as db:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        objects = db.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' "
                             "ORDER BY type, name").fetchall()
    return version, objects


def test_a_version_0_registry_is_migrated_in_place(tmp_path: Path) -> None:
    home = tmp_path / "old"
    home.mkdir()
    with sqlite3.connect(home / "registry.db") as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(V0_SCHEMA)
        db.execute("INSERT INTO projects VALUES ('legacy', 'arn:aws:lookoutvision:us-east-1:0:project/legacy', 1.0)")
        db.execute("INSERT INTO jobs (project, name, model_version, configuration, description, status, "
                   "status_message, component_name, component_version, component_arn, settings, owner, heartbeat, "
                   "created, updated) VALUES ('legacy', 'old-job', '1', ?, NULL, 'SUCCEEDED', 'done', 'legacy.model', "
                   "'1.0.0', 'arn:x', '{}', NULL, NULL, 1.0, 2.0)", (json.dumps(greengrass()),))
    assert _schema(home / "registry.db")[0] == 0

    env = cli_env(home)
    res = run_cli(["describe-model-packaging-job", "--project-name", "legacy", "--job-name", "old-job"], env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["ModelPackagingDescription"]["StatusMessage"] == "done"
    migrated = _schema(home / "registry.db")
    fresh_home = tmp_path / "fresh"
    assert run_cli(["list-projects"], cli_env(fresh_home)).returncode == 0
    assert migrated == _schema(fresh_home / "registry.db")  # same tables and indexes as a new registry
    assert migrated[0] == SCHEMA_VERSION >= 1 and ("index", "jobs_by_status") in migrated[1]
    assert [p["ProjectName"] for p in json.loads(run_cli(["list-projects"], env).stdout)["Projects"]] == ["legacy"]


def test_a_registry_from_a_newer_edge_agent_is_refused(tmp_path: Path, home: Path) -> None:
    with sqlite3.connect(home / "registry.db") as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    one_line_error(run_cli(["list-projects"], cli_env(home)), EXIT_SERVICE_ERROR,
                   f"has schema version {SCHEMA_VERSION + 1}, written by a newer edge-agent",
                   f"knows versions up to {SCHEMA_VERSION}")
    assert _schema(home / "registry.db")[0] == SCHEMA_VERSION + 1  # left as it was


# ---------------------------------------------------------------------------------------------
# 4. --wait, the agent version, deploy --local


def _model_file(home: Path) -> Path:
    manifest = json.loads((home / "projects" / "demo" / "models" / "1" / "manifest.json").read_text())
    return home / "projects" / "demo" / "models" / "1" / manifest["runtime_artifact"]


def test_start_wait_reports_success_and_failure(home: Path) -> None:
    env = cli_env(home)
    res = run_cli([*start_args(), "--job-name", "good", "--wait"], env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["JobName"] == "good" and out["Status"] == "SUCCEEDED"
    assert out["ComponentVersionArn"].endswith(":components:demo.model:versions:1.0.0")

    with _model_file(home).open("ab") as fh:  # the registry's copy damaged after import
        fh.write(b"\0")
    res = run_cli([*start_args(**{"--configuration": json.dumps(greengrass(ComponentVersion="1.0.1"))}),
                   "--job-name", "bad", "--wait"], env)
    line = one_line_error(res, EXIT_JOB_FAILED, "model packaging job bad FAILED: ")
    out = json.loads(res.stdout)
    assert out["JobName"] == "bad" and out["Status"] == "FAILED" and "sha256" in out["StatusMessage"]
    assert out["StatusMessage"] in line and "ComponentVersionArn" not in out


def test_the_agent_version_built_satisfies_what_model_components_require() -> None:
    assert AGENT_VERSION_REQUIREMENT == compatible_requirement(__version__)
    assert satisfies(__version__, AGENT_VERSION_REQUIREMENT)
    # Every agent version the docs build, and the requirement the docs show, agree with the code.
    built = re.findall(r"build-component[^\n`]*--version\s+(\S+)", (REPO / "docs" / "greengrass.md").read_text())
    assert all(satisfies(v, AGENT_VERSION_REQUIREMENT) for v in built), built
    gdk = json.loads((REPO / "gdk-config.json").read_text())["component"][AGENT_COMPONENT]
    assert gdk["version"] == __version__  # what `gdk component build` builds
    shown = re.findall(r"VersionRequirement: '([^']+)'", (REPO / "docs" / "packaging.md").read_text())
    assert shown == [AGENT_VERSION_REQUIREMENT]


@pytest.mark.parametrize("version, requirement, ok", [
    ("0.1.0", ">=0.1.0 <1.0.0", True), ("1.0.0", ">=0.1.0 <1.0.0", False), ("0.0.9", ">=0.1.0 <1.0.0", False),
    ("1.4.2", "^1.2.0", True), ("2.0.0", "^1.2.0", False), ("0.2.5", "^0.2.1", True), ("0.3.0", "^0.2.1", False),
    ("1.2.9", "~1.2.0", True), ("1.3.0", "~1.2.0", False), ("3.0.0", "1.0.0 || >=3.0.0", True),
    ("1.0.0", "1.0.0", True), ("1.0.1", "=1.0.0", False), ("5.0.0", "*", True), ("1.0.0", ">= 1.0.0", True),
])
def test_version_requirements(version: str, requirement: str, ok: bool) -> None:
    assert satisfies(version, requirement) is ok


def _agent_build(tmp_path: Path, version: str) -> Path:
    """What `scripts/build-component --out DIR` writes: recipes/recipe.yaml (rendered from the
    repository's recipe.yaml) and the wheel under artifacts/<component>/<version>/."""
    from agent.greengrass.recipe import render

    build = tmp_path / "greengrass-build"
    wheel = f"edge_agent-{version}-py3-none-any.whl"
    (build / "recipes").mkdir(parents=True)
    (build / "recipes" / "recipe.yaml").write_text(
        render((REPO / "recipe.yaml").read_text(), version, f"s3://BUCKET_NAME/COMPONENT_NAME/COMPONENT_VERSION/{wheel}"))
    artifacts = build / "artifacts" / AGENT_COMPONENT / version
    artifacts.mkdir(parents=True)
    with zipfile.ZipFile(artifacts / wheel, "w") as zf:
        zf.writestr("agent/__init__.py", f'__version__ = "{version}"\n')
    return build


def test_deploy_local_prints_only_commands_that_work(tmp_path: Path, home: Path) -> None:
    env = cli_env(home)
    deploy = ["deploy", "--local", "--home", str(home)]
    one_line_error(run_cli([*deploy, "--component", "demo.model=1.0.0"], env), EXIT_NOT_FOUND,
                   "component demo.model version 1.0.0 is not in the local component store", "it has: none")
    assert run_cli([*start_args(), "--wait"], env).returncode == 0
    one_line_error(run_cli([*deploy, "--component", "nope.model=1.0.0"], env), EXIT_NOT_FOUND,
                   "nope.model version 1.0.0", "it has: demo.model=1.0.0")

    # The agent the command merges must be in the recipe dir it names: refused, with what to do.
    one_line_error(run_cli([*deploy, "--component", "demo.model=1.0.0"], env), EXIT_NOT_FOUND,
                   f"the agent component {AGENT_COMPONENT} {__version__} is not in the local component store",
                   "scripts/build-component", "--agent-build", "--no-agent")
    res = run_cli([*deploy, "--component", "demo.model=1.0.0", "--no-agent"], env)
    assert res.returncode == 0, res.stderr
    assert AGENT_COMPONENT not in res.stdout and "--merge demo.model=1.0.0" in res.stdout

    # An agent version the model component's VersionRequirement excludes would fail resolution.
    one_line_error(run_cli([*deploy, "--component", "demo.model=1.0.0", "--agent-version", "1.0.0"], env),
                   EXIT_INVALID_REQUEST, f"requires {AGENT_COMPONENT} {AGENT_VERSION_REQUIREMENT}",
                   "--agent-version 1.0.0 does not satisfy")
    one_line_error(run_cli([*deploy, "--component", "demo.model=1.0.0", "--agent-version", "latest"], env),
                   EXIT_INVALID_REQUEST, "--agent-version 'latest' is not a version")

    build = _agent_build(tmp_path, __version__)
    one_line_error(run_cli([*deploy, "--component", "demo.model=1.0.0", "--agent-version", "0.9.0",
                            "--agent-build", str(build)], env), EXIT_INVALID_REQUEST,
                   f"holds {__version__}, not {AGENT_COMPONENT} 0.9.0")
    res = run_cli([*deploy, "--component", "demo.model=1.0.0", "--agent-build", str(build)], env)
    assert res.returncode == 0, res.stderr
    assert f"imported {AGENT_COMPONENT} {__version__}" in res.stderr
    recipes, artifacts = home / "greengrass" / "recipes", home / "greengrass" / "artifacts"
    assert (recipes / f"{AGENT_COMPONENT}-{__version__}.yaml").is_file()
    assert (artifacts / AGENT_COMPONENT / __version__ / f"edge_agent-{__version__}-py3-none-any.whl").is_file()
    assert res.stdout.split() == ["/greengrass/v2/bin/greengrass-cli", "deployment", "create", "--recipeDir",
                                  str(recipes), "--artifactDir", str(artifacts), "--merge", "demo.model=1.0.0",
                                  "--merge", f"{AGENT_COMPONENT}={__version__}"]
    # Once in the store, no --agent-build is needed.
    assert run_cli([*deploy, "--component", "demo.model=1.0.0"], env).returncode == 0


# ---------------------------------------------------------------------------------------------
# 5. the docs


def test_docs_list_every_exit_code() -> None:
    text = (REPO / "docs" / "packaging.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| ([^|]+?) \|", text, re.M))
    assert {int(k): v for k, v in rows.items()} == {code: meaning for code, (meaning, _) in EXIT_CODES.items()}
