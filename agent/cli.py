"""The `edge-agent` command line. Each feature module registers its own sub-commands."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from . import __version__, bench, bench_ab, client, status
from .config import AgentConfig
from .errors import AgentError
from .logs import configure


def _serve(args: argparse.Namespace) -> int:
    from .greengrass import detect

    # Started by the Greengrass nucleus (SVCUID + IPC socket in the environment): configuration and
    # deployments come over IPC, models from model components (docs/greengrass.md).
    gg = detect(os.environ, Path.cwd())
    component = running = None
    if gg is None:
        config = AgentConfig.from_sources(env=os.environ, cli=vars(args))
    else:
        from .greengrass.component import ConfigSource, GreengrassComponent
        from .greengrass.ipc import aws_session_factory

        component = GreengrassComponent(aws_session_factory(gg.socket_path, gg.svcuid),
                                        ConfigSource(gg.work_path, os.environ, vars(args)))
        config = component.initial_config()
    configure(config.log_level, config.log_format)
    from .memory import tune_malloc
    from .server import Agent

    tune_malloc(config.malloc_mmap_threshold_mb)

    agent = Agent(config, component_models=gg is not None)
    if component is not None:
        from .greengrass.running import STATE_FILE, RunningModels

        running = RunningModels(Path(config.work_dir) / STATE_FILE, agent.registry, component.component_autostart)
        agent.registry.add_listener(running)
    agent.start()
    if component is not None:
        component.attach(agent)

    def handle(signum: int, _frame: Any) -> None:
        # Greengrass stops components with SIGTERM: drain in-flight requests, then exit 0.
        agent.request_stop()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        agent.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if running is not None:
            running.freeze()  # stopping the models on the way out is not a StopModel
        if component is not None:
            component.stop()
        agent.stop()
    return 0


def _model_build(args: argparse.Namespace) -> int:
    from .model_package import build_package

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description="Lookout for Vision compatible edge agent")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the agent (gRPC AWS.LookoutVision.EdgeAgent)")
    AgentConfig.add_arguments(serve)
    serve.set_defaults(func=_serve)

    model = sub.add_parser("model", help="model packages").add_subparsers(dest="model_command", required=True)
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
    build.set_defaults(func=_model_build)

    client.register(sub)
    bench.register(sub)
    bench_ab.register(sub)
    status.register(sub)
    from .packaging import cli as packaging_cli  # registry, model packaging jobs, deploy (docs/packaging.md)

    packaging_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except AgentError as exc:
        print(f"edge-agent: {type(exc).__name__}: {exc.message}", file=sys.stderr)
        return 2
