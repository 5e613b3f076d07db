"""Helpers for the black-box FRP acceptance tests (``test_frp_acceptance.py``).

Everything here observes HaRP from the outside only: the environment it is started with, the
tunnel ports it binds on 127.0.0.1, its HTTP frontend, what the real frpc logs, and what Linux
shows in ``/proc/<pid>``.

* ``DataServer``: a small threaded HTTP/1.1 server on a **unix socket**, the far end of the
  ``unix_domain_socket`` plugin (as ``/var/run/docker.sock`` or ``/tmp/exapp.sock`` are for real
  deployments). It serves deterministic bytes of any length, hashes uploads, and counts the
  connections frpc opens towards it (total and peak concurrency).
* ``pattern_*``: the deterministic byte stream the server sends and the client uploads, so that
  100 MB can be compared by sha256 without keeping them in memory.
* ``download`` / ``upload`` / ``hello``: HTTP clients for a tunnel port (or HaRP's frontend).
* ``/proc`` readers (``rss_bytes``, ``fd_count``) and port probes (``port_refuses``,
  ``wait_port_refused``, ``wait_port_bindable``).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import shutil
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any, Self

from harp.check.engines import listening
from tests.peers.base import Peer, port_accepts

# ------------------------------------------------------------------------ deterministic data

# A prime length, so that the repetition never lines up with power-of-two buffer sizes and a
# dropped, duplicated or reordered chunk anywhere in the stream changes the hash.
_BLOCK = random.Random(0x4A5250).randbytes(1_000_003)
_BLOCK2 = _BLOCK + _BLOCK  # any window of up to len(_BLOCK) bytes is one slice of this


def pattern_chunks(length: int, chunk: int = 256 * 1024) -> Iterator[bytes]:
    """The first ``length`` bytes of the endless repetition of ``_BLOCK``, in slices."""
    chunk = min(chunk, len(_BLOCK))
    pos = 0
    while pos < length:
        n = min(chunk, length - pos)
        start = pos % len(_BLOCK)
        yield _BLOCK2[start : start + n]
        pos += n


def pattern_sha256(length: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern_chunks(length, 1 << 20):
        digest.update(piece)
    return digest.hexdigest()


def hello_body(ident: str) -> bytes:
    """What ``GET /hello?id=<ident>`` answers: 128 KiB that differ for every id."""
    return hashlib.sha256(ident.encode()).digest() * 4096


# --------------------------------------------------------------------------- the unix server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _UnixHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        # The default formatter reads client_address[0], which a unix socket does not have.
        pass

    def setup(self) -> None:
        super().setup()
        self.server.opened()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.closed()

    def _query(self) -> tuple[str, dict[str, str]]:
        path, _, query = self.path.partition("?")
        params: dict[str, str] = {}
        for item in query.split("&"):
            if item:
                key, _, value = item.partition("=")
                params[key] = value
        return path, params

    def do_GET(self) -> None:
        path, params = self._query()
        if path.startswith("/data/"):
            self._send_data(int(path[len("/data/") :]))
        elif path == "/hello":
            delay = float(params.get("delay", "0"))
            if delay:
                time.sleep(delay)
            self._reply(200, hello_body(params.get("id", "")), "application/octet-stream")
        else:
            self._reply(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:
        path, _ = self._query()
        if path != "/upload":
            self._reply(404, b"not found\n", "text/plain")
            return
        remaining = int(self.headers.get("Content-Length", "0"))
        digest = hashlib.sha256()
        received = 0
        while remaining > 0:
            piece = self.rfile.read(min(remaining, 1 << 20))
            if not piece:
                break
            digest.update(piece)
            received += len(piece)
            remaining -= len(piece)
        body = json.dumps({"sha256": digest.hexdigest(), "length": received}).encode()
        self._reply(200, body, "application/json")

    def _reply(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_data(self, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        try:
            for piece in pattern_chunks(length, 64 * 1024):
                self.wfile.write(piece)
                self.server.add_sent(len(piece))
        except OSError:  # the reader went away (a test closing early): fine
            self.close_connection = True


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # a unix socket refuses (EAGAIN) once the backlog is full

    def __init__(self, path: str) -> None:
        super().__init__(path, _Handler)
        self.lock = threading.Lock()
        self.connections = 0
        self.active = 0
        self.peak = 0
        self.bytes_sent = 0

    def opened(self) -> None:
        with self.lock:
            self.connections += 1
            self.active += 1
            self.peak = max(self.peak, self.active)

    def closed(self) -> None:
        with self.lock:
            self.active -= 1

    def add_sent(self, n: int) -> None:
        with self.lock:
            self.bytes_sent += n


class DataServer(Peer):
    """The test's backend behind frpc's ``unix_domain_socket`` plugin.

    Routes: ``GET /data/<n>`` (n pattern bytes), ``POST /upload`` (answers
    ``{"sha256","length"}`` of the body), ``GET /hello?id=<s>&delay=<seconds>`` (``hello_body``).
    """

    def __init__(self) -> None:
        # AF_UNIX paths are limited to 107 bytes: keep it short, under /tmp.
        self.dir = tempfile.mkdtemp(prefix="frpdata-", dir="/tmp")
        self.path = os.path.join(self.dir, "data.sock")
        self._server: _UnixHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        self._server = _UnixHTTPServer(self.path)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _stats(self) -> _UnixHTTPServer:
        assert self._server is not None, "DataServer not started"
        return self._server

    @property
    def connections(self) -> int:
        return self._stats().connections

    @property
    def active(self) -> int:
        return self._stats().active

    @property
    def peak(self) -> int:
        return self._stats().peak

    def reset_peak(self) -> None:
        stats = self._stats()
        with stats.lock:
            stats.peak = stats.active

    @property
    def bytes_sent(self) -> int:
        return self._stats().bytes_sent


# ------------------------------------------------------------------------------ HTTP clients


def _connection(port: int, timeout: float) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def download(port: int, length: int, prefix: str = "", timeout: float = 60) -> tuple[int, str]:
    """GET ``<prefix>/data/<length>``: (bytes received, their sha256). Asserts status 200."""
    conn = _connection(port, timeout)
    try:
        conn.request("GET", f"{prefix}/data/{length}")
        resp = conn.getresponse()
        assert resp.status == 200, (resp.status, resp.read(2000))
        digest = hashlib.sha256()
        total = 0
        while True:
            piece = resp.read(1 << 20)
            if not piece:
                break
            digest.update(piece)
            total += len(piece)
        return total, digest.hexdigest()
    finally:
        conn.close()


def upload(port: int, length: int, prefix: str = "", timeout: float = 60) -> dict[str, Any]:
    """POST ``length`` pattern bytes to ``<prefix>/upload``; the server's answer as a dict."""
    conn = _connection(port, timeout)
    try:
        conn.request(
            "POST",
            f"{prefix}/upload",
            body=pattern_chunks(length),
            headers={"Content-Length": str(length), "Content-Type": "application/octet-stream"},
        )
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, (resp.status, data[:2000])
        result: dict[str, Any] = json.loads(data)
        return result
    finally:
        conn.close()


def hello(port: int, ident: str, delay: float = 0.0, timeout: float = 30) -> bytes:
    """GET ``/hello?id=<ident>&delay=<delay>`` on a fresh connection; the body (status 200)."""
    conn = _connection(port, timeout)
    try:
        conn.request("GET", f"/hello?id={ident}&delay={delay}")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, (resp.status, body[:2000])
        return body
    finally:
        conn.close()


# ------------------------------------------------------------------------------- /proc


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS from /proc/<pid>/status) in bytes."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_listing(pid: int) -> list[str]:
    """Where each open descriptor of ``pid`` points (for failure messages)."""
    out = []
    base = f"/proc/{pid}/fd"
    for name in sorted(os.listdir(base), key=int):
        with contextlib.suppress(OSError):
            out.append(f"{name} -> {os.readlink(os.path.join(base, name))}")
    return out


# ------------------------------------------------------------------------------- ports


def port_refuses(port: int, host: str = "127.0.0.1") -> bool:
    """True if a TCP connect to host:port is refused right now."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def wait_port_refused(port: int, timeout: float) -> float | None:
    """Seconds until connections to 127.0.0.1:port are refused, or None after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if port_refuses(port):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def wait_port_accepting(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_accepts(port):
            return True
        time.sleep(0.05)
    return False


def port_bindable(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind host:port now (SO_REUSEADDR, like Twisted's listenTCP)."""
    return not listening(port, host)


def wait_port_bindable(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if port_bindable(port):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
