"""Exceptions of the packaging API, named like Lookout for Vision's.

Pipeline scripts written for boto3 catch ``client.exceptions.ConflictException`` or read
``err.response["Error"]["Code"]``; both work here. Every class derives from
``agent.errors.AgentError``.

The packaging CLI's exit codes are defined here, in one place (``EXIT_CODES``, documented in
docs/packaging.md, which a test keeps in step): each exception class names its ``exit_code``, so a
CI script can tell "fix the request" from "retry later" from "the job failed".
"""

from __future__ import annotations

from typing import Any

from agent.errors import AgentError, ErrorCode

# Exit codes of the packaging commands (``edge-agent start-model-packaging-job`` etc.).
EXIT_OK = 0
EXIT_SERVICE_ERROR = 1  # the request was valid but could not be carried out (damaged registry, bug)
EXIT_INVALID_REQUEST = 2  # fix the command line or the request (also argparse's usage errors)
EXIT_NOT_FOUND = 3  # unknown project, model version, job or component
EXIT_CONFLICT = 4  # clashes with an existing resource
EXIT_RETRY = 5  # busy registry or too many active jobs: the same command may work later
EXIT_ACCESS_DENIED = 6  # the registry directory or database can't be read or written by this user
EXIT_JOB_FAILED = 7  # --wait: the packaging job ended FAILED (its StatusMessage says why)

#: code -> (meaning, what raises it): the table docs/packaging.md shows.
EXIT_CODES: dict[int, tuple[str, str]] = {
    EXIT_OK: ("success", "the response JSON is on stdout"),
    EXIT_SERVICE_ERROR: ("service error", "InternalServerException: a damaged or newer registry database, "
                                          "an unexpected error"),
    EXIT_INVALID_REQUEST: ("invalid request", "ValidationException, usage errors"),
    EXIT_NOT_FOUND: ("not found", "ResourceNotFoundException"),
    EXIT_CONFLICT: ("conflict", "ConflictException"),
    EXIT_RETRY: ("retry later", "ThrottlingException, ServiceQuotaExceededException"),
    EXIT_ACCESS_DENIED: ("access denied", "AccessDeniedException"),
    EXIT_JOB_FAILED: ("job failed", "`start-model-packaging-job --wait`: the job ended FAILED"),
}


class LookoutVisionError(AgentError):
    """Base class: ``error_code`` is the LFV exception name, ``message`` says what was wrong."""

    error_code = "InternalServerException"
    code = ErrorCode.INTERNAL
    http_status = 500
    exit_code = EXIT_SERVICE_ERROR

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
    exit_code = EXIT_INVALID_REQUEST


class ConflictException(LookoutVisionError):
    """The request clashes with an existing resource (job name, component version, client token)."""

    error_code = "ConflictException"
    code = ErrorCode.FAILED_PRECONDITION
    http_status = 409
    exit_code = EXIT_CONFLICT


class ResourceNotFoundException(LookoutVisionError):
    error_code = "ResourceNotFoundException"
    code = ErrorCode.NOT_FOUND
    http_status = 404
    exit_code = EXIT_NOT_FOUND


class AccessDeniedException(LookoutVisionError):
    """The registry (EDGE_AGENT_HOME) or an output location cannot be written by this user."""

    error_code = "AccessDeniedException"
    code = ErrorCode.FAILED_PRECONDITION
    http_status = 403
    exit_code = EXIT_ACCESS_DENIED


class InternalServerException(LookoutVisionError):
    error_code = "InternalServerException"
    code = ErrorCode.INTERNAL
    http_status = 500
    exit_code = EXIT_SERVICE_ERROR


class ThrottlingException(LookoutVisionError):
    """The registry database stayed locked by other writers longer than the busy timeout."""

    error_code = "ThrottlingException"
    code = ErrorCode.UNAVAILABLE
    http_status = 429
    exit_code = EXIT_RETRY


class ServiceQuotaExceededException(LookoutVisionError):
    """Too many packaging jobs are active at once (``max_active_jobs``)."""

    error_code = "ServiceQuotaExceededException"
    code = ErrorCode.RESOURCE_EXHAUSTED
    http_status = 402
    exit_code = EXIT_RETRY


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
