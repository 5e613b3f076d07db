"""``HP_REDIS_URL``: where the shared state lives and how to log in (docs/differences.md#8).

Parsed once, at start-up, like every other variable: :class:`~harp.config.Settings` carries
the :class:`RedisURL` and :mod:`harp.state.redis` only connects to it, so a bad URL stops
start-up with one line and exit code 2, and the password is redacted by one function
(:func:`~harp.config.values.redact_url`) wherever the URL is shown.  Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote

from harp.config.values import ConfigError, redact_url, split_url, strip_quotes

__all__ = ["RedisURL", "parse_redis_url"]

_ALLOWED: Final = "expected redis://[:password@]host:port[/db] or unix:///path/to/redis.sock"
#: ASCII digits only, and a bound: ``int()`` refuses "²" and very long digit strings.
_DB_RE: Final = re.compile(r"[0-9]{1,18}", re.ASCII)


@dataclass(frozen=True, slots=True)
class RedisURL:
    """``HP_REDIS_URL``, parsed: where Redis is and how to log in."""

    host: str | None
    port: int
    path: str | None
    tls: bool
    db: int | None
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    #: The URL as configured with its password replaced, for the start-up summary.
    redacted: str = ""

    def describe(self) -> str:
        """For logs: scheme, address and database, never the credentials."""
        if self.path is not None:
            where = f"unix://{self.path}"
        else:
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            where = f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}"
        return where if self.db is None else f"{where}/{self.db}"


def parse_redis_url(raw: str) -> RedisURL | None:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://…`` (TLS) or
    ``unix:///path[?db=N]``; None when unset (state in memory).

    Errors are :class:`ConfigError` showing the URL without its password.
    """
    url = strip_quotes(raw.strip())
    if not url:
        return None
    redacted = redact_url(url)

    def bad(why: str) -> ConfigError:
        return ConfigError("HP_REDIS_URL", redacted, why)

    split = split_url(url)
    if split is None:
        raise bad(
            _ALLOWED + " (not a valid URL: check the [IPv6] brackets, the port 1-65535 "
            "and that there are no spaces)"
        )
    parts, port = split
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if parts.scheme == "unix" and parts.path:
        query = dict(item.partition("=")[::2] for item in parts.query.split("&") if item)
        db = _db(query.get("db") or query.get("dbid") or "", bad)
        return RedisURL(None, 0, parts.path, False, db, username, password, redacted)
    if parts.scheme in ("redis", "rediss") and parts.hostname and port != 0:
        return RedisURL(
            parts.hostname, port or 6379, None, parts.scheme == "rediss",
            _db(parts.path.strip("/"), bad), username, password, redacted,
        )
    raise bad(_ALLOWED)


def _db(text: str, bad: Callable[[str], ConfigError]) -> int | None:
    if not text:
        return None
    if not _DB_RE.fullmatch(text):
        raise bad("the database must be a number, e.g. redis://host:6379/0")
    return int(text)
