"""`edge-agent detect`: call DetectAnomalies for image files (agent/client.py does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.cli.common import add_socket

EPILOG = """\
Each image is sent as RGB888 (the agent's byte order; an OpenCV frame is BGR: convert it first). One JSON line
per image: is_anomalous is the image-level decision (anomaly_score >= anomaly_threshold); anomalies (areas
per class, background first) and the overlay come from the pixel mask, which the model thresholds on its own
(anomalib: 0.5 of its normalised anomaly map). Lookout for Vision documents the two as independent, so an
anomaly area can be listed for an image that is not anomalous, and the other way round.
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("detect", help="run DetectAnomalies on image files and print JSON results",
                              description="Call DetectAnomalies on the running agent for each image file.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--model", required=True, help="model component name (as in list-models)")
    add_socket(p)
    p.add_argument("--shm", action="store_true", help="send frames (and get masks) through shared memory")
    p.add_argument("--overlay", type=Path, metavar="OUT.png",
                   help="write the image with each anomaly outlined in its class colour (directories are created); "
                        "with several images one file each, OUT-<image>.png (-2, -3... when names repeat); the "
                        "JSON line says which")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds each DetectAnomalies call may take before it fails with DEADLINE_EXCEEDED "
                        "(default 60)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent import client

    return client.run(args)


