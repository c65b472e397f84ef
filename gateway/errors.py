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
    """An error answered to a request/reply caller in the registry's error shape."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, details: list[ErrorDetail] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> ErrorBody:
        details = UNSET if self.details is None else self.details
        return ErrorBody(Error(type=self.type, message=self.message, details=details))


class InvalidRequest(ApiError):
    status, type = 400, "invalid_request"


class ValidationFailed(ApiError):
    status, type = 400, "validation_error"


class AuthenticationFailed(ApiError):
    status, type = 401, "authentication_error"


class PermissionDenied(ApiError):
    status, type = 403, "permission_error"


class NotFound(ApiError):
    status, type = 404, "not_found"


class MethodNotAllowed(ApiError):
    status, type = 405, "method_not_allowed"


class Conflict(ApiError):
    status, type = 409, "conflict"


class RateLimited(ApiError):
    status, type = 429, "rate_limit_error"


class InternalError(ApiError):
    status, type = 500, "internal_error"


class Unavailable(ApiError):
    status, type = 503, "unavailable"


class TelemetronError(ApiError):
    """An error on the Telemetron route, answered in that route's own shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
