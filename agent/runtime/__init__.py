"""Model runtimes behind a small load / predict / unload interface."""

from agent.runtime.base import ModelRuntime, RuntimeSession, TensorSpec

__all__ = ["ModelRuntime", "RuntimeSession", "TensorSpec"]
