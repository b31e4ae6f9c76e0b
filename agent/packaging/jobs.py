"""Running packaging jobs: CREATED → RUNNING → SUCCEEDED | FAILED, persisted, crash-safe.

A job is executed by whoever *claims* it (an atomic CREATED → RUNNING update naming the owner:
host, pid, process start time). The Python API runs jobs on threads of the calling process; the
CLI hands them to a detached worker process (``python -m agent.packaging.worker``) so the command
returns at once. A running owner refreshes the job's heartbeat. Any Client that opens the
registry recovers jobs whose owner is gone: a RUNNING one becomes FAILED ("interrupted"), a
CREATED one (its creator exited before a worker claimed it) is run again. So no job stays
RUNNING after a crash: an owner is alive only while /proc shows its pid, with the same start time,
in a state other than zombie (a killed worker nobody reaps is dead). A job's scratch folder
(work/<project>/<job>) goes when the job ends or is marked FAILED, and at start-up for any folder
no active job owns.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from agent.core.package import MANIFEST, load_package, sha256_file
from agent.errors import AgentError
from agent.packaging.compile import compile_model, resolve_target
from agent.packaging.errors import LookoutVisionError
from agent.packaging.output import AwsOutput, LocalOutput, Output, Publication, build_artifact, check_artifact, s3_key
from agent.packaging.recipe import artifact_name, model_component_recipe
from agent.packaging.registry import JobRecord, Registry

log = logging.getLogger(__name__)

OutputFactory = Callable[[JobRecord], Output]


# ---------------------------------------------------------------------------------------------
# Owners and liveness


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) from /proc/<pid>/stat; None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and ')': the fields after its last ')' are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], fields[19]  # field 3: state; field 22: starttime


def _start_ticks(pid: int) -> str:
    """The process start time from /proc (guards against pid reuse); "" where /proc is missing."""
    stat = _proc_stat(pid)
    return stat[1] if stat else ""


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def process_alive(pid: int, start_ticks: str = "") -> bool:
    """Is pid a running process (and the same one, when its start time is known)?

    A zombie (state Z: exited, not yet reaped by its parent) or a dead task (X) is dead: a killed
    job worker whose parent never waits for it must not keep its job RUNNING. A pid reused by a
    process with another start time is dead too. Without /proc, os.kill(pid, 0) is all there is.
    """
    if pid <= 0:
        return False
    stat = _proc_stat(pid)
    if stat is not None:
        state, ticks = stat
        return state not in ("Z", "X", "x") and (not start_ticks or ticks == start_ticks)
    if Path("/proc/self/stat").exists():
        return False  # /proc works here and has no such pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_alive(owner: str | None, heartbeat: float | None, now: float, stale_after_s: float) -> bool:
    """Is the process named by owner (host:pid:start ticks) still running? Other hosts: by the heartbeat."""
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text, _, ticks = rest.partition(":")
    if host != socket.gethostname():
        return heartbeat is not None and now - heartbeat < stale_after_s
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    return process_alive(pid, ticks)


def scratch_dir(registry: Registry, project: str, name: str) -> Path:
    """Where a job builds its package (work/<project>/<job>): removed when the job ends, however it ends."""
    return registry.home / "work" / project / name


def remove_scratch(registry: Registry, project: str, name: str) -> None:
    # The project folder stays: removing it could race with another job of the project creating its own.
    shutil.rmtree(scratch_dir(registry, project, name), ignore_errors=True)


def recover(registry: Registry, *, stale_after_s: float) -> list[JobRecord]:
    """Fail RUNNING jobs whose owner is gone (removing their scratch files); return CREATED jobs
    whose creator is gone (to re-run)."""
    orphans: list[JobRecord] = []
    now = registry.clock()
    for job in registry.active_jobs():
        if owner_alive(job.owner, job.heartbeat, now, stale_after_s):
            continue
        if job.status == "RUNNING":
            if registry.fail_job(job.project, job.name,
                                 f"interrupted: the process running this job ({job.owner}) ended before the job "
                                 "finished (killed or crashed); start a new job", only_owner=job.owner):
                log.warning("packaging job %s/%s was interrupted by a crash; marked FAILED", job.project, job.name)
                remove_scratch(registry, job.project, job.name)
        else:
            orphans.append(job)
    return orphans


def sweep_scratch(registry: Registry) -> list[Path]:
    """Remove scratch folders no active job owns (left by a crash before this version cleaned up,
    or by a job marked FAILED elsewhere); returns what was removed.

    The folders are listed *before* the active jobs are read: a job claimed in between has its
    folder missing from the list (never removed), and one listed but absent from the active set
    had already ended (a job's folder is made only after its claim).
    """
    root = registry.home / "work"
    found: list[Path] = []
    try:
        for project_dir in root.iterdir():
            if project_dir.is_dir():
                found.extend(j for j in project_dir.iterdir() if j.is_dir())
    except OSError:
        pass
    if not found:
        return []
    active = {(j.project, j.name) for j in registry.active_jobs()}
    removed = []
    for job_dir in found:
        if (job_dir.parent.name, job_dir.name) not in active:
            remove_scratch(registry, job_dir.parent.name, job_dir.name)
            removed.append(job_dir)
    return removed


# ---------------------------------------------------------------------------------------------
# The job itself


def default_output_factory(registry: Registry, poll_interval_s: float = 2.0,
                           poll_timeout_s: float = 300.0) -> OutputFactory:
    """Outputs from the settings saved with the job (so a worker process or a resumed job agrees)."""

    def make(job: JobRecord) -> Output:
        settings = job.settings
        if settings.get("mode") == "aws":
            import boto3

            session = boto3.session.Session(region_name=settings["region"])
            s3 = session.client("s3", endpoint_url=settings.get("s3_endpoint_url") or None)
            gg = session.client("greengrassv2", endpoint_url=settings.get("greengrass_endpoint_url") or None)
            account = settings.get("account") or (
                lambda: session.client("sts").get_caller_identity()["Account"])
            return AwsOutput(s3, gg, region=settings["region"], account=account, poll_interval_s=poll_interval_s,
                             poll_timeout_s=poll_timeout_s)
        return LocalOutput(registry.home, registry.component_arn)

    return make




class _Heartbeat:
    """Refreshes the job's heartbeat while it runs, so other hosts can tell it is alive."""

    def __init__(self, beat: Callable[[], bool], interval_s: float) -> None:
        self._beat = beat
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="packaging-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                if not self._beat():
                    return
            except AgentError:
                continue  # a busy registry: try again next time

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run_job(registry: Registry, project: str, name: str, *, expected_owner: str | None,
            output_factory: OutputFactory, heartbeat_s: float = 5.0, owner: str | None = None) -> bool:
    """Claim the job and run it to SUCCEEDED or FAILED; False if someone else had claimed it."""
    me = owner or owner_id()
    if not registry.claim_job(project, name, me, expected_owner=expected_owner):
        return False
    work = scratch_dir(registry, project, name)
    try:
        with _Heartbeat(lambda: registry.update_job(project, name, me, heartbeat_only=True), heartbeat_s):
            arn, mode = _package(registry, registry.get_job(project, name), work, me, output_factory)
        job = registry.get_job(project, name)
        registry.update_job(project, name, me, status="SUCCEEDED", component_arn=arn,
                            message=f"component {job.component_name} version {job.component_version} created "
                                    f"({mode} output)")
    except LookoutVisionError as exc:
        registry.fail_job(project, name, exc.message, only_owner=me)
    except AgentError as exc:  # PackageError etc. from the core
        registry.fail_job(project, name, exc.message, only_owner=me)
    except Exception as exc:  # noqa: BLE001 - any failure must end the job FAILED with a message, not RUNNING
        log.exception("packaging job %s/%s failed", project, name)
        registry.fail_job(project, name, _describe(exc), only_owner=me)
    finally:
        remove_scratch(registry, project, name)
    return True


def _describe(exc: Exception) -> str:
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # boto3 is only needed for the aws output mode
        BotoCoreError = ClientError = ()  # type: ignore[assignment,misc] # noqa: N806
    if ClientError and isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{exc.operation_name} failed: {err.get('Code')}: {err.get('Message')}"
    if BotoCoreError and isinstance(exc, BotoCoreError):
        return f"AWS request failed: {exc}"
    if isinstance(exc, OSError):
        return f"I/O error: {exc}"
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, RuntimeError) else f"internal error: {type(exc).__name__}: {text}"


def _package(registry: Registry, job: JobRecord, work: Path, me: str,
             output_factory: OutputFactory) -> tuple[str, str]:
    def progress(message: str) -> None:
        registry.update_job(job.project, job.name, me, message=message)

    gg = job.configuration["Greengrass"]
    target = resolve_target(gg)
    model = registry.get_model(job.project, job.model_version)
    source = registry.load_model_package(model)
    source.verify_files()
    output = output_factory(job)
    # Refuse before writing anything: uploading over an existing version's artifact would break it.
    output.check_absent(job.component_name, job.component_version)

    progress(f"compiling for {target.os}/{target.architecture} ({target.accelerator})")
    if work.exists():
        shutil.rmtree(work)
    compiled = compile_model(source, target, work / "compiled")

    progress("building the model package")
    package_dir = work / "package"
    package_dir.mkdir(parents=True)
    files = {}
    for rel in compiled.files:
        dest = package_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(compiled.model_file.parent / rel, dest)
        files[rel] = sha256_file(dest)
    doc = json.loads((source.root / MANIFEST).read_text())
    doc.update({
        "name": job.component_name,  # the agent serves the model under the component's name
        "model_version": str(model.version),
        "lookout_vision_model_arn": model.arn,
        "description": gg.get("ComponentDescription") or model.description,
        "runtime_artifact": compiled.model_file.name,
        "files": files,
        "execution": compiled.execution,
        "compilation": compiled.record,
        "autostart": False,
        "component": {"name": job.component_name, "version": job.component_version,
                      "project": job.project, "packaging_job": job.name},
    })
    (package_dir / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")
    load_package(package_dir).verify_files()  # the agent's own rules, before anything leaves this machine

    zip_name = artifact_name(job.component_name, job.component_version)
    zip_path = work / zip_name
    build_artifact(package_dir, zip_path)
    check_artifact(zip_path)
    bucket = gg["S3OutputLocation"]["Bucket"]
    prefix = gg["S3OutputLocation"].get("Prefix", "") or ""
    settings = job.settings
    recipe = model_component_recipe(
        component_name=job.component_name,
        component_version=job.component_version,
        artifact_uri=f"s3://{bucket}/{s3_key(prefix, zip_name)}",
        architecture=target.architecture,
        os=target.os,
        description=gg.get("ComponentDescription") or f"Model {job.project} version {model.version} for the edge "
                                                      "agent",
        publisher=settings.get("publisher", "edge-agent"),
        autostart=False,
        **({"agent_component": settings["agent_component"]} if settings.get("agent_component") else {}),
        **({"agent_version_requirement": settings["agent_version_requirement"]}
           if settings.get("agent_version_requirement") else {}),
    )
    tags = {t["Key"]: t["Value"] for t in gg.get("Tags", [])}
    arn = output.publish(Publication(job.component_name, job.component_version, recipe, zip_path, bucket, prefix,
                                     tags), progress)
    return arn, output.mode


# ---------------------------------------------------------------------------------------------
# Executors: who runs a claimed job


class Executor(Protocol):
    def submit(self, project: str, name: str, expected_owner: str | None) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class InlineExecutor:
    """Runs the job inside submit() (tests, `--wait`)."""

    def __init__(self, registry: Registry, output_factory: OutputFactory) -> None:
        self.registry = registry
        self.output_factory = output_factory

    def submit(self, project: str, name: str, expected_owner: str | None) -> None:
        run_job(self.registry, project, name, expected_owner=expected_owner, output_factory=self.output_factory)

    def wait(self, timeout: float | None = None) -> bool:
        return True


class ThreadExecutor:
    """One non-daemon thread per job: the interpreter waits for running jobs before it exits."""

    def __init__(self, registry: Registry, output_factory: OutputFactory) -> None:
        self.registry = registry
        self.output_factory = output_factory
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, project: str, name: str, expected_owner: str | None) -> None:
        thread = threading.Thread(
            target=run_job, args=(self.registry, project, name),
            kwargs={"expected_owner": expected_owner, "output_factory": self.output_factory},
            name=f"packaging-job-{name}")
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Join the jobs started here; False if some still run after timeout seconds."""
        with self._lock:
            threads = list(self._threads)
        deadline = None if timeout is None else self.registry.clock() + timeout
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - self.registry.clock()))
        return not any(t.is_alive() for t in threads)


class ProcessExecutor:
    """A detached worker process per job, so the CLI returns while the job runs."""

    def __init__(self, registry: Registry, env: Mapping[str, str]) -> None:
        self.registry = registry
        self.env = dict(env)
        self._procs: list[subprocess.Popen[bytes]] = []

    def submit(self, project: str, name: str, expected_owner: str | None) -> None:
        logs = self.registry.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        root = str(Path(__file__).resolve().parents[2])  # the directory holding the agent package
        env = {**self.env, "PYTHONPATH": os.pathsep.join(p for p in (root, self.env.get("PYTHONPATH", "")) if p)}
        command = [sys.executable, "-m", "agent.packaging.worker", "--home", str(self.registry.home),
                   "--project", project, "--job", name, "--region", self.registry.region,
                   "--account", self.registry.account]
        if expected_owner:
            command += ["--expect-owner", expected_owner]
        with (logs / f"{project}.{name}.log").open("ab") as log_file:
            self._procs.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                                stderr=subprocess.STDOUT, env=env, start_new_session=True))

    def wait(self, timeout: float | None = None) -> bool:
        try:
            for proc in self._procs:
                proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True


def new_job_name() -> str:
    return f"model-packaging-job-{uuid.uuid4().hex[:20]}"

