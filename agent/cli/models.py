"""`edge-agent start-model | stop-model | describe-model | list-models`: the LFV model calls on a running agent.

Each prints the model status name (start/stop) or the description as JSON (describe/list), and exits
non-zero with a one-line message on any error. `describe-model` and `list-models` also answer for the
offline model registry (agent/packaging) when `--project-name` (or `--cli-input-json`) is given: one
parser per command, dispatching on that option.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from agent.cli.common import add_socket

#: exit statuses: 0 ok, 1 the agent said no / the model FAILED / timed out (2 is argparse's usage error)
FAILED = 1

#: how long `start-model --wait` keeps asking when the model is not known yet: an agent started a moment
#: ago serves its socket just before its first models-dir scan has registered the packages.
NOT_FOUND_GRACE_S = 3.0


class _Into:
    """Lets agent/packaging/cli.py add its options to a parser made here (it calls add_parser(name, ...))."""

    def __init__(self, parsers: dict[str, argparse.ArgumentParser]) -> None:
        self._parsers = parsers

    def add_parser(self, name: str, **_: Any) -> argparse.ArgumentParser:
        return self._parsers[name]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "start-model", help="StartModel on the agent; with --wait, until the model is RUNNING",
        description="Start a model on the running agent and print its status (STARTING; with --wait RUNNING). "
                    "Exits 1 if the agent refuses, or with --wait if the model ends FAILED (the reason goes to "
                    "stderr) or is not RUNNING within --timeout.")
    p.add_argument("model", metavar="NAME", help="model component name (as in list-models)")
    p.add_argument("--wait", action="store_true",
                   help="wait for the agent to come up and the model to be RUNNING (polls DescribeModel)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for the agent (and with --wait for RUNNING), default 300")
    add_socket(p)
    p.set_defaults(func=start_model)

    p = subparsers.add_parser(
        "stop-model", help="StopModel on the agent (drains in-flight requests)",
        description="Stop a RUNNING model (in-flight requests finish first) and print its status (STOPPED).")
    p.add_argument("model", metavar="NAME", help="model component name")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the agent, default 60")
    add_socket(p)
    p.set_defaults(func=stop_model)

    shared = {
        "describe-model": subparsers.add_parser(
            "describe-model", help="describe a model on the agent, or a model version in the registry",
            description="Without --project-name: DescribeModel on the running agent (NAME required), printed as "
                        "JSON. With --project-name (or --cli-input-json): the model version in the offline model "
                        "registry, as Lookout for Vision's DescribeModel."),
        "list-models": subparsers.add_parser(
            "list-models", help="list the agent's models, or a project's model versions in the registry",
            description="Without --project-name: ListModels on the running agent, printed as JSON. With "
                        "--project-name (or --cli-input-json): the project's model versions in the offline model "
                        "registry."),
    }
    shared["describe-model"].add_argument("model", metavar="NAME", nargs="?",
                                          help="model component name on the agent")
    for parser in shared.values():
        agent_options = parser.add_argument_group("the running agent (without --project-name)")
        add_socket(agent_options)
        agent_options.add_argument("--timeout", type=float, default=10.0,
                                   help="seconds to wait for the agent, default 10")
    from agent.packaging.cli import register_model_queries

    register_model_queries(_Into(shared))
    for parser in shared.values():
        parser.set_defaults(registry_func=parser.get_default("func"), func=_describe_or_list)
        for group in parser._action_groups:  # argparse has no public way to retitle a group
            if group.title and group.title.startswith("required"):
                group.title = "the model registry (with --project-name; these are required there)"


# -- running the commands ------------------------------------------------------------------------------
def _stub(socket: str) -> tuple[Any, Any]:
    from agent import client
    from agent.serving.grpc._generated import edge_agent_pb2_grpc as pb_grpc

    channel = client.channel(socket)
    return channel, pb_grpc.EdgeAgentStub(channel)


def _status_name(value: int) -> str:
    from agent.serving.grpc._generated import edge_agent_pb2 as pb

    return str(pb.ModelStatus.Name(value))


def _fail(message: str) -> int:
    print(f"edge-agent: {message}", file=sys.stderr)
    return FAILED


def _rpc_error(exc: Any, args: argparse.Namespace, stub: Any) -> int:
    """One line for a gRPC error; NOT_FOUND lists the models the agent does know."""
    import grpc

    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return _fail(f"agent not reachable on {args.socket} ({unavailable_reason(exc.details())}); is "
                     "`edge-agent serve` running with that --socket?")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return _fail(f"no answer from the agent on {args.socket} within {args.timeout:g}s")
    message = f"{code.name}: {exc.details()}"
    if code == grpc.StatusCode.NOT_FOUND:
        message += "; " + _known_models(stub)
    return _fail(message)


def unavailable_reason(details: str | None) -> str:
    """grpc's "failed to connect to all addresses; last error: ... error: No such file or directory" → the end."""
    text = (details or "").strip()
    return text.rsplit("error: ", 1)[-1] if "error: " in text else text or "no answer"


def _known_models(stub: Any) -> str:
    import grpc

    from agent.serving.grpc._generated import edge_agent_pb2 as pb

    try:
        names = [m.model_component for m in stub.ListModels(pb.ListModelsRequest(), timeout=5).models]
    except grpc.RpcError:
        return "the agent did not list its models"
    return f"known models: {', '.join(names)}" if names else "the agent knows no models (check its --models-dir)"


def _describe(stub: Any, name: str, timeout: float) -> Any:
    from agent.serving.grpc._generated import edge_agent_pb2 as pb

    return stub.DescribeModel(pb.DescribeModelRequest(model_component=name), timeout=timeout).model_description


def start_model(args: argparse.Namespace) -> int:
    import grpc

    from agent.serving.grpc._generated import edge_agent_pb2 as pb

    deadline = time.monotonic() + args.timeout
    channel, stub = _stub(args.socket)
    with channel:
        started = time.monotonic()
        while True:
            try:
                status = _status_name(stub.StartModel(pb.StartModelRequest(model_component=args.model),
                                                      timeout=max(0.1, deadline - time.monotonic()),
                                                      wait_for_ready=args.wait).status)
                break
            except grpc.RpcError as exc:
                code = exc.code()
                if (args.wait and code == grpc.StatusCode.NOT_FOUND
                        and time.monotonic() - started < min(NOT_FOUND_GRACE_S, args.timeout)):
                    time.sleep(0.2)  # an agent that just came up may not have scanned its models yet
                    continue
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    # Already starting or running (e.g. brought back by the RUNNING set after a restart):
                    # for a script that wants the model up, that is success, not an error.
                    try:
                        current = _status_name(_describe(stub, args.model, 10).status)
                    except grpc.RpcError:
                        current = ""
                    if current in ("STARTING", "RUNNING"):
                        print(f"edge-agent: model {args.model} is already {current}", file=sys.stderr)
                        status = current
                        break
                return _rpc_error(exc, args, stub)
        if not args.wait:
            print(status)
            return 0
        try:
            while True:
                desc = _describe(stub, args.model, max(0.1, min(10.0, deadline - time.monotonic())))
                status = _status_name(desc.status)
                if status == "RUNNING":
                    print(status)
                    return 0
                if status in ("FAILED", "STOPPED"):
                    print(status)
                    return _fail(f"model {args.model} is {status}: {desc.status_message or 'no reason given'}")
                if time.monotonic() >= deadline:
                    print(status)
                    return _fail(f"model {args.model} is still {status} after {args.timeout:g}s "
                                 f"({desc.status_message})")
                time.sleep(0.1)
        except grpc.RpcError as exc:
            return _rpc_error(exc, args, stub)


def stop_model(args: argparse.Namespace) -> int:
    import grpc

    from agent.serving.grpc._generated import edge_agent_pb2 as pb

    channel, stub = _stub(args.socket)
    with channel:
        try:
            response = stub.StopModel(pb.StopModelRequest(model_component=args.model), timeout=args.timeout)
        except grpc.RpcError as exc:
            return _rpc_error(exc, args, stub)
    print(_status_name(response.status))
    return 0


def _as_json(message: Any) -> dict[str, Any]:
    return {"model_component": message.model_component,
            "lookout_vision_model_arn": message.lookout_vision_model_arn,
            "status": _status_name(message.status), "status_message": message.status_message}


def _describe_or_list(args: argparse.Namespace) -> int:
    if args.project_name is not None or args.cli_input_json is not None:
        return int(args.registry_func(args))
    import grpc

    from agent.serving.grpc._generated import edge_agent_pb2 as pb

    describe = args.command == "describe-model"
    if describe and not args.model:
        return _fail("describe-model needs a model NAME (the running agent) or --project-name (the model "
                     "registry)")
    channel, stub = _stub(args.socket)
    with channel:
        try:
            if describe:
                out: dict[str, Any] = _as_json(_describe(stub, args.model, args.timeout))
            else:
                models = stub.ListModels(pb.ListModelsRequest(), timeout=args.timeout).models
                out = {"models": [_as_json(m) for m in models]}
        except grpc.RpcError as exc:
            return _rpc_error(exc, args, stub)
    print(json.dumps(out, indent=4))
    return 0
