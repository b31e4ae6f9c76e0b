"""Metric values after known calls, on a real agent (Unix socket, ONNX Runtime on CPU) with a fresh registry."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from metrics_fixtures import (
    DASHBOARD,
    MODEL,
    RunningAgent,
    dashboard_queries,
    exported_names,
    grey,
    make_models_dir,
    metric_names,
    scrape,
    start_agent,
    wait_until,
)
from prometheus_client import CollectorRegistry

from agent.cli.status import histogram_quantile
from agent.core.lifecycle import ModelInfo, ModelStatus
from agent.core.package import build_package
from agent.logs import configure, model_context
from agent.serving.grpc._generated import edge_agent_pb2 as pb
from agent.serving.metrics import LATENCY_BUCKETS, AgentMetrics
from agent.tools.modelgen import build_anomalib_v2

SERVICE = "AWS.LookoutVision.EdgeAgent"
STAGES = ("image_read", "queue", "preprocess", "inference", "postprocess")


def handled(a: RunningAgent, method: str, code: str) -> float:
    return a.sample("grpc_server_handled_total", grpc_service=SERVICE, grpc_method=method, grpc_type="unary",
                    grpc_code=code)


def test_detect_counts_and_histograms(running_agent: RunningAgent) -> None:
    a = running_agent
    a.stub.StartModel(pb.StartModelRequest(model_component=MODEL), timeout=10)
    a.wait_status(ModelStatus.RUNNING)
    n = 7
    for _ in range(n):
        a.detect(grey())
    labels = {"model": MODEL, "version": "1"}
    assert a.sample("edge_agent_request_duration_seconds_count", **labels) == n
    assert a.sample("edge_agent_requests_total", **labels, code="OK") == n
    assert handled(a, "DetectAnomalies", "OK") == n
    assert a.sample("grpc_server_started_total", grpc_service=SERVICE, grpc_method="DetectAnomalies",
                    grpc_type="unary") == n
    e2e = a.sample("edge_agent_request_duration_seconds_sum", **labels)
    stage_sums = {s: a.sample(f"edge_agent_{s}_duration_seconds_sum", **labels) for s in STAGES}
    for stage in STAGES:
        assert a.sample(f"edge_agent_{stage}_duration_seconds_count", **labels) == n, stage
    # Plausible sums: every stage took some time (except maybe the queue), the end-to-end time covers
    # the stages it contains, and a 64x64 model on a CPU takes well under a second per request.
    assert stage_sums["inference"] > 0 and stage_sums["preprocess"] > 0
    assert sum(stage_sums.values()) <= e2e < n * 1.0
    assert a.sample("edge_agent_image_pixels_sum", **labels) == n * 64 * 64
    # Cumulative buckets end at +Inf == count.
    assert a.sample("edge_agent_request_duration_seconds_bucket", **labels, le="+Inf") == n
    assert a.sample("edge_agent_request_duration_seconds_bucket", **labels, le=str(LATENCY_BUCKETS[-1])) == n


def test_error_codes_are_counted(running_agent: RunningAgent) -> None:
    a = running_agent
    # Model STOPPED: FAILED_PRECONDITION, aborted in the servicer, still counted.
    with pytest.raises(grpc.RpcError) as err:
        a.detect(grey())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        a.detect(grey(), model="no-such-model")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError):
        a.stub.StopModel(pb.StopModelRequest(model_component=MODEL), timeout=10)
    a.stub.StartModel(pb.StartModelRequest(model_component=MODEL), timeout=10)
    a.wait_status(ModelStatus.RUNNING)
    bad = pb.DetectAnomaliesRequest(model_component=MODEL, bitmap=pb.Bitmap(width=64, height=64, byte_data=b"x"))
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as err:
            a.stub.DetectAnomalies(bad, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    a.stub.ListModels(pb.ListModelsRequest(), timeout=10)
    # A method the server doesn't have at all.
    unknown = a.channel.unary_unary("/AWS.LookoutVision.EdgeAgent/NoSuchMethod")
    with pytest.raises(grpc.RpcError) as err:
        unknown(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

    assert handled(a, "DetectAnomalies", "FAILED_PRECONDITION") == 1
    assert handled(a, "DetectAnomalies", "NOT_FOUND") == 1
    assert handled(a, "DetectAnomalies", "INVALID_ARGUMENT") == 3
    assert handled(a, "StopModel", "FAILED_PRECONDITION") == 1
    assert handled(a, "StartModel", "OK") == 1
    assert handled(a, "ListModels", "OK") == 1
    # Counted under fixed labels: a client-chosen method name never becomes a label value.
    assert a.sample("grpc_server_handled_total", grpc_service="unknown", grpc_method="unknown",
                    grpc_type="unknown", grpc_code="UNIMPLEMENTED") == 1
    assert handled(a, "NoSuchMethod", "UNIMPLEMENTED") == 0
    # Rejected before reaching the model: no latency observed, no per-model request.
    assert a.sample("edge_agent_request_duration_seconds_count", model=MODEL, version="1") == 0
    assert a.sample("grpc_server_handling_seconds_count", grpc_service=SERVICE, grpc_method="DetectAnomalies",
                    grpc_type="unary") == 5


def test_model_status_info_and_load_metrics(running_agent: RunningAgent) -> None:
    a = running_agent

    def status(name: str) -> float:
        return a.sample("edge_agent_model_status", model=MODEL, status=name)

    assert status("STOPPED") == 1 and status("RUNNING") == 0
    a.stub.StartModel(pb.StartModelRequest(model_component=MODEL), timeout=10)
    a.wait_status(ModelStatus.RUNNING)
    assert status("RUNNING") == 1 and status("STOPPED") == 0 and status("STARTING") == 0
    info = a.sample("edge_agent_model_info", model=MODEL, version="1", provider="CPUExecutionProvider",
                    providers="CPUExecutionProvider")
    assert info == 1
    assert 0 < a.sample("edge_agent_model_load_duration_seconds", model=MODEL, version="1") < 30
    assert a.sample("edge_agent_model_warmup_duration_seconds", model=MODEL, version="1") > 0
    # Present (not just 0 by default): read from the model's gate at scrape time.
    for gauge in ("edge_agent_inflight_requests", "edge_agent_queued_requests"):
        assert a.registry.get_sample_value(gauge, {"model": MODEL, "version": "1"}) == 0, gauge
    gate = a.agent.registry.running(MODEL).gate
    with gate.slot(time.perf_counter), gate.slot(time.perf_counter):  # both of MaxConcurrentInferences=2
        assert a.sample("edge_agent_inflight_requests", model=MODEL, version="1") == 2
    a.stub.StopModel(pb.StopModelRequest(model_component=MODEL), timeout=10)
    assert status("STOPPED") == 1 and status("RUNNING") == 0
    assert a.registry.get_sample_value("edge_agent_model_info", {"model": MODEL, "version": "1",
                                       "provider": "CPUExecutionProvider",
                                       "providers": "CPUExecutionProvider"}) is None
    # Process metrics are still there, on the injected registry.
    assert a.sample("process_cpu_seconds_total") > 0
    assert a.registry.get_sample_value("edge_agent_build_info", {"version": __import__("agent").__version__}) == 1


def test_swap_counts_and_http_endpoint(short_tmp: Path) -> None:
    models = make_models_dir(short_tmp)
    a = start_agent(short_tmp, models, autostart=(MODEL,))
    try:
        a.wait_status(ModelStatus.RUNNING)
        # A new package version beside the running one → swapped in.
        staging = short_tmp / "v2"
        onnx_path = build_anomalib_v2(short_tmp / "v2.onnx", image_size=(64, 64))
        build_package(onnx_path, staging, name=MODEL, model_version="2")
        for f in staging.iterdir():
            (models / MODEL / f.name).unlink(missing_ok=True)
        for f in staging.iterdir():
            f.rename(models / MODEL / f.name)
        wait_until(lambda: a.sample("edge_agent_model_swaps_total", model=MODEL, result="ok") == 1, 20, "the swap")
        assert a.agent.registry.describe(MODEL).version == "2"
        assert a.sample("edge_agent_model_load_duration_seconds", model=MODEL, version="2") > 0
        assert a.registry.get_sample_value("edge_agent_model_load_duration_seconds",
                                           {"model": MODEL, "version": "1"}) is None
        a.detect(grey())
        # The same numbers over HTTP, as Prometheus will see them.
        samples = scrape(a.metrics_url)
        assert ({"model": MODEL, "version": "2"}, 1.0) in samples["edge_agent_request_duration_seconds_count"]
        assert any(lbl.get("result") == "ok" and v == 1 for lbl, v in samples["edge_agent_model_swaps_total"])
        assert "process_resident_memory_bytes" in samples
        # A broken package for the running model → failed swap, old version keeps serving.
        manifest = json.loads((models / MODEL / "manifest.json").read_text())
        (models / MODEL / manifest["runtime_artifact"]).write_bytes(b"not an onnx model")
        manifest["model_version"] = "3"
        (models / MODEL / "manifest.json").write_text(json.dumps(manifest))
        wait_until(lambda: a.sample("edge_agent_model_swaps_total", model=MODEL, result="failed") >= 1, 20,
                   "the failed swap")
        assert a.agent.registry.describe(MODEL).status == ModelStatus.RUNNING
    finally:
        a.channel.close()
        a.agent.stop(grace=2)
    assert a.agent.metrics_server is None


def test_metrics_port_off_and_taken(short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    models = make_models_dir(short_tmp)
    a = start_agent(short_tmp, models, metrics_port=-1)
    try:
        assert a.agent.metrics_server is None
        port = None
    finally:
        a.agent.stop(grace=1)
    first = start_agent(short_tmp, models, socket=f"unix://{short_tmp}/one.sock")
    try:
        port = first.agent.metrics_server.port  # type: ignore[union-attr]
        with caplog.at_level(logging.ERROR, logger="agent.app"):
            second = start_agent(short_tmp, models, socket=f"unix://{short_tmp}/two.sock", metrics_port=port)
        try:
            # A taken port costs the metrics, not the agent.
            assert second.agent.metrics_server is None
            assert second.stub.ListModels(pb.ListModelsRequest(), timeout=10) is not None
            assert any(f"cannot listen on 127.0.0.1:{port}" in r.getMessage() for r in caplog.records)
        finally:
            second.agent.stop(grace=1)
    finally:
        first.agent.stop(grace=1)


def test_registries_are_independent() -> None:
    # Two agents' metrics in one process: no duplicate-timeseries errors, no shared values.
    one, two = AgentMetrics(CollectorRegistry()), AgentMetrics(CollectorRegistry())
    info = ModelInfo("m", "", ModelStatus.RUNNING, "", "1", ("CPUExecutionProvider",))
    one.on_status(info)
    one.on_swap(info, False, "bad file")
    assert one.registry.get_sample_value("edge_agent_model_swaps_total", {"model": "m", "result": "failed"}) == 1
    assert two.registry.get_sample_value("edge_agent_model_swaps_total", {"model": "m", "result": "failed"}) is None
    one.on_removed("m")
    assert one.registry.get_sample_value("edge_agent_model_status", {"model": "m", "status": "RUNNING"}) is None


def test_quantile_from_buckets_matches_prometheus_rule() -> None:
    # Prometheus interpolates linearly inside the bucket holding the rank.
    buckets = [(0.001, 10.0), (0.01, 90.0), (0.1, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.001 + (0.01 - 0.001) * (50 - 10) / 80)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.01 + (0.1 - 0.01) * (99 - 90) / 10)
    assert histogram_quantile(0.05, buckets) == pytest.approx(0.0005)  # first bucket: from 0
    assert np.isnan(histogram_quantile(0.5, [(float("inf"), 0.0)]))
    # Rank in +Inf: the highest finite bound, as Prometheus does.
    assert histogram_quantile(0.99, [(0.1, 1.0), (float("inf"), 10.0)]) == 0.1


def test_log_lines_carry_model_context() -> None:
    plain, js = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        log = logging.getLogger("agent.test")
        configure("INFO", "plain", plain)
        with model_context("widget", "3"):
            log.info("model widget RUNNING on CPUExecutionProvider")
        log.info("edge agent stopped")
        configure("INFO", "json", js)
        with model_context("widget", "3"):
            try:
                raise ValueError("bad input") from OSError("disk")
            except ValueError:
                log.exception('inference failed: "quoted"')
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = plain.getvalue().splitlines()
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO agent\.test \[model=widget version=3\]: model "
                    r"widget RUNNING", lines[0]), lines[0]
    assert lines[1].endswith("INFO agent.test: edge agent stopped")
    doc = json.loads(js.getvalue().strip())  # one line, valid JSON despite quotes and a traceback
    assert doc["model"] == "widget" and doc["version"] == "3" and doc["level"] == "ERROR"
    assert "OSError: disk" in doc["exception"] and "direct cause" in doc["exception"]


def test_dashboard_references_only_exported_metrics(running_agent: RunningAgent) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 10
    used = set().union(*(metric_names(q) for q in queries))
    assert "edge_agent_request_duration_seconds_bucket" in used and "edge_agent_model_info" in used
    exported = exported_names(running_agent.registry)
    assert used <= exported, f"dashboard uses metrics the agent doesn't export: {sorted(used - exported)}"
    # The panels the issue asks for: latency quantiles per model, error rate, status, provider.
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for word in ("p50", "p99", "error", "status", "provider"):
        assert word in titles
    assert metric_names('histogram_quantile(0.9, sum by (le) (rate(x_bucket{a="b"}[5m]))) / on(job) y') == \
        {"x_bucket", "y"}


def test_docs_table_lists_every_agent_metric(running_agent: RunningAgent) -> None:
    # docs/metrics.md must name every edge_agent_* family, so the table can't silently fall behind.
    doc = (DASHBOARD.parent / "metrics.md").read_text()
    families = {f.name + ("_total" if f.type == "counter" else "_info" if f.type == "info" else "")
                for f in running_agent.registry.collect() if f.name.startswith(("edge_agent_", "grpc_server_"))}
    missing = sorted(f for f in families if f"`{f}`" not in doc)
    assert not missing, f"docs/metrics.md does not mention {missing}"


def test_status_command(running_agent: RunningAgent, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main

    a = running_agent
    a.stub.StartModel(pb.StartModelRequest(model_component=MODEL), timeout=10)
    a.wait_status(ModelStatus.RUNNING)
    for _ in range(5):
        a.detect(grey())
    assert main(["status", "--socket", a.socket, "--metrics-url", a.metrics_url, "--interval", "0.2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("edge agent ") and a.socket in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("MODEL"))
    row = lines[header + 1].split()
    assert row[:4] == [MODEL, "RUNNING", "1", "CPU"], out
    # No requests during the interval: p50/p99 since start, marked with *.
    assert re.search(r"\d+\.\d\d ms\*\s+\d+\.\d\d ms\*", lines[header + 1]), out
    assert "since the agent started" in out
    assert len(lines) <= 25  # one screen

    # With traffic during the interval: a rate, and quantiles over the interval (no *).
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            a.detect(grey())

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        assert main(["status", "--socket", a.socket, "--metrics-url", a.metrics_url, "--interval", "0.5"]) == 0
    finally:
        stop.set()
        sender.join(10)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(MODEL)).split()
    assert float(row[4]) > 0 and "*" not in out, out

    # No agent on the socket: exit 1 and one line saying so, no table (tests/cli/test_status_cli.py has more).
    missing = a.socket.replace("agent.sock", "none.sock")
    assert main(["status", "--socket", missing, "--metrics-url", "http://127.0.0.1:9/metrics",
                 "--interval", "0"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and f"agent not reachable on {missing}" in captured.err
