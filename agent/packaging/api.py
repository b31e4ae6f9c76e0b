"""``agent.packaging.Client``: Lookout for Vision's model packaging API, offline.

Request parameters and response dicts are the ones of boto3's ``lookoutvision`` client
(PascalCase, datetimes for timestamps), so a pipeline script needs only a different client
object. Projects and models come from the local registry (``create_project``, ``create_model``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from agent.core.package import ModelPackage
from agent.packaging.compile import resolve_target
from agent.packaging.errors import (
    ConflictException,
    Exceptions,
    ServiceQuotaExceededException,
    ValidationException,
)
from agent.packaging.jobs import (
    Executor,
    InlineExecutor,
    OutputFactory,
    ProcessExecutor,
    ThreadExecutor,
    default_output_factory,
    new_job_name,
    owner_id,
    recover,
    sweep_scratch,
)
from agent.packaging.output import AwsOutput, LocalOutput
from agent.packaging.recipe import AGENT_COMPONENT, AGENT_VERSION_REQUIREMENT, DEFAULT_PUBLISHER
from agent.packaging.registry import JobRecord, ModelRecord, Registry, default_home

TOKEN_TTL_S = 8 * 3600  # "An idempotency token is active for 8 hours."
PACKAGING_METHOD = "Greengrass"

# Patterns and lengths of the Lookout for Vision API shapes.
PROJECT_NAME = (re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_\-]*$"), 1, 255)
MODEL_VERSION = (re.compile(r"^([1-9][0-9]*|latest)$"), 1, 10)
JOB_NAME = (re.compile(r"^[a-zA-Z0-9-]+$"), 1, 64)
JOB_DESCRIPTION = (re.compile(r"^[a-zA-Z0-9-_. ()':,;?]+$"), 1, 256)
CLIENT_TOKEN = (re.compile(r"^[a-zA-Z0-9-]+$"), 1, 64)
COMPONENT_NAME = (re.compile(r"^[a-zA-Z0-9-_.]+$"), 1, 128)
COMPONENT_VERSION = (re.compile(r"^([0-9]{1,6})\.([0-9]{1,6})\.([0-9]{1,6})$"), 1, 64)
COMPONENT_DESCRIPTION = (re.compile(r"^[a-zA-Z0-9-_. ()':,;?]+$"), 1, 256)
BUCKET = (re.compile(r"^[0-9A-Za-z.\-_]*$"), 3, 63)
PREFIX = (re.compile(r"^([a-zA-Z0-9!_.*'()-][/a-zA-Z0-9!_.*'()-]*)?$"), 0, 1024)
TAG_TEXT = re.compile(r"^[\w\s.:/=+\-@]*$")  # \p{L}\p{Z}\p{N}_.:/=+-@ (\w covers letters, digits, _)
PAGINATION_TOKEN = re.compile(r"^[a-zA-Z0-9/+=]{0,2048}$")
MAX_TAGS = 200

START_KEYS = {"ProjectName", "ModelVersion", "JobName", "Configuration", "Description", "ClientToken"}
GREENGRASS_KEYS = {"CompilerOptions", "TargetDevice", "TargetPlatform", "S3OutputLocation", "ComponentName",
                   "ComponentVersion", "ComponentDescription", "Tags"}


def _check(value: Any, rule: tuple[re.Pattern[str], int, int], where: str, required: bool = True) -> str | None:
    pattern, low, high = rule
    if value is None:
        if required:
            raise ValidationException(f"{where} is required")
        return None
    if not isinstance(value, str):
        raise ValidationException(f"{where} must be a string, got {type(value).__name__}")
    if not low <= len(value) <= high:
        raise ValidationException(f"{where} must be {low} to {high} characters long, got {len(value)}")
    if not pattern.match(value):
        raise ValidationException(f"{where} {value!r} does not match the pattern {pattern.pattern}")
    return value


def _timestamp(value: float) -> datetime:
    return datetime.fromtimestamp(value, tz=timezone.utc)


@dataclass(frozen=True)
class PackagingSettings:
    """Where the registry lives and where components go; from_env reads the usual variables."""

    home: Path
    mode: str = "auto"  # auto | local | aws
    region: str = "us-east-1"
    account: str = ""  # ARN account for local mode; aws mode asks STS when empty
    s3_endpoint_url: str = ""
    greengrass_endpoint_url: str = ""
    publisher: str = DEFAULT_PUBLISHER
    agent_component: str = AGENT_COMPONENT
    agent_version_requirement: str = AGENT_VERSION_REQUIREMENT
    max_active_jobs: int = 10
    stale_after_s: float = 120.0  # a job on another host is dead when its heartbeat is this old
    poll_interval_s: float = 2.0  # describe_component polling after CreateComponentVersion
    poll_timeout_s: float = 300.0
    busy_timeout_s: float = 10.0  # how long a call waits for the registry's write lock (then ThrottlingException)

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> PackagingSettings:
        settings = cls(
            home=default_home(dict(env)),
            mode=env.get("EDGE_AGENT_PACKAGING_MODE", "auto"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            account=env.get("EDGE_AGENT_ACCOUNT_ID", ""),
            s3_endpoint_url=env.get("EDGE_AGENT_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3", ""),
            greengrass_endpoint_url=env.get("EDGE_AGENT_GREENGRASS_ENDPOINT_URL")
            or env.get("AWS_ENDPOINT_URL_GREENGRASSV2", ""),
        )
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def _aws_configured(settings: PackagingSettings) -> bool:
    """auto mode: AWS when an endpoint is configured or boto3 finds credentials, else local."""
    if settings.s3_endpoint_url or settings.greengrass_endpoint_url:
        return True
    try:
        import boto3
    except ImportError:
        return False
    return boto3.session.Session().get_credentials() is not None


class Client:
    """The Lookout for Vision model packaging API over the local registry.

    executor: "thread" (jobs run on threads of this process; the default), "process" (a detached
    worker per job, what the CLI uses), "inline" (start_model_packaging_job returns when the job
    has finished), or a factory (registry, output_factory) -> Executor. s3_client/greengrass_client
    replace the boto3 clients of the aws mode (tests pass stubbed ones).
    """

    exceptions = Exceptions

    def __init__(
        self,
        home: Path | str | None = None,
        *,
        settings: PackagingSettings | None = None,
        executor: str | Callable[[Registry, OutputFactory], Executor] = "thread",
        s3_client: Any = None,
        greengrass_client: Any = None,
        clock: Callable[[], float] = time.time,
        env: Mapping[str, str] | None = None,
        recover_jobs: bool = True,
    ) -> None:
        env = dict(os.environ if env is None else env)
        settings = settings or PackagingSettings.from_env(env)
        if home is not None:
            settings = replace(settings, home=Path(home))
        if settings.mode not in ("auto", "local", "aws"):
            raise ValidationException(f"output mode {settings.mode!r} must be auto, local or aws")
        if settings.mode == "auto" and (s3_client is not None or greengrass_client is not None):
            settings = replace(settings, mode="aws")
        self.settings = settings
        self.registry = Registry(settings.home, clock=clock, region=settings.region,
                                 account=settings.account or "000000000000", busy_timeout_s=settings.busy_timeout_s)
        self._clock = clock
        self._output_factory = self._make_output_factory(s3_client, greengrass_client)
        self._executor = self._make_executor(executor, env)
        if recover_jobs:
            self.recover()
            sweep_scratch(self.registry)  # scratch files of jobs killed before they could clean up

    # -- plumbing --------------------------------------------------------------------------------

    def _make_output_factory(self, s3_client: Any, greengrass_client: Any) -> OutputFactory:
        default = default_output_factory(self.registry, self.settings.poll_interval_s, self.settings.poll_timeout_s)
        if s3_client is None and greengrass_client is None:
            return default

        def make(job: JobRecord) -> Any:
            if job.settings.get("mode") != "aws":
                return LocalOutput(self.registry.home, self.registry.component_arn)
            fallback = default(job) if s3_client is None or greengrass_client is None else None
            return AwsOutput(s3_client or fallback.s3, greengrass_client or fallback.greengrass,  # type: ignore
                             region=self.settings.region, account=self.settings.account or "000000000000",
                             poll_interval_s=self.settings.poll_interval_s,
                             poll_timeout_s=self.settings.poll_timeout_s)

        return make

    def _make_executor(self, kind: str | Callable[[Registry, OutputFactory], Executor],
                       env: Mapping[str, str]) -> Executor:
        if callable(kind):
            return kind(self.registry, self._output_factory)
        if kind == "thread":
            return ThreadExecutor(self.registry, self._output_factory)
        if kind == "inline":
            return InlineExecutor(self.registry, self._output_factory)
        if kind == "process":
            return ProcessExecutor(self.registry, env)
        raise ValueError(f"executor {kind!r} must be thread, process or inline")

    def recover(self) -> None:
        """Fail jobs interrupted by a crash; run again jobs whose creator exited before they started."""
        for job in recover(self.registry, stale_after_s=self.settings.stale_after_s):
            self._executor.submit(job.project, job.name, job.owner)

    def wait_for_jobs(self, timeout: float | None = None) -> bool:
        """Wait for the jobs this client runs (thread/process executors); False on timeout."""
        return self._executor.wait(timeout)

    def output_mode(self) -> str:
        """local or aws; "auto" is decided here, when a job needs it (finding credentials imports boto3)."""
        if self.settings.mode == "auto":
            self.settings = replace(self.settings, mode="aws" if _aws_configured(self.settings) else "local")
        return self.settings.mode

    def _job_settings(self) -> dict[str, Any]:
        s = self.settings
        return {"mode": self.output_mode(), "region": s.region, "account": s.account,
                "s3_endpoint_url": s.s3_endpoint_url, "greengrass_endpoint_url": s.greengrass_endpoint_url,
                "publisher": s.publisher, "agent_component": s.agent_component,
                "agent_version_requirement": s.agent_version_requirement}

    # -- projects and models ---------------------------------------------------------------------

    def create_project(self, *, ProjectName: str, ClientToken: str | None = None) -> dict[str, Any]:  # noqa: N803
        _check(ProjectName, PROJECT_NAME, "ProjectName")
        row = self.registry.create_project(ProjectName)
        return {"ProjectMetadata": self._project(row)}

    def describe_project(self, *, ProjectName: str) -> dict[str, Any]:  # noqa: N803
        _check(ProjectName, PROJECT_NAME, "ProjectName")
        return {"ProjectDescription": self._project(self.registry.get_project(ProjectName))}

    def list_projects(self) -> dict[str, Any]:
        return {"Projects": [self._project(r) for r in self.registry.list_projects()]}

    @staticmethod
    def _project(row: Mapping[str, Any]) -> dict[str, Any]:
        return {"ProjectArn": row["arn"], "ProjectName": row["name"], "CreationTimestamp": _timestamp(row["created"])}

    def create_model(self, *, ProjectName: str, ModelFile: str | Path, Kind: str = "auto",  # noqa: N803
                     Description: str = "", Threshold: float | None = None, ImageSize: tuple[int, int] | None = None,
                     Normalize: str | None = None) -> dict[str, Any]:
        """Import an ONNX model (and its .data file) as the project's next model version.

        Validated first (ONNX checker, loads and runs in ONNX Runtime, outputs recognised for its
        kind); a bad file raises ValidationException and leaves nothing behind.
        """
        _check(ProjectName, PROJECT_NAME, "ProjectName")
        if Description:
            _check(Description, (re.compile(r"^[0-9A-Za-z.\-_ ]*$"), 1, 500), "Description")
        path = Path(ModelFile)
        if not path.is_file():
            raise ValidationException(f"model file {path} does not exist")
        options: dict[str, Any] = {"threshold": Threshold, "image_size": ImageSize, "normalize": Normalize}
        record = self.registry.import_model(ProjectName, path, kind=Kind, description=Description,
                                            build_options=options, validate=_validate_runtime)
        return {"ModelMetadata": self._model(record)}

    def describe_model(self, *, ProjectName: str, ModelVersion: str) -> dict[str, Any]:  # noqa: N803
        _check(ProjectName, PROJECT_NAME, "ProjectName")
        _check(ModelVersion, MODEL_VERSION, "ModelVersion")
        record = self.registry.get_model(ProjectName, ModelVersion)
        package = self.registry.load_model_package(record)
        return {"ModelDescription": {**self._model(record), "ModelKind": package.kind,
                                     "ImageSize": [package.image_width, package.image_height]}}

    def list_models(self, *, ProjectName: str) -> dict[str, Any]:  # noqa: N803
        _check(ProjectName, PROJECT_NAME, "ProjectName")
        return {"Models": [self._model(r) for r in self.registry.list_models(ProjectName)]}

    @staticmethod
    def _model(record: ModelRecord) -> dict[str, Any]:
        return {"CreationTimestamp": _timestamp(record.created), "ModelVersion": str(record.version),
                "ModelArn": record.arn, "Description": record.description, "Status": record.status,
                "StatusMessage": record.status_message}

    # -- packaging jobs --------------------------------------------------------------------------

    def start_model_packaging_job(self, **kwargs: Any) -> dict[str, Any]:
        """StartModelPackagingJob: validate, record the job (CREATED), run it asynchronously."""
        unknown = sorted(set(kwargs) - START_KEYS)
        if unknown:
            raise ValidationException(f"unknown parameter(s) {unknown}; valid: {sorted(START_KEYS)}")
        project = _check(kwargs.get("ProjectName"), PROJECT_NAME, "ProjectName")
        model_version = _check(kwargs.get("ModelVersion"), MODEL_VERSION, "ModelVersion")
        job_name = _check(kwargs.get("JobName"), JOB_NAME, "JobName", required=False)
        description = _check(kwargs.get("Description"), JOB_DESCRIPTION, "Description", required=False)
        token = _check(kwargs.get("ClientToken"), CLIENT_TOKEN, "ClientToken", required=False)
        configuration = _validate_configuration(kwargs.get("Configuration"))
        assert project is not None and model_version is not None
        # The SDKs fill in a fresh token when none is given: such a call is never a retry.
        request_hash = hashlib.sha256(json.dumps({k: v for k, v in kwargs.items() if k != "ClientToken"},
                                                 sort_keys=True, default=str).encode()).hexdigest()
        token = token or str(uuid.uuid4())
        now = self._clock()
        me = owner_id()
        with self.registry.transaction() as db:
            seen = self.registry.find_token(db, "StartModelPackagingJob", token, TOKEN_TTL_S)
            if seen is not None:
                if seen["request_hash"] != request_hash:
                    raise ConflictException(f"ClientToken {token!r} was used within the last 8 hours with different "
                                            "parameters; use a new token for a new request")
                return dict(json.loads(seen["result"]))
            model = self.registry.get_model(project, model_version, db)
            gg = configuration["Greengrass"]
            component_version = gg.get("ComponentVersion") or f"{model.version}.0.0"
            gg["ComponentVersion"] = component_version
            name = job_name or new_job_name()
            if db.execute("SELECT 1 FROM jobs WHERE project=? AND name=?", (project, name)).fetchone():
                raise ConflictException(f"a model packaging job named {name!r} already exists in project "
                                        f"{project!r}")
            taken = self.registry.component_taken(db, gg["ComponentName"], component_version)
            if taken:
                raise ConflictException(f"{taken}; you can't create a model component with the same component "
                                        "name and component version as an existing component")
            if self.registry.count_active(db) >= self.settings.max_active_jobs:
                raise ServiceQuotaExceededException(f"{self.settings.max_active_jobs} model packaging jobs are "
                                                    "already active; wait for one to finish")
            self.registry.insert_job(db, JobRecord(
                project=project, name=name, model_version=str(model.version), configuration=configuration,
                description=description, status="CREATED", status_message="the job is waiting to run",
                component_name=gg["ComponentName"], component_version=component_version, component_arn=None,
                settings=self._job_settings(), owner=me, heartbeat=now, created=now, updated=now))
            result = {"JobName": name}
            self.registry.save_token(db, "StartModelPackagingJob", token, request_hash, result)
        self._executor.submit(project, name, me)
        return result

    def describe_model_packaging_job(self, *, ProjectName: str, JobName: str) -> dict[str, Any]:  # noqa: N803
        _check(ProjectName, PROJECT_NAME, "ProjectName")
        _check(JobName, JOB_NAME, "JobName")
        self._recover_if_stuck(ProjectName, JobName)
        job = self.registry.get_job(ProjectName, JobName)
        return {"ModelPackagingDescription": self._describe(job)}

    def _recover_if_stuck(self, project: str, name: str) -> None:
        """Describe never shows a crashed job as RUNNING: check its owner first (cheap: one row)."""
        job = self.registry.get_job(project, name)
        if job.status in ("CREATED", "RUNNING"):
            self.recover()

    def _describe(self, job: JobRecord) -> dict[str, Any]:
        out: dict[str, Any] = {"ComponentName": job.component_name, "ComponentVersion": job.component_version}
        if job.component_arn:
            out["ComponentVersionArn"] = job.component_arn
        desc: dict[str, Any] = {
            "JobName": job.name,
            "ProjectName": job.project,
            "ModelVersion": job.model_version,
            "ModelPackagingConfiguration": job.configuration,
            "ModelPackagingMethod": PACKAGING_METHOD,
            "ModelPackagingOutputDetails": {"Greengrass": out},
            "Status": job.status,
            "StatusMessage": job.status_message,
            "CreationTimestamp": _timestamp(job.created),
            "LastUpdatedTimestamp": _timestamp(job.updated),
        }
        if job.description:
            desc["ModelPackagingJobDescription"] = job.description
        return desc

    def list_model_packaging_jobs(self, *, ProjectName: str, NextToken: str | None = None,  # noqa: N803
                                  MaxResults: int | None = None) -> dict[str, Any]:  # noqa: N803
        _check(ProjectName, PROJECT_NAME, "ProjectName")
        limit = 100 if MaxResults is None else MaxResults
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100:
            raise ValidationException(f"MaxResults must be an integer from 1 to 100, got {MaxResults!r}")
        after = 0
        if NextToken is not None:
            after = _decode_token(NextToken, ProjectName)
        jobs, next_seq = self.registry.list_jobs(ProjectName, after, limit)
        response: dict[str, Any] = {"ModelPackagingJobs": [
            {k: v for k, v in {
                "JobName": j.name, "ProjectName": j.project, "ModelVersion": j.model_version,
                "ModelPackagingJobDescription": j.description, "ModelPackagingMethod": PACKAGING_METHOD,
                "Status": j.status, "StatusMessage": j.status_message,
                "CreationTimestamp": _timestamp(j.created), "LastUpdatedTimestamp": _timestamp(j.updated),
            }.items() if v is not None} for j in jobs]}
        if next_seq is not None:
            response["NextToken"] = _encode_token(next_seq, ProjectName)
        return response

    def wait_for_job(self, ProjectName: str, JobName: str, timeout: float | None = 300.0,  # noqa: N803
                     poll_s: float = 0.1) -> dict[str, Any]:
        """Describe until SUCCEEDED/FAILED (a waiter, like boto3's); raises TimeoutError.

        timeout None waits as long as the job's owner lives: describe marks a job whose owner died
        FAILED, so this ends unless a live process keeps running the job.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            desc = self.describe_model_packaging_job(ProjectName=ProjectName, JobName=JobName)
            if desc["ModelPackagingDescription"]["Status"] in ("SUCCEEDED", "FAILED"):
                return desc
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {JobName} is still {desc['ModelPackagingDescription']['Status']} after "
                                   f"{timeout:g} s")
            time.sleep(poll_s)


def _encode_token(seq: int, project: str) -> str:
    return base64.b64encode(json.dumps({"p": project, "s": seq}).encode()).decode()


def _decode_token(token: str, project: str) -> int:
    if not isinstance(token, str) or not PAGINATION_TOKEN.match(token):
        raise ValidationException("NextToken is not a token returned by ListModelPackagingJobs")
    try:
        value = json.loads(base64.b64decode(token, validate=True))
        if value["p"] != project:
            raise ValueError
        return int(value["s"])
    except (ValueError, KeyError, TypeError):
        raise ValidationException("NextToken is not a token returned by ListModelPackagingJobs for this "
                                  "project") from None


def _validate_runtime(package: ModelPackage) -> None:
    """The model loads and runs in ONNX Runtime (CPU) with the outputs its kind needs."""
    import numpy as np
    import onnxruntime as ort

    from agent.errors import PackageError

    try:
        session = ort.InferenceSession(str(package.model_file), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise PackageError(f"ONNX Runtime can't load the model: {str(exc).splitlines()[0]}") from None
    names = {o.name for o in session.get_outputs()}
    missing = [n for n in package.outputs.values() if n not in names]
    if missing:
        raise PackageError(f"the model lacks the outputs {missing}")
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    shape[2:4] = [package.image_height, package.image_width]
    try:
        session.run(None, {inp.name: np.zeros(shape, np.float32)})
    except Exception as exc:
        raise PackageError(f"the model fails to run on a {package.image_width}x{package.image_height} image: "
                           f"{str(exc).splitlines()[0]}") from None


def _validate_configuration(configuration: Any) -> dict[str, Any]:
    """Every rule of the StartModelPackagingJob page for Configuration; returns a deep copy."""
    if configuration is None:
        raise ValidationException("Configuration is required")
    if not isinstance(configuration, Mapping):
        raise ValidationException("Configuration must be an object")
    extra = sorted(set(configuration) - {"Greengrass"})
    if extra:
        raise ValidationException(f"Configuration has unknown keys {extra}")
    gg = configuration.get("Greengrass")
    if gg is None:
        raise ValidationException("Configuration.Greengrass is required")
    if not isinstance(gg, Mapping):
        raise ValidationException("Configuration.Greengrass must be an object")
    gg = json.loads(json.dumps(gg))
    extra = sorted(set(gg) - GREENGRASS_KEYS)
    if extra:
        raise ValidationException(f"Configuration.Greengrass has unknown keys {extra}")
    where = "Configuration.Greengrass"
    _check(gg.get("ComponentName"), COMPONENT_NAME, f"{where}.ComponentName")
    if not gg["ComponentName"][0].isalnum():
        # The agent ignores hidden entries of its models directory (where Install links the model).
        raise ValidationException(f"{where}.ComponentName must start with a letter or digit")
    _check(gg.get("ComponentVersion"), COMPONENT_VERSION, f"{where}.ComponentVersion", required=False)
    _check(gg.get("ComponentDescription"), COMPONENT_DESCRIPTION, f"{where}.ComponentDescription", required=False)
    location = gg.get("S3OutputLocation")
    if location is None:
        raise ValidationException(f"{where}.S3OutputLocation is required")
    if not isinstance(location, dict):
        raise ValidationException(f"{where}.S3OutputLocation must be an object with Bucket and Prefix")
    extra = sorted(set(location) - {"Bucket", "Prefix"})
    if extra:
        raise ValidationException(f"{where}.S3OutputLocation has unknown keys {extra}")
    _check(location.get("Bucket"), BUCKET, f"{where}.S3OutputLocation.Bucket")
    if location["Bucket"] in (".", "..") or set(location["Bucket"]) == {"."}:
        raise ValidationException(f"{where}.S3OutputLocation.Bucket {location['Bucket']!r} is not a bucket name")
    prefix = _check(location.get("Prefix"), PREFIX, f"{where}.S3OutputLocation.Prefix", required=False)
    if prefix and any(part in ("..", ".") for part in PurePosixPath(prefix).parts):
        # Allowed by the S3 key pattern, but the local output maps the prefix to directories.
        raise ValidationException(f"{where}.S3OutputLocation.Prefix {prefix!r} must not contain '.' or '..' "
                                  "segments")
    tags = gg.get("Tags")
    if tags is not None:
        if not isinstance(tags, list) or len(tags) > MAX_TAGS:
            raise ValidationException(f"{where}.Tags must be a list of at most {MAX_TAGS} {{Key, Value}} objects")
        keys = set()
        for i, tag in enumerate(tags):
            if not isinstance(tag, dict) or set(tag) - {"Key", "Value"} or "Key" not in tag or "Value" not in tag:
                raise ValidationException(f"{where}.Tags[{i}] must be an object with Key and Value")
            key, value = tag["Key"], tag["Value"]
            if not isinstance(key, str) or not 1 <= len(key) <= 128 or not TAG_TEXT.match(key):
                raise ValidationException(f"{where}.Tags[{i}].Key {key!r} must be 1-128 letters, digits, spaces or "
                                          "_.:/=+-@")
            if key.lower().startswith("aws:"):
                raise ValidationException(f"{where}.Tags[{i}].Key {key!r}: the aws: prefix is reserved")
            if not isinstance(value, str) or len(value) > 256 or not TAG_TEXT.match(value):
                raise ValidationException(f"{where}.Tags[{i}].Value must be at most 256 letters, digits, spaces or "
                                          "_.:/=+-@")
            if key in keys:
                raise ValidationException(f"{where}.Tags has the key {key!r} twice")
            keys.add(key)
    resolve_target(gg)  # TargetDevice XOR TargetPlatform, CompilerOptions rules
    return {"Greengrass": gg}
