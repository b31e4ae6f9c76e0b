"""`edge-agent model build`: turn an ONNX file into a model package the agent serves."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PROVIDERS = ("tensorrt", "cuda", "cpu")  # agent.core.package.PROVIDERS, without importing the core for --help
KINDS = ["auto", "anomalib", "anomalib_v1", "classification", "segmentation"]


def _size(text: str) -> tuple[int, int]:
    """argparse type for WxH: a usage error (not a traceback) for '224' or '224,224'."""
    w, sep, h = text.strip().lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT in pixels, e.g. 320x240")
    return int(w), int(h)


def _providers(text: str) -> list[str]:
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PROVIDERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown execution provider(s) {unknown or [text]}; choose from "
                                         f"{','.join(PROVIDERS)}")
    return names


def _ids(text: str) -> list[int]:
    try:
        ids = [int(i) for i in text.split(",") if i.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of class indexes, e.g. 0 or 0,2") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError("class indexes are >= 0")
    return ids


def register(subparsers: Any) -> None:
    model = subparsers.add_parser("model", help="model packages").add_subparsers(dest="model_command")
    model.required = True
    build = model.add_parser("build", help="write a model package (manifest.json + ONNX files) for an ONNX model",
                             description="Write a model package for an ONNX model. Settings are checked against "
                                         "the ONNX graph. docs/model-package.md describes the format.")
    build.add_argument("--onnx", type=Path, required=True, help="the ONNX file (its .data file is copied along)")
    build.add_argument("--name", required=True, help="model component name")
    build.add_argument("--out", type=Path, required=True, help="package directory to create")
    build.add_argument("--format", dest="package_format", default="edge-agent", choices=["edge-agent", "dda"],
                       help="edge-agent (default) or dda: DDA's layout (manifest + mochi/model.onnx) and semantics, "
                            "for a model whose outputs are class probabilities")
    build.add_argument("--kind", default="auto", choices=KINDS, help="model kind (default: recognised from the "
                                                                     "graph)")
    build.add_argument("--threshold", type=float, help="anomaly threshold on the 0..1 score (default 0.5)")
    build.add_argument("--classes", help="pixel class names, background first (e.g. background,scratch,dent)")
    build.add_argument("--colors", help="#RRGGBB per class (default: the Lookout for Vision / DDA palette)")
    build.add_argument("--image-size", type=_size, metavar="WxH", help="model input size, for models with a "
                                                                       "dynamic input size")
    build.add_argument("--raw-image-size", type=_size, metavar="WxH", help="camera frame size the mask is "
                                                                           "resized to (raw_image_shape)")
    build.add_argument("--normalize", choices=["imagenet"], help="apply ImageNet mean/std before the model")
    build.add_argument("--interpolation", help="frame resizing: bilinear (Pillow; edge-agent default) or an OpenCV "
                                               "interpolation: nearest, linear, cubic, area (dda default), lanczos4")
    build.add_argument("--score-activation", default="auto", choices=["auto", "none", "sigmoid", "softmax"],
                       help="classification outputs: auto = softmax over 2+ values (logits), none for one value")
    build.add_argument("--class-normal-ids", type=_ids, metavar="I[,J]", help="classification-head classes that "
                                                                               "are normal (default 0)")
    build.add_argument("--image-classes", help="classification-head class names (e.g. normal,anomaly)")
    build.add_argument("--seg-normal-ids", type=_ids, metavar="I[,J]", help="pixel classes that are normal, for "
                                                                             "--classification-logic")
    build.add_argument("--classification-logic", choices=["cls_head", "seg_head", "cls_and_seg", "cls_or_seg"],
                       help="combine the score's verdict with the mask's (DDA's rule)")
    build.add_argument("--description", default="")
    build.add_argument("--arn", default="", help="lookout_vision_model_arn reported by ListModels")
    build.add_argument("--model-version", default="1")
    build.add_argument("--providers", type=_providers, help=f"preferred execution providers, e.g. "
                                                            f"{','.join(PROVIDERS)}")
    build.add_argument("--autostart", action="store_true", help="start the model as soon as the agent knows it")
    build.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agent.core.package import build_package
    from agent.runtime.onnx import OnnxProbe  # ONNX Runtime checks the model: devices have no `onnx`

    def split(text: str | None) -> list[str] | None:
        return [t.strip() for t in text.split(",")] if text else None

    package = build_package(
        args.onnx, args.out, name=args.name, kind=args.kind, threshold=args.threshold,
        classes=split(args.classes), colors=split(args.colors), image_size=args.image_size,
        normalize=args.normalize, description=args.description, arn=args.arn, model_version=args.model_version,
        autostart=args.autostart, execution={"providers": args.providers} if args.providers else None,
        score_activation=args.score_activation, package_format=args.package_format,
        class_normal_ids=args.class_normal_ids, image_classes=split(args.image_classes),
        seg_normal_ids=args.seg_normal_ids, classification_logic=args.classification_logic,
        raw_image_size=args.raw_image_size, interpolation=args.interpolation, probe=OnnxProbe(),
    )
    print(json.dumps({"name": package.name, "kind": package.kind, "format": package.format,
                      "path": str(package.root), "model_file": str(package.model_file),
                      "image_size": [package.image_width, package.image_height], "threshold": package.threshold,
                      "outputs": dict(package.outputs)}))
    return 0
