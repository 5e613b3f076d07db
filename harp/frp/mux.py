"""The yamux session of one frpc connection, driven over a Twisted transport.

:class:`harp.frp.yamux.Session` is pure protocol; this module gives it I/O and time:

* every stream frpc opens becomes a :class:`YamuxStream` (a transport, see
  :mod:`harp.frp.stream`) handed to ``on_stream``, which starts the first-message
  dispatcher on it;
* **keepalive / dead-peer detection**: we ping every ``keepalive`` seconds (frps does
  too) and drop the session when nothing at all arrived for ``dead_after`` seconds.  frpc
  answers our pings and sends its own every 30 s, so a live client is never that quiet,
  while a vanished one (cable pulled, VM frozen) frees its ports within that bound;
* **login deadline**: a session that has not logged in within ``login_timeout`` seconds
  is closed, so half-open or foreign connections cannot pile up;
* **write back-pressure**: the connection registers itself as a streaming producer on
  its transport.  While the TCP/TLS buffer below is full, every stream's producer is
  paused, so fast sources cannot queue unbounded data behind a slow client;
* **read back-pressure**: ``on_write`` is called after every write; the server passes
  the connection's :class:`~harp.frp.backlog.OutputGuard`, which stops reading from a
  peer that does not read our answers (pings, ACKs) and drops it past a hard cap;
* **linger**: after we FIN a stream, frpc FINs back at once; if it does not within
  ``linger`` seconds the stream is reset so it cannot stay in the session for ever.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from harp import timers
from harp.frp import yamux
from harp.frp.stream import WRITE_HIGH_WATER, WRITE_LOW_WATER, Stream
from harp.logs import HarpLogger

__all__ = ["MAX_STREAMS_BEFORE_LOGIN", "STREAM_WINDOW", "YamuxConnection", "YamuxStream"]

log = HarpLogger("harp.frp")

STREAM_WINDOW: Final = 1024 * 1024
"""Receive window we grant per stream: the most a stalled reader can make us hold
(frps grants 6 MiB; 1 MiB still fills loopback and keeps 50 stalled streams < 64 MiB)."""

MAX_STREAMS_BEFORE_LOGIN: Final = 4
"""Streams a session may hold open before a Login succeeded (each may buffer 10 KiB)."""


class YamuxStream(Stream):
    """One yamux stream of a :class:`YamuxConnection`, as a transport."""

    multiplexed = True

    def __init__(self, conn: YamuxConnection, stream_id: int) -> None:
        super().__init__()
        self.conn = conn
        self.stream_id = stream_id

    def getPeer(self) -> IAddress:
        return self.conn.peer

    def getHost(self) -> IAddress:
        return self.conn.host

    @property
    def carrier(self) -> object:
        return self.conn

    def close_carrier(self) -> None:
        self.conn.abort("its control connection ended")

    def mark_logged_in(self) -> None:
        self.conn.mark_logged_in()

    def __repr__(self) -> str:
        return f"<YamuxStream {self.stream_id} of {self.conn.peer}>"

    # ---------------------------------------------------------------- hooks

    def _raw_write(self, data: bytes) -> None:
        session = self.conn.session
        try:
            session.send(self.stream_id, data)
        except yamux.StreamClosedError:
            return
        self.conn.flush()
        self.check_write()

    def check_write(self) -> None:
        """Pause/resume our producer from the stream's queue and the session's state."""
        try:
            queued = self.conn.session.buffered_amount(self.stream_id)
        except yamux.StreamClosedError:
            return
        if self.conn.write_paused or queued > WRITE_HIGH_WATER:
            self._set_write_blocked(True)
        elif queued <= WRITE_LOW_WATER:
            self._set_write_blocked(False)

    def _raw_close(self) -> None:
        self.conn.session.close_stream(self.stream_id)
        self.conn.flush()
        self.conn.linger(self)

    def _raw_abort(self) -> None:
        self.conn.session.reset_stream(self.stream_id)
        self.conn.flush()
        self.connection_lost(self.aborted("FRP stream reset by HaRP"))

    def _raw_consumed(self, amount: int) -> None:
        self.conn.session.consume(self.stream_id, amount)
        self.conn.flush()

    # ---------------------------------------------------------------- events

    def remote_fin(self) -> None:
        """frpc closed its side.  frp closes both directions then, and so do we."""
        self.conn.session.close_stream(self.stream_id)
        self.conn.flush()
        self.conn.linger(self)
        self.connection_lost(Failure(ConnectionDone("FRP stream closed by the client")))

    def remote_reset(self) -> None:
        self.connection_lost(Failure(ConnectionLost("FRP stream reset by the client")))


@implementer(IPushProducer)
class YamuxConnection:
    """A yamux server session bound to *transport* (TLS or TCP)."""

    def __init__(
        self,
        transport: Any,
        reactor: IReactorTime,
        on_stream: Callable[[YamuxStream], None],
        *,
        keepalive: float = 30.0,
        dead_after: float = 75.0,
        login_timeout: float = 10.0,
        linger: float = 30.0,
        window: int = STREAM_WINDOW,
        on_write: Callable[[], object] | None = None,
    ) -> None:
        self.transport = transport
        self.reactor = reactor
        self.peer: IAddress = transport.getPeer()
        self.host: IAddress = transport.getHost()
        self.session = yamux.Session(max_stream_window=window)
        self.streams: dict[int, YamuxStream] = {}
        self.write_paused = False
        self.closed = False
        self.logged_in = False
        self._on_stream = on_stream
        self._on_write = on_write
        self._keepalive = keepalive
        self._dead_after = dead_after
        self._linger_time = linger
        self._lingering: dict[int, IDelayedCall] = {}
        self._last_rx = reactor.seconds()
        self._tick_call: IDelayedCall | None = reactor.callLater(keepalive, self._tick)
        self._login_call: IDelayedCall | None = reactor.callLater(
            login_timeout, self._login_expired
        )
        transport.registerProducer(self, True)

    # ---------------------------------------------------------------- input

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._last_rx = self.reactor.seconds()
        for event in self.session.receive_data(data):
            if self.closed:
                break
            self._dispatch(event)
        self.flush()

    def _dispatch(self, event: yamux.Event) -> None:
        if isinstance(event, yamux.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.session.consume(event.stream_id, len(event.data))
            else:
                stream.data_received(event.data)
        elif isinstance(event, yamux.StreamOpened):
            if not self.logged_in and len(self.streams) >= MAX_STREAMS_BEFORE_LOGIN:
                # frpc opens one stream (Login) and waits; more is a flood, not frpc.
                self.session.reset_stream(event.stream_id)
                return
            stream = YamuxStream(self, event.stream_id)
            self.streams[event.stream_id] = stream
            stream.notify_lost(self._forget)
            self._on_stream(stream)
        elif isinstance(event, yamux.SendWindowUpdated):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.check_write()
        elif isinstance(event, yamux.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.remote_fin()
            self._unlinger(event.stream_id)
        elif isinstance(event, yamux.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.remote_reset()
            self._unlinger(event.stream_id)
        elif isinstance(event, yamux.StreamRejected):
            log.debug("FRP session {peer}: refused stream {sid}: {reason}",
                      peer=self.peer, sid=event.stream_id, reason=event.reason)
        elif isinstance(event, yamux.GoAwayReceived):
            log.debug("FRP session {peer}: GoAway {code}", peer=self.peer, code=event.code)
        elif isinstance(event, yamux.SessionTerminated):
            log.info("FRP session {peer}: yamux protocol error, closing: {reason}",
                     peer=self.peer, reason=event.reason)
            self.flush()  # the GoAway
            self._teardown(Failure(ConnectionLost(f"yamux protocol error: {event.reason}")))
            self.transport.loseConnection()
        # PingReceived / PingAcknowledged: liveness is tracked by _last_rx.

    def _forget(self, stream: Stream) -> None:
        assert isinstance(stream, YamuxStream)
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]

    # ---------------------------------------------------------------- output

    def flush(self) -> None:
        out = self.session.data_to_send()
        if out and not self.closed:
            self.transport.write(out)
            if self._on_write is not None:
                self._on_write()  # the output guard (harp.frp.backlog) measures the queue

    def linger(self, stream: YamuxStream) -> None:
        """Reset *stream* if frpc does not finish closing it in time."""
        sid = stream.stream_id
        if self.closed or sid in self._lingering or sid not in self.session.stream_ids:
            return
        self._lingering[sid] = self.reactor.callLater(self._linger_time, self._linger_expired, sid)

    def _unlinger(self, sid: int) -> None:
        call = self._lingering.pop(sid, None)
        timers.cancel(call)

    def _linger_expired(self, sid: int) -> None:
        self._lingering.pop(sid, None)
        if self.closed:
            return
        self.session.reset_stream(sid)
        self.flush()
        stream = self.streams.get(sid)
        if stream is not None:
            stream.connection_lost(Stream.aborted("FRP stream did not close in time"))

    # ---------------------------------------------------------------- lifecycle

    def mark_logged_in(self) -> None:
        """A control logged in on this session: the login deadline no longer applies."""
        self.logged_in = True
        timers.cancel(self._login_call)
        self._login_call = None

    def _login_expired(self) -> None:
        self._login_call = None
        if not self.logged_in and not self.closed:
            log.info("FRP session {peer}: no successful Login in time, closing", peer=self.peer)
            self.abort("no Login")

    def _tick(self) -> None:
        self._tick_call = None
        if self.closed:
            return
        silent = self.reactor.seconds() - self._last_rx
        if silent >= self._dead_after:
            log.info("FRP session {peer}: nothing received for {secs:.0f}s, closing",
                     peer=self.peer, secs=silent)
            self.abort("peer silent")
            return
        self.session.ping()
        self.flush()
        self._tick_call = self.reactor.callLater(self._keepalive, self._tick)

    def abort(self, why: str) -> None:
        """Drop the whole session now: every stream is lost, the transport aborted."""
        if self.closed:
            return
        self._teardown(Failure(ConnectionLost(f"FRP session closed: {why}")))
        self.transport.abortConnection()

    def connection_lost(self, reason: Failure) -> None:
        self._teardown(reason)

    def _teardown(self, reason: Failure) -> None:
        if self.closed:
            return
        self.closed = True
        for call in (self._tick_call, self._login_call, *self._lingering.values()):
            timers.cancel(call)
        self._tick_call = self._login_call = None
        self._lingering.clear()
        for stream in list(self.streams.values()):
            stream.connection_lost(reason)
        self.streams.clear()

    # ---------------------------------------------------------------- IPushProducer

    def pauseProducing(self) -> None:
        """The transport below is full: hold every stream's producer."""
        self.write_paused = True
        for stream in list(self.streams.values()):
            stream.check_write()

    def resumeProducing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.check_write()

    def stopProducing(self) -> None:
        self.abort("transport stopped")
