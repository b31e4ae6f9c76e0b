"""Where a packaging job's component goes: the artifact zip, and the two output modes.

* local: ``$EDGE_AGENT_HOME/s3/<Bucket>/<Prefix>/<zip>`` (what S3 would hold) plus a tree that
  ``greengrass-cli deployment create --recipeDir … --artifactDir …`` takes:
  ``greengrass/recipes/<Name>-<Version>.yaml`` and ``greengrass/artifacts/<Name>/<Version>/<zip>``.
* aws: the zip uploaded to S3 with boto3 and the component registered with greengrassv2
  CreateComponentVersion (inline recipe); any S3-compatible store works through endpoint_url.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from agent.core.package import safe_relative
from agent.errors import PackageError
from agent.packaging.recipe import AGENT_COMPONENT, render_json, render_yaml

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: the same package gives the same zip bytes


def build_artifact(package_dir: Path, zip_path: Path) -> list[str]:
    """Zip package_dir's files at the archive's top level; returns the member names.

    Members are relative POSIX paths (checked with safe_relative: no absolute paths, no ``..``),
    sorted, with fixed timestamps. Symlinks are refused rather than followed out of the package.
    """
    members: list[tuple[str, Path]] = []
    for path in sorted(package_dir.rglob("*")):
        if path.is_symlink():
            raise PackageError(f"{path} is a symlink; a model package must hold plain files")
        if path.is_file():
            rel = path.relative_to(package_dir).as_posix()
            safe_relative(rel, "archive member")
            members.append((rel, path))
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_name(f".{zip_path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for rel, path in members:
            info = zipfile.ZipInfo(rel, ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with path.open("rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, zip_path)
    return [rel for rel, _ in members]


def check_artifact(zip_path: Path) -> list[str]:
    """The member names of an artifact, refusing any that would land outside the unpack directory."""
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        for name in names:
            safe_relative(name, "archive member")
        if "manifest.json" not in names:
            raise PackageError(f"{zip_path.name} has no manifest.json at its top level")
        bad = zf.testzip()
        if bad is not None:
            raise PackageError(f"{zip_path.name}: member {bad} is corrupt")
    return names


def s3_key(prefix: str, zip_name: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{zip_name}" if prefix else zip_name


@dataclass(frozen=True)
class Publication:
    component_name: str
    component_version: str
    recipe: Mapping[str, Any]
    zip_path: Path
    bucket: str
    prefix: str
    tags: Mapping[str, str]


class Output(Protocol):
    mode: str

    def check_absent(self, name: str, version: str) -> None:
        """Raise RuntimeError if the component version already exists at the destination."""

    def publish(self, pub: Publication, progress: Callable[[str], None]) -> str:
        """Store the artifact and register the component; returns the component version ARN."""


def _atomic_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write(dest: Path, text: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalOutput:
    """The S3 bucket and the Greengrass component store are directories under the home."""

    mode = "local"

    def __init__(self, home: Path, component_arn: Callable[[str, str], str]) -> None:
        self.home = home
        self.component_arn = component_arn

    def recipe_path(self, name: str, version: str) -> Path:
        return self.home / "greengrass" / "recipes" / f"{name}-{version}.yaml"

    def artifact_dir(self, name: str, version: str) -> Path:
        return self.home / "greengrass" / "artifacts" / name / version

    def s3_path(self, bucket: str, prefix: str, zip_name: str) -> Path:
        return self.home / "s3" / bucket / PurePosixPath(s3_key(prefix, zip_name))

    def check_absent(self, name: str, version: str) -> None:
        if self.recipe_path(name, version).exists():
            raise RuntimeError(f"component {name} version {version} already exists ({self.recipe_path(name, version)})")

    def publish(self, pub: Publication, progress: Callable[[str], None]) -> str:
        progress(f"writing the artifact to {self.s3_path(pub.bucket, pub.prefix, pub.zip_path.name)}")
        _atomic_copy(pub.zip_path, self.s3_path(pub.bucket, pub.prefix, pub.zip_path.name))
        _atomic_copy(pub.zip_path, self.artifact_dir(pub.component_name, pub.component_version) / pub.zip_path.name)
        # The recipe last: its presence is what makes the component exist (check_absent).
        _atomic_write(self.recipe_path(pub.component_name, pub.component_version), render_yaml(pub.recipe))
        return self.component_arn(pub.component_name, pub.component_version)


class AwsOutput:
    """S3 + greengrassv2 through boto3 clients (standard credential chain, endpoints configurable)."""

    mode = "aws"

    def __init__(self, s3: Any, greengrass: Any, *, region: str, account: str | Callable[[], str],
                 poll_interval_s: float = 2.0, poll_timeout_s: float = 300.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.s3 = s3
        self.greengrass = greengrass
        self.region = region
        self._account = account
        self.poll_interval_s = poll_interval_s
        self.poll_timeout_s = poll_timeout_s
        self.sleep = sleep
        self.clock = clock

    def account(self) -> str:
        if callable(self._account):
            self._account = self._account()
        return self._account

    def arn(self, name: str, version: str) -> str:
        return f"arn:aws:greengrass:{self.region}:{self.account()}:components:{name}:versions:{version}"

    def check_absent(self, name: str, version: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.greengrass.describe_component(arn=self.arn(name, version))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                return
            raise
        raise RuntimeError(f"component {name} version {version} already exists in AWS IoT Greengrass; choose "
                           "another ComponentVersion")

    def _check_bucket_region(self, bucket: str) -> None:
        location = self.s3.get_bucket_location(Bucket=bucket).get("LocationConstraint") or "us-east-1"
        if location != self.region:
            raise RuntimeError(f"bucket {bucket} is in region {location}, but the component is created in "
                               f"{self.region}; Greengrass needs the artifact bucket in its own region")

    def publish(self, pub: Publication, progress: Callable[[str], None]) -> str:
        key = s3_key(pub.prefix, pub.zip_path.name)
        self._check_bucket_region(pub.bucket)
        progress(f"uploading the artifact to s3://{pub.bucket}/{key}")
        self.s3.upload_file(str(pub.zip_path), pub.bucket, key)
        progress("registering the component with AWS IoT Greengrass")
        kwargs: dict[str, Any] = {"inlineRecipe": render_json(pub.recipe).encode()}
        if pub.tags:
            kwargs["tags"] = dict(pub.tags)
        response = self.greengrass.create_component_version(**kwargs)
        arn = str(response["arn"])
        state = response.get("status", {}).get("componentState")
        deadline = self.clock() + self.poll_timeout_s
        delay = min(0.25, self.poll_interval_s)  # usually DEPLOYABLE within seconds: start short, back off
        while state not in ("DEPLOYABLE", "FAILED"):
            if self.clock() >= deadline:
                raise RuntimeError(f"component {arn} is still {state} after {self.poll_timeout_s:g} s")
            self.sleep(delay)
            delay = min(delay * 2, self.poll_interval_s)
            status = self.greengrass.describe_component(arn=arn).get("status", {})
            state = status.get("componentState")
            response = {"status": status}
        if state == "FAILED":
            status = response.get("status", {})
            raise RuntimeError(f"AWS IoT Greengrass could not create {arn}: {status.get('message', '')} "
                               f"{status.get('errors', {})}".strip())
        return arn


# ---------------------------------------------------------------------------------------------
# Deployments


def deployment_request(
    target_arn: str,
    components: Mapping[str, str],
    *,
    agent_version: str | None,
    agent_component: str = AGENT_COMPONENT,
    deployment_name: str | None = None,
    timeout_s: int = 60,
    failure_handling: str = "ROLLBACK",
) -> dict[str, Any]:
    """CreateDeployment parameters: the model components plus the agent, NOTIFY_COMPONENTS, ROLLBACK.

    NOTIFY_COMPONENTS lets the agent defer the update while it is serving (it hot-swaps models
    rather than restarting); timeout_s bounds how long Greengrass waits for that answer.
    """
    if not components:
        raise ValueError("at least one component NAME=VERSION is needed")
    all_components = dict(components)
    if agent_version and agent_component not in all_components:
        all_components[agent_component] = agent_version
    request: dict[str, Any] = {
        "targetArn": target_arn,
        "components": {name: {"componentVersion": version} for name, version in sorted(all_components.items())},
        "deploymentPolicies": {
            "failureHandlingPolicy": failure_handling,
            "componentUpdatePolicy": {"timeoutInSeconds": int(timeout_s), "action": "NOTIFY_COMPONENTS"},
        },
    }
    if deployment_name:
        request["deploymentName"] = deployment_name
    return request


def create_deployment(greengrass: Any, request: Mapping[str, Any]) -> dict[str, Any]:
    response = greengrass.create_deployment(**request)
    return {k: response[k] for k in ("deploymentId", "iotJobId", "iotJobArn") if k in response}


def local_deployment_command(home: Path, components: Mapping[str, str], *, agent_version: str | None,
                             agent_component: str = AGENT_COMPONENT,
                             cli: str = "/greengrass/v2/bin/greengrass-cli") -> list[str]:
    """The greengrass-cli command that deploys the local tree (the agent from the device's store)."""
    merge: Sequence[str] = [f"{n}={v}" for n, v in sorted(components.items())]
    if agent_version and agent_component not in components:
        merge = [*merge, f"{agent_component}={agent_version}"]
    command = [cli, "deployment", "create", "--recipeDir", str(home / "greengrass" / "recipes"),
               "--artifactDir", str(home / "greengrass" / "artifacts")]
    for item in merge:
        command += ["--merge", item]
    return command
