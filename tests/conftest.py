"""Shared fixtures: stubs compiled from proto/ in this test run, model packages built by the
tests themselves (agent.tools.modelgen), and real agents on real Unix sockets in short temp dirs."""

from __future__ import annotations

import importlib
import shutil
import sys
import typing  # runtime-evaluated aliases below: collections.abc generics need Python >= 3.9
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import numpy as np
import pytest
from metrics_fixtures import RunningAgent, short_tmp_dir, widget_agent

from agent.app import Agent
from agent.config import AgentConfig
from agent.core.package import ModelPackage, build_package

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pb_modules(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    """edge_agent_pb2 / edge_agent_pb2_grpc generated from proto/edge-agent.proto the way LFV
    clients do it (python -m grpc_tools.protoc ...), imported as top-level modules."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    shutil.copy(ROOT / "proto" / "edge-agent.proto", out)
    rc = protoc.main(["protoc", f"--proto_path={out}", f"--python_out={out}", f"--grpc_python_out={out}",
                      "edge-agent.proto"])
    assert rc == 0
    sys.path.insert(0, str(out))
    try:
        pb2 = importlib.import_module("edge_agent_pb2")
        pb2_grpc = importlib.import_module("edge_agent_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    return pb2, pb2_grpc


@pytest.fixture(scope="session")
def pb(pb_modules: tuple[ModuleType, ModuleType]) -> ModuleType:
    return pb_modules[0]


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One ONNX file of each kind, built once per run by agent.tools.modelgen."""
    from agent.tools.modelgen import build_anomalib_v1, build_anomalib_v2, build_classifier, build_segmenter

    root = tmp_path_factory.mktemp("onnx")
    files = {}
    for kind, build, kwargs in (
        ("anomalib", build_anomalib_v2, {}),
        ("anomalib_dynamic", build_anomalib_v2, {"dynamic_batch": True}),
        ("anomalib_v1", build_anomalib_v1, {}),
        ("classification", build_classifier, {}),
        ("classification_logits", build_classifier, {"logits": True}),
        ("segmentation", build_segmenter, {"n_classes": 3}),
    ):
        (root / kind).mkdir()
        files[kind] = build(root / kind / "model.onnx", **kwargs)
    return files


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: AF_UNIX socket paths are limited to 107 bytes."""
    with short_tmp_dir() as path:
        yield path


@pytest.fixture
def running_agent(short_tmp: Path) -> Iterator[RunningAgent]:
    """A real agent (fresh metrics registry, metrics on a free port) with one STOPPED model."""
    with widget_agent(short_tmp) as running:
        yield running


@pytest.fixture
def models_dir(short_tmp: Path) -> Path:
    path = short_tmp / "models"
    path.mkdir()
    return path


PackageMaker = typing.Callable[..., ModelPackage]


@pytest.fixture
def make_package(model_files: dict[str, Path], models_dir: Path) -> PackageMaker:
    """make_package(kind, name=..., **build_package kwargs) → a package inside models_dir."""

    def make(kind: str, name: str | None = None, *, directory: Path | None = None, **kwargs: Any) -> ModelPackage:
        name = name or kind.replace("_", "-")
        src = model_files[kind]
        if kind == "segmentation":
            kwargs.setdefault("classes", ["background", "red", "green"])
        kwargs.setdefault("arn", f"arn:aws:lookoutvision:us-east-1:123456789012:model/test/{name}")
        return build_package(src, directory or models_dir / name, name=name, **kwargs)

    return make


AgentFactory = typing.Callable[..., Agent]


@pytest.fixture
def agent_factory(short_tmp: Path, models_dir: Path) -> Iterator[AgentFactory]:
    """Start real agents (gRPC on a Unix socket in short_tmp); all are stopped at teardown."""
    agents: list[Agent] = []

    def start(**overrides: Any) -> Agent:
        settings: dict[str, Any] = {
            "socket": f"unix://{short_tmp}/agent{len(agents)}.sock",
            "models_dir": str(models_dir),
            "execution_providers": "cpu",
            "warmup_runs": 1,
            "work_dir": str(short_tmp / "work"),
            "scan_interval_s": 0.2,
            "metrics_port": 0,  # any free port: several agents run side by side
        }
        settings.update({k: v for k, v in overrides.items() if k not in ("runtime", "listeners", "observer")})
        config = AgentConfig.from_sources(cli=settings)
        agent = Agent(config, **{k: v for k, v in overrides.items() if k in ("runtime", "listeners", "observer")})
        agent.start()
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop(grace=1.0)


@pytest.fixture
def agent(agent_factory: AgentFactory) -> Agent:
    return agent_factory()


@pytest.fixture
def stub(agent: Agent, pb_modules: tuple[ModuleType, ModuleType]) -> Iterator[Any]:
    with grpc.insecure_channel(agent.config.socket) as channel:
        yield pb_modules[1].EdgeAgentStub(channel)


def wait_status(stub: Any, pb: ModuleType, name: str, status: int, timeout: float = 20.0) -> Any:
    """Poll DescribeModel like LFV clients do, until `status` (returns the description)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        desc = stub.DescribeModel(pb.DescribeModelRequest(model_component=name)).model_description
        if desc.status == status or time.monotonic() > deadline:
            return desc
        time.sleep(0.02)


def grey_with_square(width: int = 64, height: int = 64, color: tuple[int, int, int] = (255, 0, 0),
                     box: tuple[int, int, int, int] | None = (8, 8, 24, 24)) -> np.ndarray:
    """Mid-grey image with a coloured square (x0, y0, x1, y1): the modelgen detectors flag exactly it."""
    image = np.full((height, width, 3), 128, dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        image[y0:y1, x0:x1] = color
    return image


def wait_known(agent: Agent, *names: str, timeout: float = 10.0) -> None:
    """Wait until discovery has registered every name (packages appear asynchronously)."""
    import time

    deadline = time.monotonic() + timeout
    while not set(names) <= agent.registry.names():
        assert time.monotonic() < deadline, f"models {names} not discovered; known: {agent.registry.names()}"
        time.sleep(0.02)


def detect(stub: Any, pb: ModuleType, name: str, image: np.ndarray, **kwargs: Any) -> Any:
    """DetectAnomalies with byte_data, as the AWS sample clients send it."""
    h, w = image.shape[:2]
    req = pb.DetectAnomaliesRequest(model_component=name, bitmap=pb.Bitmap(width=w, height=h,
                                                                            byte_data=image.tobytes()), **kwargs)
    return stub.DetectAnomalies(req, timeout=30).detect_anomaly_result


def start(stub: Any, pb: ModuleType, name: str) -> Any:
    """StartModel, then poll DescribeModel until RUNNING (asserting it gets there)."""
    assert stub.StartModel(pb.StartModelRequest(model_component=name)).status == pb.STARTING
    desc = wait_status(stub, pb, name, pb.RUNNING)
    assert desc.status == pb.RUNNING, desc.status_message
    return desc
