"""The HTTPS frontend's TLS layer with real TLS handshakes in memory.

Why: :mod:`harp.web.https` replaced Twisted's pyOpenSSL wrapper on the ExApp HTTPS
frontend, so what clients and scanners see must hold there: the policy (TLS 1.2 or
newer, AEAD suites only), ALPN (``h2`` only when enabled; a client offering only
protocols we do not speak still completes the handshake), plaintext both ways in
order, writes made before the handshake sent after it, and a broken or plain-text
client closed without an exception.  The client side is the standard library's ``ssl``
over memory BIOs; the server side is the real protocol over a ``StringTransport``.
"""

from __future__ import annotations

import ssl
import warnings
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from harp.tlsctx import ReloadableServerContext, TLSConfigError, load_frontend_context
from harp.web.https import LINGER, TLSServerFactory, TLSServerProtocol
from tests.conftest import self_signed_pem


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("https") / "cert.pem"
    self_signed_pem(path, "harp.test")
    return path


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost = False
        self.made = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


def client_context(alpn: list[str] | None = None, **kwargs: Any) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    for name, value in kwargs.items():
        setattr(ctx, name, value)
    return ctx


class Pair:
    """A memory-BIO client and the real server protocol, shuttled by hand."""

    def __init__(self, pem: Path, client: ssl.SSLContext, http2: bool = True) -> None:
        self.inner = Recorder()
        factory = TLSServerFactory(ReloadableServerContext(pem, http2), Factory())
        self.server = TLSServerProtocol(factory, self.inner)
        self.wire = StringTransport()
        self.server.makeConnection(self.wire)
        self.c_in, self.c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client.wrap_bio(self.c_in, self.c_out, server_hostname="harp.test")

    def shuttle(self) -> None:
        for _ in range(6):
            if self.c_out.pending:
                self.server.dataReceived(self.c_out.read())
            sent = self.wire.value()
            self.wire.clear()
            if sent:
                self.c_in.write(sent)

    def handshake(self) -> None:
        for _ in range(6):
            try:
                self.client.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.shuttle()
        self.shuttle()

    def client_reads(self) -> bytes:
        self.shuttle()
        data = b""
        while True:
            try:
                data += self.client.read(65536)
            except ssl.SSLWantReadError:
                return data


@pytest.mark.parametrize(("offered", "on", "off"), [
    (["h2", "http/1.1"], "h2", "http/1.1"),
    (["http/1.1", "h2"], "h2", "http/1.1"),
    (["http/1.1"], "http/1.1", "http/1.1"),
    (["h2"], "h2", None),  # nothing in common: the handshake completes without ALPN
    (None, None, None),
])
def test_alpn_offers_h2_only_when_enabled(pem: Path, offered: list[str] | None,
                                          on: str | None, off: str | None) -> None:
    for http2, expected in ((True, on), (False, off)):
        pair = Pair(pem, client_context(offered), http2)
        pair.handshake()
        assert pair.client.selected_alpn_protocol() == expected
        assert pair.server.negotiatedProtocol == (expected.encode() if expected else None)


def test_plaintext_both_ways_and_early_writes_after_the_handshake(pem: Path) -> None:
    pair = Pair(pem, client_context(["http/1.1"]))
    assert pair.inner.made  # connected at once: its head deadline covers the handshake
    assert ISSLTransport.providedBy(pair.server)
    pair.server.write(b"early ")  # before the handshake: kept
    pair.handshake()
    pair.client.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    pair.shuttle()
    assert pair.inner.data == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    pair.server.writeSequence([b"HTTP/1.1 200 OK\r\n", b"Content-Length: 2\r\n\r\nok"])
    big = bytes(range(256)) * 4096  # 1 MiB: many TLS records in one write
    pair.server.write(big)
    assert pair.client_reads() == b"early HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + big


def test_close_notify_from_the_client_closes_the_connection(pem: Path) -> None:
    pair = Pair(pem, client_context())
    pair.handshake()
    try:
        pair.client.unwrap()
    except ssl.SSLWantReadError:
        pass
    pair.shuttle()
    assert pair.wire.disconnecting


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # plain HTTP on the HTTPS port
    b"\x16\x03\x01\x00\x05hello",  # a TLS record header with nonsense inside
    b"\x00" * 4096,
])
def test_garbage_is_closed_without_an_exception(pem: Path, garbage: bytes) -> None:
    pair = Pair(pem, client_context())
    pair.server.dataReceived(garbage)
    assert pair.wire.disconnecting
    assert pair.inner.data == b""
    pair.server.dataReceived(b"more")  # after the failure: ignored
    assert pair.inner.data == b""


def test_old_protocols_and_weak_suites_are_refused(pem: Path) -> None:
    with warnings.catch_warnings():  # a TLS 1.1 client is the point of this test
        warnings.simplefilter("ignore", DeprecationWarning)
        tls11 = client_context(minimum_version=ssl.TLSVersion.TLSv1,
                               maximum_version=ssl.TLSVersion.TLSv1_1)
    tls11.set_ciphers("ALL:@SECLEVEL=0")
    cbc = client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    cbc.set_ciphers("ECDHE-RSA-AES128-SHA")
    for ctx in (tls11, cbc):
        pair = Pair(pem, ctx)
        with pytest.raises(ssl.SSLError):
            pair.handshake()
        assert pair.wire.disconnecting


def test_tls12_with_an_aead_suite_is_accepted(pem: Path) -> None:
    ctx = client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    pair = Pair(pem, ctx)
    pair.handshake()
    assert pair.client.version() == "TLSv1.2"
    assert "GCM" in pair.client.cipher()[0] or "CHACHA20" in pair.client.cipher()[0]


def test_a_bad_certificate_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "cert.pem"
    bad.write_text("not a certificate")
    with pytest.raises(TLSConfigError, match=r"cert\.pem: not a usable PEM"):
        load_frontend_context(bad)
    with pytest.raises(TLSConfigError, match="cannot be read"):
        load_frontend_context(tmp_path / "missing.pem")


def test_reload_swaps_the_context_for_new_connections_only(pem: Path, tmp_path: Path) -> None:
    contexts = ReloadableServerContext(pem)
    before = contexts.server_context()
    contexts.reload()
    assert contexts.server_context() is not before
    contexts.path = tmp_path / "missing.pem"
    with pytest.raises(TLSConfigError):
        contexts.reload()
    assert contexts.server_context() is not None  # the previous one stays in service


class HalfClosing(StringTransport):
    """A TCP-like transport: it can close its write side alone, and be cut."""

    def __init__(self) -> None:
        super().__init__()
        self.write_closed = False
        self.aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True


def _lingering(pem: Path) -> tuple[Pair, HalfClosing, Clock]:
    pair = Pair(pem, client_context(["http/1.1"]))
    clock = Clock()
    pair.server.factory.clock = clock
    wire = HalfClosing()
    pair.wire = wire
    pair.server.transport = wire
    pair.handshake()
    return pair, wire, clock


def test_a_close_of_ours_is_a_fin_then_reads_are_discarded_until_linger_ends(
    pem: Path,
) -> None:
    pair, wire, clock = _lingering(pem)
    pair.server.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
    pair.server.loseConnection()
    # The answer and the close_notify leave, then a FIN: not a full close.
    assert wire.write_closed and not wire.disconnecting and not wire.aborted
    pair.shuttle()
    answer = b""
    while True:
        try:
            piece = pair.client.read(65536)
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            break
        if not piece:
            break  # the close_notify
        answer += piece
    assert answer == b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"
    pair.client.write(b"x" * 100_000)  # a client that goes on sending
    pair.shuttle()
    assert pair.inner.data == b""  # read and thrown away
    clock.advance(LINGER + 1)
    assert wire.aborted  # it did not close its side in time: cut


def test_a_client_that_closes_too_ends_the_linger(pem: Path) -> None:
    pair, wire, clock = _lingering(pem)
    pair.server.loseConnection()
    pair.server.connectionLost(None)  # the client's FIN: the connection is over
    clock.advance(LINGER + 1)
    assert not wire.aborted
