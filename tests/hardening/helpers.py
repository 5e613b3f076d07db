"""Raw-socket tools for hostile HTTP cases: a recording upstream and a byte-level client.

:class:`RecordingUpstream` is a real HTTP/1.1 server on 127.0.0.1 (a thread per
connection) that keeps *every byte* it receives and a log of the requests it parsed, so
a test can assert that nothing reached the ExApp that should not have::

    with RecordingUpstream() as up:
        ...                                   # point an ExApp record at up.port
        assert not up.saw(marker)             # not in any byte it ever received
        req = up.requests_with(marker)[0]     # a parsed request (method, target, headers, body)

It answers every request ``200`` with keep-alive and a small JSON body.  A request with
an ``Upgrade`` header is answered ``200`` too (a refused upgrade: the connection stays
HTTP, so bytes smuggled behind it show up as further requests in the log), except when
its target contains ``/ws101`` or ``upgrade_mode == "accept"``: then it answers
``101 Switching Protocols``, sends :data:`GREETING` and echoes every byte back prefixed
with ``echo:``.  :meth:`RecordingUpstream.close_idle` closes its idle keep-alive
connections from the server side (FIN), as an ExApp's keep-alive timeout does.

:func:`exchange` sends raw bytes (optionally in timed pieces) and reads what comes back
until the wanted number of complete responses arrived, the peer closed, or a timeout;
:class:`Exchange` sums it up as ``"drop"``, a status code, or ``"no answer …"``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType

GREETING = b"hello-from-upstream"
CRLF = b"\r\n"

# --- the upstream


@dataclass
class UpstreamRequest:
    """One request the upstream parsed; ``complete`` once its whole body arrived."""

    conn: int
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    complete: bool = False

    def header(self, name: str) -> list[str]:
        """All values of header ``name`` (case-insensitive)."""
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


class _Closed(Exception):
    pass


class _Reader:
    def __init__(self, sock: socket.socket, raw: bytearray, lock: threading.Lock) -> None:
        self.sock, self.raw, self.lock = sock, raw, lock
        self.buf = b""

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise _Closed
        with self.lock:
            self.raw.extend(data)
        self.buf += data

    def until(self, delim: bytes, limit: int = 1 << 20) -> bytes:
        while delim not in self.buf:
            if len(self.buf) > limit:
                raise _Closed
            self._more()
        out, _, self.buf = self.buf.partition(delim)
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def any(self) -> bytes:
        if not self.buf:
            self._more()
        out, self.buf = self.buf, b""
        return out


class RecordingUpstream:
    """See the module docstring."""

    def __init__(self) -> None:
        self.requests: list[UpstreamRequest] = []
        self.raw: list[bytearray] = []  # per connection, everything received
        self.tunnel_bytes = bytearray()
        self.upgrade_mode = "path"  # "path": 101 only for /ws101 targets; "accept": always
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._idle: set[socket.socket] = set()
        self._conns: set[socket.socket] = set()
        self._sock: socket.socket | None = None
        self._stopping = threading.Event()

    # lifecycle

    def start(self) -> RecordingUpstream:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        self._sock = sock
        threading.Thread(target=self._accept, daemon=True, name="recording-upstream").start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> RecordingUpstream:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    # inspection

    def all_raw(self) -> bytes:
        with self._lock:
            return b"".join(bytes(r) for r in self.raw) + bytes(self.tunnel_bytes)

    def saw(self, marker: bytes | str) -> bool:
        """Did ``marker`` appear anywhere in the bytes this upstream received?"""
        needle = marker.encode("latin-1") if isinstance(marker, str) else marker
        return needle in self.all_raw()

    def requests_with(self, marker: str) -> list[UpstreamRequest]:
        """Parsed requests whose target or any header value contains ``marker``."""
        with self._lock:
            snapshot = list(self.requests)
        return [r for r in snapshot
                if marker in r.target or any(marker in v for _, v in r.headers)]

    def wait_for(self, marker: str, timeout: float = 5.0,
                 complete: bool = True) -> UpstreamRequest | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for req in self.requests_with(marker):
                if req.complete or not complete:
                    return req
            time.sleep(0.02)
        return None

    def connection_count(self) -> int:
        with self._lock:
            return len(self.raw)

    def close_idle(self) -> int:
        """Close (FIN) every keep-alive connection waiting for its next request."""
        with self._lock:
            idle = list(self._idle)
        for conn in idle:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        return len(idle)

    # serving

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        raw = bytearray()
        with self._lock:
            self.raw.append(raw)
            self._conns.add(conn)
        cid = next(self._ids)
        reader = _Reader(conn, raw, self._lock)
        try:
            while True:
                with self._lock:
                    self._idle.add(conn)
                try:
                    head = reader.until(CRLF + CRLF)
                finally:
                    with self._lock:
                        self._idle.discard(conn)
                req = self._parse_head(cid, head)
                with self._lock:
                    self.requests.append(req)
                if not self._read_body(reader, req):
                    return
                req.complete = True
                if req.header("upgrade") and (
                    self.upgrade_mode == "accept" or "/ws101" in req.target
                ):
                    self._tunnel(conn, reader)
                    return
                self._answer(conn, req)
                if any(v.lower() == "close" for v in req.header("connection")):
                    return
        except (_Closed, OSError, ValueError):
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._idle.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    @staticmethod
    def _parse_head(cid: int, head: bytes) -> UpstreamRequest:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        method, target, version = [*parts, "", "", ""][:3]
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
        return UpstreamRequest(cid, method, target, version, headers)

    @staticmethod
    def _read_body(reader: _Reader, req: UpstreamRequest) -> bool:
        te = ",".join(req.header("transfer-encoding")).lower()
        if te:
            if te.split(",")[-1].strip() != "chunked":
                return False
            body = bytearray()
            while True:
                size = int(reader.until(CRLF).split(b";")[0].strip(), 16)
                if size == 0:
                    while reader.until(CRLF):  # trailers
                        pass
                    break
                body += reader.exact(size)
                reader.exact(2)
            req.body = bytes(body)
            return True
        lengths = req.header("content-length")
        if lengths:
            req.body = reader.exact(int(lengths[-1]))
        return True

    @staticmethod
    def _answer(conn: socket.socket, req: UpstreamRequest) -> None:
        body = json.dumps({"method": req.method, "target": req.target,
                           "body_length": len(req.body)}).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def _tunnel(self, conn: socket.socket, reader: _Reader) -> None:
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n" + GREETING)
        while True:
            data = reader.any()
            with self._lock:
                self.tunnel_bytes.extend(data)
            conn.sendall(b"echo:" + data)


# --- the client side


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def parse_responses(data: bytes) -> tuple[list[Response], bytes]:
    """The complete HTTP/1.1 responses at the start of ``data``, and what follows them.

    A 101 ends the parse (what follows is tunnel data).  Bodies are framed by
    Content-Length or chunked; a response framed by the close is left incomplete.
    """
    out: list[Response] = []
    rest = data
    while True:
        head, sep, after = rest.partition(CRLF + CRLF)
        if not sep:
            return out, rest
        lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ")[1])
        except (IndexError, ValueError):
            return out, rest
        headers = [(k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in lines[1:])]
        names = {k.lower(): v for k, v in headers}
        if status == 101 or 100 <= status < 200 or status in (204, 304):
            out.append(Response(status, headers, b""))
            rest = after
            if status == 101:
                return out, rest
            continue
        if "chunked" in names.get("transfer-encoding", "").lower():
            body, remaining = _dechunk(after)
            if body is None:
                return out, rest
            out.append(Response(status, headers, body))
            rest = remaining
            continue
        if "content-length" in names:
            n = int(names["content-length"])
            if len(after) < n:
                return out, rest
            out.append(Response(status, headers, after[:n]))
            rest = after[n:]
            continue
        return out, rest  # framed by close: incomplete until EOF


def _dechunk(data: bytes) -> tuple[bytes | None, bytes]:
    body = b""
    rest = data
    while True:
        line, sep, after = rest.partition(CRLF)
        if not sep:
            return None, data
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            trailer_end = after.find(CRLF)
            while trailer_end > 0:  # skip trailers
                after = after[trailer_end + 2:]
                trailer_end = after.find(CRLF)
            if trailer_end < 0:
                return None, data
            return body, after[2:]
        if len(after) < size + 2:
            return None, data
        body += after[:size]
        rest = after[size + 2:]


@dataclass
class Exchange:
    """What came back for some raw bytes sent."""

    data: bytes = b""
    closed: bool = False  # the peer closed (EOF or reset)
    reset: bool = False
    elapsed: float = 0.0  # until closed, or until we stopped reading
    responses: list[Response] = field(default_factory=list)
    send_error: str = ""

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]

    @property
    def outcome(self) -> str:
        """``drop`` (closed, not a byte), the status codes (``"200"``, ``"200,drop"`` when
        closed after them), ``garbage`` or ``no answer after Ns``."""
        if not self.data:
            return "drop" if self.closed else f"no answer after {self.elapsed:.1f}s"
        if not self.responses:
            return f"garbage {self.data[:30]!r}" + (",closed" if self.closed else "")
        codes = ",".join(str(s) for s in self.statuses)
        return codes + (",closed" if self.closed else "")

    @property
    def first(self) -> str:
        """The first answer only: ``drop``, a status code or ``no answer``."""
        if self.responses:
            return str(self.responses[0].status)
        return "drop" if self.closed and not self.data else self.outcome


def connect(port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                     source_address=(source, 0))


def read_exchange(sock: socket.socket, want: int = 1, timeout: float = 2.0,
                  started: float | None = None) -> Exchange:
    """Read until ``want`` complete responses, the peer closes, or ``timeout`` of silence."""
    start = time.monotonic() if started is None else started
    result = Exchange()
    sock.settimeout(timeout)
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except (ConnectionResetError, ConnectionAbortedError):
            result.closed = result.reset = True
            break
        if not chunk:
            result.closed = True
            break
        result.data += chunk
        result.responses, _ = parse_responses(result.data)
        if len(result.responses) >= want or (
            result.responses and result.responses[-1].status == 101
        ):
            break
    result.responses, _ = parse_responses(result.data)
    result.elapsed = time.monotonic() - start
    return result


def exchange(port: int, payload: bytes | Iterable[tuple[float, bytes]], *,
             source: str = "127.0.0.1", want: int = 1, timeout: float = 2.0) -> Exchange:
    """Send ``payload`` (bytes in one write, or ``(delay, bytes)`` pieces) on a new
    connection and read the answer (see :func:`read_exchange`)."""
    with connect(port, source) as sock:
        start = time.monotonic()
        pieces = [(0.0, payload)] if isinstance(payload, bytes) else payload
        try:
            for delay, piece in pieces:
                if delay:
                    time.sleep(delay)
                sock.sendall(piece)
        except OSError as exc:
            # The server may refuse mid-send; what it answered is still readable.
            result = read_exchange(sock, want, timeout=0.5, started=start)
            result.send_error = type(exc).__name__
            result.closed = True
            return result
        return read_exchange(sock, want, timeout, started=start)


def build_request(method: str, target: str, headers: Iterable[tuple[str, str]] = (),
                  body: bytes = b"", host: str = "harp.test") -> bytes:
    """Raw request bytes; no header is added except Host (pass framing yourself)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Sources:
    """Distinct loopback source addresses, so one case's ban never hits another's.

    ``Sources(n)`` hands out 127.0.n.1 … 127.0.n.254; each test module picks its own
    ``n`` (test_http_hostile uses 10).
    """

    def __init__(self, third_octet: int) -> None:
        self._third = third_octet
        self._next = itertools.count(1)

    def new(self) -> str:
        n = next(self._next)
        assert n < 255, "out of source addresses"
        return f"127.0.{self._third}.{n}"
