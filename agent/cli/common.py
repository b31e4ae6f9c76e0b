"""What the client commands (detect, status, start-model, ...) share: the socket option. Light: no grpc here,
so `edge-agent --help` and parsing stay cheap."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from agent.config import DEFAULT_SOCKET, ENV_PREFIX


def socket_uri(text: str) -> str:
    """A gRPC target for the agent: `unix:///path` as the agent prints it, or a bare socket path
    (`/tmp/x.sock`, `./x.sock`, `~/x.sock`), or HOST:PORT for the agent's optional --tcp listener."""
    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError("the socket is empty")
    if text.startswith(("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:")):
        return text
    if text.startswith(("/", "./", "../", "~")) or text.endswith(".sock") or os.sep in text:
        return "unix://" + os.path.abspath(os.path.expanduser(text))
    return text  # HOST:PORT


def default_socket(environ: Mapping[str, str] = os.environ) -> str:
    """The socket `edge-agent serve` would use with the same environment (EDGE_AGENT_SOCKET), else LFV's."""
    return environ.get(ENV_PREFIX + "SOCKET", "").strip() or DEFAULT_SOCKET


def add_socket(parser: Any) -> None:
    """Add --socket to a parser or an argument group."""
    default = default_socket()
    now = f"; now {default}" if default != DEFAULT_SOCKET else ""
    parser.add_argument("--socket", type=socket_uri, default=socket_uri(default),
                        help=f"the agent's socket: unix:///path or a bare /path.sock, or HOST:PORT for its --tcp "
                             f"listener (default: $EDGE_AGENT_SOCKET, else {DEFAULT_SOCKET}{now})")
