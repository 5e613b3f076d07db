"""Hostile FRP peers in memory: output floods without reading, foreign work connections.

The raw TCP transport is a ``StringTransport`` that also exposes Twisted's
``FileDescriptor`` buffer attributes (``dataBuffer``/``offset``), so the output guard of
:mod:`harp.frp.backlog` sees everything written and not yet "sent" (``clear()`` plays
the peer reading it).  Reading is paused through the transport's ``IPushProducer`` side
(``producerState``); a real reactor then stops calling ``dataReceived``, which the
flood loops below mirror.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from zope.interface import implementer

from harp.frp import codec, msg, yamux_frame
from harp.frp.backlog import (
    HARD_CAP,
    HIGH_WATER,
    LOW_WATER,
    POLL_INTERVAL,
    STALL_TIMEOUT,
    OutputGuard,
    tcp_backlog,
)
from harp.frp.crypto import StreamEncryptor, auth_key
from harp.frp.listener import FrpServerFactory
from tests.unit.frp.test_control import CIPHER, KEY, Env, FakeFrpc

READ_SIZE = 64 * 1024
"""What Twisted's TCP transport hands to dataReceived at most per read."""


class BufferedTransport(StringTransport):
    """A StringTransport whose written bytes count as Twisted's unsent TCP buffer."""

    offset = 0

    @property
    def dataBuffer(self) -> bytes:
        return self.value()


def _connect(env: Env, peer: Any = None) -> tuple[BufferedTransport, Any]:
    peer = peer or IPv4Address("TCP", "127.0.0.1", 40000)
    transport = BufferedTransport(peerAddress=peer,
                                  hostAddress=IPv4Address("TCP", "127.0.0.1", 8782))
    proto = env.factory.buildProtocol(peer)
    proto.makeConnection(transport)
    return transport, proto


def _flood(proto: Any, transport: BufferedTransport, unit: bytes, reads: int) -> int:
    """Feed *reads* TCP reads of repeated *unit* while reading is not paused."""
    chunk = unit * (READ_SIZE // len(unit))
    done = 0
    while done < reads and transport.producerState == "producing" and not transport.disconnecting:
        proto.dataReceived(chunk)
        done += 1
    return done


# ------------------------------------------------------------------------ the guard itself


class _Raw:
    def __init__(self) -> None:
        self.pending = 0
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def abortConnection(self) -> None:
        self.events.append("abort")


def _guard(raw: _Raw, clock: MemoryReactorClock) -> OutputGuard:
    return OutputGuard(clock, raw, lambda: raw.pending, "198.51.100.7")


def test_guard_pauses_above_high_and_resumes_below_low() -> None:
    clock, raw = MemoryReactorClock(), _Raw()
    guard = _guard(raw, clock)
    raw.pending = HIGH_WATER
    guard.check()
    assert raw.events == []
    raw.pending = HIGH_WATER + 1
    guard.check()
    assert raw.events == ["pause"] and guard.backlogged
    raw.pending = LOW_WATER + 1  # draining, not yet low enough
    clock.advance(POLL_INTERVAL)
    assert raw.events == ["pause"]
    raw.pending = LOW_WATER
    clock.advance(POLL_INTERVAL)
    assert raw.events == ["pause", "resume"] and not guard.backlogged
    assert not clock.getDelayedCalls()


def test_guard_drops_past_the_hard_cap() -> None:
    clock, raw = MemoryReactorClock(), _Raw()
    guard = _guard(raw, clock)
    raw.pending = HARD_CAP + 1
    guard.check()
    assert raw.events == ["abort"] and guard.dropped
    guard.check()  # once only
    assert raw.events == ["abort"]


def test_guard_drops_a_peer_that_reads_nothing_but_not_a_slow_reader() -> None:
    clock, raw = MemoryReactorClock(), _Raw()
    guard = _guard(raw, clock)
    raw.pending = 2 * HIGH_WATER
    guard.check()
    # A slow reader: a little goes out every poll, for longer than the stall timeout.
    for _ in range(int(2 * STALL_TIMEOUT / POLL_INTERVAL)):
        raw.pending -= 100
        clock.advance(POLL_INTERVAL)
    assert "abort" not in raw.events
    clock.advance(STALL_TIMEOUT - POLL_INTERVAL)
    assert "abort" not in raw.events
    clock.advance(2 * POLL_INTERVAL)
    assert raw.events == ["pause", "abort"] and guard.dropped
    assert not clock.getDelayedCalls()


def test_guard_and_consumer_pauses_do_not_undo_each_other() -> None:
    clock, raw = MemoryReactorClock(), _Raw()
    guard = _guard(raw, clock)
    guard.pause_reading("consumer")
    raw.pending = HIGH_WATER + 1
    guard.check()
    guard.resume_reading("consumer")
    assert raw.events == ["pause"]  # still backlogged: reading stays off
    guard.pause_reading("consumer")
    raw.pending = 0
    clock.advance(POLL_INTERVAL)
    assert raw.events == ["pause"]  # the consumer still wants it off
    guard.resume_reading("consumer")
    assert raw.events == ["pause", "resume"]


def test_tcp_backlog_reads_twisted_buffers() -> None:
    class Fd:
        dataBuffer = b"x" * 100
        offset = 40
        _tempDataLen = 7

    assert tcp_backlog(Fd()) == 67
    assert tcp_backlog(object()) == 0


# ------------------------------------------------------------------------ floods end to end


def test_yamux_ping_flood_before_login_stops_reading() -> None:
    env = Env()
    transport, proto = _connect(env)
    reads = _flood(proto, transport, yamux_frame.ping_frame(7, yamux_frame.Flag.SYN), reads=400)
    assert transport.producerState == "paused", "HaRP kept reading a peer that reads nothing"
    assert reads < 400
    assert len(transport.value()) <= HIGH_WATER + READ_SIZE
    # The peer reads: reading resumes at the next poll.
    transport.clear()
    env.reactor.advance(POLL_INTERVAL)
    assert transport.producerState == "producing"


def test_yamux_syn_flood_refusals_are_bounded_too() -> None:
    """SYNs beyond the pre-login limit are refused with RST: also output per input."""
    env = Env()
    transport, proto = _connect(env)
    syns = b"".join(yamux_frame.window_update_frame(sid, 0, yamux_frame.Flag.SYN)
                    for sid in range(1, 2 * 120_000, 2))  # 1.4 MB of RSTs owed
    step = READ_SIZE - READ_SIZE % 12
    pos = 0
    while pos < len(syns) and transport.producerState == "producing":
        proto.dataReceived(syns[pos : pos + step])
        pos += step
    assert transport.producerState == "paused"
    assert pos < len(syns)
    assert len(transport.value()) <= HIGH_WATER + READ_SIZE


def test_frp_ping_flood_after_direct_login_stops_reading_then_drops() -> None:
    env = Env()
    transport, proto = _connect(env)
    login = msg.Login(version="0.65.0", timestamp=7, privilege_key=auth_key("", 7),
                      metas={"token": KEY}, pool_count=1)
    proto.dataReceived(codec.encode_message(login))
    assert env.server.controls
    enc = StreamEncryptor(CIPHER)
    ping = codec.encode_message(msg.Ping())
    proto.dataReceived(enc.encrypt(ping))  # the IV goes out with the first one
    plain = ping * (READ_SIZE // len(ping))
    reads = 0
    while transport.producerState == "producing" and reads < 400:
        proto.dataReceived(enc.encrypt(plain))  # CFB: every chunk continues the stream
        reads += 1
    assert env.server.controls, "the flood itself must be valid FRP"

    assert transport.producerState == "paused"
    assert len(transport.value()) <= HIGH_WATER + READ_SIZE + 64
    env.reactor.advance(STALL_TIMEOUT + 1)
    assert transport.disconnecting, "a peer that reads nothing must be dropped"


def test_direct_consumer_pause_survives_the_backlog_resume() -> None:
    """A direct stream's own pause (its consumer is full) outlives a drained backlog."""
    env = Env()
    transport, proto = _connect(env)
    login = msg.Login(version="0.65.0", timestamp=7, privilege_key=auth_key("", 7),
                      metas={"token": KEY}, pool_count=1)
    proto.dataReceived(codec.encode_message(login))
    control = next(iter(env.server.controls.values()))
    control.stream.pauseProducing()
    assert transport.producerState == "paused"
    proto.guard.check()
    transport.clear()
    env.reactor.advance(POLL_INTERVAL)
    assert transport.producerState == "paused"
    control.stream.resumeProducing()
    assert transport.producerState == "producing"


# ------------------------------------------------------------------------ work connections


def _work_stream(frpc: FakeFrpc, run_id: str, **fields: Any) -> int:
    sid = frpc.session.open_stream()
    frpc.session.send(sid, codec.encode_message(msg.NewWorkConn(run_id=run_id, **fields)))
    frpc.pump()
    return sid


def test_work_conn_on_a_foreign_yamux_session_is_rejected_and_counted() -> None:
    env = Env(blacklist_count=2)
    owner = FakeFrpc(env)
    owner.auto_work = False
    run_id = owner.login(pool=0).run_id
    control = env.server.controls[run_id]
    for port in (41000, 41001):
        intruder = FakeFrpc(env, IPv4Address("TCP", "203.0.113.9", port))
        sid = _work_stream(intruder, run_id)
        assert sid in intruder.reset or intruder.transport.disconnecting
    assert not control._pool
    assert env.state.is_banned("203.0.113.9")
    assert not env.state.is_banned("127.0.0.1")
    # The owner's own session still works.
    _work_stream(owner, run_id)
    assert len(control._pool) == 1


def test_direct_work_conn_must_come_from_the_control_address() -> None:
    env = Env()
    _, proto = _connect(env, IPv4Address("TCP", "192.0.2.1", 40000))
    login = msg.Login(version="0.65.0", timestamp=7, privilege_key=auth_key("", 7),
                      metas={"token": KEY}, pool_count=0)
    proto.dataReceived(codec.encode_message(login))
    (run_id, control), = env.server.controls.items()
    work = codec.encode_message(msg.NewWorkConn(run_id=run_id))

    other, other_proto = _connect(env, IPv4Address("TCP", "192.0.2.99", 40001))
    other_proto.dataReceived(work)
    assert other.disconnecting and not control._pool

    same, same_proto = _connect(env, IPv4Address("TCP", "192.0.2.1", 40002))
    same_proto.dataReceived(work)
    assert not same.disconnecting and len(control._pool) == 1


def test_work_conn_with_a_wrong_privilege_key_is_rejected() -> None:
    env = Env()
    frpc = FakeFrpc(env)
    frpc.auto_work = False
    run_id = frpc.login(pool=0).run_id
    control = env.server.controls[run_id]
    bad = _work_stream(frpc, run_id, timestamp=9, privilege_key=auth_key("nope", 9))
    assert bad in frpc.reset and not control._pool
    _work_stream(frpc, run_id, timestamp=9, privilege_key=auth_key("", 9))
    assert len(control._pool) == 1


# ------------------------------------------------------------------------ plaintext warning


@implementer(IOpenSSLServerConnectionCreator)
class _NoTLS:
    """Stands for a TLS configuration; never asked for a connection here."""

    def serverConnectionForTLS(self, protocol: Any) -> Any:
        raise AssertionError("not used")


def test_plaintext_frp_warns_at_start_whatever_the_level() -> None:
    from harp import logs

    seen: list[LogEvent] = []
    globalLogPublisher.addObserver(seen.append)
    before = logs._threshold[0]
    logs.set_level("error")
    try:
        env = Env()
        env.factory.doStart()
        env.factory.doStop()
        tls_env = Env()
        tls_factory = FrpServerFactory(tls_env.reactor, tls_env.server, _NoTLS())
        tls_factory.doStart()
        tls_factory.doStop()
    finally:
        logs._threshold[0] = before
        globalLogPublisher.removeObserver(seen.append)
    texts = [formatEvent(e) for e in seen if "WITHOUT TLS" in (formatEvent(e) or "")]
    assert len(texts) == 1
    assert "unencrypted" in texts[0] and "HP_FRP_DISABLE_TLS=true" in texts[0]
