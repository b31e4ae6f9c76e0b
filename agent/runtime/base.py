"""The runtime contract the inference pipeline depends on (ONNX Runtime today)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agent.core.package import ModelPackage


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str


class RuntimeSession(Protocol):
    """One loaded model. predict() must be safe to call from several threads at once."""

    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def outputs(self) -> Sequence[TensorSpec]: ...

    @property
    def providers(self) -> Sequence[str]:
        """Execution providers the session really uses, best first (e.g. ["CUDAExecutionProvider", ...])."""
        ...

    @property
    def provider_note(self) -> str:
        """Human-readable note on provider selection, for the model's status message."""
        ...

    def predict(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]: ...

    def unload(self) -> None: ...


class ModelRuntime(Protocol):
    def load(self, package: ModelPackage) -> RuntimeSession:
        """Create a session for the package; raises ModelLoadError with a readable reason."""
        ...
