"""Exceptions of the packaging API, named like Lookout for Vision's.

Pipeline scripts written for boto3 catch ``client.exceptions.ConflictException`` or read
``err.response["Error"]["Code"]``; both work here. Every class derives from
``agent.errors.AgentError``, so the ``edge-agent`` CLI prints ``<Name>: <message>`` on stderr
and exits non-zero without knowing about packaging.
"""

from __future__ import annotations

from typing import Any

from agent.errors import AgentError, ErrorCode


class LookoutVisionError(AgentError):
    """Base class: ``error_code`` is the LFV exception name, ``message`` says what was wrong."""

    error_code = "InternalServerException"
    code = ErrorCode.INTERNAL
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)

    @property
    def response(self) -> dict[str, Any]:
        """The botocore ClientError shape, for scripts that inspect ``err.response``."""
        return {"Error": {"Code": self.error_code, "Message": self.message},
                "ResponseMetadata": {"HTTPStatusCode": self.http_status}}

    def __str__(self) -> str:
        return f"{self.error_code}: {self.message}"


class ValidationException(LookoutVisionError):
    """The request breaks a parameter rule (pattern, length, combination)."""

    error_code = "ValidationException"
    code = ErrorCode.INVALID_ARGUMENT
    http_status = 400


class ConflictException(LookoutVisionError):
    """The request clashes with an existing resource (job name, component version, client token)."""

    error_code = "ConflictException"
    code = ErrorCode.FAILED_PRECONDITION
    http_status = 409


class ResourceNotFoundException(LookoutVisionError):
    error_code = "ResourceNotFoundException"
    code = ErrorCode.NOT_FOUND
    http_status = 404


class AccessDeniedException(LookoutVisionError):
    """The registry (EDGE_AGENT_HOME) or an output location cannot be written by this user."""

    error_code = "AccessDeniedException"
    code = ErrorCode.FAILED_PRECONDITION
    http_status = 403


class InternalServerException(LookoutVisionError):
    error_code = "InternalServerException"
    code = ErrorCode.INTERNAL
    http_status = 500


class ThrottlingException(LookoutVisionError):
    """The registry database stayed locked by other writers longer than the busy timeout."""

    error_code = "ThrottlingException"
    code = ErrorCode.UNAVAILABLE
    http_status = 429


class ServiceQuotaExceededException(LookoutVisionError):
    """Too many packaging jobs are active at once (``max_active_jobs``)."""

    error_code = "ServiceQuotaExceededException"
    code = ErrorCode.RESOURCE_EXHAUSTED
    http_status = 402


ALL = (ValidationException, ConflictException, ResourceNotFoundException, AccessDeniedException,
       InternalServerException, ThrottlingException, ServiceQuotaExceededException)


class Exceptions:
    """``client.exceptions.<Name>``, as boto3 clients have it."""

    LookoutVisionError = LookoutVisionError
    ClientError = LookoutVisionError
    ValidationException = ValidationException
    ConflictException = ConflictException
    ResourceNotFoundException = ResourceNotFoundException
    AccessDeniedException = AccessDeniedException
    InternalServerException = InternalServerException
    ThrottlingException = ThrottlingException
    ServiceQuotaExceededException = ServiceQuotaExceededException
