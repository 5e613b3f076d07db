"""The real frpc 0.65 against the real ``twistd harp``: logins, proxies, rejections.

One HaRP process with TLS (the default: mutual TLS with the generated PKI) and one with
``HP_FRP_DISABLE_TLS=true`` serve the whole module, because frpc runs under qemu and every
start costs seconds.  Each test uses its own tunnel port so a slow release in one test
cannot fail the next one.  The far end of every tunnel is a tiny HTTP server on a unix
socket (frpc's ``unix_domain_socket`` plugin, as ExApps and Docker engines use).
"""

from __future__ import annotations

import http.client
import os
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HarpProcess, base_env, free_port
from tests.peers.frpc import FrpcProcess, FrpcProxy

pytestmark = pytest.mark.interop

LOGIN_OK = r"login to server success"


# --------------------------------------------------------------------------- helpers


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # client_address is "" on a unix socket; the default formatter would fail

    def do_GET(self) -> None:
        body = f"hello from {self.server.name} {self.path}".encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class UnixHTTPServer:
    """A threaded HTTP server on a unix socket; ``GET`` answers ``hello from <name> <path>``."""

    def __init__(self, name: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="frplogin-", dir="/tmp")
        self.path = os.path.join(self.dir, "s.sock")
        server = socketserver.ThreadingUnixStreamServer(self.path, _Hello)
        server.daemon_threads = True
        server.name = name  # type: ignore[attr-defined]
        self.server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)


def http_get(port: int, path: str = "/x", timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def port_refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def wait_port_refused(port: int, timeout: float) -> float:
    """Seconds until 127.0.0.1:port refuses connections; fails after *timeout*."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if port_refuses(port):
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"port {port} still accepts connections after {timeout}s")


def tunnel_port() -> int:
    """A free port in the engine range (24001-24099), distinct per call."""
    while True:
        port = 24000 + next(_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


_PORTS = iter(range(2, 99))


# --------------------------------------------------------------------------- fixtures


def _start_harp(workdir: Path, **extra: str) -> HarpProcess:
    env = base_env(workdir, **extra)
    workdir.mkdir(parents=True, exist_ok=True)
    return HarpProcess(env, workdir).start()


@pytest.fixture(scope="module")
def harp_tls(tmp_path_factory: pytest.TempPathFactory, frpc_binary: str) -> Iterator[HarpProcess]:
    proc = _start_harp(tmp_path_factory.mktemp("harp-tls"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def harp_plain(
    tmp_path_factory: pytest.TempPathFactory, frpc_binary: str
) -> Iterator[HarpProcess]:
    proc = _start_harp(tmp_path_factory.mktemp("harp-plain"), HP_FRP_DISABLE_TLS="true")
    yield proc
    proc.stop()


@pytest.fixture
def backend() -> Iterator[UnixHTTPServer]:
    server = UnixHTTPServer("backend")
    yield server
    server.close()


class Clients:
    """Starts frpc processes for one test; all are stopped at its end."""

    def __init__(self, binary: str, tmp: Path) -> None:
        self.binary = binary
        self.tmp = tmp
        self.procs: list[FrpcProcess] = []

    def start(self, harp: HarpProcess, *, tls: bool = True, **options: Any) -> FrpcProcess:
        if tls:
            certs = Path(harp.env["HP_CERTS_DIR"]) / "frp"
            options.setdefault("tls_enable", True)
            options.setdefault("cert_file", str(certs / "client.crt"))
            options.setdefault("key_file", str(certs / "client.key"))
            options.setdefault("trusted_ca_file", str(certs / "ca.crt"))
            options.setdefault("server_name", "harp.nc")
        options.setdefault("token", harp.env["HP_SHARED_KEY"])
        proc = FrpcProcess(
            server_port=harp.frp_port, binary=self.binary,
            workdir=self.tmp / f"frpc{len(self.procs)}", **options,
        )
        self.procs.append(proc)
        return proc.start()

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


@pytest.fixture
def clients(frpc_binary: str, tmp_path: Path) -> Iterator[Clients]:
    c = Clients(frpc_binary, tmp_path)
    yield c
    c.stop()


def _expect_tunnel(frpc: FrpcProcess, harp: HarpProcess, name: str, port: int) -> None:
    frpc.wait_for_log(LOGIN_OK, timeout=30)
    frpc.wait_for_log(rf"\[{name}\] start proxy success", timeout=30)
    status, body = http_get(port, "/ping")
    assert (status, body) == (200, b"hello from backend /ping"), harp.output()[-2000:]


# --------------------------------------------------------------------------- logins


@pytest.mark.parametrize(
    ("custom_first_byte", "tcp_mux"),
    [(False, True), (True, True), (False, False), (True, False)],
    ids=["tls-mux", "tls-0x17-mux", "tls-nomux", "tls-0x17-nomux"],
)
def test_mutual_tls_login_and_tunnel(
    harp_tls: HarpProcess, clients: Clients, backend: UnixHTTPServer,
    custom_first_byte: bool, tcp_mux: bool,
) -> None:
    """frpc with the generated client cert, serverName harp.nc, every transport variant."""
    port = tunnel_port()
    name = f"app-{port}"
    frpc = clients.start(
        harp_tls,
        disable_custom_tls_first_byte=not custom_first_byte,
        tcp_mux=tcp_mux,
        proxies=[FrpcProxy(name, remote_port=port, unix_path=backend.path)],
    )
    _expect_tunnel(frpc, harp_tls, name, port)
    # A second request: a fresh work connection from the refilled pool.
    assert http_get(port, "/again") == (200, b"hello from backend /again")
    frpc.stop()
    wait_port_refused(port, 5)


def test_plain_tcp_both_sides(
    harp_plain: HarpProcess, clients: Clients, backend: UnixHTTPServer
) -> None:
    """HP_FRP_DISABLE_TLS=true and frpc with tls.enable=false (the ExApp start.sh default)."""
    port = tunnel_port()
    frpc = clients.start(
        harp_plain, tls=False,
        proxies=[FrpcProxy("plain-app", remote_port=port, unix_path=backend.path,
                           use_encryption=True)],
    )
    _expect_tunnel(frpc, harp_plain, "plain-app", port)


def test_plain_client_refused_when_tls_required(harp_tls: HarpProcess, clients: Clients) -> None:
    frpc = clients.start(harp_tls, tls=False, tls_enable=False)
    frpc.wait_for_log(r"login to the server failed", timeout=30)
    assert LOGIN_OK not in frpc.log_text()


def test_client_without_certificate_refused(harp_tls: HarpProcess, clients: Clients) -> None:
    frpc = clients.start(harp_tls, tls=False, tls_enable=True)
    frpc.wait_for_log(r"login to the server failed", timeout=30)
    assert LOGIN_OK not in frpc.log_text()
    assert "TLS handshake failed" in harp_tls.output()


# --------------------------------------------------------------------------- rejections


def test_wrong_token_rejected(harp_tls: HarpProcess, clients: Clients) -> None:
    frpc = clients.start(harp_tls, token="not-the-key")
    frpc.wait_for_log(r"login to the server failed: send Login request to plugin error",
                      timeout=30)
    assert LOGIN_OK not in frpc.log_text()
    assert "not-the-key" not in harp_tls.output()
    assert harp_tls.env["HP_SHARED_KEY"] not in harp_tls.output()


def test_remote_port_outside_ranges_rejected(
    harp_tls: HarpProcess, clients: Clients, backend: UnixHTTPServer
) -> None:
    frpc = clients.start(
        harp_tls, proxies=[FrpcProxy("far", remote_port=25000, unix_path=backend.path)]
    )
    frpc.wait_for_log(r"\[far\] start error: port not allowed", timeout=30)
    assert port_refuses(25000)


def test_second_client_cannot_take_used_port_or_name(
    harp_tls: HarpProcess, clients: Clients, backend: UnixHTTPServer
) -> None:
    port, other = tunnel_port(), tunnel_port()
    first = clients.start(
        harp_tls, proxies=[FrpcProxy("owner", remote_port=port, unix_path=backend.path)]
    )
    _expect_tunnel(first, harp_tls, "owner", port)
    same_port = clients.start(
        harp_tls, proxies=[FrpcProxy("thief", remote_port=port, unix_path=backend.path)]
    )
    same_name = clients.start(
        harp_tls, proxies=[FrpcProxy("owner", remote_port=other, unix_path=backend.path)]
    )
    same_port.wait_for_log(r"\[thief\] start error: port already used", timeout=30)
    same_name.wait_for_log(r"\[owner\] start error: proxy \[owner\] already exists", timeout=30)
    assert port_refuses(other)
    assert http_get(port, "/still") == (200, b"hello from backend /still")


# --------------------------------------------------------------------------- client death


def test_killed_client_frees_its_port(
    harp_tls: HarpProcess, clients: Clients, backend: UnixHTTPServer
) -> None:
    port = tunnel_port()
    frpc = clients.start(
        harp_tls, proxies=[FrpcProxy("victim", remote_port=port, unix_path=backend.path)]
    )
    _expect_tunnel(frpc, harp_tls, "victim", port)
    frpc.kill()
    assert wait_port_refused(port, 5) < 5
    # The same proxy can come back at once (a restarted container).
    again = clients.start(
        harp_tls, proxies=[FrpcProxy("victim", remote_port=port, unix_path=backend.path)]
    )
    _expect_tunnel(again, harp_tls, "victim", port)
    # A tunnel port opening and closing is Twisted's debug chatter, not an info line
    # (docs/operations.md, "Logs"); HaRP runs at info here.
    out = harp_tls.output()
    assert f"starting on {port}" not in out and f"Port {port} Closed" not in out, out[-2000:]


def test_ipv6_bad_token_logins_ban_the_address(
    tmp_path_factory: pytest.TempPathFactory, clients: Clients, backend: UnixHTTPServer
) -> None:
    """Over IPv6 (the reference's plugin split ``client_address`` on ':' and broke this)."""
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    port = free_port("::1")
    harp = _start_harp(tmp_path_factory.mktemp("harp-v6"), HP_FRP_DISABLE_TLS="true",
                       HP_FRP_ADDRESS=f"[::1]:{port}", HP_BLACKLIST_COUNT="2")
    try:
        for _ in range(2):
            bad = clients.start(harp, tls=False, server_addr="::1", token="wrong")
            bad.wait_for_log(r"login to the server failed: send Login request to plugin error",
                             timeout=30)
        good = clients.start(harp, tls=False, server_addr="::1")
        good.wait_for_log(r"login to the server failed: banned", timeout=30)
        assert "FRP login from ::1 rejected: address is banned" in harp.output()
    finally:
        harp.stop()
