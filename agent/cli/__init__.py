"""The `edge-agent` command line.

Commands live in their own modules and are imported only when they run: `edge-agent serve` does not
load the benchmark, the packaging tools or the client, and `edge-agent --help` loads none of them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from agent import __version__
from agent.errors import AgentError

#: (command, module that registers it, one-line help). A module may register several commands.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("serve", "agent.cli.serve", "run the agent (gRPC AWS.LookoutVision.EdgeAgent)"),
    ("model", "agent.cli.model", "model packages: build one from an ONNX file"),
    ("detect", "agent.cli.detect", "run DetectAnomalies on image files and print JSON results"),
    ("status", "agent.cli.status", "one-screen summary: models, state, provider, request rate, latency"),
    ("start-model", "agent.cli.models", "StartModel on the agent; with --wait, until the model is RUNNING"),
    ("stop-model", "agent.cli.models", "StopModel on the agent (drains in-flight requests)"),
    ("describe-model", "agent.cli.models", "describe a model on the agent (or, with --project-name, a model "
                                           "version in the registry)"),
    ("list-models", "agent.cli.models", "list the agent's models (or, with --project-name, a project's model "
                                        "versions in the registry)"),
    ("bench", "agent.tools.bench.benchmark", "benchmark the agent against the in-process floor (not for CI)"),
    ("bench-ab", "agent.tools.bench.ab", "A/B two agent builds side by side (not for CI)"),
    ("create-project", "agent.packaging.cli", "create a Lookout for Vision project (local model registry)"),
    ("describe-project", "agent.packaging.cli", "describe a project"),
    ("list-projects", "agent.packaging.cli", "list projects"),
    ("create-model", "agent.packaging.cli", "import a trained ONNX model as a model version of a project"),
    ("start-model-packaging-job", "agent.packaging.cli", "package a model version as a Greengrass component"),
    ("describe-model-packaging-job", "agent.packaging.cli", "describe a model packaging job"),
    ("list-model-packaging-jobs", "agent.packaging.cli", "list a project's model packaging jobs"),
    ("deploy", "agent.packaging.cli", "deploy model components (and the agent) to Greengrass core devices"),
)


def _command(argv: Sequence[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not an option), if any."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the module of the command in argv is imported (None: every module, for docs/tests)."""
    parser = argparse.ArgumentParser(prog="edge-agent", description="Lookout for Vision compatible edge agent")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = _command(argv) if argv is not None else None
    modules = {module for name, module, _ in COMMANDS if argv is None or name == chosen}
    for module in sorted(modules):
        importlib.import_module(module).register(sub)  # type: ignore[attr-defined]
    for name, _, help_text in COMMANDS:
        if name not in sub.choices:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


#: exit status when whoever reads our output went away (`edge-agent status | head`): 128 + SIGPIPE, as a
#: command killed by SIGPIPE reports it. SIGPIPE itself stays ignored (Python's default): the agent's own
#: sockets must never kill `serve`.
BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return status
    except AgentError as exc:
        print(f"edge-agent: {type(exc).__name__}: {exc.message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not raise a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE
