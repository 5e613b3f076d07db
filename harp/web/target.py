"""The request-target, checked and normalised before any decision (docs/security.md).

Every decision of the pipeline (app id, control plane, reserved ExApp endpoints, route
access) is made on the *normalised* path, and the same normalised path is what the
ExApp receives: a client cannot make HaRP decide on one spelling and the ExApp act on
another (``/%69nit`` or ``//init`` versus ``/init``).

Pure functions on bytes, no I/O; the common case (a clean path) costs two C-level
scans.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import unquote_to_bytes

#: Bytes allowed in a request-target: visible ASCII except ``#`` (a fragment is never
#: sent by a conforming client).  Space, controls, DEL and 0x80-0xFF are refused.
_ALLOWED: Final = frozenset(range(0x21, 0x7F)) - {ord("#")}
_REFUSED: Final = bytes(b for b in range(256) if b not in _ALLOWED)

#: RFC 3986 unreserved characters: their percent-encoded form means the same thing,
#: so it is decoded before deciding.
_UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_HEX: Final = frozenset(b"0123456789ABCDEFabcdef")


def valid_target(target: bytes) -> bool:
    """Origin-form (``/…``) and only visible ASCII: anything else is refused.

    Absolute-form (``http://host/…``), authority-form and ``*`` are never valid on the
    ExApp frontends; a target such as ``0/exapps/…`` once changed the upstream port.
    """
    return (
        target[:1] == b"/"
        and len(target.translate(None, _REFUSED)) == len(target)
    )


def normalise_path(path: bytes) -> bytes | None:
    """The path every decision is made on, or None when it cannot be normalised.

    Decodes percent-encoded unreserved characters, collapses runs of ``/``, removes
    ``.`` segments; a trailing ``/`` is kept (it is meaningful to many ExApps).  None
    for a malformed percent escape or a ``..`` segment in any spelling.  ``path`` must
    already be a :func:`valid_target` without its query.
    """
    if b"%" in path:
        decoded = _decode_unreserved(path)
        if decoded is None:
            return None
        path = decoded
    if b"//" not in path and b"/." not in path:
        return path
    segments = path.split(b"/")
    out: list[bytes] = []
    for segment in segments[1:-1]:
        if segment == b"..":
            return None
        if segment and segment != b".":
            out.append(segment)
    last = segments[-1]
    if last == b"..":
        return None
    trailing = last in (b"", b".")
    if not trailing:
        out.append(last)
    result = b"/" + b"/".join(out)
    if trailing and out:
        result += b"/"
    return result


def _decode_unreserved(path: bytes) -> bytes | None:
    parts = path.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            return None
        value = int(part[:2], 16)
        if value in _UNRESERVED:
            out.append(bytes((value,)) + part[2:])
        else:
            out.append(b"%" + part[:2].upper() + part[2:])
    return b"".join(out)


def endpoint_key(target: bytes) -> bytes:
    """``target`` as an ExApp framework would route it: fully decoded, no ``//``, no
    trailing ``/``.  Used to recognise the reserved endpoints (``/init`` …) in any
    spelling, including ``%2F`` separators that the ExApp's server decodes.
    """
    decoded = unquote_to_bytes(target) if b"%" in target else target
    while b"//" in decoded or b"/./" in decoded:
        decoded = decoded.replace(b"//", b"/").replace(b"/./", b"/")
    if decoded.endswith(b"/."):
        decoded = decoded[:-1]
    return decoded.rstrip(b"/") or b"/"
