"""Turns msgspec's first-error-only validation into a list of every bad field.

msgspec stops at the first error and words it for programmers (``Expected `int` <= 5 - at
`$.upload.daily_data_limit_mb```). Callers of the registry get one entry per bad field,
named by dotted path, in plain words. `validate` walks a Struct type field by field; each
leaf is checked by msgspec itself against the leaf's annotated type, so the constraints
live once, as ``msgspec.Meta`` on the Struct. A leaf's wording comes from its Meta:
``extra={"rule": ...}`` says what a value of the right type must satisfy, and
``extra={"check": ...}`` adds a predicate msgspec cannot express (a time zone name).

`convert` is the entry point: ``convert(body, RegisterDevice)`` returns the typed body or
raises `Invalid` naming every bad field.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping
from functools import cache
from typing import Annotated, Any, Literal, TypedDict, TypeVar, Union

import msgspec

T = TypeVar("T")


class ErrorDetail(TypedDict):
    """One bad field: ``{"field": "upload.mode", "error": "Invalid mode. ..."}``."""

    field: str
    error: str


class Invalid(ValueError):
    """A body that does not fit its Struct; ``details`` names every bad field."""

    def __init__(self, message: str, details: list[ErrorDetail]) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


NUL_RULE = "Must not contain the NUL character (U+0000)"


def rule(text: str, check: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """The ``extra`` of a ``msgspec.Meta``: the error text, and an optional predicate."""
    return {"rule": text, "check": check} if check is not None else {"rule": text}


def free_of_nul(value: object) -> bool:
    """True when no string or key in a JSON value holds U+0000 (PostgreSQL cannot store it).

    Iterative, so that a deeply nested document cannot exhaust the stack.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def convert(body: object, type_: type[T], *, message: str = "Invalid request") -> T:
    """``body`` (decoded JSON) as a ``type_`` Struct, or `Invalid` listing every bad field.

    A null field whose type does not admit null counts as absent: it takes the field's
    default, and is "Required" where there is none.
    """
    details = validate(body, type_)
    if details:
        raise Invalid(message, details)
    assert isinstance(body, dict)
    absent = _nulls_as_absent(type_)  # type: ignore[arg-type]
    return msgspec.convert(
        {key: value for key, value in body.items() if value is not None or key not in absent},
        type_,
    )


@cache
def _nulls_as_absent(struct: Any) -> frozenset[str]:
    return frozenset(
        field.encode_name for field in msgspec.structs.fields(struct)
        if not _admits_none(field.type)
    )


def _admits_none(hint: Any) -> bool:
    while typing.get_origin(hint) is Annotated:
        hint = hint.__origin__
    return typing.get_origin(hint) in (Union, types.UnionType) and type(None) in typing.get_args(
        hint
    )


def validate(body: object, type_: Any, path: str = "") -> list[ErrorDetail]:
    """Every bad field of ``body`` against ``type_`` (a Struct type), with dotted paths."""
    errors: list[ErrorDetail] = []
    _check_struct(body, type_, path, errors)
    return errors


def _check_struct(value: object, struct: Any, path: str, errors: list[ErrorDetail]) -> None:
    if not isinstance(value, dict):
        errors.append({"field": path or "body", "error": "Must be an object"})
        return
    fields = msgspec.structs.fields(struct)
    for field in fields:
        item = value.get(field.encode_name)
        where = join(path, field.encode_name)
        if item is None:
            if field.required and not _admits_none(field.type):
                errors.append({"field": where, "error": "Required"})
            continue
        _check(item, field.type, where, errors)
    if struct.__struct_config__.forbid_unknown_fields:
        known = {field.encode_name for field in fields}
        for key in value:
            if key not in known:
                errors.append({"field": join(path, key), "error": "Unknown field"})


def _check(value: object, hint: Any, path: str, errors: list[ErrorDetail]) -> None:
    base, extra = _unwrap(hint)
    if isinstance(base, type) and issubclass(base, msgspec.Struct):
        _check_struct(value, base, path, errors)
        return
    problem = None
    try:
        msgspec.convert(value, hint)
    except msgspec.ValidationError:
        problem = _wording(value, base, extra)
    else:
        check = extra.get("check")
        if check is not None and not check(value):
            problem = extra["rule"]
    if problem is not None:
        errors.append({"field": path, "error": problem})


def _unwrap(hint: Any) -> tuple[Any, Mapping[str, Any]]:
    """The type under ``Annotated``, ``| None`` and ``| UnsetType``, and its Meta's
    ``extra``."""
    extra: dict[str, Any] = {}
    while True:
        origin = typing.get_origin(hint)
        if origin is Annotated:
            for meta in hint.__metadata__:
                if isinstance(meta, msgspec.Meta) and meta.extra:
                    extra.update(meta.extra)
            hint = hint.__origin__
        elif origin in (Union, types.UnionType):
            options = [arg for arg in typing.get_args(hint)
                       if arg is not type(None) and arg is not msgspec.UnsetType]
            if len(options) != 1:
                return hint, extra
            hint = options[0]
        else:
            return hint, extra


_TYPE_WORDING = {
    str: "Must be a string",
    bool: "Must be a boolean",
    int: "Must be an integer",
    dict: "Must be an object",
}


def _wording(value: object, base: Any, extra: Mapping[str, Any]) -> str:
    """A wrong type is named as such; a right type with a bad value gets the leaf's rule."""
    origin = typing.get_origin(base) or base
    if origin is Literal:
        origin = type(typing.get_args(base)[0])
    expected = _TYPE_WORDING.get(origin)
    if expected is not None and not _is_instance(value, origin):
        return expected
    text = extra.get("rule")
    return text if isinstance(text, str) else expected or "Invalid value"


def _is_instance(value: object, kind: type) -> bool:
    if kind is int:  # JSON keeps booleans and integers apart; Python does not
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)
