"""grpc.health.v1 and reflection on the agent's socket: transitions with StartModel / StopModel."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from metrics_fixtures import (
    MODEL,
    RunningAgent,
    make_models_dir,
    start_agent,
    wait_until,
)

from agent.core.lifecycle import ModelInfo, ModelStatus
from agent.serving.grpc._generated import edge_agent_pb2 as pb
from agent.serving.health import AgentHealth

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check(a: RunningAgent, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(a.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_overall_and_per_model_transitions(running_agent: RunningAgent) -> None:
    a = running_agent
    assert check(a, "") == SERVING
    assert check(a, "AWS.LookoutVision.EdgeAgent") == SERVING
    assert check(a, MODEL) == NOT_SERVING  # known, STOPPED
    with pytest.raises(grpc.RpcError) as err:
        check(a, "never-heard-of-it")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # Watch the model while it starts and stops; updates arrive on the stream.
    updates: queue.Queue[int] = queue.Queue()
    watch = health_pb2_grpc.HealthStub(a.channel).Watch(health_pb2.HealthCheckRequest(service=MODEL), timeout=30)

    def read() -> None:
        try:
            for response in watch:
                updates.put(response.status)
        except grpc.RpcError:
            pass  # cancelled at the end of the test

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert updates.get(timeout=5) == NOT_SERVING
        a.stub.StartModel(pb.StartModelRequest(model_component=MODEL), timeout=10)
        a.wait_status(ModelStatus.RUNNING)
        assert check(a, MODEL) == SERVING
        seen = [updates.get(timeout=5)]
        while seen[-1] != SERVING:  # STARTING may report NOT_SERVING again first
            seen.append(updates.get(timeout=5))
        a.stub.StopModel(pb.StopModelRequest(model_component=MODEL), timeout=10)
        assert check(a, MODEL) == NOT_SERVING
        assert updates.get(timeout=5) == NOT_SERVING  # STOPPING
    finally:
        watch.cancel()
        reader.join(5)
    # The watch was a server-streaming RPC; the interceptor counts it when it ends.
    wait_until(lambda: a.sample("grpc_server_handled_total", grpc_service="grpc.health.v1.Health",
                                grpc_method="Watch", grpc_type="server_stream", grpc_code="CANCELLED") == 1,
               10, "the cancelled Watch RPC to be counted")
    assert a.sample("grpc_server_handled_total", grpc_service="grpc.health.v1.Health", grpc_method="Check",
                    grpc_type="unary", grpc_code="NOT_FOUND") == 1


def test_failed_model_is_not_serving(short_tmp: Path) -> None:
    models = make_models_dir(short_tmp)
    (models / MODEL / f"{MODEL}.onnx").write_bytes(b"broken")  # sha256 no longer matches → FAILED
    a = start_agent(short_tmp, models)
    try:
        wait_until(lambda: MODEL in a.agent.registry.names(), 10, "model discovery")
        a.stub.StartModel(pb.StartModelRequest(model_component=MODEL), timeout=10)
        a.wait_status(ModelStatus.FAILED)
        assert check(a, MODEL) == NOT_SERVING
        assert check(a, "") == SERVING  # one broken model doesn't make the agent unhealthy
        assert a.sample("edge_agent_model_status", model=MODEL, status="FAILED") == 1
    finally:
        a.channel.close()
        a.agent.stop(grace=1)


def list_services(a: RunningAgent) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(a.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=5)
    return sorted(s.name for r in responses for s in r.list_services_response.service)


def test_reflection_on_by_default(running_agent: RunningAgent) -> None:
    a = running_agent
    assert list_services(a) == ["AWS.LookoutVision.EdgeAgent", "grpc.health.v1.Health",
                                "grpc.reflection.v1alpha.ServerReflection"]
    # A bidi stream that ran to its end counts as OK.
    wait_until(lambda: a.sample("grpc_server_handled_total", grpc_service="grpc.reflection.v1alpha.ServerReflection",
                                grpc_method="ServerReflectionInfo", grpc_type="bidi_stream", grpc_code="OK") == 1,
               10, "the reflection RPC to be counted")


def test_reflection_can_be_turned_off(short_tmp: Path) -> None:
    a = start_agent(short_tmp, make_models_dir(short_tmp), grpc_reflection=False)
    try:
        with pytest.raises(grpc.RpcError) as err:
            list_services(a)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert check(a, "") == SERVING
    finally:
        a.channel.close()
        a.agent.stop(grace=1)


def test_shutdown_is_final() -> None:
    health = AgentHealth()
    request = health_pb2.HealthCheckRequest

    class Context:
        def set_code(self, code: grpc.StatusCode) -> None:
            self.code = code

    def status(service: str) -> int:
        return health.servicer.Check(request(service=service), Context()).status

    assert status("") == NOT_SERVING  # not started yet
    health.serving()
    health.on_status(ModelInfo("m", "", ModelStatus.RUNNING, "", "1"))
    assert status("") == SERVING and status("m") == SERVING
    health.shutting_down()
    health.on_status(ModelInfo("m", "", ModelStatus.RUNNING, "", "1"))  # a late transition can't undo it
    assert status("") == NOT_SERVING and status("m") == NOT_SERVING
