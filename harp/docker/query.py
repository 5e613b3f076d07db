"""A strict query-string parser for the Docker passthrough's allow-list (docs/differences.md#22).

The engine reads the query with Go's ``url.ParseQuery``: names and values are
percent-decoded, ``+`` is a space, and a repeated name yields several values.  An allow-list
that looked at the raw text could therefore be fooled: ``from%53rc=`` *is* ``fromSrc`` to
the engine, and ``fromImage=a&fromSrc=…`` hides the dangerous name behind an allowed one.
So the query is parsed here once, strictly, and judged on the decoded names:

* only URL-safe bytes; no ``;`` (older Go split on it too), no ``#``, no spaces or controls;
* every ``&``-separated item non-empty, with a non-empty name;
* every ``%`` starts a valid escape, and names and values decode to printable UTF-8;
* no name twice.

:func:`parse_query` returns the decoded pairs, or None if any rule is broken.
:func:`encode_query` builds the canonical form HaRP forwards instead of the client's text,
so the engine parses exactly what was checked.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import quote

#: RFC 3986 query characters except ";" (a separator for some parsers) and "#".
_QUERY_BYTES: Final = re.compile(rb"[A-Za-z0-9\-._~!$'()*+,:@/?%=&]*")
_ESCAPE: Final = re.compile(rb"%([0-9A-Fa-f]{2})")
_BAD_PERCENT: Final = re.compile(rb"%(?![0-9A-Fa-f]{2})")

Pairs = list[tuple[str, str]]


def _decode(part: bytes) -> str | None:
    """``+`` → space, ``%XX`` → byte, then strict UTF-8 without control characters."""
    if _BAD_PERCENT.search(part):
        return None
    raw = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), part.replace(b"+", b" "))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        return None
    return text


def parse_query(raw: bytes) -> Pairs | None:
    """The decoded ``(name, value)`` pairs of ``raw``, or None if it is not strictly valid."""
    if not raw:
        return []
    if not _QUERY_BYTES.fullmatch(raw):
        return None
    pairs: Pairs = []
    seen: set[str] = set()
    for item in raw.split(b"&"):
        raw_name, _, raw_value = item.partition(b"=")
        name = _decode(raw_name)
        value = _decode(raw_value)
        if not name or value is None or name in seen:
            return None
        seen.add(name)
        pairs.append((name, value))
    return pairs


def encode_query(pairs: Pairs) -> bytes:
    """The canonical query for ``pairs``: every byte but unreserved ones percent-encoded."""
    return "&".join(
        f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in pairs
    ).encode("ascii")


def filter_query(raw: bytes, allowed: frozenset[str]) -> bytes | None:
    """The canonical query if ``raw`` parses strictly and uses only ``allowed`` names."""
    pairs = parse_query(raw)
    if pairs is None or any(name not in allowed for name, _ in pairs):
        return None
    return encode_query(pairs)
