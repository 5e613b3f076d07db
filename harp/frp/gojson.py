"""Go's ``encoding/json`` with ``omitempty``, in miniature: what frp's message bodies are.

frp marshals every message as a Go struct (golib ``msg/json``), so a body HaRP accepts or
sends must follow Go's rules, not Python's (docs/compatibility.md#frp-messages):

* **encode**: empty strings, zero numbers, ``false``, empty maps and empty lists are
  omitted; nested structs are always present; keys come in Go struct field order (the
  dataclass field order); output is ASCII with ``<``, ``>`` and ``&`` escaped as Go's
  HTML-safe default does;
* **decode**: unknown keys are ignored, keys match case-insensitively, ``null`` leaves a
  field at its zero value, invalid UTF-8 and lone surrogates become U+FFFD; a type
  mismatch (a string where Go has an int, a float for an int, an out-of-range ``uint16``)
  is an error, because Go's decoder fails on it too.

Pure functions and one base class (:class:`GoStruct`); :mod:`harp.frp.msg` declares the
message structs on it and :mod:`harp.frp.codec` frames them.  Every failure is a
:class:`GoJsonError`, which the codec reports as a malformed message.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, ClassVar, Final, Self

__all__ = ["GoJsonError", "GoStruct", "Uint16", "dumps", "loads_object"]


class GoJsonError(Exception):
    """The JSON is not what Go would unmarshal into the struct (or not JSON at all)."""


class _U16Marker:
    """Annotation marker: the Go field is ``uint16`` (ports)."""


Uint16 = Annotated[int, _U16Marker]
"""An ``int`` that must fit Go's ``uint16``; used for ports in StartWorkConn."""

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

# A field "kind" is one of these tags, or a nested GoStruct subclass.
_STR, _INT64, _UINT16, _BOOL, _MAP, _LIST = "str", "int64", "uint16", "bool", "map", "list"
_Kind = str | type["GoStruct"]


@dataclass(frozen=True)
class _Schema:
    fields: tuple[tuple[str, _Kind], ...]
    by_folded_key: Mapping[str, tuple[str, _Kind]]


def _kind_of(hint: object) -> _Kind:
    if typing.get_origin(hint) is Annotated and _U16Marker in typing.get_args(hint):
        return _UINT16
    if hint is str:
        return _STR
    if hint is bool:
        return _BOOL
    if hint is int:
        return _INT64
    if hint == dict[str, str]:
        return _MAP
    if hint == list[str]:
        return _LIST
    if isinstance(hint, type) and issubclass(hint, GoStruct):
        return hint
    raise TypeError(f"unsupported field type {hint!r}")  # programming error


def _fix_str(value: str) -> str:
    # json.loads keeps lone surrogates from "\ud800" escapes; Go turns them
    # into U+FFFD.  Doing the same keeps every decoded string encodable.
    return _LONE_SURROGATE.sub("\ufffd", value)


def _convert(kind: _Kind, key: str, value: object) -> object:
    """Check one decoded JSON value against its Go type; return the Python value."""
    if kind == _STR:
        if isinstance(value, str):
            return _fix_str(value)
    elif kind == _BOOL:
        if isinstance(value, bool):
            return value
    elif kind in (_INT64, _UINT16):
        if isinstance(value, int) and not isinstance(value, bool):
            low, high = (0, 0xFFFF) if kind == _UINT16 else (_INT64_MIN, _INT64_MAX)
            if low <= value <= high:
                return value
            raise GoJsonError(f"field {key!r}: {value} out of range")
    elif kind == _MAP:
        if isinstance(value, dict):
            out: dict[str, str] = {}
            for k, v in value.items():
                if v is None:
                    v = ""
                if not isinstance(v, str):
                    raise GoJsonError(f"field {key!r}: map values must be strings")
                out[_fix_str(k)] = _fix_str(v)
            return out
    elif kind == _LIST:
        if isinstance(value, list):
            items: list[str] = []
            for v in value:
                if v is None:
                    v = ""
                if not isinstance(v, str):
                    raise GoJsonError(f"field {key!r}: list items must be strings")
                items.append(_fix_str(v))
            return items
    elif isinstance(kind, type):
        if isinstance(value, dict):
            return kind.from_json_obj(value)
    raise GoJsonError(f"field {key!r}: unexpected JSON type {type(value).__name__}")


def _is_empty(kind: _Kind, value: object) -> bool:
    if isinstance(kind, type):
        return False  # Go's omitempty never omits a struct
    return not value  # "", 0, False, {}, []


class GoStruct:
    """Base for dataclasses that map 1:1 onto a Go struct with omitempty tags.

    Attribute names *are* the JSON keys (frp uses snake_case tags throughout),
    and the field order is Go's struct order, so encoding needs no metadata.
    """

    __slots__ = ()
    _schemas: ClassVar[dict[type, _Schema]] = {}

    @classmethod
    def _schema(cls) -> _Schema:
        schema = GoStruct._schemas.get(cls)
        if schema is None:
            hints = typing.get_type_hints(cls, include_extras=True)
            pairs = tuple(
                (f.name, _kind_of(hints[f.name]))
                for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            )
            schema = _Schema(pairs, {name.casefold(): (name, kind) for name, kind in pairs})
            GoStruct._schemas[cls] = schema
        return schema

    def to_json_obj(self) -> dict[str, object]:
        """The JSON object Go would marshal: zero values left out."""
        out: dict[str, object] = {}
        for name, kind in self._schema().fields:
            value = getattr(self, name)
            if _is_empty(kind, value):
                continue
            if isinstance(value, GoStruct):
                out[name] = value.to_json_obj()
            elif isinstance(value, dict):
                out[name] = dict(value)
            elif isinstance(value, list):
                out[name] = list(value)
            else:
                out[name] = value
        return out

    @classmethod
    def from_json_obj(cls, obj: Mapping[str, object]) -> Self:
        """Build from a decoded JSON object, the way Go's Unmarshal would.

        Unknown keys are ignored, keys match case-insensitively, ``null``
        keeps the zero value, and the last of several matching keys wins.
        Raises :class:`GoJsonError` on a type mismatch.
        """
        schema = cls._schema()
        values: dict[str, object] = {}
        for key, value in obj.items():
            hit = schema.by_folded_key.get(key.casefold())
            if hit is None or value is None:
                continue
            name, kind = hit
            values[name] = _convert(kind, name, value)
        return typing.cast(Self, typing.cast(typing.Any, cls)(**values))


def dumps(obj: Mapping[str, object]) -> bytes:
    """*obj* as Go's ``json.Marshal`` writes it: compact, ASCII, HTML-safe."""
    # ASCII-only output can never fail to encode (even with lone surrogates),
    # and escaping <, > and & matches Go's default HTML-safe marshalling.
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode("ascii")


def _reject_constant(name: str) -> object:
    raise GoJsonError(f"non-standard JSON constant {name}")


def loads_object(body: bytes) -> dict[str, object]:
    """Parse *body* as the JSON object of a Go struct; ``null`` is the empty object.

    Raises :class:`GoJsonError` and nothing else, whatever the bytes.
    """
    try:
        # Go accepts invalid UTF-8 inside strings (replacing it); so do we.
        obj = json.loads(body.decode("utf-8", "replace"), parse_constant=_reject_constant)
    except GoJsonError:
        raise
    except (ValueError, RecursionError) as exc:
        raise GoJsonError(f"invalid JSON body: {exc}") from None
    if obj is None:
        return {}  # Go: unmarshalling null into a struct is a no-op
    if not isinstance(obj, dict):
        raise GoJsonError(f"body is a JSON {type(obj).__name__}, not an object")
    return obj
