"""A plain HTTP/1.1 upstream for data-path tests: big bodies, slow answers, counting.

Real sockets on 127.0.0.1 (or a unix socket), a thread per connection, keep-alive on.
It does not check AppAPI identity headers (the nc_py_api ExApp does that elsewhere);
it exists to push volume and timing through HaRP and to count the connections HaRP
opens to it.

- ``GET /bytes/<n>[?chunked=1]``  n deterministic bytes (``pattern(n)``), Content-Length
  or chunked framing; ``downloaded`` counts the bytes handed to the socket so far, so a
  test can tell a download that waits for its reader from one a proxy soaks up.
- ``POST|PUT /upload``             reads the body (Content-Length or chunked) and answers
  ``{"length": n, "sha256": hex}``; ``uploaded`` counts the body bytes received so far,
  so a test can tell a streamed upload from one a proxy buffered first.
- ``GET /sse?n=3&interval=0.5``    n server-sent events, ``interval`` seconds apart.
- ``GET /headers``                 the request headers it received, as JSON.
- ``GET /hang``                    never answers (until the server stops).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import ThreadingUnixStreamServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from tests.peers.base import Peer

_BLOCK = hashlib.sha256(b"harp").digest() * 2048  # 64 KiB of fixed bytes


def pattern(n: int) -> bytes:
    """The first ``n`` bytes of the repeating download pattern."""
    reps, rest = divmod(n, len(_BLOCK))
    return _BLOCK * reps + _BLOCK[:rest]


def pattern_sha256(n: int) -> str:
    digest = hashlib.sha256()
    reps, rest = divmod(n, len(_BLOCK))
    for _ in range(reps):
        digest.update(_BLOCK)
    digest.update(_BLOCK[:rest])
    return digest.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def setup(self) -> None:
        super().setup()
        with self.server.owner.lock:
            self.server.owner.connections += 1

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path.startswith("/bytes/"):
            self._bytes(
                int(url.path.rsplit("/", 1)[1]), query.get("chunked") == "1",
                cut=int(query.get("cut", "-1")), pause=float(query.get("pause", "0")),
            )
        elif url.path == "/sse":
            self._sse(int(query.get("n", "3")), float(query.get("interval", "0.5")))
        elif url.path in ("/headers", "/v1.44/_ping"):  # the latter: as a Docker engine
            self._send(200, json.dumps({k.lower(): v for k, v in self.headers.items()}).encode())
        elif url.path == "/hang":
            self.server.owner.stopping.wait()
            self.close_connection = True
        else:
            self._send(404, b'{"error":"not found"}')

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/upload":
            self._send(404, b'{"error":"not found"}')
            return
        digest = hashlib.sha256()
        length = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                remaining = size
                while remaining:
                    data = self.rfile.read(min(remaining, 1 << 16))
                    digest.update(data)
                    self._count(len(data))
                    remaining -= len(data)
                length += size
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length", "0"))
            while remaining:
                data = self.rfile.read(min(remaining, 1 << 16))
                if not data:
                    break
                digest.update(data)
                self._count(len(data))
                length += len(data)
                remaining -= len(data)
        self._send(200, json.dumps({"length": length, "sha256": digest.hexdigest()}).encode())

    do_PUT = do_POST

    def _count(self, n: int) -> None:
        with self.server.owner.lock:
            self.server.owner.uploaded += n

    def _bytes(self, n: int, chunked: bool, cut: int = -1, pause: float = 0.0) -> None:
        """``n`` pattern bytes; ``cut``: close the connection after that many (a
        truncated body); ``pause``: wait that long (or until stopped) halfway through."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(n))
        self.end_headers()
        sent = 0
        halfway = n // 2 if pause else -1
        while sent < n:
            if sent == cut:
                self.wfile.flush()
                self.close_connection = True
                return
            if halfway >= 0 and sent >= halfway:
                halfway = -1
                self.wfile.flush()
                self.server.owner.stopping.wait(pause)
            limit = n - sent if cut < 0 else min(n, cut) - sent
            block = _BLOCK[: min(len(_BLOCK), limit)]
            if chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
            else:
                self.wfile.write(block)
            sent += len(block)
            with self.server.owner.lock:
                self.server.owner.downloaded += len(block)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _sse(self, n: int, interval: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(n):
            event = f"data: event {i}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            if i + 1 < n and self.server.owner.stopping.wait(interval):
                return
        self.wfile.write(b"0\r\n\r\n")


class _TCPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: BulkUpstream


class _UnixServer(ThreadingUnixStreamServer):
    daemon_threads = True
    owner: BulkUpstream

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, _ = super().get_request()
        return conn, ("unix", 0)


class BulkUpstream(Peer):
    """``BulkUpstream().start()`` on a free TCP port, or ``BulkUpstream(unix_path=...)``."""

    def __init__(self, unix_path: str | None = None) -> None:
        self.unix_path = unix_path
        self.lock = threading.Lock()
        self.connections = 0
        self.uploaded = 0
        self.downloaded = 0
        self.stopping = threading.Event()
        self._server: _TCPServer | _UnixServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)
            self._server = _UnixServer(self.unix_path, _Handler)
        else:
            self._server = _TCPServer(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        assert isinstance(self._server, _TCPServer)
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)
