"""yamux, sans I/O: the session state machine with per-stream flow control.

frpc multiplexes its control and work connections over one TCP(+TLS)
connection with hashicorp/yamux (the fatedier fork is identical on the wire).
This module speaks that protocol without touching sockets, timers or the
reactor, so that it can be tested exhaustively and driven by a thin Twisted
protocol::

    session = Session()                        # server side: peer opens odd ids

    def dataReceived(self, data):
        for event in session.receive_data(data):
            ...                                # StreamOpened, DataReceived, ...
        self.transport.write(session.data_to_send())

    # whenever the application calls send()/consume()/close_stream()/
    # reset_stream()/ping()/go_away(), write session.data_to_send() afterwards.

The frames it reads and writes (docs/compatibility.md#frp-yamux) are :mod:`harp.frp.yamux_frame`.

What the session does on its own, and why:

* **ACKs every incoming SYN immediately** (WindowUpdate+ACK).  frpc sends data
  without waiting for the ACK but kills the whole session if none arrives in
  75 s, and a server that never opens streams has no reason to delay it.
* **Answers Ping SYN with Ping ACK** carrying the same opaque value: frpc drops
  the connection ~10 s after an unanswered keepalive.
* **Flow control, both ways.**  Each stream starts with a 256 KiB window per
  direction.  *Send side:* :meth:`Session.send` never puts more on the wire
  than the peer's window; the excess is queued per stream and flushed when
  WindowUpdates arrive (frpc treats an overrun as a protocol error and tears
  the session down).  *Receive side:* incoming data is handed over in
  :class:`DataReceived` events and counts against our advertised window until
  the application calls :meth:`Session.consume` -- only then is window given
  back, so a slow consumer (a paused user socket) throttles the client instead
  of filling our memory.  Updates are batched like hashicorp's: sent once at
  least half the maximum window can be returned.
* **Protocol errors** (bad version or type, duplicate or wrong-parity SYN,
  receive window overrun) queue a GoAway(protocol error) and end the session
  with a :class:`SessionTerminated` event carrying a human-readable reason for
  the caller to log; the caller should flush :meth:`Session.data_to_send` and
  close the transport.  Per-stream refusals (too many streams, after our own
  GoAway) answer with RST and a :class:`StreamRejected` event.

Frames for unknown streams are ignored (Data payloads are skipped without
being buffered, whatever their declared length).  Incoming Data payloads are
*streamed*: a large frame can produce several :class:`DataReceived` events as
its bytes arrive, so memory stays bounded by the window, not by frame size.

Closing: :meth:`Session.close_stream` sends FIN once all queued data has gone
out; a stream is forgotten once both sides have sent FIN, or after a RST either
way.  frp itself closes both directions when either ends, and we mirror that
(docs/compatibility.md#frp-yamux), so on :class:`StreamEnded` the caller normally
closes its side too.  Timers (open/close timeouts, keepalive pings, dead-peer detection) belong
to the caller: :meth:`Session.ping` sends a ping and :class:`PingAcknowledged`
reports the echo.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harp.frp.yamux_frame import (
    HEADER_LEN,
    INITIAL_WINDOW,
    MAX_DATA_FRAME,
    MAX_U32,
    Flag,
    FrameHeader,
    FrameType,
    GoAwayCode,
    YamuxProtocolError,
    encode_header,
    go_away_frame,
    ping_frame,
    window_update_frame,
)

__all__ = [
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "PingAcknowledged",
    "PingReceived",
    "SendWindowUpdated",
    "Session",
    "SessionTerminated",
    "StreamClosedError",
    "StreamEnded",
    "StreamOpened",
    "StreamRejected",
    "StreamReset",
]


class StreamClosedError(Exception):
    """The application used a stream that is unknown, reset, or already closed by us."""


# --------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream (already ACKed).  Its first bytes tell what it is."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Payload bytes for a stream.  Call :meth:`Session.consume` once processed."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer sent FIN: it will send no more on this stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer sent RST: the stream is gone; queued outgoing data was dropped."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamRejected:
    """We refused an incoming SYN with RST; *reason* is for the log."""

    stream_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class SendWindowUpdated:
    """The peer granted more window: a producer paused on *buffered* may resume."""

    stream_id: int
    send_window: int
    buffered: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer pinged us (already answered); proof the peer is alive."""

    opaque: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    """The echo of one of our :meth:`Session.ping` calls arrived."""

    opaque: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer will accept no new streams; existing ones carry on."""

    code: int


@dataclass(frozen=True, slots=True)
class SessionTerminated:
    """We hit a protocol error: a GoAway is queued, every stream is gone.

    Flush :meth:`Session.data_to_send`, log *reason*, close the transport.
    """

    code: GoAwayCode
    reason: str


Event = (
    StreamOpened
    | DataReceived
    | StreamEnded
    | StreamReset
    | StreamRejected
    | SendWindowUpdated
    | PingReceived
    | PingAcknowledged
    | GoAwayReceived
    | SessionTerminated
)


# --------------------------------------------------------------------------
# Session


@dataclass(slots=True, eq=False)
class _StreamState:
    id: int
    inbound: bool
    recv_window: int
    send_window: int = INITIAL_WINDOW
    unconsumed: int = 0
    send_buffer: bytearray = field(default_factory=bytearray)
    fin_pending: bool = False
    local_closed: bool = False
    remote_closed: bool = False


class _Terminated(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Session:
    """One yamux session, fed with the connection's bytes, producing events.

    *client* selects the stream id parity of :meth:`open_stream` (client odd,
    server even) and which parity an incoming SYN must have.  HaRP's FRP server
    is the server side and never opens streams, but the client side makes the
    state machine testable against itself.

    *max_stream_window* is the receive window we advertise per stream (at least
    256 KiB; frps uses 6 MiB).  It is also the most unconsumed data one stream
    can make us hold.  *max_inbound_streams* caps concurrent peer-opened
    streams; SYNs beyond it are refused with RST.
    """

    def __init__(
        self,
        *,
        client: bool = False,
        max_stream_window: int = INITIAL_WINDOW,
        max_inbound_streams: int = 1024,
    ) -> None:
        if not INITIAL_WINDOW <= max_stream_window <= MAX_U32:
            raise ValueError(f"max_stream_window must be >= {INITIAL_WINDOW}")
        self._client = client
        self._max_window = max_stream_window
        self._max_inbound = max_inbound_streams
        self._streams: dict[int, _StreamState] = {}
        self._inbound_count = 0
        self._next_stream_id = 1 if client else 2
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._local_go_away = False
        self._remote_go_away = False
        self._terminated = False
        self._next_ping = 0
        self._pings_outstanding: set[int] = set()
        # receive parser state
        self._header_buf = bytearray()
        self._payload_left = 0
        self._payload_stream: _StreamState | None = None
        self._payload_fin = False

    # ---------------------------------------------------------------- status

    @property
    def terminated(self) -> bool:
        """True after a protocol error; the session accepts nothing more."""
        return self._terminated

    @property
    def remote_go_away(self) -> bool:
        """True once the peer sent GoAway (no new outbound streams)."""
        return self._remote_go_away

    @property
    def stream_ids(self) -> list[int]:
        """Ids of all live streams (not fully closed, not reset)."""
        return list(self._streams)

    def send_window(self, stream_id: int) -> int:
        """Bytes the peer currently lets us put on the wire for this stream."""
        return self._get(stream_id).send_window

    def buffered_amount(self, stream_id: int) -> int:
        """Bytes accepted by :meth:`send` but waiting for window."""
        return len(self._get(stream_id).send_buffer)

    def unconsumed(self, stream_id: int) -> int:
        """Bytes delivered to the application and not yet :meth:`consume`-d."""
        return self._get(stream_id).unconsumed

    # ------------------------------------------------------------ output

    def data_to_send(self) -> bytes:
        """Everything the session wants written to the transport since the last call."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    # ------------------------------------------------------------ application API

    def open_stream(self) -> int:
        """Open an outbound stream (SYN with our window delta) and return its id.

        Data may be sent immediately, as frpc does, without waiting for ACK.
        """
        if self._terminated or self._local_go_away or self._remote_go_away:
            raise StreamClosedError("session is going away")
        stream_id = self._next_stream_id
        if stream_id > MAX_U32:
            raise StreamClosedError("stream ids exhausted")
        self._next_stream_id += 2
        self._streams[stream_id] = _StreamState(
            stream_id, inbound=False, recv_window=self._max_window
        )
        delta = self._max_window - INITIAL_WINDOW
        self._out.append(window_update_frame(stream_id, delta, Flag.SYN))
        return stream_id

    def send(self, stream_id: int, data: bytes) -> None:
        """Queue *data* on a stream; as much as the window allows goes out now.

        Check :meth:`buffered_amount` to apply back-pressure to the source.
        Raises :class:`StreamClosedError` if the stream is unknown, reset, or
        we already closed it.
        """
        stream = self._get(stream_id)
        if stream.local_closed or stream.fin_pending:
            raise StreamClosedError(f"stream {stream_id} is closed for sending")
        stream.send_buffer += data
        self._flush(stream)

    def consume(self, stream_id: int, amount: int) -> None:
        """Report that *amount* received bytes were processed; may send a WindowUpdate.

        Calling it for a stream that has meanwhile gone away is harmless.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if not 0 <= amount <= stream.unconsumed:
            raise ValueError(f"cannot consume {amount} of {stream.unconsumed} bytes")
        stream.unconsumed -= amount
        self._maybe_update_window(stream)

    def close_stream(self, stream_id: int) -> None:
        """Half-close our side: FIN after all queued data.  Idempotent."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed or stream.fin_pending:
            return
        stream.fin_pending = True
        self._flush(stream)

    def reset_stream(self, stream_id: int) -> None:
        """Abort a stream with RST, dropping queued data.  Idempotent."""
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        self._forget(stream)
        self._out.append(window_update_frame(stream_id, 0, Flag.RST))

    def ping(self) -> int:
        """Send a Ping SYN; returns the opaque value a :class:`PingAcknowledged` will echo."""
        opaque = self._next_ping
        self._next_ping = (self._next_ping + 1) & MAX_U32
        if not self._terminated:  # nothing may follow our GoAway
            self._pings_outstanding.add(opaque)
            self._out.append(ping_frame(opaque, Flag.SYN))
        return opaque

    def go_away(self, code: GoAwayCode = GoAwayCode.NORMAL) -> None:
        """Tell the peer we accept no new streams; later SYNs get RST."""
        if self._local_go_away or self._terminated:
            return
        self._local_go_away = True
        self._out.append(go_away_frame(code))

    # ------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> list[Event]:
        """Process bytes from the transport and return the resulting events."""
        if self._terminated:
            return []
        try:
            self._receive(memoryview(data))
        except _Terminated as exc:
            self._terminate(GoAwayCode.PROTOCOL_ERROR, exc.reason)
        events, self._events = self._events, []
        return events

    def _receive(self, data: memoryview) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._payload_left:
                take = min(self._payload_left, end - pos)
                chunk = data[pos : pos + take]
                pos += take
                self._payload_left -= take
                stream = self._payload_stream
                if stream is not None and self._streams.get(stream.id) is stream:
                    stream.unconsumed += take
                    self._events.append(DataReceived(stream.id, bytes(chunk)))
                if not self._payload_left:
                    self._end_payload()
                continue
            take = min(HEADER_LEN - len(self._header_buf), end - pos)
            self._header_buf += data[pos : pos + take]
            pos += take
            if len(self._header_buf) == HEADER_LEN:
                try:
                    header = FrameHeader.decode(self._header_buf)
                except YamuxProtocolError as exc:
                    raise _Terminated(str(exc)) from None
                self._header_buf.clear()
                self._handle_header(header)

    def _handle_header(self, header: FrameHeader) -> None:
        if header.type is FrameType.PING:
            self._handle_ping(header)
        elif header.type is FrameType.GO_AWAY:
            self._remote_go_away = True
            self._events.append(GoAwayReceived(header.length))
        else:
            self._handle_stream_frame(header)

    def _handle_ping(self, header: FrameHeader) -> None:
        if header.flags & Flag.SYN:
            self._out.append(ping_frame(header.length, Flag.ACK))
            self._events.append(PingReceived(header.length))
        elif header.flags & Flag.ACK and header.length in self._pings_outstanding:
            self._pings_outstanding.discard(header.length)
            self._events.append(PingAcknowledged(header.length))

    def _handle_stream_frame(self, header: FrameHeader) -> None:
        is_data = header.type is FrameType.DATA
        stream_id, flags = header.stream_id, header.flags
        stream = self._streams.get(stream_id)
        if flags & Flag.SYN:
            stream = self._accept(stream_id, stream)
        if stream is None:
            self._skip_payload(header)  # unknown or refused stream
            return
        if flags & Flag.RST:
            del self._streams[stream_id]
            self._forget(stream)
            self._events.append(StreamReset(stream_id))
            self._skip_payload(header)
            return
        if not is_data:
            if header.length:
                stream.send_window += header.length
                self._flush(stream)
                if not flags & Flag.SYN:  # a SYN's delta is just the initial state
                    self._events.append(
                        SendWindowUpdated(stream_id, stream.send_window, len(stream.send_buffer))
                    )
            if flags & Flag.FIN:
                self._remote_fin(stream)
            return
        if stream.remote_closed:
            self._skip_payload(header)  # data after FIN: the peer broke its promise
            return
        if header.length > stream.recv_window:
            raise _Terminated(
                f"receive window exceeded on stream {stream_id}: "
                f"{header.length} > {stream.recv_window}"
            )
        stream.recv_window -= header.length
        self._payload_stream = stream
        self._payload_left = header.length
        self._payload_fin = bool(flags & Flag.FIN)
        if not header.length:
            self._end_payload()

    def _accept(self, stream_id: int, existing: _StreamState | None) -> _StreamState | None:
        """Handle a SYN: validate, then ACK or refuse.  Returns the new stream or None."""
        if existing is not None:
            raise _Terminated(f"duplicate SYN for stream {stream_id}")
        if stream_id == 0 or (stream_id % 2 == 1) == self._client:
            raise _Terminated(f"SYN for stream {stream_id} has our parity")
        reason = None
        if self._local_go_away:
            reason = "session is going away"
        elif self._inbound_count >= self._max_inbound:
            reason = f"more than {self._max_inbound} open streams"
        if reason is not None:
            self._out.append(window_update_frame(stream_id, 0, Flag.RST))
            self._events.append(StreamRejected(stream_id, reason))
            return None
        stream = _StreamState(stream_id, inbound=True, recv_window=self._max_window)
        self._streams[stream_id] = stream
        self._inbound_count += 1
        delta = self._max_window - INITIAL_WINDOW
        self._out.append(window_update_frame(stream_id, delta, Flag.ACK))
        self._events.append(StreamOpened(stream_id))
        return stream

    def _skip_payload(self, header: FrameHeader) -> None:
        if header.type is FrameType.DATA and header.length:
            self._payload_stream = None
            self._payload_left = header.length
            self._payload_fin = False

    def _end_payload(self) -> None:
        stream, fin = self._payload_stream, self._payload_fin
        self._payload_stream, self._payload_fin = None, False
        if fin and stream is not None and self._streams.get(stream.id) is stream:
            self._remote_fin(stream)

    def _remote_fin(self, stream: _StreamState) -> None:
        if stream.remote_closed:
            return
        stream.remote_closed = True
        self._events.append(StreamEnded(stream.id))
        if stream.local_closed:
            self._remove(stream)

    # ------------------------------------------------------------ internals

    def _get(self, stream_id: int) -> _StreamState:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamClosedError(f"no such stream {stream_id}")
        return stream

    def _flush(self, stream: _StreamState) -> None:
        buf = stream.send_buffer
        while buf and stream.send_window > 0:
            size = min(len(buf), stream.send_window, MAX_DATA_FRAME)
            self._out.append(encode_header(FrameType.DATA, Flag.NONE, stream.id, size))
            self._out.append(bytes(buf[:size]))
            del buf[:size]
            stream.send_window -= size
        if stream.fin_pending and not buf:
            stream.fin_pending = False
            stream.local_closed = True
            self._out.append(window_update_frame(stream.id, 0, Flag.FIN))
            if stream.remote_closed:
                self._remove(stream)

    def _maybe_update_window(self, stream: _StreamState) -> None:
        if stream.remote_closed:
            return  # the peer sends nothing more; window is moot
        delta = self._max_window - stream.unconsumed - stream.recv_window
        if delta < self._max_window // 2:
            return  # batch small updates, as hashicorp does
        stream.recv_window += delta
        self._out.append(window_update_frame(stream.id, delta))

    def _remove(self, stream: _StreamState) -> None:
        del self._streams[stream.id]
        self._forget(stream)

    def _forget(self, stream: _StreamState) -> None:
        stream.send_buffer.clear()
        if stream.inbound:
            self._inbound_count -= 1

    def _terminate(self, code: GoAwayCode, reason: str) -> None:
        self._terminated = True
        self._out.append(go_away_frame(code))
        for stream in self._streams.values():
            stream.send_buffer.clear()
        self._streams.clear()
        self._inbound_count = 0
        self._payload_left = 0
        self._events.append(SessionTerminated(code, reason))
