"""`edge-agent model build`: turn an ONNX file into a model package the agent serves."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    model = subparsers.add_parser("model", help="model packages").add_subparsers(dest="model_command")
    model.required = True
    build = model.add_parser("build", help="write a model package (manifest.json + ONNX files) for an ONNX model")
    build.add_argument("--onnx", type=Path, required=True, help="the ONNX file (its .data file is copied along)")
    build.add_argument("--name", required=True, help="model component name")
    build.add_argument("--out", type=Path, required=True, help="package directory to create")
    build.add_argument("--kind", default="auto", choices=["auto", "anomalib", "anomalib_v1", "classification",
                                                          "segmentation"])
    build.add_argument("--threshold", type=float, help="anomaly threshold on the 0..1 score (default 0.5)")
    build.add_argument("--classes", help="pixel class names, background first (e.g. background,scratch,dent)")
    build.add_argument("--colors", help="#RRGGBB per class (default: the Lookout for Vision palette)")
    build.add_argument("--image-size", help="WxH for models with a dynamic input size")
    build.add_argument("--normalize", choices=["imagenet"], help="apply ImageNet mean/std before the model")
    build.add_argument("--description", default="")
    build.add_argument("--arn", default="", help="lookout_vision_model_arn reported by ListModels")
    build.add_argument("--model-version", default="1")
    build.add_argument("--providers", help="preferred execution providers, e.g. tensorrt,cuda,cpu")
    build.add_argument("--autostart", action="store_true", help="start the model as soon as the agent knows it")
    build.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.core.package import build_package

    size = None
    if args.image_size:
        w, _, h = args.image_size.partition("x")
        size = (int(w), int(h))
    package = build_package(
        args.onnx, args.out, name=args.name, kind=args.kind, threshold=args.threshold,
        classes=args.classes.split(",") if args.classes else None,
        colors=args.colors.split(",") if args.colors else None, image_size=size, normalize=args.normalize,
        description=args.description, arn=args.arn, model_version=args.model_version, autostart=args.autostart,
        execution={"providers": args.providers.split(",")} if args.providers else None,
    )
    print(json.dumps({"name": package.name, "kind": package.kind, "path": str(package.root),
                      "image_size": [package.image_width, package.image_height], "threshold": package.threshold,
                      "outputs": dict(package.outputs)}))
    return 0
