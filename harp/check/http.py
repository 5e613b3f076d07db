"""Blocking HTTP for the checks: one request, short timeout, no redirects followed.

``python -m harp check`` is a command-line tool, not the reactor, so plain ``http.client``
is the right tool.  Every transport failure becomes :class:`Unreachable` with a reason an
operator can act on (refused, timed out, name does not resolve, TLS not trusted), because
"could not connect" is the answer the checks have to explain, not a traceback.
Redirects are returned, not followed: HaRP does not follow them either, so a redirect is
itself a finding (e.g. ``NC_INSTANCE_URL`` says http:// but Nextcloud wants https://).
"""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

#: Seconds for connecting and for each read; a healthy peer answers far sooner.
TIMEOUT = 5.0
#: The checks only look at small JSON answers; never read more than this.
MAX_BODY = 256 * 1024


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    #: Lower-cased header names.
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


class Unreachable(Exception):
    """No HTTP answer at all; ``reason`` says why in words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a unix socket (the Docker engine's API socket)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = unix_connect(self.unix_path, self.timeout)


def unix_connect(path: str, timeout: float | None = TIMEOUT) -> socket.socket:
    """A stream socket connected to ``path`` (closed again if connecting fails)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def connection(
    url: str, timeout: float = TIMEOUT, tls: ssl.SSLContext | None = None
) -> tuple[http.client.HTTPConnection, str]:
    """A connection to ``url``'s server and the request target (path and query)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.scheme == "https":
        context = tls if tls is not None else ssl.create_default_context()
        return http.client.HTTPSConnection(
            host, parts.port, timeout=timeout, context=context
        ), target
    return http.client.HTTPConnection(host, parts.port, timeout=timeout), target


def exchange(
    conn: http.client.HTTPConnection, target: str, headers: Mapping[str, str],
    method: str = "GET",
) -> Reply:
    """Send one request on ``conn`` (reconnecting if the server closed it) and read the reply."""
    try:
        conn.request(method, target, headers=dict(headers))
        response = conn.getresponse()
        body = response.read(MAX_BODY)
        if not response.isclosed():
            response.read()  # drain so the connection can be reused
        return Reply(
            response.status, {k.lower(): v for k, v in response.getheaders()}, body
        )
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise Unreachable(describe(exc)) from None


def get(
    url: str, headers: Mapping[str, str], timeout: float = TIMEOUT,
    tls: ssl.SSLContext | None = None,
) -> Reply:
    """One ``GET`` on a fresh connection."""
    conn, target = connection(url, timeout, tls)
    try:
        return exchange(conn, target, headers)
    finally:
        conn.close()


def unix_get(path: str, target: str, timeout: float = TIMEOUT) -> Reply:
    """One ``GET`` to the HTTP server on unix socket ``path``."""
    conn = UnixHTTPConnection(path, timeout)
    try:
        return exchange(conn, target, {"Host": "docker"})
    finally:
        conn.close()


def describe(exc: BaseException) -> str:
    """A transport error in an operator's words (never a traceback)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its TLS certificate is not trusted ({exc.verify_message or exc.reason})"
    if isinstance(exc, ssl.SSLError):
        return f"the TLS handshake failed ({exc.reason or exc})"
    if isinstance(exc, TimeoutError):
        return f"no answer within {TIMEOUT:g} s"
    if isinstance(exc, socket.gaierror):
        return f"the host name does not resolve ({exc.strerror})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    if isinstance(exc, FileNotFoundError):
        return "the socket file does not exist"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without an answer"
    if isinstance(exc, http.client.HTTPException):
        return f"the answer is not HTTP ({type(exc).__name__})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
