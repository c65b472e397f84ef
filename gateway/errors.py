"""Every exception the gateway raises on purpose.

``ApiError`` and its subclasses are answered to request/reply callers with their status,
type and details; the rest are internal and translated at the boundary that meets them.
"""

from __future__ import annotations

from gateway_codecs.registry import Error, ErrorBody
from gateway_codecs.validation import ErrorDetail
from msgspec import UNSET


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError, ValueError):
    """A configuration value that cannot be used."""


# ---- storage ------------------------------------------------------------------------------


class StorageUnavailable(GatewayError):
    """PostgreSQL cannot be reached or did not answer in time."""


class ProcessConflict(GatewayError):
    """This process would clash with another gateway process on the same database."""


class SchemaMissing(StorageUnavailable):
    """The database exists but ``schema.sql`` was not applied."""


class BatchFailed(GatewayError):
    """PostgreSQL refused a heartbeat batch; ``retryable`` for deadlocks and the like."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


# ---- the broker's dynamic security plugin -------------------------------------------------


class DynsecUnavailable(GatewayError):
    """The broker's dynamic security plugin cannot be reached or did not answer in time."""


class DynsecRefused(GatewayError):
    """The dynamic security plugin answered a command with an error."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"{command}: {error}")
        self.command = command
        self.error = error


# ---- answered to callers ------------------------------------------------------------------


class ApiError(GatewayError):
    """An error answered to a request/reply caller in the registry's error shape.

    Each kind names its status and type: ``class NotFound(ApiError, status=404,
    type="not_found")``.
    """

    status = 500
    type = "internal_error"

    def __init_subclass__(cls, *, status: int, type: str, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.status, cls.type = status, type

    def __init__(self, message: str, details: list[ErrorDetail] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> ErrorBody:
        details = UNSET if self.details is None else self.details
        return ErrorBody(Error(type=self.type, message=self.message, details=details))


class InvalidRequest(ApiError, status=400, type="invalid_request"):
    """The envelope or the body is not valid JSON, or lacks method or path."""


class ValidationFailed(ApiError, status=400, type="validation_error"):
    """A field is missing, mistyped or out of range; ``details`` names every one."""


class AuthenticationFailed(ApiError, status=401, type="authentication_error"):
    """No API key, or an unknown or revoked one."""


class PermissionDenied(ApiError, status=403, type="permission_error"):
    """The key lacks the route's scope."""


class NotFound(ApiError, status=404, type="not_found"):
    """An unknown route, or an unknown or deleted object."""


class MethodNotAllowed(ApiError, status=405, type="method_not_allowed"):
    """A known path with another method."""


class Conflict(ApiError, status=409, type="conflict"):
    """A state conflict: bound to another user, a deleted device's serial, if-match."""


class RateLimited(ApiError, status=429, type="rate_limit_error"):
    """A per-device quota is full (open commands)."""


class InternalError(ApiError, status=500, type="internal_error"):
    """A bug; the message says nothing internal."""


class Unavailable(ApiError, status=503, type="unavailable"):
    """The database (or the broker's dynamic security) did not answer; retry."""


class TelemetronError(ApiError, status=400, type="invalid_request"):
    """An error on the Telemetron route, answered in that route's own shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
