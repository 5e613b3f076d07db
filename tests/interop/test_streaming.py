"""The streaming data path through the real harp process: SSE, WebSockets, big bodies,
keep-alive, timeouts, and no leaked descriptors."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import self_signed_pem
from tests.interop.conftest import ALL_PUBLIC, public_record, start_harp
from tests.peers.base import free_port
from tests.peers.bulk_upstream import BulkUpstream, pattern, pattern_sha256
from tests.peers.exapp_runner import ExAppProcess
from tests.peers.fake_nextcloud import FakeNextcloud
from tests.peers.harp import HarpProcess

pytestmark = pytest.mark.interop

MB = 1 << 20


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class RssSampler:
    """Samples a process's RSS in the background; ``peak`` in KiB."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_kib(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def read_pattern_slowly(blocks: Iterator[bytes], n: int) -> None:
    """Read a ``/bytes/<n>`` download like a slowish client at first; check it."""
    digest = hashlib.sha256()
    received = 0
    for block in blocks:
        digest.update(block)
        received += len(block)
        if received < 8 * MB:
            time.sleep(0.001)  # a slowish reader at first: HaRP must not buffer
    assert received == n
    assert digest.hexdigest() == pattern_sha256(n)


@pytest.fixture(scope="module")
def app_id() -> str:
    return "streamer"


@pytest.fixture(scope="module")
def nextcloud(nextcloud: FakeNextcloud, exapp: ExAppProcess,
              bulk: BulkUpstream) -> FakeNextcloud:
    """The shared fake Nextcloud, knowing three all-public apps: the nc_py_api ExApp,
    the bulk upstream, and one whose port refuses connections."""
    nextcloud.apps["streamer"] = {
        "exapp_token": exapp.secret, "exapp_version": exapp.version, "host": "127.0.0.1",
        "port": exapp.port, "routes": ALL_PUBLIC,
    }
    nextcloud.apps["bulk"] = public_record(bulk.port)
    nextcloud.apps["refused"] = public_record(free_port())
    return nextcloud


@pytest.fixture(scope="module")
def harp_settings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    certs = tmp_path_factory.mktemp("certs")
    self_signed_pem(certs / "cert.pem", "harp.test")  # HTTPS on, same tree
    return {
        "HP_CERTS_DIR": str(certs),
        # A short client timeout: it must cut slow clients, never WebSockets or SSE.
        "HP_TIMEOUT_CLIENT": "3s",
        "HP_LOG_LEVEL": "warning",
    }


def conn(harp: HarpProcess, timeout: float = 60) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", harp.http_port, timeout=timeout)


def test_sse_events_arrive_as_they_are_sent(harp: HarpProcess) -> None:
    c = conn(harp)
    start = time.monotonic()
    c.request("GET", "/exapps/streamer/sse")
    resp = c.getresponse()
    assert resp.status == 200
    assert resp.getheader("content-type", "").startswith("text/event-stream")
    first = resp.readline()
    first_at = time.monotonic() - start
    rest = resp.read()
    total = time.monotonic() - start
    assert first.startswith((b"data:", b"id:"))
    assert first_at < 0.5 and total >= 0.9, (first_at, total)  # 3 events, 0.5 s apart
    assert (first + rest).count(b"data:") == 3
    c.close()


def test_sse_bulk_upstream_chunks_flushed(harp: HarpProcess) -> None:
    c = conn(harp)
    start = time.monotonic()
    c.request("GET", "/exapps/bulk/sse?n=4&interval=1")
    resp = c.getresponse()
    times = []
    while line := resp.readline():
        if line.startswith(b"data:"):
            times.append(time.monotonic() - start)
    assert len(times) == 4
    assert times[0] < 0.7 and times[-1] > 2.8
    c.close()


def test_websocket_echo_idle_and_big_message(harp: HarpProcess) -> None:
    url = f"ws://127.0.0.1:{harp.http_port}/exapps/streamer/ws"
    with ws_connect(url, max_size=32 * MB, open_timeout=10) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "Echo: hello"
        big = base64.b64encode(os.urandom(7_500_000)).decode()  # 10 MB of text
        ws.send(big)
        assert ws.recv(timeout=60) == "Echo: " + big
        time.sleep(35)  # idle far beyond HP_TIMEOUT_CLIENT (3 s): bug #114 must not exist
        ws.send("still there")
        assert ws.recv(timeout=10) == "Echo: still there"


def test_https_frontend_streams_and_upgrades(harp: HarpProcess) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    c = http.client.HTTPSConnection("127.0.0.1", harp.https_port, timeout=30, context=ctx)
    start = time.monotonic()
    c.request("GET", "/exapps/bulk/sse?n=3&interval=1")
    resp = c.getresponse()
    first = resp.readline()
    assert first.startswith(b"data:") and time.monotonic() - start < 0.8
    resp.read()
    c.request("GET", f"/exapps/bulk/bytes/{10 * MB}")  # keep-alive on the TLS connection
    body = c.getresponse().read()
    assert hashlib.sha256(body).hexdigest() == pattern_sha256(10 * MB)
    c.close()
    url = f"wss://127.0.0.1:{harp.https_port}/exapps/streamer/ws"
    with ws_connect(url, ssl=ctx, open_timeout=10, max_size=8 * MB) as ws:
        message = "x" * (2 * MB)
        ws.send(message)
        assert ws.recv(timeout=30) == "Echo: " + message


def test_download_100mb_bounded_memory(harp: HarpProcess) -> None:
    assert harp.proc is not None
    for chunked in (False, True):
        c = conn(harp)
        baseline = rss_kib(harp.proc.pid)
        with RssSampler(harp.proc.pid) as sampler:
            c.request("GET", f"/exapps/bulk/bytes/{100 * MB}" + ("?chunked=1" if chunked else ""))
            resp = c.getresponse()
            assert resp.status == 200
            read_pattern_slowly(iter(partial(resp.read, 1 << 16), b""), 100 * MB)
        assert sampler.peak - baseline < 50 * 1024, (sampler.peak, baseline)
        c.close()


def test_https_stalled_reader_bounded_memory(harp: HarpProcess) -> None:
    """An HTTPS client that stops reading a 100 MB download: HaRP stops reading the
    upstream too (back-pressure through the TLS layer), its RSS stays bounded."""
    assert harp.proc is not None
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    baseline = rss_kib(harp.proc.pid)
    c = http.client.HTTPSConnection("127.0.0.1", harp.https_port, timeout=30, context=ctx)
    with RssSampler(harp.proc.pid) as sampler:
        c.request("GET", f"/exapps/bulk/bytes/{100 * MB}")
        resp = c.getresponse()
        assert resp.status == 200
        assert len(resp.read(MB)) == MB
        time.sleep(3)  # stalled: the upstream keeps offering 99 MB meanwhile
        rest = iter(partial(resp.read, 1 << 16), b"")
        received = MB + sum(len(block) for block in rest)
    c.close()
    assert received == 100 * MB
    assert sampler.peak - baseline < 50 * 1024, (sampler.peak, baseline)


def pipes(pid: int) -> int:
    """Pipes ``pid`` holds: a body HaRP splices holds one while it is in flight."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
        except OSError:
            pass  # closed meanwhile
    return count


def wait_for(check: Callable[[], bool], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_large_body_spliced_on_plain_http_only(harp: HarpProcess) -> None:
    # Halfway through, the upstream pauses: a spliced body holds HaRP's pipe meanwhile;
    # over TLS the bytes must go through the process (no pipe).  A client that hangs up
    # mid-body gets its pipe closed at once, and HaRP keeps serving.
    assert harp.proc is not None
    pid = harp.proc.pid
    idle = pipes(pid)
    target = f"/exapps/bulk/bytes/{8 * MB}?pause=3"
    client = socket.create_connection(("127.0.0.1", harp.http_port), timeout=30)
    client.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    received = 0
    while received < 4 * MB:
        received += len(client.recv(1 << 20))
    assert wait_for(lambda: pipes(pid) == idle + 2), (pipes(pid), idle)
    client.close()
    assert wait_for(lambda: pipes(pid) == idle), (pipes(pid), idle)

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    c = http.client.HTTPSConnection("127.0.0.1", harp.https_port, timeout=30, context=ctx)
    c.request("GET", target)
    resp = c.getresponse()
    assert len(resp.read(4 * MB)) == 4 * MB
    assert pipes(pid) == idle
    c.close()

    c = conn(harp)
    c.request("GET", f"/exapps/bulk/bytes/{MB}")
    body = c.getresponse().read()
    assert hashlib.sha256(body).hexdigest() == pattern_sha256(MB)
    c.close()


def test_spliced_bodies_keep_both_connections(harp: HarpProcess, bulk: BulkUpstream) -> None:
    # After a spliced body the client's connection serves the next request and the
    # upstream connection goes back to the pool (the splice ends exactly at its length).
    c = conn(harp)
    c.request("GET", "/exapps/bulk/bytes/10")  # a pooled upstream connection to reuse
    assert c.getresponse().read() == pattern(10)
    before = bulk.connections
    for n in (3 * MB + 7, 200, 2 * MB, 128 * 1024 + 1, 10):
        c.request("GET", f"/exapps/bulk/bytes/{n}")
        resp = c.getresponse()
        assert resp.status == 200 and resp.getheader("content-length") == str(n)
        assert hashlib.sha256(resp.read()).hexdigest() == pattern_sha256(n)
    c.request("HEAD", f"/exapps/bulk/bytes/{3 * MB}")
    assert c.getresponse().read() == b""
    c.close()
    assert bulk.connections - before <= 1


def test_pipelined_request_behind_a_spliced_body(harp: HarpProcess) -> None:
    # Two requests in one write: the second waits in the channel while the first
    # body is spliced, then gets its own answer; the bytes of the two never mix.
    client = socket.create_connection(("127.0.0.1", harp.http_port), timeout=30)
    first, second = 2 * MB + 3, 1000
    client.sendall(
        f"GET /exapps/bulk/bytes/{first} HTTP/1.1\r\nHost: x\r\n\r\n"
        f"GET /exapps/bulk/bytes/{second} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    stream = client.makefile("rb")
    for n in (first, second):
        assert stream.readline().startswith(b"HTTP/1.1 200")
        length = None
        while (line := stream.readline()) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        assert length == n
        assert hashlib.sha256(stream.read(n)).hexdigest() == pattern_sha256(n)
    client.close()


def read_until_cut(resp: http.client.HTTPResponse) -> bytes:
    """The body of a response that must end cut: a short read or a reset, never whole.

    HaRP aborts the client connection (a reset): what was still in HaRP's send buffer
    may be lost with it, so only "less than announced" is certain.
    """
    got = b""
    try:
        while block := resp.read1(1 << 20):
            got += block
    except (http.client.IncompleteRead, ConnectionResetError):
        return got
    assert len(got) < int(resp.getheader("content-length", "-1")), "ended as if complete"
    return got


def test_upstream_cut_mid_body_is_a_cut_response(harp: HarpProcess) -> None:
    # The upstream closes 1 MB into a 4 MB body: the client must see a truncated
    # response (never a complete one), and HaRP keeps serving.
    c = conn(harp)
    c.request("GET", f"/exapps/bulk/bytes/{4 * MB}?cut={MB}")
    resp = c.getresponse()
    assert resp.getheader("content-length") == str(4 * MB)
    assert len(read_until_cut(resp)) <= MB
    c.close()
    c = conn(harp)
    c.request("GET", f"/exapps/bulk/bytes/{MB}")
    assert hashlib.sha256(c.getresponse().read()).hexdigest() == pattern_sha256(MB)
    c.close()


def test_upload_100mb_bounded_memory(harp: HarpProcess) -> None:
    assert harp.proc is not None
    block = os.urandom(MB)
    expected = hashlib.sha256(block * 100).hexdigest()

    def body() -> Iterator[bytes]:
        for _ in range(100):
            yield block

    for chunked in (True, False):
        c = conn(harp)
        baseline = rss_kib(harp.proc.pid)
        with RssSampler(harp.proc.pid) as sampler:
            headers = {} if chunked else {"Content-Length": str(100 * MB)}
            c.request("POST", "/exapps/bulk/upload", body=body(), headers=headers,
                      encode_chunked=chunked)
            resp = c.getresponse()
            result = json.loads(resp.read())
        assert resp.status == 200
        assert result == {"length": 100 * MB, "sha256": expected}
        assert sampler.peak - baseline < 50 * 1024, (sampler.peak, baseline)
        c.close()


def test_keep_alive_reuses_upstream_connections(harp: HarpProcess, bulk: BulkUpstream) -> None:
    before = bulk.connections
    c = conn(harp)
    for _ in range(200):
        c.request("GET", "/exapps/bulk/bytes/100")
        resp = c.getresponse()
        assert resp.status == 200 and len(resp.read()) == 100
    c.close()
    assert bulk.connections - before <= 2


def test_headers_relayed(harp: HarpProcess) -> None:
    c = conn(harp)
    c.request("GET", "/exapps/bulk/headers", headers={"Host": "cloud.example", "X-A": "b",
                                                      "Connection": "keep-alive, X-A"})
    seen = json.loads(c.getresponse().read())
    assert seen["host"] == "cloud.example"  # the client's Host passes through
    assert "x-a" not in seen  # listed in Connection: hop-by-hop (RFC 9110 §7.6.1)
    assert seen["ex-app-id"] == "bulk" and seen["aa-version"] == "32"
    assert "keep-alive" not in seen.get("connection", "")
    c.request("HEAD", "/exapps/bulk/anything")
    resp = c.getresponse()
    assert resp.status == 200 and resp.read() == b""
    c.close()


def test_early_answer_does_not_wait_for_the_body(harp: HarpProcess) -> None:
    for path, status in (("/exapps/no-such-app/x", b"404"), ("/exapps/refused/x", b"503")):
        sock = socket.create_connection(("127.0.0.1", harp.http_port), timeout=10)
        sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 52428800\r\n\r\n" + b"x" * MB)
        answer = sock.recv(4096)  # without sending the other 49 MB
        assert answer.startswith(b"HTTP/1.1 " + status), answer
        assert b"connection: close" in answer.lower()
        sock.close()


def test_refused_upstream_is_503(harp: HarpProcess) -> None:
    c = conn(harp)
    c.request("GET", "/exapps/refused/x")
    resp = c.getresponse()
    assert (resp.status, resp.read()) == (503, b"503 Service Unavailable (HaRP)")
    c.close()


def test_slow_loris_is_cut(harp: HarpProcess) -> None:
    start = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", harp.http_port))
    sock.settimeout(15)
    sock.sendall(b"GET /exapps/bulk/bytes/1 HTTP/1.1\r\n")
    answer = b""
    try:
        for i in range(20):
            sock.sendall(b"X-Slow-%d: y\r\n" % i)  # one header a second, never finished
            time.sleep(1)
    except OSError:
        pass
    try:
        answer = sock.recv(4096)
    except OSError:
        pass
    elapsed = time.monotonic() - start
    sock.close()
    assert elapsed < 8, elapsed
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408")


def test_idle_keep_alive_closed(harp: HarpProcess) -> None:
    c = conn(harp)
    c.request("GET", "/exapps/bulk/bytes/1")
    c.getresponse().read()
    assert c.sock is not None
    c.sock.settimeout(10)
    start = time.monotonic()
    assert c.sock.recv(1) == b""  # closed by HaRP after HP_TIMEOUT_CLIENT
    assert 2 < time.monotonic() - start < 6
    c.close()


@pytest.fixture
def impatient_harp(tmp_path: Path, key: str, nextcloud: FakeNextcloud,
                   bulk: BulkUpstream) -> Iterator[HarpProcess]:
    """A HaRP of its own with ``HP_TIMEOUT_SERVER=2s``, in front of the bulk upstream."""
    proc = start_harp(tmp_path, key, nextcloud, HP_LOG_LEVEL="warning", HP_TIMEOUT_SERVER="2s")
    try:
        yield proc
    finally:
        proc.stop()


def test_upstream_that_never_answers_is_504(impatient_harp: HarpProcess) -> None:
    c = conn(impatient_harp)
    start = time.monotonic()
    c.request("GET", "/exapps/bulk/hang")
    resp = c.getresponse()
    assert (resp.status, resp.read()) == (504, b"504 Gateway Timeout")
    assert 1.5 < time.monotonic() - start < 6
    c.close()


def test_upstream_silent_mid_body_cuts_the_client(impatient_harp: HarpProcess) -> None:
    # A spliced body whose upstream goes silent longer than HP_TIMEOUT_SERVER: the
    # client connection is cut (a truncated body never looks complete).
    c = conn(impatient_harp)
    c.request("GET", f"/exapps/bulk/bytes/{8 * MB}?pause=15")
    resp = c.getresponse()
    start = time.monotonic()
    assert len(read_until_cut(resp)) <= 4 * MB
    assert time.monotonic() - start < 10
    c.close()


def test_no_descriptor_leak(harp: HarpProcess) -> None:
    # Runs last in this module (pytest keeps file order): everything above is done.
    assert harp.proc is not None
    time.sleep(6)  # idle pooled upstream connections expire after 4 s
    first = fd_count(harp.proc.pid)
    for _ in range(30):
        c = conn(harp)
        c.request("GET", "/exapps/bulk/bytes/10")
        c.getresponse().read()
        c.close()
    url = f"ws://127.0.0.1:{harp.http_port}/exapps/streamer/ws"
    for _ in range(5):
        with ws_connect(url, open_timeout=10) as ws:
            ws.send("x")
            assert ws.recv(timeout=10) == "Echo: x"
    time.sleep(6)
    assert fd_count(harp.proc.pid) <= first, (fd_count(harp.proc.pid), first)




@pytest.mark.parametrize(
    "raw",
    [
        b"garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
        b"GET /exapps/bulk/x HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        b"GET /exapps/bulk/x HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # TLS on the HTTP port
    ],
)
def test_malformed_requests_are_dropped_silently(harp: HarpProcess, raw: bytes) -> None:
    sock = socket.create_connection(("127.0.0.1", harp.http_port), timeout=10)
    try:
        sock.sendall(raw)
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        assert data == b""
    finally:
        sock.close()
    # And the reactor is alive.
    c = conn(harp)
    c.request("GET", "/exapps/bulk/bytes/3")
    resp = c.getresponse()
    assert resp.status == 200 and len(resp.read()) == 3
    c.close()
