"""Method + path → route: the table's lookup, its path parameters, and metric labels."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import msgspec

from gateway.errors import MethodNotAllowed, NotFound

_ID = re.compile(r"^[A-Za-z0-9_]{1,64}$")
B = TypeVar("B")

# (status, response object)
Reply = tuple[int, msgspec.Struct]


@dataclass(frozen=True, slots=True)
class Route(Generic[B]):
    """One route: its scope, its handler, and what the handler takes.

    ``takes`` is the Struct the request's body (or, with ``source="query"``, its query
    string) is converted to before the handler sees it; None hands over the body as
    decoded JSON (settings documents), which the handler checks. With ``source="none"``
    the handler takes nothing (reads ignore a body; the Telemetron route reads its own).
    ``invalid`` is the message of the validation error.
    """

    method: str
    template: str
    scope: str
    handler: Callable[[Any, B], Awaitable[Reply]]
    takes: type[B] | None = None
    source: Literal["body", "query", "none"] = "body"
    invalid: str = "Invalid request"
    _parts: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_parts", tuple(self.template.split("/")))

    def params(self, segments: list[str]) -> dict[str, str] | None:
        """The path parameters when ``segments`` fit the template, else None."""
        if len(self._parts) != len(segments):
            return None
        params: dict[str, str] = {}
        for part, segment in zip(self._parts, segments, strict=True):
            if part.startswith("{"):
                if not _ID.fullmatch(segment):
                    return None
                params[part[1:-1]] = segment
            elif part != segment:
                return None
        return params


class Router:
    def __init__(self, routes: tuple[Route[Any], ...]) -> None:
        self.routes = routes

    def match(self, method: str, path: str) -> tuple[Route[Any], Mapping[str, str]]:
        """The route for method and path, or NotFound / MethodNotAllowed."""
        segments = path.split("?", 1)[0].rstrip("/").split("/") if path != "/" else [""]
        allowed: list[str] = []
        for route in self.routes:
            params = route.params(segments)
            if params is None:
                continue
            if route.method == method:
                return route, params
            allowed.append(route.method)
        if allowed:
            raise MethodNotAllowed(f"{method} is not allowed here; allowed: {', '.join(allowed)}")
        raise NotFound(f"No route for {method} {path}")

    def template(self, method: str, path: str) -> str:
        """The template label for metrics (never a raw path)."""
        try:
            return self.match(method, path)[0].template
        except (NotFound, MethodNotAllowed):
            return "unmatched"
