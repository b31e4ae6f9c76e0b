"""AWS-CLI-shaped commands: ``edge-agent start-model-packaging-job --project-name P ...``.

Each API command takes its parameters as ``--kebab-case`` options and/or ``--cli-input-json``
(JSON text or ``file://path``, PascalCase keys; options given on the command line win). The
response JSON goes to stdout. Every failure is one line on stderr,
``edge-agent: <ExceptionName>: <message>``, and an exit code from ``agent.packaging.errors``
(EXIT_CODES; docs/packaging.md): never a traceback, whatever the request, the registry database
or the home directory holds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sqlite3
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Tuple  # noqa: UP035 - runtime alias below must work on Python 3.8

from agent import __version__
from agent.errors import AgentError, ErrorCode
from agent.packaging.errors import (
    EXIT_ACCESS_DENIED,
    EXIT_CONFLICT,
    EXIT_INVALID_REQUEST,
    EXIT_JOB_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_RETRY,
    EXIT_SERVICE_ERROR,
    LookoutVisionError,
    ValidationException,
)

Param = Tuple[str, str, str]  # noqa: UP006 - (--flag, PascalCaseKey, kind: str | int | number | json)

#: Deeper JSON than any request has (the deepest, Configuration.Greengrass.Tags[i].Key, is 5 levels).
MAX_JSON_DEPTH = 32

# Errors of the agent core (e.g. PackageError) carry an ErrorCode, not an exit code.
_EXIT_BY_ERROR_CODE = {
    ErrorCode.INVALID_ARGUMENT: EXIT_INVALID_REQUEST,
    ErrorCode.NOT_FOUND: EXIT_NOT_FOUND,
    ErrorCode.FAILED_PRECONDITION: EXIT_CONFLICT,
    ErrorCode.RESOURCE_EXHAUSTED: EXIT_RETRY,
    ErrorCode.UNAVAILABLE: EXIT_RETRY,
    ErrorCode.INTERNAL: EXIT_SERVICE_ERROR,
}


@dataclass(frozen=True)
class Outcome:
    """What a command prints on stdout, and its exit code (a failed --wait job prints and fails)."""

    response: Any
    exit_code: int = EXIT_OK


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _print(response: Any) -> None:
    print(json.dumps(response, indent=4, default=_json_default))


def _fail(message: str) -> None:
    print(f"edge-agent: {message}", file=sys.stderr)


def guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command so that any failure is one stderr line and a documented exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except LookoutVisionError as exc:
            _fail(f"{exc.error_code}: {exc.message}")
            return exc.exit_code
        except AgentError as exc:
            _fail(f"{type(exc).__name__}: {exc.message}")
            return _EXIT_BY_ERROR_CODE.get(exc.code, EXIT_SERVICE_ERROR)
        except RecursionError:
            _fail("ValidationException: the request is nested too deeply")
            return EXIT_INVALID_REQUEST
        except PermissionError as exc:
            _fail(f"AccessDeniedException: {exc}")
            return EXIT_ACCESS_DENIED
        except BrokenPipeError:
            # stdout closed early (`| head`): nothing more can be said there; keep the exit quiet.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_SERVICE_ERROR
        except KeyboardInterrupt:
            return 130
        except (OSError, sqlite3.Error) as exc:
            _fail(f"InternalServerException: {type(exc).__name__}: {exc}")
            return EXIT_SERVICE_ERROR
        except Exception as exc:  # noqa: BLE001 - a bug: still one line (EDGE_AGENT_DEBUG=1 shows the traceback)
            if os.environ.get("EDGE_AGENT_DEBUG"):
                raise
            _fail(f"InternalServerException: unexpected {type(exc).__name__}: {exc} (EDGE_AGENT_DEBUG=1 shows "
                  "the traceback)")
            return EXIT_SERVICE_ERROR

    return run


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_JSON_DEPTH:
                stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _parse_json(flag: str, text: str) -> Any:
    """JSON text or file://path, as the AWS CLI takes it; every failure a ValidationException."""
    if text.startswith("file://"):
        path = Path(text[len("file://"):]).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValidationException(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ValidationException(f"{flag}: {path} is not UTF-8 text: {exc.reason}") from None
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
        depth = MAX_JSON_DEPTH + 1
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise ValidationException(f"{flag} is not valid JSON: {exc}") from None
    else:
        depth = _depth(value)
    if depth > MAX_JSON_DEPTH:
        raise ValidationException(f"{flag} is nested more than {MAX_JSON_DEPTH} levels deep (no request is that deep)")
    return value


def read_input_json(text: str) -> dict[str, Any]:
    """--cli-input-json: JSON text or file://path (as the AWS CLI takes it)."""
    value = _parse_json("--cli-input-json", text)
    if not isinstance(value, dict):
        raise ValidationException("--cli-input-json must be a JSON object of the request's parameters")
    return value


def _json_option(flag: str, text: str) -> Any:
    return _parse_json(flag, text)


_JSON_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "number": (int, float)}


def _check_input_json(request: dict[str, Any], params: Sequence[Param]) -> None:
    """The AWS CLI's parameter validation of --cli-input-json: known keys, scalar types."""
    kinds = {key: kind for _, key, kind in params}
    for key, value in request.items():
        if key not in kinds:
            raise ValidationException(f'Parameter validation failed: Unknown parameter in input: "{key}", must be '
                                      f"one of: {', '.join(kinds) or '(none: this command takes no parameters)'}")
        types = _JSON_TYPES.get(kinds[key])
        if types and (not isinstance(value, types) or isinstance(value, bool)):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ValidationException(f"Parameter validation failed: Invalid type for parameter {key}, value: "
                                      f"{shown}, type: {type(value).__name__}, valid types: "
                                      f"{', '.join(t.__name__ for t in types)}")


def gather(args: argparse.Namespace, params: Sequence[Param]) -> dict[str, Any]:
    """--cli-input-json first, then each option given on the command line over it."""
    request = read_input_json(args.cli_input_json) if args.cli_input_json else {}
    _check_input_json(request, params)
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
            flag, type={"int": int, "number": float}.get(kind, str), default=None, choices=CHOICES.get(flag),
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
        result = call(args, request, args)
        outcome = result if isinstance(result, Outcome) else Outcome(result)
        _print(outcome.response)
        return outcome.exit_code

    p.set_defaults(func=guarded(run))


def _start(args: argparse.Namespace, request: dict[str, Any], _: argparse.Namespace) -> Any:
    # The CLI exits right away, so the job runs in a detached worker process (or here, with --wait).
    client = _client(args, executor="inline" if args.wait else "process")
    started = client.start_model_packaging_job(**request)
    if not args.wait:
        return started
    # The job ran inline, or (same ClientToken) is another process's: either way wait for its end.
    # No timeout: describe marks a job FAILED once its owner is dead, so this ends.
    desc = client.wait_for_job(request["ProjectName"], started["JobName"], timeout=None,
                               poll_s=0.5)["ModelPackagingDescription"]
    response = {"JobName": started["JobName"], "Status": desc["Status"], "StatusMessage": desc["StatusMessage"]}
    arn = desc["ModelPackagingOutputDetails"]["Greengrass"].get("ComponentVersionArn")
    if arn:
        response["ComponentVersionArn"] = arn
    if desc["Status"] != "SUCCEEDED":
        _fail(f"model packaging job {started['JobName']} {desc['Status']}: {desc['StatusMessage']}")
        return Outcome(response, EXIT_JOB_FAILED)
    return Outcome(response)


def _create_model(args: argparse.Namespace, request: dict[str, Any], _: argparse.Namespace) -> Any:
    size = None
    if "ImageSize" in request:
        w, _sep, h = str(request.pop("ImageSize")).partition("x")
        try:
            size = (int(w), int(h))
        except ValueError:
            raise ValidationException("--image-size must be WIDTHxHEIGHT, e.g. 256x256") from None
    if "Threshold" in request:
        request["Threshold"] = float(request["Threshold"])  # an int or float (checked by gather)
    return _client(args).create_model(**request, **({"ImageSize": size} if size else {}))


def _deploy(args: argparse.Namespace) -> int:
    from agent.packaging.deploy import check_agent_version, check_local_deployment
    from agent.packaging.output import create_deployment, deployment_request, local_deployment_command
    from agent.packaging.registry import default_home

    components: dict[str, str] = {}
    for item in args.component:
        name, sep, version = item.partition("=")
        if not sep or not name or not version:
            raise ValidationException(f"--component {item!r} must be NAME=VERSION")
        components[name] = version
    agent_version = None if args.no_agent else args.agent_version
    if agent_version is not None:
        check_agent_version(agent_version)
    if args.local:
        home = Path(args.home) if args.home else default_home(dict(os.environ))
        for note in check_local_deployment(home, components, agent_version,
                                           Path(args.agent_build) if args.agent_build else None):
            print(f"edge-agent: {note}", file=sys.stderr)
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
         ("--description", "Description", "str"), ("--threshold", "Threshold", "number"),
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
                   help="print the greengrass-cli command for the local component store instead of calling AWS "
                        "(every component must be in the store)")
    d.add_argument("--agent-build", metavar="DIR",
                   help="with --local: a `scripts/build-component` output folder (e.g. greengrass-build) to add the "
                        "agent component from, when the store lacks --agent-version")
    d.add_argument("--home", help="registry directory, for --local")
    d.add_argument("--region", help="AWS region of the greengrassv2 call (default: $AWS_REGION, else "
                                    "$AWS_DEFAULT_REGION, else us-east-1)")
    d.add_argument("--greengrass-endpoint-url", help="greengrassv2 endpoint URL (a test double or a VPC endpoint)")
    d.set_defaults(func=guarded(_deploy))

