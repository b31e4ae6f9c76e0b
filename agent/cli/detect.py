"""`edge-agent detect`: call DetectAnomalies for image files (agent/client.py does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.config import DEFAULT_SOCKET


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("detect", help="run DetectAnomalies on image files and print JSON results")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", required=True, help="model component name")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"agent socket URI (default {DEFAULT_SOCKET})")
    p.add_argument("--shm", action="store_true", help="send frames (and get masks) through shared memory")
    p.add_argument("--overlay", type=Path, help="write the image with the mask drawn over it (PNG); with "
                   "several images, one file per image named OUT-<image>.png")
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent import client

    return client.run(args)


