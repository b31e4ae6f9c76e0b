"""The one error hierarchy of the agent core.

Every error carries a transport-neutral ErrorCode; agent/serving/grpc/status.py maps codes to gRPC
status codes in one place, so the core never imports grpc.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"


class AgentError(Exception):
    """Base class: `code` says which status a caller gets, the message says what was wrong."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(AgentError):
    """The request itself is wrong (image size, byte length, shared-memory handle, model name)."""

    code = ErrorCode.INVALID_ARGUMENT


class ModelNotFound(AgentError):
    code = ErrorCode.NOT_FOUND

    def __init__(self, name: str) -> None:
        super().__init__(f"model component {name!r} not found")
        self.name = name


class InvalidModelState(AgentError):
    """The call needs the model in another state (e.g. DetectAnomalies on a STOPPED model)."""

    code = ErrorCode.FAILED_PRECONDITION


class Overloaded(AgentError):
    """The model's bounded request queue is full."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(AgentError):
    """The caller's deadline passed (or would pass) before the request could run; it was not run."""

    code = ErrorCode.DEADLINE_EXCEEDED


class CallCancelled(AgentError):
    """The caller went away (cancelled, disconnected) before the request ran; it was not run."""

    code = ErrorCode.CANCELLED


class InferenceFailed(AgentError):
    """The runtime raised while running a request; the model stays RUNNING."""

    code = ErrorCode.INTERNAL


class PackageError(AgentError):
    """A model package (manifest.json + model files) is missing, malformed or inconsistent."""

    code = ErrorCode.INVALID_ARGUMENT


class ModelLoadError(AgentError):
    """The runtime could not create or warm up a session (the model goes FAILED)."""

    code = ErrorCode.INTERNAL


class ConfigError(AgentError):
    """A configuration value is invalid (CLI, environment or Greengrass configuration)."""

    code = ErrorCode.INVALID_ARGUMENT
