"""``HP_REDIS_URL``: is the shared state's Redis reachable, and does it take the login?

Replicas of HaRP share bans and the ExApp registry through Redis; a wrong password or an
unreachable server degrades every replica to its own local state, which works but no
longer shares bans.  The check logs in the way HaRP does (``AUTH``, ``SELECT``) and sends
``PING``, over a plain blocking socket (TLS for ``rediss://``).  Redis's own error text is
shown; it never contains the password, and the URL is shown redacted.
"""

from __future__ import annotations

import socket
import ssl
from typing import Final

from harp.check import http
from harp.check.result import Result, failed, passed, skipped
from harp.config import RedisURL

NAME: Final = "redis"
_FIX_LOGIN: Final = (
    "put the password Redis expects in HP_REDIS_URL (redis://[user]:PASSWORD@host:6379/0)"
)


def command(*args: str) -> bytes:
    """One command in Redis's protocol (RESP): an array of bulk strings."""
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def login(url: RedisURL) -> list[bytes]:
    """The commands HaRP sends before using the connection, then ``PING``."""
    commands = []
    if url.password is not None:
        who = [url.username] if url.username else []
        commands.append(command("AUTH", *who, url.password))
    if url.db is not None:
        commands.append(command("SELECT", str(url.db)))
    commands.append(command("PING"))
    return commands


def judge(where: str, replies: list[bytes]) -> Result:
    """The one-line replies to :func:`login`'s commands, in order."""
    for reply in replies:
        if reply.startswith(b"-"):
            text = reply[1:].decode("utf-8", "replace").strip()
            if text.startswith(("WRONGPASS", "NOAUTH")) or "password" in text:
                return failed(NAME, f"{where} refuses the login: {text}", _FIX_LOGIN)
            return failed(NAME, f"{where} answered: {text}",
                          "fix HP_REDIS_URL (the database number, the user)")
    if replies and replies[-1].strip() == b"+PONG":
        return passed(NAME, f"Redis answers at {where}")
    return failed(NAME, f"{where} does not answer like Redis",
                  "HP_REDIS_URL must name a Redis server")


def _connect(url: RedisURL) -> socket.socket:
    if url.path is not None:
        return http.unix_connect(url.path)
    sock = socket.create_connection((url.host or "", url.port), http.TIMEOUT)
    if url.tls:
        return ssl.create_default_context().wrap_socket(sock, server_hostname=url.host)
    return sock


def redis_state(url: RedisURL | None) -> Result:
    if url is None:
        return skipped(NAME, "HP_REDIS_URL unset: state in memory (one HaRP, no replicas)")
    where = url.describe()
    commands = login(url)
    try:
        with _connect(url) as sock:
            sock.sendall(b"".join(commands))
            with sock.makefile("rb") as reader:
                replies = [reader.readline(4096) for _ in commands]
    except OSError as exc:
        return failed(NAME, f"cannot reach {where}: {http.describe(exc)}",
                      "start Redis, or fix the host and port in HP_REDIS_URL")
    return judge(where, replies)
