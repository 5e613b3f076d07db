"""What replicas publish on ``harp:events``, as pure encode/decode functions (no I/O).

The Lua scripts (:mod:`harp.state.redis.scripts`) publish ban events themselves, with
``cjson``, in the same shape :func:`decode_event` reads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class Event:
    """One change published on ``harp:events``.

    ``origin``/``seq`` identify the replica and its write number, so that a replica can tell
    its own echoes apart; ``record`` is the record's JSON object (``put``), ``ttl`` the
    remaining ban time in milliseconds (``ban``).
    """

    kind: Literal["put", "del", "ban"]
    origin: str
    seq: int = 0
    app: str = ""
    record: Mapping[str, Any] | None = None
    addr: str = ""
    ttl: float = 0.0


def encode_put(origin: str, seq: int, app_id: str, source: Mapping[str, Any]) -> str:
    return json.dumps(
        {"k": "put", "o": origin, "s": seq, "app": app_id, "rec": source},
        separators=(",", ":"),
    )


def encode_delete(origin: str, seq: int, app_id: str) -> str:
    return json.dumps({"k": "del", "o": origin, "s": seq, "app": app_id}, separators=(",", ":"))


def decode_event(raw: str | bytes) -> Event | None:
    """Parse an event; None for anything malformed (another program on the channel, a newer
    HaRP's event kind): ignoring it is always safe, the next sync repairs the mirror."""
    try:
        data = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("o"), str):
        return None
    kind = data.get("k")
    seq = data.get("s", 0)
    if isinstance(seq, bool) or not isinstance(seq, int):
        return None
    if kind in ("put", "del"):
        app = data.get("app")
        if not isinstance(app, str) or not app:
            return None
        if kind == "del":
            return Event("del", data["o"], seq, app)
        record = data.get("rec")
        if not isinstance(record, dict):
            return None
        return Event("put", data["o"], seq, app, record)
    if kind == "ban":
        addr, ttl = data.get("addr"), data.get("ttl")
        if (
            not isinstance(addr, str) or not addr or isinstance(ttl, bool)
            or not isinstance(ttl, int | float) or not ttl > 0
        ):
            return None
        return Event("ban", data["o"], addr=addr, ttl=float(ttl))
    return None
