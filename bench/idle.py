"""What an idle client connection costs HaRP: RSS growth ÷ connections.

Measured first, on a fresh process.  Two states are measured on the same connections: just
accepted (nothing sent), and idle keep-alive after one public-route request each (sent one
connection at a time, so the upstream pool stays as small as for a single client).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass

from bench import procstat
from bench.harness import APP_ID, Stack


@dataclass(frozen=True, slots=True)
class IdleResult:
    connections: int
    fresh_bytes: float
    keepalive_bytes: float
    rss_before: int
    rss_fresh: int
    rss_keepalive: int


def _fds(root: int) -> int:
    total = 0
    for pid in procstat.tree(root):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def _settled_rss(root: int, pause: float = 1.0) -> int:
    time.sleep(pause)
    return procstat.memory(root).total


def _read_response(sock: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("HaRP closed an idle connection")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("HaRP closed mid-response")
        body += chunk


def measure(stack: Stack, count: int = 2000) -> IdleResult:
    """Run on a fresh HaRP (before any load): afterwards its heap has room to spare and
    new connections would reuse it, showing almost nothing."""
    root = stack.pid
    request = f"GET /exapps/{APP_ID}/public/1k HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", stack.harp.http_port), 10) as first:
        first.sendall(request)  # the ExApp record is fetched and cached before the baseline
        _read_response(first)
    before = _settled_rss(root)
    fds_before = _fds(root)
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", stack.harp.http_port), 10))
        deadline = time.monotonic() + 30
        while _fds(root) - fds_before < count and time.monotonic() < deadline:
            time.sleep(0.1)
        fresh = _settled_rss(root)
        for sock in socks:
            sock.sendall(request)
            _read_response(sock)
        keepalive = _settled_rss(root)
    finally:
        for sock in socks:
            sock.close()
    return IdleResult(
        connections=count,
        fresh_bytes=(fresh - before) / count,
        keepalive_bytes=(keepalive - before) / count,
        rss_before=before,
        rss_fresh=fresh,
        rss_keepalive=keepalive,
    )
