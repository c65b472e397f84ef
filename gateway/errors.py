"""The gateway's exceptions. API errors carry the contract's status, type and details."""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class StorageUnavailable(GatewayError):
    """PostgreSQL cannot be reached or did not answer in time."""


class DynsecUnavailable(GatewayError):
    """The broker's dynamic security plugin cannot be reached or did not answer in time."""


class DynsecRefused(GatewayError):
    """The dynamic security plugin answered a command with an error."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"{command}: {error}")
        self.command = command
        self.error = error


class ApiError(GatewayError):
    """An error answered to a request/reply caller in the Bota error shape."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, details: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


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
