"""Runtimes for lifecycle tests, injected through Agent(runtime=...): each wraps the real
OnnxRuntime and adds one controllable behaviour (block a load, block or fail a predict,
count concurrent predicts). The ONNX session underneath is always real."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agent.core.package import ModelPackage
from agent.runtime.onnx import OnnxRuntime, OnnxRuntimeOptions, OnnxSession


class WrappedSession:
    def __init__(self, inner: OnnxSession, runtime: ControlledRuntime) -> None:
        self.inner = inner
        self.runtime = runtime
        self.inputs = inner.inputs
        self.outputs = inner.outputs
        self.providers = inner.providers
        self.provider_note = inner.provider_note

    def predict(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        rt = self.runtime
        with rt.lock:
            rt.active += 1
            rt.max_active = max(rt.max_active, rt.active)
            rt.calls += 1
            fail = rt.fail_next > 0
            if fail:
                rt.fail_next -= 1
        try:
            if fail:
                raise RuntimeError("simulated device error")
            if rt.predict_gate is not None:
                rt.predict_gate.wait(10)
            if rt.predict_delay:
                time.sleep(rt.predict_delay)
            return self.inner.predict(feeds, output_names)
        finally:
            with rt.lock:
                rt.active -= 1

    def unload(self) -> None:
        self.inner.unload()


class ControlledRuntime:
    def __init__(self) -> None:
        self.inner = OnnxRuntime(OnnxRuntimeOptions(providers=("cpu",)))
        self.load_gate: threading.Event | None = None
        self.predict_gate: threading.Event | None = None
        self.predict_delay = 0.0
        self.fail_next = 0
        self.lock = threading.Lock()
        self.active = self.max_active = self.calls = 0

    def load(self, package: ModelPackage) -> Any:
        if self.load_gate is not None:
            self.load_gate.wait(10)
        return WrappedSession(self.inner.load(package), self)
