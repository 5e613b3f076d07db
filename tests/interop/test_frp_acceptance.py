"""Black-box acceptance tests of HaRP's FRP server, against the real frpc 0.65.

Only HaRP's observable behaviour is used: the environment it starts with, the PKI it writes under
``$HP_CERTS_DIR/frp``, the tunnel ports it binds on 127.0.0.1, its HTTP frontend and registry push,
what frpc logs, and ``/proc/<pid>`` of the twistd process. Contract:
docs/compatibility.md#frp-protocol, docs/compatibility.md#brute-force-protection and
docs/compatibility.md#exapp-container-contract.

The backend behind frpc is either ``DataServer`` (a unix-socket HTTP server, see frp_helpers) or
the nc_py_api test ExApp listening on a unix socket like a deployed ExApp. Remote ports are the
ones the reference's setups use (23000 for an ExApp, 24001 for a remote engine); tests that need
more ports use 24002-24004. HaRP's own listeners use free ports.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import HarpProcess, base_env
from tests.interop.frp_helpers import (
    DataServer,
    download,
    fd_count,
    fd_listing,
    hello,
    hello_body,
    pattern_chunks,
    pattern_sha256,
    port_refuses,
    rss_bytes,
    upload,
    wait_port_bindable,
    wait_port_refused,
)
from tests.peers.exapp_runner import ExAppProcess
from tests.peers.frpc import FrpcProcess, FrpcProxy

pytestmark = pytest.mark.interop

ENGINE_PORT = 24001  # a remote Docker engine's tunnel
EXAPP_PORT = 23000  # an ExApp's APP_PORT
MB = 1_000_000

LOGIN_FAILED = r"(?m)login to the server failed: (.*?)(?:\. With loginFailExit|$)"
# The two texts frps sends for a bad token: the reference (plugin answers HTTP 400) and
# frps's own token check (docs/compatibility.md#frp-login). Either is "the error as frps sends it".
BAD_TOKEN_ERRORS = (
    "send Login request to plugin error",
    "token in login doesn't match token from configuration",
)


# ------------------------------------------------------------------------------ environment


def _listening(port: int) -> list[str]:
    """Local addresses of sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                local, state = fields[1], fields[3]
                addr, _, hex_port = local.rpartition(":")
                if state == "0A" and int(hex_port, 16) == port:
                    if len(addr) == 8:
                        found.append(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
                    else:
                        found.append(f"[{addr}]")
    return found


class FrpEnv:
    """Starts HaRP, data servers, ExApps and frpc clients for one test; ``close()`` ends all."""

    def __init__(self, tmp: Path, frpc_bin: str) -> None:
        self.tmp = tmp
        self.frpc_bin = frpc_bin
        self.harps: list[HarpProcess] = []
        self.frpcs: list[FrpcProcess] = []
        self.servers: list[DataServer] = []
        self.exapps: list[ExAppProcess] = []

    # -- HaRP

    def harp(self, **env: str) -> HarpProcess:
        workdir = self.tmp / f"harp{len(self.harps)}"
        workdir.mkdir()
        full = base_env(workdir, **{"HP_BLACKLIST_COUNT": "1000", **env})
        proc = HarpProcess(full, workdir)
        self.harps.append(proc)
        proc.start()
        deadline = time.monotonic() + 10
        while "127.0.0.1" not in _listening(proc.frp_port):
            assert time.monotonic() < deadline, f"FRP port not listening:\n{tail(proc)}"
            time.sleep(0.05)
        return proc

    # -- backends

    def data_server(self) -> DataServer:
        server = DataServer().start()
        self.servers.append(server)
        return server

    def exapp(self, **kwargs: Any) -> ExAppProcess:
        app = ExAppProcess(log_path=self.tmp / f"exapp{len(self.exapps)}.log", **kwargs)
        self.exapps.append(app)
        return app.start()

    # -- frpc

    def frpc(
        self,
        harp: HarpProcess,
        proxies: list[FrpcProxy],
        *,
        tls: str = "mtls",
        token: str | None = None,
        **options: Any,
    ) -> FrpcProcess:
        """An frpc (not started) for ``harp``.

        ``tls``: ``"mtls"`` is what ExApps and remote engines use (client cert, CA and
        ``serverName = "harp.nc"``); ``"no-cert"`` is TLS with the CA but no client certificate;
        ``"plain"`` disables TLS. ``token`` defaults to HaRP's shared key.
        """
        certs = Path(harp.env["HP_CERTS_DIR"]) / "frp"
        if tls == "mtls":
            options |= {
                "tls_enable": True,
                "cert_file": str(certs / "client.crt"),
                "key_file": str(certs / "client.key"),
                "trusted_ca_file": str(certs / "ca.crt"),
                "server_name": "harp.nc",
            }
        elif tls == "no-cert":
            options |= {
                "tls_enable": True,
                "trusted_ca_file": str(certs / "ca.crt"),
                "server_name": "harp.nc",
            }
        else:
            assert tls == "plain", tls
            options |= {"tls_enable": False}
        proc = FrpcProcess(
            server_port=harp.frp_port,
            token=harp.env["HP_SHARED_KEY"] if token is None else token,
            proxies=proxies,
            workdir=self.tmp / f"frpc{len(self.frpcs)}",
            binary=self.frpc_bin,
            **options,
        )
        self.frpcs.append(proc)
        return proc

    def engine_tunnel(self) -> tuple[HarpProcess, DataServer, FrpcProcess]:
        """HaRP, a data server and an frpc tunnelling it as ``engine-1`` on
        :data:`ENGINE_PORT`, logged in and started (what most tests begin with)."""
        need_free(ENGINE_PORT)
        harp = self.harp()
        server = self.data_server()
        frpc = self.frpc(harp, [FrpcProxy("engine-1", ENGINE_PORT, unix_path=server.path)])
        started(frpc, harp, "engine-1")
        return harp, server, frpc

    def close(self) -> None:
        for proc in self.frpcs:
            proc.stop()
        for app in self.exapps:
            app.stop()
        for harp in self.harps:
            harp.stop()
        for server in self.servers:
            server.stop()


@pytest.fixture
def env(tmp_path: Path, frpc_binary: str) -> Iterator[FrpEnv]:
    frp = FrpEnv(tmp_path, frpc_binary)
    try:
        yield frp
    finally:
        frp.close()


def tail(harp: HarpProcess, lines: int = 40) -> str:
    return "\n".join(harp.output().splitlines()[-lines:])


def need_free(*ports: int) -> None:
    """The fixed remote ports must be free (another test run may briefly hold them)."""
    for port in ports:
        if not wait_port_bindable(port, 30):
            pytest.fail(f"127.0.0.1:{port} is in use by another program; cannot run this test")


def started(frpc: FrpcProcess, harp: HarpProcess, name: str, timeout: float = 30) -> None:
    """Start ``frpc`` and wait for ``[name] start proxy success``."""
    if not frpc.running:
        frpc.start()
    match = expect_log(
        frpc, harp, rf"\[{re.escape(name)}\] (start proxy success|start error: .*)", timeout
    )
    if match.group(1) != "start proxy success":
        hint = ""
        if "port unavailable" in match.group(1):
            # HaRP could not bind the port: some other program (e.g. a concurrent test run
            # using the fixed ports) holds it.
            hint = " (the port is held by another program; is another test run active?)"
        raise AssertionError(f"[{name}] {match.group(1)}{hint}\n--- HaRP log tail:\n{tail(harp)}")


def expect_log(frpc: FrpcProcess, harp: HarpProcess, pattern: str, timeout: float = 30,
               since: int | None = None) -> re.Match[str]:
    try:
        return frpc.wait_for_log(pattern, timeout=timeout, since=since)
    except (TimeoutError, RuntimeError) as exc:
        raise AssertionError(f"{exc}\n--- HaRP log tail:\n{tail(harp)}") from None


def login_error(frpc: FrpcProcess, harp: HarpProcess, timeout: float = 30) -> str:
    """Wait for frpc's failed login (it exits: loginFailExit = true); the error text."""
    match = expect_log(frpc, harp, rf"{LOGIN_FAILED}|login to server success", timeout)
    assert match.group(0) != "login to server success", (
        f"HaRP accepted a login it must refuse:\n{frpc.log_tail()}\n--- HaRP:\n{tail(harp)}"
    )
    assert frpc.proc is not None
    frpc.proc.wait(timeout=10)  # loginFailExit: the client gives up
    return match.group(1).strip()


def push_record(harp: HarpProcess, app_id: str, record: dict[str, Any]) -> None:
    """Register an ExApp record the way AppAPI does on enable
    (docs/compatibility.md#exapp-registry)."""
    conn = http.client.HTTPConnection("127.0.0.1", harp.http_port, timeout=10)
    try:
        conn.request("POST", f"/exapps/app_api/exapp_storage/{app_id}",
                     body=json.dumps(record).encode(),
                     headers={"harp-shared-key": harp.env["HP_SHARED_KEY"],
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        assert 200 <= resp.status < 300, (resp.status, body)
    finally:
        conn.close()


def dropped_or_status(port: int, path: str, headers: dict[str, str],
                      source: str = "127.0.0.1") -> int | None:
    """Status of one request, or None if HaRP closed the connection without answering (ban)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
        return None
    finally:
        conn.close()


# ------------------------------------------------------- 1. data through a tcp proxy (24001)


def test_tunnel_100mb_both_ways_byte_exact(env: FrpEnv) -> None:
    """TLS + tcpMux (frpc defaults, with the HaRP client cert): 100 MB down and up, sha256-equal."""
    harp, _server, _frpc = env.engine_tunnel()
    # Bound on the loopback interface only (docs/compatibility.md#frp-proxies).
    assert _listening(ENGINE_PORT) == ["127.0.0.1"], _listening(ENGINE_PORT)
    assert hello(ENGINE_PORT, "first") == hello_body("first")

    size = 100 * MB
    expected = pattern_sha256(size)
    t0 = time.monotonic()
    assert download(ENGINE_PORT, size, timeout=120) == (size, expected), tail(harp)
    t1 = time.monotonic()
    assert upload(ENGINE_PORT, size, timeout=120) == {"sha256": expected, "length": size}, \
        tail(harp)
    t2 = time.monotonic()
    print(f"100 MB down {size / MB / (t1 - t0):.1f} MB/s, up {size / MB / (t2 - t1):.1f} MB/s")


VARIANTS: dict[str, tuple[dict[str, str], dict[str, Any], dict[str, Any]]] = {
    "tls-no-mux": ({}, {"tcp_mux": False}, {}),
    "tls-custom-first-byte": ({}, {"disable_custom_tls_first_byte": False}, {}),
    "plain-both-sides": ({"HP_FRP_DISABLE_TLS": "true"}, {"tls": "plain"}, {}),
    "plain-no-mux-pool": ({"HP_FRP_DISABLE_TLS": "true"}, {"tls": "plain", "tcp_mux": False,
                                                           "pool_count": 3}, {}),
    "encryption": ({}, {}, {"use_encryption": True}),
    "encryption-compression": ({}, {}, {"use_encryption": True, "use_compression": True}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tunnel_variants_byte_exact(env: FrpEnv, variant: str) -> None:
    """The other transports of the acceptance list carry 8 MB both ways unchanged."""
    harp_env, frpc_options, proxy_options = VARIANTS[variant]
    need_free(ENGINE_PORT)
    harp = env.harp(**harp_env)
    server = env.data_server()
    proxy = FrpcProxy("engine-1", ENGINE_PORT, unix_path=server.path, **proxy_options)
    frpc = env.frpc(harp, [proxy], **frpc_options)
    frpc.start()
    match = expect_log(frpc, harp, r"\[engine-1\] (start proxy success|start error: .*)")
    if variant == "encryption-compression":
        # Our decision (the issue allows it): compression is refused with a clear
        # NewProxyResp error naming the frpc option to turn off.
        assert "start error" in match.group(0), match.group(0)
        assert "transport.useCompression" in match.group(0)
        return
    assert "start error" not in match.group(0), match.group(0)
    size = 8 * MB
    expected = pattern_sha256(size)
    for i in range(3):  # several user connections: pooled and freshly requested work conns
        assert hello(ENGINE_PORT, f"v{i}") == hello_body(f"v{i}")
    assert download(ENGINE_PORT, size) == (size, expected), tail(harp)
    assert upload(ENGINE_PORT, size) == {"sha256": expected, "length": size}, tail(harp)


def test_tunnel_50_concurrent_connections(env: FrpEnv) -> None:
    """50 simultaneous user connections, each its own work connection and backend connection."""
    harp, server, _frpc = env.engine_tunnel()
    assert hello(ENGINE_PORT, "warm") == hello_body("warm")
    before = server.connections
    server.reset_peak()

    def one(i: int) -> bool:
        return hello(ENGINE_PORT, f"c{i}", delay=2.0, timeout=60) == hello_body(f"c{i}")

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(one, range(50)))
    elapsed = time.monotonic() - t0
    assert all(results), f"{results.count(False)} responses mixed up\n{tail(harp)}"
    assert server.connections - before == 50
    # Each backend request takes 2 s: they only finish in time if they really ran side by side.
    assert server.peak >= 25, f"at most {server.peak} backend connections at once"
    assert elapsed < 30, f"50 concurrent requests took {elapsed:.1f}s"


def test_frontend_reaches_tunnel_port(env: FrpEnv) -> None:
    """A record with host 127.0.0.1 and a tunnelled port: HaRP's HTTP side reaches the backend."""
    harp, _server, _frpc = env.engine_tunnel()
    push_record(harp, "tunapp", {
        "exapp_token": "secret", "exapp_version": "1.0.0", "host": "127.0.0.1",
        "port": ENGINE_PORT,
        "routes": [{"url": "^/data/", "access_level": 0}, {"url": "^/upload$", "access_level": 0}],
    })
    size = 20 * MB
    expected = pattern_sha256(size)
    assert download(harp.http_port, size, prefix="/exapps/tunapp") == (size, expected), tail(harp)
    assert upload(harp.http_port, size, prefix="/exapps/tunapp") == \
        {"sha256": expected, "length": size}, tail(harp)


# ----------------------------------------------------------------------- 2. slow reader


def _read_exact(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        piece = sock.recv(min(n - got, 1 << 20))
        assert piece, f"EOF after {got} of {n} bytes"
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def test_slow_reader_does_not_grow_memory(env: FrpEnv) -> None:
    """A user that stops reading a huge download: HaRP applies back-pressure, RSS stays bounded."""
    need_free(ENGINE_PORT)
    harp = env.harp()
    assert harp.proc is not None
    pid = harp.proc.pid
    server = env.data_server()
    frpc = env.frpc(harp, [FrpcProxy("engine-1", ENGINE_PORT, unix_path=server.path)])
    started(frpc, harp, "engine-1")

    # Warm up (buffers, allocator arenas) and measure the tunnel's speed.
    warm = 30 * MB
    t0 = time.monotonic()
    assert download(ENGINE_PORT, warm) == (warm, pattern_sha256(warm))
    rate = warm / max(time.monotonic() - t0, 0.01)
    # Stall long enough that a server which buffers without bound would gain >= 150 MB.
    stall = min(max(150 * MB / rate, 8.0), 40.0)
    time.sleep(0.5)
    baseline = rss_bytes(pid)

    sent_before = server.bytes_sent
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", ENGINE_PORT))
        sock.sendall(b"GET /data/5000000000 HTTP/1.1\r\nHost: engine\r\n\r\n")
        peak = baseline
        deadline = time.monotonic() + stall
        while time.monotonic() < deadline:  # not reading at all
            peak = max(peak, rss_bytes(pid))
            time.sleep(0.2)
        in_flight = server.bytes_sent - sent_before
        growth = peak - baseline
        assert growth <= 50 * 2**20, (
            f"HaRP RSS grew by {growth / 2**20:.0f} MiB while the reader stalled {stall:.0f}s "
            f"(backend sent {in_flight / MB:.0f} MB meanwhile)\n{tail(harp)}"
        )
        # The stalled stream resumes intact: headers, then the first 20 MB of the pattern.
        head = b""
        while b"\r\n\r\n" not in head:
            piece = sock.recv(1)
            assert piece, "EOF in headers"
            head += piece
        assert head.startswith(b"HTTP/1.1 200"), head
        body = _read_exact(sock, 20 * MB)
        assert body == b"".join(pattern_chunks(20 * MB)), "data corrupted after the stall"
    print(f"slow reader: stall {stall:.0f}s at {rate / MB:.0f} MB/s, RSS +{growth / 2**20:.1f} "
          f"MiB, backend sent {in_flight / MB:.1f} MB during the stall")


# -------------------------------------------------------------------------- 3. rejections


def test_reject_wrong_token(env: FrpEnv) -> None:
    harp = env.harp()
    frpc = env.frpc(harp, [FrpcProxy("engine-1", 24002, local_port=9)], token="not-the-key")
    frpc.start()
    error = login_error(frpc, harp)
    assert error in BAD_TOKEN_ERRORS, error


def test_reject_client_without_certificate(env: FrpEnv) -> None:
    """mTLS is enforced: no client cert, or no TLS at all, never logs in (frpc sees EOF or so)."""
    harp = env.harp()
    no_cert = env.frpc(harp, [FrpcProxy("engine-1", 24002, local_port=9)], tls="no-cert")
    no_cert.start()
    assert login_error(no_cert, harp)
    plain = env.frpc(harp, [FrpcProxy("engine-1", 24002, local_port=9)], tls="plain")
    plain.start()
    assert login_error(plain, harp)
    # The server is still fine for a proper client.
    need_free(24002)
    good = env.frpc(harp, [FrpcProxy("engine-1", 24002, local_port=9)])
    started(good, harp, "engine-1")


def test_reject_port_outside_allowed_ranges(env: FrpEnv) -> None:
    harp = env.harp()
    frpc = env.frpc(harp, [FrpcProxy("far-away", 25000, local_port=9)])
    frpc.start()
    expect_log(frpc, harp, r"login to server success")
    expect_log(frpc, harp, r"\[far-away\] start error: port not allowed")
    assert "127.0.0.1" not in _listening(25000)


def test_reject_used_port_and_used_name(env: FrpEnv) -> None:
    need_free(ENGINE_PORT, 24002)
    harp = env.harp()
    server = env.data_server()
    first = env.frpc(harp, [FrpcProxy("engine-1", ENGINE_PORT, unix_path=server.path)])
    started(first, harp, "engine-1")

    same_port = env.frpc(harp, [FrpcProxy("engine-2", ENGINE_PORT, unix_path=server.path)])
    same_port.start()
    expect_log(same_port, harp, r"\[engine-2\] start error: port already used")

    same_name = env.frpc(harp, [FrpcProxy("engine-1", 24002, unix_path=server.path)])
    same_name.start()
    expect_log(same_name, harp, r"\[engine-1\] start error: proxy \[engine-1\] already exists")
    assert "127.0.0.1" not in _listening(24002)

    # The first client's tunnel is untouched.
    assert hello(ENGINE_PORT, "still-mine") == hello_body("still-mine")


def test_one_port_per_client(env: FrpEnv) -> None:
    """maxPortsPerClient = 1 (docs/compatibility.md#frp-proxies): the second proxy of one client is
    refused."""
    need_free(24003, 24004)
    harp = env.harp()
    server = env.data_server()
    frpc = env.frpc(harp, [FrpcProxy("p-a", 24003, unix_path=server.path),
                           FrpcProxy("p-b", 24004, unix_path=server.path)])
    frpc.start()
    expect_log(frpc, harp, r"start proxy success")
    expect_log(frpc, harp, r"start error: exceed the max_ports_per_client")
    log = frpc.log_text()
    ok = [n for n in ("p-a", "p-b") if f"[{n}] start proxy success" in log]
    assert len(ok) == 1, log
    port = 24003 if ok == ["p-a"] else 24004
    assert hello(port, "single") == hello_body("single")


def test_bad_token_logins_ban_the_address(env: FrpEnv) -> None:
    """HP_BLACKLIST_COUNT=2: two bad-token logins ban 127.0.0.1, then even the right token fails."""
    harp = env.harp(HP_BLACKLIST_COUNT="2")
    proxies = [FrpcProxy("engine-1", 24002, local_port=9)]
    for attempt in range(2):
        bad = env.frpc(harp, proxies, token=f"wrong-{attempt}")
        bad.start()
        error = login_error(bad, harp)
        assert error in BAD_TOKEN_ERRORS, (attempt, error)  # not yet banned
    good = env.frpc(harp, proxies)
    good.start()
    assert login_error(good, harp) == "banned"
    # The ban is per address and shared with the HTTP side
    # (docs/compatibility.md#brute-force-protection).
    key = {"harp-shared-key": harp.env["HP_SHARED_KEY"]}
    assert dropped_or_status(harp.http_port, "/exapps/app_api/info", key) is None
    assert dropped_or_status(harp.http_port, "/exapps/app_api/info", key, "127.0.0.2") == 200


# ---------------------------------------------------------------- 4. kill, restart, cycles


def test_killed_client_frees_port_and_restart_works(env: FrpEnv) -> None:
    harp, _server, frpc = env.engine_tunnel()
    assert hello(ENGINE_PORT, "before") == hello_body("before")

    # A user connection in the middle of a download when the client dies.
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.connect(("127.0.0.1", ENGINE_PORT))
        sock.sendall(b"GET /data/5000000000 HTTP/1.1\r\nHost: engine\r\n\r\n")
        _read_exact(sock, 1 << 20)
        frpc.kill()
        killed = time.monotonic()
        sock.settimeout(1)
        ended = False
        while time.monotonic() - killed < 10 and not ended:
            try:
                ended = not sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:  # reset
                ended = True
        assert ended, "user connection still open 10 s after frpc was killed"
        user_closed = time.monotonic() - killed
        freed = wait_port_refused(ENGINE_PORT, max(5.0 - (time.monotonic() - killed), 0.1))
    assert freed is not None, f"127.0.0.1:{ENGINE_PORT} still accepts 5 s after kill\n{tail(harp)}"
    assert user_closed <= 5, f"user connection closed only after {user_closed:.1f}s"

    frpc.start()
    started(frpc, harp, "engine-1")
    assert hello(ENGINE_PORT, "after") == hello_body("after")
    size = 5 * MB
    assert download(ENGINE_PORT, size) == (size, pattern_sha256(size))


def test_login_logout_cycles_leak_no_descriptors(env: FrpEnv) -> None:
    """20 x (login, proxy, one request, stop or kill): HaRP's fd count returns to its baseline."""
    need_free(ENGINE_PORT)
    harp = env.harp()
    assert harp.proc is not None
    pid = harp.proc.pid
    server = env.data_server()
    time.sleep(0.5)
    baseline = fd_count(pid)
    before = fd_listing(pid)
    rss_before = rss_bytes(pid)
    frpc = env.frpc(harp, [FrpcProxy("engine-1", ENGINE_PORT, unix_path=server.path)])
    for cycle in range(20):
        started(frpc, harp, "engine-1")
        assert hello(ENGINE_PORT, f"cycle{cycle}") == hello_body(f"cycle{cycle}")
        if cycle % 2:
            frpc.kill()
        else:
            frpc.stop()  # graceful: frpc closes its proxies and the session
        freed = wait_port_refused(ENGINE_PORT, 5)
        assert freed is not None, f"cycle {cycle}: port still open 5 s after logout\n{tail(harp)}"
    deadline = time.monotonic() + 5
    while fd_count(pid) > baseline + 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    after = fd_listing(pid)
    assert len(after) <= baseline + 3, (
        f"fds: {baseline} before, {len(after)} after 20 cycles\n"
        f"new: {sorted(set(after) - set(before))}\n{tail(harp)}"
    )
    assert rss_bytes(pid) - rss_before < 50 * 2**20


# ---------------------------------------------------------- 5. an ExApp end to end (23000)

APP = "harp-frp-exapp"
ROUTES = [
    {"url": "^/public$", "access_level": 0},
    {"url": "^/echo-headers", "access_level": 0},
    {"url": "^/ws$", "access_level": 0},
    {"url": "^/sse$", "access_level": 0},
]


@pytest.fixture
def exapp_stack(env: FrpEnv) -> tuple[HarpProcess, ExAppProcess]:
    """HaRP + the nc_py_api ExApp on a unix socket + frpc configured like exapps_dev/start.sh."""
    need_free(EXAPP_PORT)
    harp = env.harp()
    key = harp.env["HP_SHARED_KEY"]
    app = env.exapp(app_id=APP, port=EXAPP_PORT, unix_socket=True, shared_key=key)
    assert app.socket_path is not None
    # start.sh: loginFailExit=false, mTLS with the installed certs, serverName harp.nc,
    # metadatas.token, one tcp proxy named $APP_ID on $APP_PORT via the unix socket plugin.
    frpc = env.frpc(harp, [FrpcProxy(APP, EXAPP_PORT, unix_path=app.socket_path)],
                    login_fail_exit=False)
    started(frpc, harp, APP)
    push_record(harp, APP, {
        "exapp_token": app.secret, "exapp_version": app.version, "host": "127.0.0.1",
        "port": EXAPP_PORT, "routes": ROUTES,
    })
    return harp, app


def test_exapp_over_frp_http(exapp_stack: tuple[HarpProcess, ExAppProcess]) -> None:
    harp, app = exapp_stack
    conn = http.client.HTTPConnection("127.0.0.1", harp.http_port, timeout=30)
    try:
        for _ in range(3):  # keep-alive on the frontend, several tunnel streams behind it
            conn.request("GET", f"/exapps/{APP}/public?via=frp")
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, (resp.status, body, tail(harp))
            assert json.loads(body) == {"route": "public", "user": "", "query": "via=frp"}
        payload = b"x" * 5000  # the app does not read the body: keep it small
        conn.request("POST", f"/exapps/{APP}/echo-headers", body=payload,
                     headers={"X-Test": "frp"})
        resp = conn.getresponse()
        seen = json.loads(resp.read())
        assert resp.status == 200
        assert seen["x-test"] == "frp"
        assert seen["ex-app-id"] == APP
        assert seen["ex-app-version"] == app.version
        assert seen["content-length"] == str(len(payload))
    finally:
        conn.close()
    # Server-sent events stream through the tunnel as they are produced (0.5 s apart).
    conn = http.client.HTTPConnection("127.0.0.1", harp.http_port, timeout=30)
    try:
        conn.request("GET", f"/exapps/{APP}/sse")
        resp = conn.getresponse()
        assert resp.status == 200
        arrivals: list[float] = []
        text = b""
        while len(arrivals) < 3:
            line = resp.readline()
            assert line, f"stream ended after {len(arrivals)} events: {text!r}"
            text += line
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic())
        assert arrivals[-1] - arrivals[0] >= 0.7, f"events were buffered: {arrivals}"
    finally:
        conn.close()


def test_exapp_over_frp_websocket(exapp_stack: tuple[HarpProcess, ExAppProcess]) -> None:
    harp, _ = exapp_stack
    url = f"ws://127.0.0.1:{harp.http_port}/exapps/{APP}/ws"
    with ws_connect(url, open_timeout=15, close_timeout=5, proxy=None) as ws:
        for message in ("hello", "ünïcödé", "y" * 200_000):
            ws.send(message)
            assert ws.recv(timeout=15) == f"Echo: {message}"
        # Idle for a moment, then still alive.
        time.sleep(2)
        ws.send("again")
        assert ws.recv(timeout=15) == "Echo: again"


def test_sigterm_closes_frp_controls_tunnels_and_pools(env: FrpEnv) -> None:
    """SIGTERM: the services stop in order, and each closes what it owns.

    The frpc control, the user connection in its tunnel and the tunnel port are closed,
    the keep-alive pools are emptied, and the process ends promptly instead of being
    killed at the end of the stop timeout.
    """
    harp, _server, frpc = env.engine_tunnel()
    assert hello(ENGINE_PORT, "before") == hello_body("before")
    assert harp.proc is not None
    with socket.socket() as user:
        user.settimeout(10)
        user.connect(("127.0.0.1", ENGINE_PORT))
        user.sendall(b"GET /data/5000000000 HTTP/1.1\r\nHost: engine\r\n\r\n")
        _read_exact(user, 1 << 20)
        harp.proc.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        code = harp.proc.wait(timeout=15)
        took = time.monotonic() - stopping
        user.settimeout(5)
        ended = False
        try:
            while not ended:
                ended = not user.recv(1 << 20)
        except OSError:
            ended = True
    # twistd ends a SIGTERM shutdown by re-raising the signal on itself (exit -15).
    assert code in (0, -signal.SIGTERM), tail(harp)
    assert took < 10, f"SIGTERM took {took:.1f}s\n{tail(harp)}"
    assert ended, "the tunnelled user connection outlived HaRP"
    assert port_refuses(ENGINE_PORT), f"127.0.0.1:{ENGINE_PORT} still accepts after stop"
    expect_log(frpc, harp, r"(?i)(login to server failed|connect to server error|"
                           r"try to reconnect|closed|EOF)")
    assert "Traceback" not in harp.output(), tail(harp)
