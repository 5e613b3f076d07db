"""The Docker Engine API passthrough's allow-list: pure, no I/O
(docs/compatibility.md#docker-allow-list, docs/differences.md#22).

AppAPI makes exactly five kinds of raw Engine calls through HaRP:
``_ping``, ``images/create`` (pull, streamed NDJSON progress), ``images/<ref>/json``, and
``containers/nc_app_<id>/{json,logs}`` (logs as Docker's multiplexed stream).  Everything
else an engine can do (create, exec, archive, delete …) stays behind HaRP's own
``/docker/exapp/*`` endpoints, so the passthrough admits only those five, with any
``/v<digits.dots>`` version prefix, and answers 403 to the rest.  ``HEAD`` is admitted
wherever ``GET`` is (HAProxy's ``METH_GET`` does the same).

The reference matches its regexes on the URL-decoded path.  We decode once, exactly as the
engine will, and additionally refuse what could make the engine see a different path than
the one checked: empty segments (``//``), ``.``/``..`` segments in any spelling, backslashes,
control characters, and a ``%`` surviving the decode (double encoding).  The decoded path —
which then consists of URL-safe characters only — is what is forwarded, so the engine routes
exactly the path that was checked.

The query is allow-listed too (docs/differences.md#22): ``images/create?fromSrc=<url>`` makes
the engine download an arbitrary URL (and ``fromSrc=-`` imports the request body as an
image), ``logs?follow=true`` holds a connection open forever.  Each endpoint admits only
the parameters AppAPI sends (docs/compatibility.md#docker-allow-list) — ``fromImage``, ``tag`` and
``platform`` for a pull, ``stdout``, ``stderr`` and ``tail`` for logs, none elsewhere —
judged on the strictly parsed, decoded names (:mod:`harp.docker.query`), and the
canonical re-encoding is what the engine receives.  A refused query is a 403 like a
refused path.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final
from urllib.parse import unquote_to_bytes

from harp.docker.names import valid_image_ref
from harp.docker.query import filter_query

_VERSION: Final = rb"(?:/v[0-9.]+)?"
_READ: Final = frozenset({b"GET", b"HEAD"})
_PING: Final = re.compile(_VERSION + rb"/_ping", re.IGNORECASE)
_IMAGE_JSON: Final = re.compile(_VERSION + rb"/images/(?P<ref>.+)/json", re.IGNORECASE)
_CONTAINER: Final = re.compile(
    _VERSION + rb"/containers/nc_app_[a-z0-9_.-]+/(?:json|logs)", re.IGNORECASE
)
_PULL: Final = re.compile(_VERSION + rb"/images/create", re.IGNORECASE)
#: What a checked, decoded path may contain (all of it URL-safe as is).
_SAFE_PATH: Final = re.compile(rb"[A-Za-z0-9._/:@+-]+")

#: Query parameters per endpoint: what AppAPI sends, nothing more.
NO_PARAMS: Final[frozenset[str]] = frozenset()
PULL_PARAMS: Final = frozenset({"fromImage", "tag", "platform"})
LOGS_PARAMS: Final = frozenset({"stdout", "stderr", "tail"})
_LOGS: Final = re.compile(rb".*/logs", re.IGNORECASE)


def allowed_target(method: bytes, rest: bytes) -> bytes | None:
    """The path to forward for an allowed ``method`` + raw ``rest``, else None (→ 403)."""
    matched = _match(method, rest)
    return None if matched is None else matched[0]


def allowed_request(method: bytes, rest: bytes, query: bytes) -> tuple[bytes, bytes] | None:
    """(path, canonical query) to forward for an allowed request, else None (→ 403).

    A pure function of its arguments, and AppAPI asks the same few (``_ping``, a
    container's state, an image) again and again: short ones are remembered
    (docs/performance.md)."""
    if len(rest) + len(query) <= _MAX_REMEMBERED:
        return _remembered(method, rest, query)
    return _allowed(method, rest, query)


#: Longest path + query whose answer is remembered, and how many are.
_MAX_REMEMBERED: Final = 512


@lru_cache(maxsize=1024)
def _remembered(method: bytes, rest: bytes, query: bytes) -> tuple[bytes, bytes] | None:
    return _allowed(method, rest, query)


def _allowed(method: bytes, rest: bytes, query: bytes) -> tuple[bytes, bytes] | None:
    matched = _match(method, rest)
    if matched is None:
        return None
    path, params = matched
    canonical = filter_query(query, params)
    return None if canonical is None else (path, canonical)


def _match(method: bytes, rest: bytes) -> tuple[bytes, frozenset[str]] | None:
    """The decoded path and the query parameters its endpoint admits."""
    path = unquote_to_bytes(rest)
    if not path.startswith(b"/") or not _SAFE_PATH.fullmatch(path):
        return None  # control chars, "%" after decoding, "\\", "?", "#", spaces ...
    segments = path[1:].split(b"/")
    if any(segment in (b"", b".", b"..") for segment in segments):
        return None
    if method in _READ:
        if _PING.fullmatch(path):
            return path, NO_PARAMS
        if _CONTAINER.fullmatch(path):
            return path, LOGS_PARAMS if _LOGS.fullmatch(path) else NO_PARAMS
        image = _IMAGE_JSON.fullmatch(path)
        if image is not None and valid_image_ref(image.group("ref").decode("ascii")):
            return path, NO_PARAMS
        return None
    if method == b"POST" and _PULL.fullmatch(path):
        return path, PULL_PARAMS
    return None
