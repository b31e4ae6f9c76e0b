"""Overload, deadlines, undecodable bodies and shutdown against a real agent on a real Unix socket.

The model's predict sleeps (tests/runtimes.py's ControlledRuntime over a real ONNX session), so the
timings below are the agent's, not the CPU's: a 0.25 s model with the default settings."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import detect, grey_with_square, start, wait_known
from runtimes import ControlledRuntime

from agent.config import AgentConfig
from agent.core.lifecycle import ModelStatus

DETECT = "/AWS.LookoutVision.EdgeAgent/DetectAnomalies"
#: model_component (field 1, a proto3 string) holding bytes that are not UTF-8.
BAD_UTF8 = b"\x0a\x02\xff\xfe"


def request(pb, image=None, name="widget"):
    image = grey_with_square() if image is None else image
    h, w = image.shape[:2]
    return pb.DetectAnomaliesRequest(model_component=name, bitmap=pb.Bitmap(width=w, height=h,
                                                                             byte_data=image.tobytes()))


def rss_kb() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def code(exc: BaseException | None) -> str:
    if exc is None:
        return "OK"
    assert isinstance(exc, grpc.RpcError), exc
    return exc.code().name


def test_undecodable_bodies_are_invalid_argument_and_leak_nothing(agent, make_package):
    make_package("anomalib", "widget")
    wait_known(agent, "widget")
    raw = {"request_serializer": None, "response_deserializer": None}  # identity: the bytes go out as they are
    with grpc.insecure_channel(agent.config.socket) as ch:
        for method in ("DetectAnomalies", "StartModel", "StopModel", "DescribeModel"):
            with pytest.raises(grpc.RpcError) as info:
                ch.unary_unary(f"/AWS.LookoutVision.EdgeAgent/{method}", **raw)(BAD_UTF8, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert f"not a valid AWS.LookoutVision.{method}Request" in info.value.details()
            assert "UTF-8" in info.value.details()
        # Health (grpc_health's own handler) gets the same treatment from the server's guard.
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary("/grpc.health.v1.Health/Check", **raw)(BAD_UTF8, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "grpc.health.v1.HealthCheckRequest" in info.value.details()
        call = ch.unary_unary(DETECT, **raw)
        for _ in range(200):  # warm up allocator and grpc's pools before measuring
            with pytest.raises(grpc.RpcError):
                call(BAD_UTF8, timeout=5)
        before = rss_kb()
        codes = set()
        for _ in range(3000):
            try:
                call(BAD_UTF8, timeout=5)
            except grpc.RpcError as exc:
                codes.add(exc.code())
        grown_mb = (rss_kb() - before) / 1024
        print(f"\n3,000 undecodable bodies: RSS +{grown_mb:.1f} MB; message: {info.value.details()}")
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT}
    # A raising deserializer leaked ~19 KB per body inside grpcio: 3,000 bodies would be ~57 MB.
    assert grown_mb < 8, f"RSS grew {grown_mb:.1f} MB over 3,000 undecodable bodies"
    handled = agent.metrics.registry.get_sample_value("grpc_server_handled_total", {
        "grpc_service": "AWS.LookoutVision.EdgeAgent", "grpc_method": "DetectAnomalies", "grpc_type": "unary",
        "grpc_code": "INVALID_ARGUMENT"})
    assert handled >= 3200


def test_burst_is_bounded_and_lifecycle_calls_are_not_starved(agent_factory, make_package, pb, pb_modules):
    """40 simultaneous calls to a 0.25 s model, default settings: 2 run + 16 queue, the rest are refused at
    once; DescribeModel and health Check during the burst answer in well under 0.2 s."""
    runtime = ControlledRuntime()
    agent = agent_factory(runtime=runtime)
    defaults = AgentConfig()
    assert (agent.config.max_concurrency, agent.config.max_queue, agent.config.grpc_workers) == \
        (defaults.max_concurrency, defaults.max_queue, defaults.grpc_workers)
    make_package("anomalib", "widget")
    wait_known(agent, "widget")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(agent.config.socket) as ch:
        stub = pb_modules[1].EdgeAgentStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        start(stub, pb, "widget")
        runtime.predict_delay = 0.25
        version = agent.registry.describe("widget").version
        req = request(pb)
        calls_before = runtime.calls
        t0 = time.monotonic()
        futures = [stub.DetectAnomalies.future(req, timeout=30) for _ in range(40)]
        time.sleep(0.3)  # the burst has arrived and been admitted or refused
        d0 = time.monotonic()
        status = stub.DescribeModel(pb.DescribeModelRequest(model_component="widget"), timeout=5)
        describe_s = time.monotonic() - d0
        h0 = time.monotonic()
        health.Check(health_pb2.HealthCheckRequest(service="widget"), timeout=5)
        health_s = time.monotonic() - h0
        queued = agent.metrics.registry.get_sample_value("edge_agent_queued_requests",
                                                         {"model": "widget", "version": version})
        latencies, codes = [], []
        for f in futures:
            exc = f.exception()
            codes.append(code(exc))
            if exc is None:
                latencies.append(time.monotonic() - t0)
    assert status.model_description.status == pb.RUNNING
    accepted, refused = codes.count("OK"), codes.count("RESOURCE_EXHAUSTED")
    print(f"\n40-call burst: {accepted} accepted, {refused} RESOURCE_EXHAUSTED; slowest accepted "
          f"{max(latencies):.2f}s; DescribeModel {describe_s * 1000:.0f} ms, health {health_s * 1000:.0f} ms; "
          f"queued metric {queued}")
    assert (accepted, refused) == (2 + 16, 22)
    assert queued is not None and queued >= 14  # the queue is visible where the metrics say it is
    assert describe_s < 0.2 and health_s < 0.2
    assert max(latencies) < 9 * 0.25 + 1.5
    assert runtime.calls - calls_before == 18  # refused calls ran nothing


def test_deadlines_and_cancelled_calls_are_not_run(agent_factory, make_package, pb, pb_modules):
    """20 calls with a 0.5 s deadline to a 0.25 s model with one slot: no more inferences run than could
    have succeeded (2), every skipped call is counted, and the inference histogram counts exactly the
    inferences run."""
    runtime = ControlledRuntime()
    agent = agent_factory(runtime=runtime, max_concurrency=1)
    make_package("anomalib", "widget")
    wait_known(agent, "widget")
    registry = agent.metrics.registry
    with grpc.insecure_channel(agent.config.socket) as ch:
        stub = pb_modules[1].EdgeAgentStub(ch)
        start(stub, pb, "widget")
        version = agent.registry.describe("widget").version
        labels = {"model": "widget", "version": version}
        runtime.predict_delay = 0.25
        detect(stub, pb, "widget", grey_with_square())  # one run: the agent now knows runs take 0.25 s
        calls_before = runtime.calls
        hist_before = registry.get_sample_value("edge_agent_inference_duration_seconds_count", labels)
        req = request(pb)
        futures = [stub.DetectAnomalies.future(req, timeout=0.5) for _ in range(20)]
        codes = [code(f.exception()) for f in futures]
        time.sleep(0.6)  # anything (wrongly) still running would finish and be counted by now
        ran = runtime.calls - calls_before
        counted = registry.get_sample_value("edge_agent_inference_duration_seconds_count", labels) - hist_before
        exceeded = registry.get_sample_value("edge_agent_requests_total", {**labels, "code": "DEADLINE_EXCEEDED"})

        # A queued call whose client cancels is not run either.
        runtime.predict_delay = 0.5
        runtime.predict_gate = None
        first = stub.DetectAnomalies.future(req, timeout=10)
        time.sleep(0.1)
        queued = stub.DetectAnomalies.future(req, timeout=10)
        time.sleep(0.1)
        calls = runtime.calls
        queued.cancel()
        first.result(10)
        time.sleep(0.3)
        cancelled_ran = runtime.calls - calls
    print(f"\n20 calls, 0.5 s deadline, 0.25 s model, 1 slot: codes {sorted(set(codes))}, "
          f"OK {codes.count('OK')}, inferences run {ran}, histogram +{counted:.0f}, DEADLINE_EXCEEDED "
          f"counted {exceeded:.0f}")
    assert ran <= 2 and codes.count("OK") >= 1
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
    assert counted == ran  # every inference run is in the histogram, nothing else is
    assert exceeded >= 20 - 2 - codes.count("RESOURCE_EXHAUSTED") - 1
    assert cancelled_ran == 0


def test_stop_lets_calls_already_received_finish(agent_factory, make_package, pb, pb_modules):
    runtime = ControlledRuntime()
    agent = agent_factory(runtime=runtime, max_concurrency=2)
    make_package("anomalib", "widget")
    wait_known(agent, "widget")
    with grpc.insecure_channel(agent.config.socket) as ch:
        stub = pb_modules[1].EdgeAgentStub(ch)
        start(stub, pb, "widget")
        runtime.predict_delay = 0.1
        req = request(pb, grey_with_square(1024, 1024, box=(100, 100, 300, 300)))
        futures = [stub.DetectAnomalies.future(req, timeout=30) for _ in range(16)]
        time.sleep(0.05)
        stopper = threading.Thread(target=agent.stop, kwargs={"grace": 20.0})
        stopper.start()
        codes = [code(f.exception()) for f in futures]
        stopper.join(30)
    assert codes == ["OK"] * 16, codes
    assert agent.registry.models()[0].status.name == "STOPPED"


def test_stop_model_during_requests_never_fails_them_internally(agent_factory, make_package, pb, pb_modules):
    """StopModel/StartModel in a loop while 4 clients call DetectAnomalies: clients see OK or
    FAILED_PRECONDITION only (never INTERNAL "session was unloaded"), StopModel always says STOPPED."""
    runtime = ControlledRuntime()
    agent = agent_factory(runtime=runtime, max_concurrency=2, warmup_runs=0)
    make_package("anomalib", "widget")
    wait_known(agent, "widget")
    end = time.monotonic() + 1.0
    with grpc.insecure_channel(agent.config.socket) as ch:
        stub = pb_modules[1].EdgeAgentStub(ch)
        start(stub, pb, "widget")
        req = request(pb)

        def client() -> dict[str, int]:
            seen: dict[str, int] = {}
            while time.monotonic() < end:
                try:
                    stub.DetectAnomalies(req, timeout=10)
                    c = "OK"
                except grpc.RpcError as exc:
                    c = exc.code().name
                seen[c] = seen.get(c, 0) + 1
            return seen

        def operator() -> list[int]:
            statuses = []
            while time.monotonic() < end:
                statuses.append(stub.StopModel(pb.StopModelRequest(model_component="widget"), timeout=10).status)
                stub.StartModel(pb.StartModelRequest(model_component="widget"), timeout=10)
                agent.registry.wait_for("widget", {ModelStatus.RUNNING, ModelStatus.FAILED}, 10)
            return statuses

        with ThreadPoolExecutor(5) as pool:
            clients = [pool.submit(client) for _ in range(4)]
            statuses = pool.submit(operator).result(30)
            seen: dict[str, int] = {}
            for f in clients:
                for k, v in f.result(30).items():
                    seen[k] = seen.get(k, 0) + v
    assert statuses and set(statuses) == {pb.STOPPED}
    assert set(seen) <= {"OK", "FAILED_PRECONDITION"}, seen
    assert seen.get("OK", 0) > 0
