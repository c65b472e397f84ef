"""Backend-facing messages: the request and response envelopes of MQTT request/reply."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import msgspec

MAX_REQUEST_BYTES = 256 * 1024
REPLY_PREFIX = "api/v1/replies/"


class Request(msgspec.Struct, kw_only=True):
    """A request envelope; ``body`` is any JSON value, checked by the route."""

    method: str
    path: str
    query: dict[str, str] = {}
    headers: dict[str, str] = {}
    body: Any = None
    reply_to: str | None = None
    correlation_id: str | int | None = None


class Response(msgspec.Struct, omit_defaults=True):
    status: int
    body: Any = None
    correlation_id: str | int | None = None


class EnvelopeError(ValueError):
    """The envelope is not valid JSON or lacks method/path."""


_any_json = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def reply_fields(payload: bytes) -> tuple[Any, str | None, str | int | None]:
    """Decode the envelope loosely and pull out its reply topic and correlation id.

    Used first, so a malformed envelope can still be answered when it names a reply topic.
    Returns the decoded document (or None when it is not JSON).
    """
    try:
        document = _any_json.decode(payload)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        # msgspec raises UnicodeDecodeError for invalid UTF-8 inside a string.
        return None, None, None
    if not isinstance(document, dict):
        return document, None, None
    reply_to = document.get("reply_to")
    correlation = document.get("correlation_id")
    return (
        document,
        reply_to if isinstance(reply_to, str) else None,
        correlation if isinstance(correlation, str | int) and not isinstance(correlation, bool)
        else None,
    )


def parse_request(document: Any) -> Request:
    """Turn the loosely decoded envelope into a typed Request or raise EnvelopeError."""
    if not isinstance(document, dict):
        raise EnvelopeError("The request envelope must be a JSON object")
    try:
        request = msgspec.convert(document, Request)
    except msgspec.ValidationError as exc:
        raise EnvelopeError(f"Invalid request envelope: {exc}") from exc
    request.headers = {name.lower(): value for name, value in request.headers.items()}
    request.method = request.method.upper()
    # As in HTTP, the path may carry a query string; `query` wins where both name a key.
    path, sep, query_string = request.path.partition("?")
    if sep:
        request.path = path
        request.query = dict(parse_qsl(query_string, keep_blank_values=True)) | request.query
    return request


def encode_response(response: Response) -> bytes:
    return _encoder.encode(response)
