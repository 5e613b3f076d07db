"""Hostile FRP peers against the real ``twistd harp`` (docs/security.md#limits).

Every test starts its own HaRP (bans and memory must not leak between cases) and speaks
FRP by hand: yamux headers (12 bytes, big-endian), FRP messages (type byte, int64 length,
JSON), and for the control stream after Login frp's AES-128-CFB with the key derived from
the empty token (docs/compatibility.md#frp-protocol).  Nothing of ``harp`` is imported, so the bytes
are what any client could send.

* **Floods without reading** (docs/security.md#limits, FRP output backlog): the client sends yamux
  Pings, or FRP ``Ping`` messages on a tcpMux=false control, as fast as the socket takes them, and
  never reads an answer (its receive buffer is tiny).  HaRP's RSS is sampled throughout; its growth
  must stay bounded and HaRP must end the connection.
* **Foreign work connections** (docs/security.md#what-authenticates-what): a second yamux session
  that sends ``NewWorkConn`` with a logged-in client's run_id must be refused, and each refusal
  counts towards a ban like a failed login.
* **Plaintext warning**: ``HP_FRP_DISABLE_TLS=true`` says so at start, even when
  ``HP_LOG_LEVEL=error``.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

try:
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # cryptography < 43
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from tests.conftest import HarpProcess, base_env

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
RSS_GROWTH_LIMIT = 20 * MiB
"""Before the fix: +28 MB in 8 s before login, +69 MB in 12 s logged in."""

_YAMUX = struct.Struct(">BBHII")
DATA, WINDOW_UPDATE, PING = 0, 1, 2
SYN, ACK, RST = 0x1, 0x2, 0x8


# ------------------------------------------------------------------------------ wire helpers


def yamux_frame(kind: int, flags: int, stream: int, length: int, payload: bytes = b"") -> bytes:
    return _YAMUX.pack(0, kind, flags, stream, length) + payload


def frp_message(kind: bytes, body: dict[str, Any]) -> bytes:
    raw = json.dumps(body, separators=(",", ":")).encode()
    return kind + struct.pack(">q", len(raw)) + raw


def login_message(key: str) -> bytes:
    ts = int(time.time())
    return frp_message(b"o", {
        "version": "0.65.0", "os": "linux", "arch": "amd64",
        "privilege_key": hashlib.md5(str(ts).encode()).hexdigest(),  # noqa: S324 - frp's
        "timestamp": ts, "metas": {"token": key}, "client_spec": {}, "pool_count": 1,
    })


def on_stream(stream: int, payload: bytes, *, open_it: bool) -> bytes:
    """Open yamux *stream* (as frpc does: WindowUpdate+SYN) and send *payload* on it."""
    head = yamux_frame(WINDOW_UPDATE, SYN, stream, 0) if open_it else b""
    return head + yamux_frame(DATA, 0, stream, len(payload), payload)


def cfb_encryptor() -> Any:
    """frp's control-stream cipher for the empty token; returns (iv, encryptor)."""
    key = PBKDF2HMAC(algorithm=hashes.SHA1(), length=16, salt=b"frp",  # noqa: S303
                     iterations=64).derive(b"")
    iv = os.urandom(16)
    return iv, Cipher(algorithms.AES(key), CFB(iv)).encryptor()


def connect(port: int, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect(), so the advertised window is small too
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def read_until(sock: socket.socket, done: Callable[[bytes], bool], timeout: float = 5) -> bytes:
    """Read until ``done(buffer)``, EOF, or *timeout*; returns what arrived."""
    buf = b""
    deadline = time.monotonic() + timeout
    while not done(buf) and time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            break
        except OSError:
            break
        if not chunk:
            break
        buf += chunk
    return buf


def yamux_frames(buf: bytes) -> list[tuple[int, int, int, int, bytes]]:
    """Complete frames in *buf*: (type, flags, stream, length, payload)."""
    frames, pos = [], 0
    while pos + 12 <= len(buf):
        _, kind, flags, stream, length = _YAMUX.unpack_from(buf, pos)
        size = length if kind == DATA else 0
        if pos + 12 + size > len(buf):
            break
        frames.append((kind, flags, stream, length, buf[pos + 12 : pos + 12 + size]))
        pos += 12 + size
    return frames


def stream_data(buf: bytes, stream: int) -> bytes:
    return b"".join(p for k, _, s, _, p in yamux_frames(buf) if k == DATA and s == stream)


def first_message(data: bytes) -> dict[str, Any] | None:
    if len(data) < 9:
        return None
    (length,) = struct.unpack(">q", data[1:9])
    if len(data) < 9 + length:
        return None
    body: dict[str, Any] = json.loads(data[9 : 9 + length])
    return body


def yamux_login(port: int, key: str, *, rcvbuf: int | None = None) -> tuple[socket.socket, str]:
    """A tcpMux session logged in on stream 1: (socket, run_id)."""
    sock = connect(port, rcvbuf=rcvbuf)
    sock.sendall(on_stream(1, login_message(key), open_it=True))
    buf = read_until(sock, lambda b: first_message(stream_data(b, 1)) is not None)
    resp = first_message(stream_data(buf, 1))
    assert resp is not None and resp.get("run_id") and not resp.get("error"), (resp, buf)
    return sock, str(resp["run_id"])


# ------------------------------------------------------------------------------ the flood


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@dataclass
class Flood:
    sent: int
    seconds: float
    dropped: bool
    peak_growth: int

    def describe(self) -> str:
        end = f"dropped after {self.seconds:.1f}s" if self.dropped else \
            f"still open after {self.seconds:.1f}s"
        return f"{end}, sent {self.sent / MiB:.1f} MiB, RSS +{self.peak_growth / MiB:.1f} MiB"


def flood(sock: Any, next_chunk: Callable[[], bytes], pid: int, baseline: int,
          limit: float) -> Flood:
    """Send without ever reading until HaRP drops us, RSS runs away, or *limit* seconds."""
    sock.setblocking(False)
    start = time.monotonic()
    peak, sent, dropped = 0, 0, False
    pending = b""
    next_sample = 0.0
    while True:
        now = time.monotonic()
        if now >= next_sample:
            peak = max(peak, rss(pid) - baseline)
            next_sample = now + 0.2
            if peak > 2 * RSS_GROWTH_LIMIT:
                break  # unbounded: no need to wait for the limit
        if now - start > limit:
            break
        _, writable, _ = select.select([], [sock], [], 0.2)
        if not writable:
            continue
        if not pending:
            pending = next_chunk()
        try:
            n = sock.send(pending)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            continue
        except OSError:  # reset / broken pipe / TLS EOF: HaRP closed the connection
            dropped = True
            break
        sent += n
        pending = pending[n:]
    peak = max(peak, rss(pid) - baseline)
    return Flood(sent, time.monotonic() - start, dropped, peak)


def settle(harp: HarpProcess) -> int:
    """HaRP's RSS once it is listening and idle (the baseline of a case)."""
    assert harp.proc is not None
    time.sleep(0.5)
    return rss(harp.proc.pid)


def _start(harp_factory: type[HarpProcess], tmp_path: Path, **env: str) -> HarpProcess:
    return harp_factory(base_env(tmp_path, **env)).start()


PINGS = b"".join(yamux_frame(PING, SYN, 0, n) for n in range(64 * 1024 // 12))


# ------------------------------------------------------------- floods without reading


def _flood_case(
    harp: HarpProcess, record_case: Any, measure: Any, case: str, shown: bytes,
    open_flooded: Callable[[], tuple[Any, Callable[[], bytes]]], limit: float,
) -> None:
    """Open a connection with *open_flooded* (which returns it and the next chunk to send),
    flood it without reading, and assert HaRP drops it with its RSS bounded."""
    baseline = settle(harp)
    assert harp.proc is not None
    with measure(harp) as m:
        sock, next_chunk = open_flooded()
        result = flood(sock, next_chunk, harp.proc.pid, baseline, limit=limit)
        sock.close()
    record_case(case=case, input=shown, expected="dropped, RSS bounded",
                observed=result.describe(), measured=m)
    assert result.peak_growth < RSS_GROWTH_LIMIT, result.describe()
    assert result.dropped, result.describe()


def test_yamux_ping_flood_before_login_over_tls(
    harp_factory: type[HarpProcess], tmp_path: Path, record_case: Any, measure: Any
) -> None:
    """Mutual TLS done, then only yamux Pings and never a read: bounded, then dropped."""
    harp = _start(harp_factory, tmp_path)
    certs = Path(harp.env["HP_CERTS_DIR"]) / "frp"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # frpc without trustedCaFile does not check either
    # (docs/compatibility.md#frp-transport)
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(certs / "client.crt"), str(certs / "client.key"))

    def over_tls() -> tuple[Any, Callable[[], bytes]]:
        raw = connect(harp.frp_port, rcvbuf=4096)
        return ctx.wrap_socket(raw, server_hostname="harp.nc"), lambda: PINGS

    _flood_case(harp, record_case, measure, "frp ping flood before login (TLS)",
                PINGS[:24] + b"...", over_tls, limit=25)


def test_yamux_ping_flood_logged_in(
    harp_factory: type[HarpProcess], tmp_path: Path, record_case: Any, measure: Any
) -> None:
    """A logged-in tcpMux session floods yamux Pings and reads nothing."""
    harp = _start(harp_factory, tmp_path, HP_FRP_DISABLE_TLS="true")

    def logged_in() -> tuple[Any, Callable[[], bytes]]:
        sock, _ = yamux_login(harp.frp_port, harp.env["HP_SHARED_KEY"], rcvbuf=4096)
        return sock, lambda: PINGS

    _flood_case(harp, record_case, measure, "frp ping flood logged in (yamux)",
                PINGS[:24] + b"...", logged_in, limit=40)


def test_frp_ping_message_flood_logged_in_without_mux(
    harp_factory: type[HarpProcess], tmp_path: Path, record_case: Any, measure: Any
) -> None:
    """tcpMux=false: encrypted FRP ``Ping`` messages, each owed a ``Pong``, never read."""
    harp = _start(harp_factory, tmp_path, HP_FRP_DISABLE_TLS="true")
    ping = frp_message(b"h", {})
    plain = ping * (64 * 1024 // len(ping))
    iv, enc = cfb_encryptor()

    def logged_in_without_mux() -> tuple[Any, Callable[[], bytes]]:
        sock = connect(harp.frp_port, rcvbuf=4096)
        sock.sendall(login_message(harp.env["HP_SHARED_KEY"]))
        resp = first_message(read_until(sock, lambda b: first_message(b) is not None))
        assert resp is not None and resp.get("run_id"), resp
        sock.sendall(iv)
        return sock, lambda: enc.update(plain)

    _flood_case(harp, record_case, measure, "frp Ping message flood logged in (no mux)",
                ping, logged_in_without_mux, limit=40)


# ------------------------------------------------------------ foreign work connections


def test_work_conn_on_a_foreign_session_is_refused_and_counted(
    harp_factory: type[HarpProcess], tmp_path: Path, record_case: Any
) -> None:
    harp = _start(harp_factory, tmp_path, HP_FRP_DISABLE_TLS="true", HP_BLACKLIST_COUNT="2")
    key = harp.env["HP_SHARED_KEY"]
    owner, run_id = yamux_login(harp.frp_port, key)
    hijack = on_stream(1, frp_message(b"w", {"run_id": run_id}), open_it=True)
    observed = []
    try:
        for _ in range(2):
            with connect(harp.frp_port) as intruder:
                intruder.sendall(hijack)
                buf = read_until(intruder, lambda b: any(
                    f[0] == WINDOW_UPDATE and f[1] & RST and f[2] == 1
                    for f in yamux_frames(b)), timeout=3)
                refused = any(f[0] == WINDOW_UPDATE and f[1] & RST and f[2] == 1
                              for f in yamux_frames(buf))
                observed.append("reset" if refused else "parked")
        # Two refusals ban the address (HP_BLACKLIST_COUNT=2), like two failed logins.
        with connect(harp.frp_port) as late:
            late.sendall(on_stream(1, login_message(key), open_it=True))
            resp = first_message(stream_data(read_until(
                late, lambda b: first_message(stream_data(b, 1)) is not None), 1))
        observed.append(f"then login: {resp and (resp.get('error') or 'ok')}")
    finally:
        owner.close()
    record_case(case="frp NewWorkConn with another session's run_id", input=hijack,
                expected="reset x2, then login banned", observed=", ".join(observed), proc=harp)
    assert observed[:2] == ["reset", "reset"], (observed, harp.output()[-3000:])
    assert resp is not None and resp.get("error") == "banned", (resp, harp.output()[-3000:])
    assert "work connection from 127.0.0.1 for client" in harp.output()


# ------------------------------------------------------------------------------ plaintext


def test_plaintext_frp_warns_at_start_even_at_error_level(
    harp_factory: type[HarpProcess], tmp_path: Path, record_case: Any
) -> None:
    harp = _start(harp_factory, tmp_path, HP_FRP_DISABLE_TLS="true", HP_LOG_LEVEL="error")
    deadline = time.monotonic() + 10
    while "WITHOUT TLS" not in harp.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [line for line in harp.output().splitlines() if "WITHOUT TLS" in line]
    record_case(case="HP_FRP_DISABLE_TLS=true start", input="HP_LOG_LEVEL=error",
                expected="one warning line", observed=f"{len(lines)} line(s)", proc=harp)
    assert len(lines) == 1, harp.output()
    assert "unencrypted" in lines[0] and "warn" in lines[0].lower()
