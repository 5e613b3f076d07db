"""The kernel splice of a body, on a real epoll reactor and real loopback sockets.

Why: :class:`harp.splice.Splice` takes two Twisted transports over for a while (the
upstream's reading, the client's writing) and gives them back; these cases check that
the bytes arrive whole and in order after what Twisted had buffered, that each way of
ending (all sent, upstream cut, client gone, kernel refusal) is reported once, and that
no pipe is left open.  Each case runs on its own reactor instance with HaRP's write
coalescer, as in production; the process's global reactor is untouched.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest
from twisted.internet import epollreactor
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure

from harp import splice as S
from harp import writes

HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: ...\r\n\r\n"


def pipes() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
        except OSError:
            pass
    return count


class Case:
    """An upstream peer feeding ``source``; ``sink`` writing to a client peer."""

    def __init__(self, payload: bytes, length: int, cut: bool = False,
                 client_reads: int | None = None) -> None:
        self.reactor: Any = epollreactor.EPollReactor()
        writes.install(self.reactor)
        #: Pipes before the case (the reactor's own waker is one).
        self.pipes = pipes()
        self.payload = payload
        self.length = length
        self.cut = cut
        self.client_reads = client_reads
        self.received = bytearray()
        self.events: list[Any] = []
        self.progress = 0
        self.source: Any = None
        self.sink: Any = None
        self.splice: S.Splice | None = None
        self.upstream_data = bytearray()

    # --- the two middle ends

    def run(self) -> None:
        case = self

        class Source(Protocol):
            def connectionMade(self) -> None:
                case.source = self.transport
                self.transport.stopReading()  # type: ignore[union-attr]  # as after a head
                case.maybe_start()

            def dataReceived(self, data: bytes) -> None:
                case.upstream_data += data  # only what Twisted reads again after the splice

        class Sink(Protocol):
            def connectionMade(self) -> None:
                case.sink = self.transport
                case.maybe_start()

            def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
                if case.splice is not None:
                    case.splice.cancel()
                case.events.append("sink lost")
                case.finish_soon()

        class Upstream(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.write(case.payload)
                if case.cut:
                    self.transport.loseConnection()

        class Client(Protocol):
            def dataReceived(self, data: bytes) -> None:
                case.received += data
                if case.client_reads is not None and len(case.received) >= case.client_reads:
                    assert self.transport is not None
                    self.transport.abortConnection()  # type: ignore[attr-defined]

        reactor = self.reactor
        source_port = reactor.listenTCP(0, Factory.forProtocol(Source), interface="127.0.0.1")
        sink_port = reactor.listenTCP(0, Factory.forProtocol(Sink), interface="127.0.0.1")
        for port, protocol in ((source_port, Upstream), (sink_port, Client)):
            factory = ClientFactory()
            factory.protocol = protocol
            reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
        reactor.callLater(20, reactor.stop)
        try:
            reactor.run(installSignalHandlers=False)
        finally:
            source_port.stopListening()
            sink_port.stopListening()

    def maybe_start(self) -> None:
        if self.source is None or self.sink is None:
            return
        # Wait until the upstream's bytes are there, so a cut is seen as one.
        self.reactor.callLater(0.05, self.start)

    def start(self) -> None:
        self.sink.write(HEAD)  # buffered by Twisted: must leave before the body
        self.splice = S.Splice(
            self.reactor, self.source, self.sink, self.length, self.on_progress,
            self.on_done, self.on_failed, self.on_fallback,
        )
        self.splice.start()

    # --- the splice's reports

    def on_progress(self, n: int) -> None:
        self.progress += n

    def on_done(self) -> None:
        self.events.append("done")
        self.sink.loseConnection()

    def on_failed(self, side: str, reason: str) -> None:
        self.events.append(("failed", side))
        self.sink.abortConnection()

    def on_fallback(self, pending: bytes, remaining: int) -> None:
        self.events.append(("fallback", len(pending), remaining))
        self.sink.write(pending)
        self.sink.loseConnection()

    def finish_soon(self) -> None:
        self.reactor.callLater(0.1, self.reactor.stop)


def test_the_body_follows_the_buffered_head_whole_and_in_order() -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    case = Case(payload + b"next response", len(payload))
    case.run()
    assert bytes(case.received) == HEAD + payload
    assert case.events == ["done", "sink lost"]
    assert case.progress == len(payload)
    assert case.upstream_data == b"next response"  # Twisted reads the source again after
    assert pipes() == case.pipes


def test_an_upstream_cut_short_is_reported_once() -> None:
    case = Case(b"x" * (512 * 1024), 2 * 1024 * 1024, cut=True)
    case.run()
    assert case.events[0] == ("failed", "upstream")
    assert case.events.count(("failed", "upstream")) == 1
    assert len(case.received) <= len(HEAD) + 512 * 1024
    assert pipes() == case.pipes


def test_a_client_gone_mid_body_leaves_no_pipe() -> None:
    payload = b"y" * (8 * 1024 * 1024)
    case = Case(payload, len(payload) * 2, client_reads=256 * 1024)
    case.run()
    assert "done" not in case.events
    assert "sink lost" in case.events
    assert pipes() == case.pipes


def test_a_kernel_that_refuses_gets_the_body_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first splice (upstream → pipe) works, the second (pipe → client) is refused:
    # the bytes in the pipe come back as ``pending``, nothing is lost or doubled.
    real = os.splice
    calls = [0]

    def refusing(src: int, dst: int, count: int, *args: Any, **kwargs: Any) -> int:
        calls[0] += 1
        if calls[0] > 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(src, dst, count, *args, **kwargs)

    monkeypatch.setattr(S, "_splice", refusing)
    monkeypatch.setattr(S._Support, "usable", True)
    payload = os.urandom(300 * 1024)
    case = Case(payload, len(payload))
    case.run()
    (what, pending, remaining), *_ = case.events
    assert what == "fallback" and pending > 0 and pending + remaining == len(payload)
    assert bytes(case.received) == HEAD + payload[:pending]
    assert case.upstream_data == payload[pending:]  # Twisted reads the rest again
    assert S._Support.usable is False  # never tried again in this process
    assert S.socket_fd(case.source) is None


def test_only_plain_socket_transports_are_spliced() -> None:
    class NotASocket:
        disconnecting = disconnected = False

        def fileno(self) -> int:
            return 0

    assert S.socket_fd(NotASocket()) is None
    assert S.socket_fd(None) is None

