"""ExApp records: what HaRP knows about one ExApp, parsed and compiled once.

The record arrives as JSON from AppAPI's push (``/exapp_storage``) or Nextcloud's
``harp/exapp-meta`` (docs/compatibility.md#exapp-registry).  It is validated and its route regexes
compiled here, at store time, so the per-request route check is a loop of
``pattern.match`` calls and nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from harp.logs import HarpLogger

log = HarpLogger("harp.exapps")

PUBLIC: Final = 0
USER: Final = 1
ADMIN: Final = 2


class RecordError(ValueError):
    """The record is not of the documented shape; the message says which field."""


@dataclass(frozen=True, slots=True)
class Route:
    pattern: re.Pattern[str]
    access_level: int
    #: Upstream response statuses that count as brute-force failures.
    bruteforce: frozenset[int]


@dataclass(frozen=True, slots=True)
class ExAppRecord:
    token: str = field(repr=False)
    version: str
    host: str
    port: int
    routes: tuple[Route, ...]
    #: The JSON the record was built from, for the Redis state and debugging.
    source: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)


def _level(value: object, where: str) -> int:
    # AppAPI sends access_level as an int or, depending on the DB driver, a string.
    if isinstance(value, bool):
        raise RecordError(f"{where}: access_level must be 0, 1 or 2")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or value not in (PUBLIC, USER, ADMIN):
        raise RecordError(f"{where}: access_level must be 0, 1 or 2")
    return value


def _statuses(value: object, where: str) -> frozenset[int]:
    if value is None:
        return frozenset()
    if not isinstance(value, list):
        raise RecordError(f"{where}: bruteforce_protection must be a list of HTTP statuses")
    out = set()
    for item in value:
        if isinstance(item, str) and item.strip().isdigit():
            item = int(item.strip())
        if isinstance(item, bool) or not isinstance(item, int):
            raise RecordError(f"{where}: bruteforce_protection must be a list of HTTP statuses")
        out.add(item)
    return frozenset(out)


def parse_record(app_id: str, data: object) -> ExAppRecord:
    """Validate a record; invalid route regexes are skipped and logged once, here."""
    if not isinstance(data, dict):
        raise RecordError("the record must be a JSON object")
    token = data.get("exapp_token")
    version = data.get("exapp_version")
    host = data.get("host")
    port = data.get("port")
    if not isinstance(token, str):
        raise RecordError("exapp_token must be a string")
    if not isinstance(version, str):
        raise RecordError("exapp_version must be a string")
    if not isinstance(host, str) or not host:
        raise RecordError("host must be a non-empty string")
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise RecordError("port must be an integer 1-65535")
    raw_routes = data.get("routes") or []
    if not isinstance(raw_routes, list):
        raise RecordError("routes must be a list")
    routes = []
    for index, raw in enumerate(raw_routes):
        where = f"routes[{index}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("url"), str):
            raise RecordError(f"{where}: must be an object with a url")
        level = _level(raw.get("access_level", PUBLIC), where)
        statuses = _statuses(raw.get("bruteforce_protection"), where)
        try:
            pattern = re.compile(raw["url"])
        except re.error as exc:
            log.warn(
                "ExApp {app}: route {url!r} skipped, invalid regex: {error}",
                app=app_id, url=raw["url"], error=str(exc),
            )
            continue
        routes.append(Route(pattern, level, statuses))
    return ExAppRecord(token, version, host, port, tuple(routes), data)


def synthesized(version: str, host: str, port: int) -> ExAppRecord:
    """The record of an AppAPI-signed request for an app Nextcloud does not know yet
    (e.g. during ``/init``); built from its headers, never cached."""
    return ExAppRecord("", version, host, port, ())
