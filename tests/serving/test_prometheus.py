"""A real Prometheus server scrapes a real agent; we ask it for histogram_quantile over our histogram.

Prometheus is Debian's `prometheus` package (scripts/install-test-deps installs it in CI), or the
binary named by PROMETHEUS_BIN. Without one the test skips locally, and fails when CI is set: a CI
image that lost the package must not pass silently.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from metrics_fixtures import (
    DASHBOARD,
    MODEL,
    RunningAgent,
    dashboard_queries,
    grey,
    scrape,
    wait_until,
)

from agent.cli.status import histogram_quantile
from agent.core.lifecycle import ModelStatus
from agent.serving.grpc._generated import edge_agent_pb2 as pb

JOB = "edge-agent"


def prometheus_binary() -> str:
    found = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")
    if not found and os.access("/usr/sbin/prometheus", os.X_OK):
        found = "/usr/sbin/prometheus"
    if found:
        return found
    reason = ("no prometheus binary: install Debian's package (scripts/install-test-deps, or apt-get install "
              "prometheus) or set PROMETHEUS_BIN")
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip")
    pytest.skip(reason)


class Prometheus:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def query(self, expr: str) -> dict[str, Any]:
        """/api/v1/query; returns the parsed body (status "success" or "error")."""
        address = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(address, timeout=5) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:  # 400 = bad PromQL, with an error body
            return json.load(exc)

    def scalar(self, expr: str) -> float:
        """The value of a one-element vector result (NaN when it is empty)."""
        body = self.query(expr)
        assert body["status"] == "success", f"{expr}: {body}"
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else math.nan

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_prometheus(binary: str, workdir: Path, target: str) -> Prometheus:
    """Prometheus on 127.0.0.1, scraping `target` every second. It can't report a port it chose itself,
    so we pick a free one and retry if another process took it in between."""
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n")
    log = workdir / "prometheus.log"
    for _attempt in range(3):
        port = _free_port()
        with log.open("wb") as out:
            process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT)
        prom = Prometheus(process, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return prom
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        stop_prometheus(prom)
        if "address already in use" not in prom.tail():
            break
    raise AssertionError(f"prometheus did not become ready:\n{prom.tail()}")


def stop_prometheus(prom: Prometheus) -> None:
    prom.process.terminate()
    try:
        prom.process.wait(10)
    except subprocess.TimeoutExpired:
        prom.process.kill()
        prom.process.wait(5)


@pytest.fixture
def prometheus(running_agent: RunningAgent, short_tmp: Path) -> Iterator[Prometheus]:
    binary = prometheus_binary()
    workdir = short_tmp / "prometheus"
    workdir.mkdir()
    assert running_agent.agent.metrics_server is not None
    prom = start_prometheus(binary, workdir, f"127.0.0.1:{running_agent.agent.metrics_server.port}")
    try:
        yield prom
    finally:
        stop_prometheus(prom)


def _wait_value(prom: Prometheus, expr: str, want: float, timeout: float = 20) -> None:
    try:
        wait_until(lambda: prom.scalar(expr) == want, timeout, f"{expr} == {want}", interval=0.25)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last value {prom.scalar(expr)}; prometheus log:\n{prom.tail()}") from None


def test_prometheus_scrapes_and_computes_quantiles(running_agent: RunningAgent, prometheus: Prometheus) -> None:
    a, prom = running_agent, prometheus
    a.stub.StartModel(pb.StartModelRequest(model_component=MODEL), timeout=10)
    a.wait_status(ModelStatus.RUNNING)
    _wait_value(prom, f'up{{job="{JOB}"}}', 1)
    _wait_value(prom, f'edge_agent_model_status{{model="{MODEL}", status="RUNNING"}}', 1)

    # Two batches with an ingested scrape between them, so rate() over the window sees an increase.
    sel = f'model="{MODEL}"'
    for _ in range(10):
        a.detect(grey())
    _wait_value(prom, f"sum(edge_agent_request_duration_seconds_count{{{sel}}})", 10)
    for _ in range(20):
        a.detect(grey())
    _wait_value(prom, f"sum(edge_agent_request_duration_seconds_count{{{sel}}})", 30)

    # Quantiles over all requests so far, from the buckets Prometheus stored …
    quantiles = {q: prom.scalar(f"histogram_quantile({q}, sum by (le) (edge_agent_request_duration_seconds_bucket"
                                f"{{{sel}}}))") for q in (0.5, 0.99)}
    # … agree with the same computation on our own scrape (the `status` command's code path).
    samples = scrape(a.metrics_url)
    buckets = [(float(lbl["le"]), v) for lbl, v in samples["edge_agent_request_duration_seconds_bucket"]
               if lbl["model"] == MODEL]
    for q, value in quantiles.items():
        assert 0 < value < 1.0, (q, value)  # a 64x64 model on the CPU: well under a second
        assert value == pytest.approx(histogram_quantile(q, buckets), rel=1e-9)
    assert quantiles[0.5] <= quantiles[0.99]

    # The dashboard's form: quantile of the per-second rate over a window, per model.
    recent = prom.scalar("histogram_quantile(0.99, sum by (le, model) (rate(edge_agent_request_duration_seconds_bucket"
                         f"{{{sel}}}[1m])))")
    assert 0 < recent < 1.0, recent
    inference = prom.scalar("histogram_quantile(0.5, sum by (le) (rate(edge_agent_inference_duration_seconds_bucket"
                            f"{{{sel}}}[1m])))")
    assert 0 < inference <= recent
    assert prom.scalar(f'sum(edge_agent_requests_total{{{sel}, code="OK"}})') == 30
    assert prom.scalar(f'edge_agent_model_info{{{sel}, provider="CPUExecutionProvider"}}') == 1


def test_dashboard_queries_are_valid_promql(running_agent: RunningAgent, prometheus: Prometheus) -> None:
    # Grafana variables replaced the way Grafana would; Prometheus itself judges the syntax.
    dashboard = json.loads(DASHBOARD.read_text())
    for expr in dashboard_queries(dashboard):
        promql = expr.replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$model", ".*")
        body = prometheus.query(promql)
        assert body["status"] == "success", f"{expr}\n→ {body.get('error')}"
