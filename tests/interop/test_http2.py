"""HTTP/2 on the HTTPS frontend, with real HTTP/2 clients (curl, httpx) and raw frames.

The same pipeline as HTTP/1.1: the nc_py_api ExApp checks the identity headers, the
fake Nextcloud decides the USER route, the bulk upstream pushes volume both ways.  The
hostile cases speak HTTP/2 frame by frame (hyperframe/hpack, the h2 package's own
parsers) so that nothing in a client library refuses to send them; each must end in a
closed connection (or a reset stream) and leave HaRP serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from websockets.sync.client import connect as ws_connect

from tests.conftest import peer_missing, self_signed_pem
from tests.interop.conftest import APP, ROUTES, ok, public_record, record_for, request
from tests.interop.test_streaming import MB, RssSampler, read_pattern_slowly, rss_kib
from tests.peers.bulk_upstream import BulkUpstream, pattern_sha256
from tests.peers.exapp_runner import ExAppProcess
from tests.peers.fake_nextcloud import FakeNextcloud
from tests.peers.harp import HarpProcess

pytestmark = pytest.mark.interop

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ENHANCE_YOUR_CALM = 0xB


@pytest.fixture(scope="module")
def nextcloud(nextcloud: FakeNextcloud, exapp: ExAppProcess,
              bulk: BulkUpstream) -> FakeNextcloud:
    nextcloud.apps[APP] = record_for(exapp, routes=[*ROUTES, {"url": "^/ws$", "access_level": 0}])
    nextcloud.apps["bulk"] = public_record(bulk.port)
    nextcloud.add_session("sess-user", "usr", 1)
    return nextcloud


@pytest.fixture(scope="module")
def harp_settings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    certs = tmp_path_factory.mktemp("certs")
    self_signed_pem(certs / "cert.pem", "harp.test")
    # HP_HTTP2 is on by default; the client timeout is short so the idle test is quick.
    return {"HP_CERTS_DIR": str(certs), "HP_TIMEOUT_CLIENT": "3s", "HP_LOG_LEVEL": "info"}


def tls_context(alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(alpn)
    return ctx


def h2_client(**kwargs: object) -> httpx.Client:
    return httpx.Client(http2=True, verify=tls_context(["h2", "http/1.1"]), timeout=60,
                        **kwargs)  # type: ignore[arg-type]


def base(harp: HarpProcess) -> str:
    return f"https://127.0.0.1:{harp.https_port}"


def curl() -> str:
    found = shutil.which("curl")
    if found is None:
        peer_missing("curl (Debian package curl)")
        raise AssertionError("unreachable")
    if "HTTP2" not in subprocess.run([found, "-V"], capture_output=True, text=True).stdout:
        peer_missing("curl built with HTTP/2 (nghttp2)")
    return found


# --------------------------------------------------------------------------- ALPN


@pytest.mark.parametrize(("offered", "selected"), [
    (["h2", "http/1.1"], "h2"), (["http/1.1", "h2"], "h2"), (["http/1.1"], "http/1.1"),
    (["h2"], "h2"), (["spdy/3"], None),
])
def test_alpn_selection(harp: HarpProcess, offered: list[str], selected: str | None) -> None:
    with socket.create_connection(("127.0.0.1", harp.https_port), timeout=10) as raw, \
            tls_context(offered).wrap_socket(raw) as tls:
        assert tls.selected_alpn_protocol() == selected


def test_http11_still_served_on_https(harp: HarpProcess) -> None:
    with httpx.Client(verify=tls_context(["http/1.1"]), timeout=30) as client:
        resp = client.get(f"{base(harp)}/exapps/{APP}/public")
    assert resp.http_version == "HTTP/1.1"
    assert resp.status_code == 200 and resp.json()["route"] == "public"


# --------------------------------------------------------------------------- real clients


def test_curl_http2_get_and_post(harp: HarpProcess) -> None:
    done = subprocess.run(
        [curl(), "--http2", "-k", "-sS", "-w", "\n%{http_version} %{response_code}",
         f"{base(harp)}/exapps/{APP}/public?x=1"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    body, _, tail = done.stdout.rpartition("\n")
    assert tail == "2 200", done.stdout
    assert '"route":"public"' in body and '"query":"x=1"' in body
    payload = bytes(range(256)) * 4096  # 1 MiB
    done = subprocess.run(
        [curl(), "--http2", "-k", "-sS", "--data-binary", "@-", "-w", "\n%{http_version}",
         f"{base(harp)}/exapps/bulk/upload"],
        input=payload, capture_output=True, timeout=60, check=True,
    )
    body_bytes, _, version = done.stdout.rpartition(b"\n")
    assert version == b"2"
    assert httpx.Response(200, content=body_bytes).json() == {
        "length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    assert f"GET /exapps/{APP}/public 200 app={APP}" in harp.output()


def test_access_control_same_as_http11(harp: HarpProcess) -> None:
    cookie = {"Cookie": "oc_sessionPassphrase=sess-user"}
    with h2_client() as client:
        for route, headers in [("public", {}), ("user", {}), ("user", cookie),
                               ("admin", cookie)]:
            over_h2 = client.get(f"{base(harp)}/exapps/{APP}/{route}", headers=headers)
            assert over_h2.http_version == "HTTP/2"
            over_h1 = ok(request(harp.http_port, f"/exapps/{APP}/{route}", headers))
            assert (over_h2.status_code, over_h2.content) == (over_h1.status, over_h1.body)
        assert client.get(f"{base(harp)}/exapps/{APP}/user", headers=cookie).json()[
            "user"] == "usr"


def test_forwarded_headers(harp: HarpProcess) -> None:
    """``:authority`` becomes Host; cookie crumbs arrive as one Cookie line; nothing
    connection-specific reaches the ExApp."""
    with RawH2(harp) as raw:
        raw.send_headers(1, "GET", f"/exapps/{APP}/echo-headers", extra=[
            (b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"x-test", b"yes")])
        status, body = raw.response(1)
    assert status == b"200"
    seen = httpx.Response(200, content=body).json()
    assert seen["host"] == "harp.test"
    assert seen["cookie"] == "a=1; b=2"
    assert seen["x-test"] == "yes"
    assert seen["ex-app-id"] == APP
    assert not {"connection", "upgrade", "te", "keep-alive", "http2-settings"} & set(seen)


def test_many_concurrent_streams_on_one_connection(harp: HarpProcess) -> None:
    sizes = [1000 + 7919 * i for i in range(60)]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            http2=True, verify=tls_context(["h2"]), timeout=60,
            limits=httpx.Limits(max_connections=1),
        ) as client:
            return await asyncio.gather(*(
                client.get(f"{base(harp)}/exapps/bulk/bytes/{n}") for n in sizes))

    responses = asyncio.run(run())
    for n, resp in zip(sizes, responses, strict=True):
        assert resp.http_version == "HTTP/2" and resp.status_code == 200
        assert hashlib.sha256(resp.content).hexdigest() == pattern_sha256(n)


def test_large_download_bounded_memory(harp: HarpProcess) -> None:
    assert harp.proc is not None
    baseline = rss_kib(harp.proc.pid)
    with RssSampler(harp.proc.pid) as sampler, h2_client() as client, \
            client.stream("GET", f"{base(harp)}/exapps/bulk/bytes/{100 * MB}") as resp:
        assert resp.http_version == "HTTP/2" and resp.status_code == 200
        read_pattern_slowly(resp.iter_raw(1 << 16), 100 * MB)
    assert sampler.peak - baseline < 50 * 1024, (sampler.peak, baseline)


def test_curl_download_with_huge_window_bounded_memory(harp: HarpProcess) -> None:
    """curl opens a 32 MiB stream window and reads slowly: the per-stream send buffer,
    not the client's window, bounds what HaRP holds."""
    assert harp.proc is not None
    baseline = rss_kib(harp.proc.pid)
    digest = hashlib.sha256()
    with RssSampler(harp.proc.pid) as sampler, subprocess.Popen(
        [curl(), "--http2", "-k", "-sS", "--limit-rate", "20M",
         f"{base(harp)}/exapps/bulk/bytes/{60 * MB}"], stdout=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None
        while block := proc.stdout.read(1 << 16):
            digest.update(block)
    assert proc.returncode == 0
    assert digest.hexdigest() == pattern_sha256(60 * MB)
    # Without the cap HaRP held most of curl's 32 MiB window (about 29 MiB measured).
    assert sampler.peak - baseline < 16 * 1024, (sampler.peak, baseline)


def test_large_upload_streams(harp: HarpProcess) -> None:
    assert harp.proc is not None
    block = bytes(range(256)) * 256  # 64 KiB
    count = 800  # 50 MiB

    def chunks() -> Iterator[bytes]:
        for _ in range(count):
            yield block

    baseline = rss_kib(harp.proc.pid)
    with RssSampler(harp.proc.pid) as sampler, h2_client() as client:
        resp = client.post(f"{base(harp)}/exapps/bulk/upload", content=chunks())
    assert resp.http_version == "HTTP/2" and resp.status_code == 200
    assert resp.json() == {"length": len(block) * count,
                           "sha256": hashlib.sha256(block * count).hexdigest()}
    assert sampler.peak - baseline < 50 * 1024, (sampler.peak, baseline)


def test_early_answer_to_upload_resets_only_that_stream(harp: HarpProcess) -> None:
    """A 403 before the body is read ends the stream (RST_STREAM NO_ERROR after the
    answer); the connection keeps serving."""
    with RawH2(harp) as raw:
        raw.send_headers(1, "POST", f"/exapps/{APP}/user", end=False)
        raw.send(DataFrame(1, data=b"x" * 16000))
        status, _ = raw.response(1)
        assert status == b"403"
        raw.send_headers(3, "GET", f"/exapps/{APP}/public")
        status, body = raw.response(3)
    assert status == b"200" and b'"route":"public"' in body


def test_websocket_over_http11_on_the_same_port(harp: HarpProcess) -> None:
    url = f"wss://127.0.0.1:{harp.https_port}/exapps/{APP}/ws"
    with ws_connect(url, ssl=tls_context(["http/1.1"]), open_timeout=10) as ws:
        ws.send("over http/1.1")
        assert ws.recv(timeout=10) == "Echo: over http/1.1"


# --------------------------------------------------------------------------- hostile


class RawH2:
    """An HTTP/2 client that sends exactly the frames a test writes."""

    def __init__(self, harp: HarpProcess) -> None:
        raw = socket.create_connection(("127.0.0.1", harp.https_port), timeout=15)
        self.sock = tls_context(["h2"]).wrap_socket(raw)
        assert self.sock.selected_alpn_protocol() == "h2"
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.goaway: int | None = None
        self.buffer = b""
        self.closed = False
        self.sock.sendall(PREFACE + SettingsFrame(0).serialize())

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, *frames: Frame) -> None:
        self.sock.sendall(b"".join(frame.serialize() for frame in frames))

    def headers_frame(self, stream_id: int, method: str, path: str, end: bool = True,
                      extra: list[tuple[bytes, bytes]] | None = None) -> HeadersFrame:
        block = self.encoder.encode([
            (b":method", method.encode()), (b":scheme", b"https"),
            (b":authority", b"harp.test"), (b":path", path.encode()), *(extra or [])])
        return HeadersFrame(stream_id, data=block,
                            flags=["END_HEADERS", *(["END_STREAM"] if end else [])])

    def send_headers(self, stream_id: int, method: str, path: str, end: bool = True,
                     extra: list[tuple[bytes, bytes]] | None = None) -> None:
        self.send(self.headers_frame(stream_id, method, path, end, extra))

    def frames(self, timeout: float) -> Iterator[Frame]:
        """Frames as they arrive, until the server closes or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            while len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(self.buffer[9:9 + length]))
                self.buffer = self.buffer[9 + length:]
                if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                    try:
                        self.send(SettingsFrame(0, flags=["ACK"]))
                    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                        # HaRP already closed (a flood test cut our last write short, and
                        # the TLS layer refuses another write): what it sent is still read.
                        pass
                elif isinstance(frame, GoAwayFrame):
                    self.goaway = frame.error_code
                yield frame
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                return
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                return
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            if not data:
                self.closed = True
            self.buffer += data

    def response(self, stream_id: int, timeout: float = 30) -> tuple[bytes, bytes]:
        status, body = b"", b""
        for frame in self.frames(timeout):
            if frame.stream_id != stream_id:
                continue
            if isinstance(frame, HeadersFrame):
                status = dict(self.decoder.decode(frame.data, raw=True))[b":status"]
            elif isinstance(frame, DataFrame):
                body += frame.data
                if frame.flow_controlled_length:
                    self.send(WindowUpdateFrame(0, window_increment=len(frame.data) or 1),
                              WindowUpdateFrame(stream_id,
                                                window_increment=len(frame.data) or 1))
            if "END_STREAM" in frame.flags or isinstance(frame, RstStreamFrame):
                return status, body
        raise AssertionError(f"no complete response on stream {stream_id}")

    def closed_with(self, timeout: float = 30) -> int | None:
        """Wait for the server to close; the GOAWAY error code it sent, if any."""
        for _ in self.frames(timeout):
            pass
        assert self.closed, "HaRP kept the connection open"
        return self.goaway


def still_serving(harp: HarpProcess) -> None:
    """HaRP answers on a new connection, and no hostile frame cost a traceback."""
    with h2_client() as client:
        resp = client.get(f"{base(harp)}/exapps/{APP}/public")
    assert resp.status_code == 200 and resp.http_version == "HTTP/2"
    assert "Traceback" not in harp.output()


def test_rapid_reset_storm_closes_the_connection(harp: HarpProcess) -> None:
    with RawH2(harp) as raw:
        frames: list[Frame] = []
        for i in range(1000):
            stream_id = 1 + 2 * i
            frames += [raw.headers_frame(stream_id, "GET", f"/exapps/{APP}/public"),
                       RstStreamFrame(stream_id, error_code=8)]  # CANCEL
        try:
            raw.send(*frames)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # HaRP may hang up before all is written
        assert raw.closed_with() == ENHANCE_YOUR_CALM
    still_serving(harp)


def test_too_many_streams_closes_the_connection(harp: HarpProcess) -> None:
    with RawH2(harp) as raw:
        # Uploads that never send their body: every stream stays open.
        raw.send(*(raw.headers_frame(1 + 2 * i, "POST", "/exapps/bulk/upload", end=False)
                   for i in range(101)))
        assert raw.closed_with() is not None
    still_serving(harp)


def test_oversized_header_list_closes_the_connection(harp: HarpProcess) -> None:
    """More than the 16 KiB head HTTP/1.1 allows, in frames each small enough."""
    with RawH2(harp) as raw:
        block = raw.headers_frame(1, "GET", f"/exapps/{APP}/public", extra=[
            (b"x-big-%d" % i, b"v" * 1000) for i in range(20)]).data
        pieces = [block[i:i + 8000] for i in range(0, len(block), 8000)]
        frames: list[Frame] = [HeadersFrame(1, data=pieces[0], flags=["END_STREAM"])]
        frames += [ContinuationFrame(1, data=piece) for piece in pieces[1:-1]]
        frames.append(ContinuationFrame(1, data=pieces[-1], flags=["END_HEADERS"]))
        raw.send(*frames)
        assert raw.closed_with() == ENHANCE_YOUR_CALM
    still_serving(harp)


def test_continuation_flood_closes_the_connection(harp: HarpProcess) -> None:
    with RawH2(harp) as raw:
        block = raw.encoder.encode([(b":method", b"GET"), (b":path", b"/")])
        frames: list[Frame] = [HeadersFrame(1, data=block)]  # no END_HEADERS
        frames += [ContinuationFrame(1, data=b"\x00" * 1000) for _ in range(200)]
        try:
            raw.send(*frames)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass
        assert raw.closed_with() is not None
    still_serving(harp)


def test_idle_connection_closed_despite_pings(harp: HarpProcess) -> None:
    """PINGs do not keep a connection without requests open past HP_TIMEOUT_CLIENT (3 s)."""
    with RawH2(harp) as raw:
        started = time.monotonic()
        while not raw.closed and time.monotonic() - started < 20:
            raw.send(PingFrame(0, opaque_data=b"12345678"))
            for _ in raw.frames(1):
                pass
        assert raw.closed
        assert raw.closed_with() == 0  # GOAWAY NO_ERROR, then closed
