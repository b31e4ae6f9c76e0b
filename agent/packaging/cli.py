"""AWS-CLI-shaped commands: ``edge-agent start-model-packaging-job --project-name P ...``.

Each API command takes its parameters as ``--kebab-case`` options and/or ``--cli-input-json``
(JSON text or ``file://path``, PascalCase keys; options given on the command line win). The
response JSON goes to stdout; errors raise LookoutVisionError, which ``agent.cli.main`` prints as
``edge-agent: <ExceptionName>: <message>`` on stderr with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from agent import __version__
from agent.packaging.errors import ValidationException

Param = tuple[str, str, str]  # (--flag, PascalCaseKey, kind: str | int | json)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _print(response: Any) -> None:
    print(json.dumps(response, indent=4, default=_json_default))


def read_input_json(text: str) -> dict[str, Any]:
    """--cli-input-json: JSON text or file://path (as the AWS CLI takes it)."""
    if text.startswith("file://"):
        path = Path(text[len("file://"):]).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValidationException(f"--cli-input-json: cannot read {path}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationException(f"--cli-input-json is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValidationException("--cli-input-json must be a JSON object of the request's parameters")
    return value


def _json_option(flag: str, text: str) -> Any:
    if text.startswith("file://"):
        text = Path(text[len("file://"):]).expanduser().read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationException(f"{flag} is not valid JSON: {exc}") from None


def gather(args: argparse.Namespace, params: Sequence[Param]) -> dict[str, Any]:
    """--cli-input-json first, then each option given on the command line over it."""
    request = read_input_json(args.cli_input_json) if args.cli_input_json else {}
    for flag, key, kind in params:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if kind == "json":
            value = _json_option(flag, value)
        request[key] = value
    return request


def _client(args: argparse.Namespace, executor: str = "process") -> Any:
    # "process": a job this call starts or resumes (crash recovery) runs in a detached worker, so
    # the command returns at once instead of waiting for it at interpreter exit.
    from agent.packaging.api import Client, PackagingSettings

    settings = PackagingSettings.from_env(
        os.environ, mode=args.output_mode, region=args.region, account=args.account_id,
        s3_endpoint_url=args.endpoint_url, greengrass_endpoint_url=args.greengrass_endpoint_url)
    if args.home:
        settings = PackagingSettings(**{**settings.__dict__, "home": Path(args.home)})
    return Client(settings=settings, executor=executor)


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("registry and output")
    g.add_argument("--home", help="registry directory (default: $EDGE_AGENT_HOME, else ~/.local/share/edge-agent)")
    g.add_argument("--output-mode", choices=["auto", "local", "aws"],
                   help="where components go (default: $EDGE_AGENT_PACKAGING_MODE, else auto: aws when AWS "
                        "credentials or an endpoint are configured, else local)")
    g.add_argument("--region", help="AWS region (default: $AWS_REGION, else us-east-1)")
    g.add_argument("--account-id", help="account id in local ARNs (default: $EDGE_AGENT_ACCOUNT_ID)")
    g.add_argument("--endpoint-url", help="S3 endpoint URL (any S3-compatible store)")
    g.add_argument("--greengrass-endpoint-url", help="greengrassv2 endpoint URL")


#: Request keys each command cannot do without (the API raises a TypeError/ValidationException without them):
#: shown as required in --help, and checked with a message naming the option.
REQUIRED: dict[str, tuple[str, ...]] = {
    "create-project": ("ProjectName",),
    "describe-project": ("ProjectName",),
    "create-model": ("ProjectName", "ModelFile"),
    "describe-model": ("ProjectName", "ModelVersion"),
    "list-models": ("ProjectName",),
    "start-model-packaging-job": ("ProjectName", "ModelVersion", "Configuration"),
    "describe-model-packaging-job": ("ProjectName", "JobName"),
    "list-model-packaging-jobs": ("ProjectName",),
}
#: Options with a fixed set of values (listed in --help, checked by argparse).
CHOICES: dict[str, tuple[str, ...]] = {
    "--kind": ("auto", "anomalib", "anomalib_v1", "classification", "segmentation"),
    "--normalize": ("imagenet",),
}


def _api_command(sub: Any, name: str, help_text: str, params: Sequence[Param],
                 call: Callable[[Any, dict[str, Any], argparse.Namespace], Any],
                 extra: Callable[[argparse.ArgumentParser], object] | None = None) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    required = REQUIRED.get(name, ())
    needed = p.add_argument_group("required (on the command line or in --cli-input-json)") if required else p
    for flag, key, kind in params:
        (needed if key in required else p).add_argument(
            flag, type=int if kind == "int" else str, default=None, choices=CHOICES.get(flag),
            help=f"{key}{' (JSON text or file://path)' if kind == 'json' else ''}"
                 f"{' (required)' if key in required else ''}")
    p.add_argument("--cli-input-json", help="the request as JSON text or file://path (PascalCase keys)")
    if extra:
        extra(p)
    _common(p)

    def run(args: argparse.Namespace) -> int:
        request = gather(args, params)
        missing = [flag for flag, key, _ in params if key in required and key not in request]
        if missing:
            keys = ", ".join(k for f, k, _ in params if f in missing)
            raise ValidationException(f"{name} needs {', '.join(missing)} (or {keys} in --cli-input-json)")
        _print(call(args, request, args))
        return 0

    p.set_defaults(func=run)


def _start(args: argparse.Namespace, request: dict[str, Any], _: argparse.Namespace) -> Any:
    # The CLI exits right away, so the job runs in a detached worker process (or here, with --wait).
    client = _client(args, executor="inline" if args.wait else "process")
    return client.start_model_packaging_job(**request)


def _create_model(args: argparse.Namespace, request: dict[str, Any], _: argparse.Namespace) -> Any:
    size = None
    if "ImageSize" in request:
        w, _sep, h = str(request.pop("ImageSize")).partition("x")
        try:
            size = (int(w), int(h))
        except ValueError:
            raise ValidationException("--image-size must be WIDTHxHEIGHT, e.g. 256x256") from None
    if "Threshold" in request:
        try:
            request["Threshold"] = float(request["Threshold"])
        except ValueError:
            raise ValidationException("--threshold must be a number") from None
    return _client(args).create_model(**request, **({"ImageSize": size} if size else {}))


def _deploy(args: argparse.Namespace) -> int:
    from agent.packaging.output import create_deployment, deployment_request, local_deployment_command
    from agent.packaging.registry import default_home

    components: dict[str, str] = {}
    for item in args.component:
        name, sep, version = item.partition("=")
        if not sep or not name or not version:
            raise ValidationException(f"--component {item!r} must be NAME=VERSION")
        components[name] = version
    agent_version = None if args.no_agent else args.agent_version
    if args.local:
        home = Path(args.home) if args.home else default_home(dict(os.environ))
        print(shlex.join(local_deployment_command(home, components, agent_version=agent_version)))
        return 0
    if not args.target_arn:
        raise ValidationException("--target-arn (a thing or thing group ARN) is required, or use --local")
    request = deployment_request(args.target_arn, components, agent_version=agent_version,
                                 deployment_name=args.deployment_name, timeout_s=args.timeout)
    import boto3

    region = args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    gg = boto3.session.Session(region_name=region).client(
        "greengrassv2", endpoint_url=args.greengrass_endpoint_url or None)
    _print(create_deployment(gg, request))
    return 0


def register_model_queries(subparsers: Any) -> None:
    """The registry's describe-model / list-models options (agent/cli/models.py dispatches: with --project-name
    or --cli-input-json the registry answers, otherwise the agent on --socket)."""
    _api_command(subparsers, "describe-model", "describe a model version",
                 [("--project-name", "ProjectName", "str"), ("--model-version", "ModelVersion", "str")],
                 lambda a, r, _: _client(a).describe_model(**r))
    _api_command(subparsers, "list-models", "list a project's model versions",
                 [("--project-name", "ProjectName", "str")], lambda a, r, _: _client(a).list_models(**r))


def register(subparsers: Any) -> None:
    """Add the registry, packaging and deploy sub-commands to the edge-agent parser."""
    _api_command(subparsers, "create-project", "create a project in the local model registry",
                 [("--project-name", "ProjectName", "str")],
                 lambda a, r, _: _client(a).create_project(**r))
    _api_command(subparsers, "describe-project", "describe a project", [("--project-name", "ProjectName", "str")],
                 lambda a, r, _: _client(a).describe_project(**r))
    _api_command(subparsers, "list-projects", "list the registry's projects", [],
                 lambda a, r, _: _client(a).list_projects(**r))
    _api_command(
        subparsers, "create-model", "import an ONNX model (with its .data file) as the project's next model version",
        [("--project-name", "ProjectName", "str"), ("--onnx", "ModelFile", "str"), ("--kind", "Kind", "str"),
         ("--description", "Description", "str"), ("--threshold", "Threshold", "str"),
         ("--image-size", "ImageSize", "str"), ("--normalize", "Normalize", "str")],
        _create_model)
    # describe-model and list-models: agent/cli/models.py owns the two commands (they also query a running
    # agent) and adds the registry's options to them through register_model_queries().
    _api_command(
        subparsers, "start-model-packaging-job",
        "package a model version as a Greengrass model component (asynchronous; see describe-model-packaging-job)",
        [("--project-name", "ProjectName", "str"), ("--model-version", "ModelVersion", "str"),
         ("--job-name", "JobName", "str"), ("--configuration", "Configuration", "json"),
         ("--description", "Description", "str"), ("--client-token", "ClientToken", "str")],
        _start,
        extra=lambda p: p.add_argument("--wait", action="store_true",
                                       help="run the job in this process and return when it has finished"))
    _api_command(subparsers, "describe-model-packaging-job", "describe a model packaging job",
                 [("--project-name", "ProjectName", "str"), ("--job-name", "JobName", "str")],
                 lambda a, r, _: _client(a).describe_model_packaging_job(**r))
    _api_command(subparsers, "list-model-packaging-jobs", "list a project's model packaging jobs",
                 [("--project-name", "ProjectName", "str"), ("--max-results", "MaxResults", "int"),
                  ("--next-token", "NextToken", "str")],
                 lambda a, r, _: _client(a).list_model_packaging_jobs(**r))

    deploy_help = ("deploy model components (and the agent) with greengrassv2 CreateDeployment, or print the local "
                   "greengrass-cli command")
    d = subparsers.add_parser("deploy", help=deploy_help, description=deploy_help)
    d.add_argument("--target-arn", help="IoT thing or thing group ARN")
    d.add_argument("--component", action="append", required=True, metavar="NAME=VERSION",
                   help="a component to deploy (repeatable)")
    d.add_argument("--agent-version", default=__version__,
                   help=f"version of com.edgeagent.EdgeAgent to deploy along (default {__version__})")
    d.add_argument("--no-agent", action="store_true", help="don't add the agent component")
    d.add_argument("--deployment-name", help="deploymentName shown in the Greengrass console (default: none; the "
                                             "console shows the deployment id)")
    d.add_argument("--timeout", type=int, default=60,
                   help="seconds components get to defer the update (NOTIFY_COMPONENTS), default 60")
    d.add_argument("--local", action="store_true",
                   help="print the greengrass-cli command for the local tree instead of calling AWS")
    d.add_argument("--home", help="registry directory, for --local")
    d.add_argument("--region", help="AWS region of the greengrassv2 call (default: $AWS_REGION, else "
                                    "$AWS_DEFAULT_REGION, else us-east-1)")
    d.add_argument("--greengrass-endpoint-url", help="greengrassv2 endpoint URL (a test double or a VPC endpoint)")
    d.set_defaults(func=_deploy)

