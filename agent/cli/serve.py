"""`edge-agent serve`: run the agent until SIGTERM/SIGINT (agent/app.py wires everything)."""

from __future__ import annotations

import argparse
from typing import Any

from agent.config import AgentConfig


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="run the agent (gRPC AWS.LookoutVision.EdgeAgent)")
    AgentConfig.add_arguments(serve)
    serve.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.app import serve

    return serve(vars(args))
