# The class names are the AWS error codes botocore maps to exceptions, so they
# keep AWS's "Exception" suffix.
# ruff: noqa: N818
"""Service errors, rendered in the AWS JSON 1.1 error shape.

botocore picks the modeled exception class from ``__type`` (the part after a
``#`` if any), so the names here must match the service model exactly for
``client.exceptions.TaskNotFoundException`` and friends to be raised.
"""

from __future__ import annotations


class ServiceError(Exception):
    """An error answered to the caller as ``{"__type": code, "message": ...}``."""

    code = "InternalServiceError"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, str]:
        return {"__type": self.code, "message": self.message}


class InternalServiceError(ServiceError):
    code = "InternalServiceError"
    status = 500


class InvalidRequestException(ServiceError):
    code = "InvalidRequestException"
    status = 400


class TaskNotFoundException(ServiceError):
    code = "TaskNotFoundException"
    status = 400


class PipelineNotFoundException(ServiceError):
    code = "PipelineNotFoundException"
    status = 400


class PipelineDeletedException(ServiceError):
    code = "PipelineDeletedException"
    status = 400


class ThrottlingException(ServiceError):
    code = "ThrottlingException"
    status = 400


class SerializationException(ServiceError):
    code = "SerializationException"
    status = 400


class UnknownOperationException(ServiceError):
    code = "UnknownOperationException"
    status = 400


# Authentication failures. AWS answers these before looking at the body; the
# status codes follow what the AWS JSON services send.
class MissingAuthenticationTokenException(ServiceError):
    code = "MissingAuthenticationTokenException"
    status = 403


class IncompleteSignatureException(ServiceError):
    code = "IncompleteSignatureException"
    status = 400


class UnrecognizedClientException(ServiceError):
    code = "UnrecognizedClientException"
    status = 403


class AccessDeniedException(ServiceError):
    """An IAM policy refused the call (e.g. the ``datapipeline:workerGroup`` condition)."""

    code = "AccessDeniedException"
    status = 400
