"""Streams: what FRP control and work connections run on, as Twisted transports.

frpc carries each control or work connection either as a yamux stream (``tcpMux = true``)
or as its own TCP(+TLS) connection (``tcpMux = false``).  Everything above that layer --
the first-message dispatcher, the control loop, the user-connection relay and the HTTP
client that reaches an ExApp through a tunnel -- wants one thing: a transport.  So a
:class:`Stream` (frp's and yamux's word for it) *is* a transport (``ITransport`` +
``IConsumer`` + ``IPushProducer``) whose protocol can be swapped as the connection
changes role (first message → parked work connection → the user's relay or HTTP client
protocol).

Why the class owns flow control:

* **Reading** (peer → us).  When the protocol's own consumer is full it calls
  :meth:`Stream.pauseProducing`; from then on received bytes are held, *not
  acknowledged*, until :meth:`Stream.resumeProducing`.  For a yamux stream the
  acknowledgement is :meth:`harp.frp.yamux.Session.consume`, so an unacknowledged
  stream's window closes and frpc stops sending: memory stays bounded by the window.
  A direct connection simply stops reading its socket.
* **Writing** (us → peer).  A yamux stream queues what its send window does not allow;
  above :data:`WRITE_HIGH_WATER` queued bytes (or while the TCP connection below is
  itself backed up) the registered producer is paused, and resumed below
  :data:`WRITE_LOW_WATER`.  A direct connection hands producer registration straight to
  the TCP/TLS transport, which already does this.

Work connections of proxies with ``use_encryption`` get an AES-CFB stream cipher
installed (:meth:`Stream.set_cipher`); CFB keeps lengths, so flow-control accounting
uses wire byte counts throughout.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Final

from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IProducer,
    IProtocol,
    IPushProducer,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from harp.frp.backlog import OutputGuard
from harp.frp.crypto import StreamDecryptor, StreamEncryptor

__all__ = ["WRITE_HIGH_WATER", "WRITE_LOW_WATER", "DirectStream", "Stream"]

WRITE_HIGH_WATER: Final = 256 * 1024
"""Queued outgoing bytes above which a stream pauses its registered producer."""
WRITE_LOW_WATER: Final = 64 * 1024
"""Queued outgoing bytes below which a paused producer is resumed."""


@implementer(ITransport, IConsumer, IPushProducer)
class Stream:
    """Base class: one FRP byte stream presented as a Twisted transport.

    Subclasses implement the ``_raw_*`` hooks; whatever carries the stream (the yamux
    session, or the TCP connection's protocol) reports events through the public
    :meth:`data_received` and :meth:`connection_lost`.  :meth:`connectionLost` of the
    attached protocol is called exactly once, when the stream is gone for good.
    """

    #: True when this stream is a yamux stream (heartbeats then come from yamux).
    multiplexed: bool = False

    def __init__(self) -> None:
        self.protocol: IProtocol | None = None
        self.connected = True
        self.disconnecting = False
        self._gone = False
        self._paused = False
        self._pending: deque[bytes] = deque()
        self._encryptor: StreamEncryptor | None = None
        self._decryptor: StreamDecryptor | None = None
        self._producer: IPushProducer | None = None
        self._producer_paused = False
        self._write_blocked = False
        self._lost_hooks: list[Callable[[Stream], object]] = []

    # ------------------------------------------------------------ role changes

    def attach(self, protocol: IProtocol) -> None:
        """Make *protocol* the receiver of this stream's bytes (``makeConnection``)."""
        self.protocol = protocol
        protocol.makeConnection(self)
        if self._gone:  # the connection died during connectionMade
            return
        self._drain()

    def set_cipher(self, encryptor: StreamEncryptor, decryptor: StreamDecryptor) -> None:
        """Encrypt every later write and decrypt every later received byte (AES-CFB)."""
        self._encryptor = encryptor
        self._decryptor = decryptor

    def notify_lost(self, hook: Callable[[Stream], object]) -> None:
        """Call *hook(self)* once the stream is gone (owners use it to forget it)."""
        if self._gone:
            hook(self)
        else:
            self._lost_hooks.append(hook)

    @property
    def carrier(self) -> object:
        """The connection this stream travels on: the yamux session, or itself.

        Work connections are accepted only on their control's carrier (or, without yamux,
        from its address), see :meth:`harp.frp.service.FrpServer.work_conn`.
        """
        return self

    @property
    def alive(self) -> bool:
        """Usable for writing: not lost and not closing."""
        return not self._gone and not self.disconnecting

    # ------------------------------------------------------------ ITransport

    def write(self, data: bytes) -> None:
        if not data or self._gone or self.disconnecting:
            return
        if self._encryptor is not None:
            data = self._encryptor.encrypt(data)
        self._raw_write(data)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Close gracefully (FIN after queued data); frp then closes the other leg too."""
        if self._gone or self.disconnecting:
            return
        self.disconnecting = True
        self._producer = None
        self._raw_close()

    def abortConnection(self) -> None:
        """Drop the stream at once (yamux RST / TCP abort)."""
        if self._gone:
            return
        self.disconnecting = True
        self._producer = None
        self._raw_abort()

    def getPeer(self) -> IAddress:
        raise NotImplementedError

    def getHost(self) -> IAddress:
        raise NotImplementedError

    def close_carrier(self) -> None:
        """Abort whatever carries this stream (the whole yamux session, or the TCP)."""
        self.abortConnection()

    def mark_logged_in(self) -> None:
        """A control logged in on this stream: its carrier's login deadline is met.

        Only a yamux session has such a deadline (several streams share it, see
        :meth:`harp.frp.mux.YamuxConnection.mark_logged_in`); a direct connection's
        deadline already ended with its first message.
        """

    # ------------------------------------------------------------ IConsumer

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        # Like Twisted's TCP transport, a new producer is not paused on registration
        # (a body producer may not have started yet); the next write pauses it if needed.
        if not streaming:
            raise ValueError("FRP streams accept streaming (push) producers only")
        self._producer = producer  # type: ignore[assignment]
        self._producer_paused = False

    def unregisterProducer(self) -> None:
        self._producer = None
        self._producer_paused = False

    def _set_write_blocked(self, blocked: bool) -> None:
        """Pause or resume the registered producer (subclasses call this)."""
        self._write_blocked = blocked
        producer = self._producer
        if producer is None:
            return
        if blocked and not self._producer_paused:
            self._producer_paused = True
            producer.pauseProducing()
        elif not blocked and self._producer_paused:
            self._producer_paused = False
            producer.resumeProducing()

    # ------------------------------------------------------------ IPushProducer

    def pauseProducing(self) -> None:
        """Stop delivering received bytes; they stay unacknowledged until resumed."""
        if not self._paused:
            self._paused = True
            self._raw_pause_reading()

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            self._raw_resume_reading()
            self._drain()

    def stopProducing(self) -> None:
        self.loseConnection()

    # ------------------------------------------------------------ events from the carrier

    def data_received(self, data: bytes) -> None:
        """Wire bytes arrived for this stream (its carrier calls this)."""
        if self._gone:
            return
        if self.disconnecting:
            self._raw_consumed(len(data))  # discarded, but keep the window open
            return
        self._pending.append(data)
        self._drain()

    def _drain(self) -> None:
        while self._pending and not self._paused and not self._gone and self.protocol is not None:
            raw = self._pending.popleft()
            plain = raw if self._decryptor is None else self._decryptor.decrypt(raw)
            if self.disconnecting:
                self._raw_consumed(len(raw))
                continue
            if plain:
                self.protocol.dataReceived(plain)
            self._raw_consumed(len(raw))

    def connection_lost(self, reason: Failure | None = None) -> None:
        """The stream is gone; tell the protocol and the owners, once (idempotent)."""
        if self._gone:
            return
        self._gone = True
        self.connected = False
        self.disconnecting = True
        self._pending.clear()
        self._producer = None
        hooks, self._lost_hooks = self._lost_hooks, []
        for hook in hooks:
            hook(self)
        if reason is None:
            reason = Failure(ConnectionDone("FRP stream closed"))
        if self.protocol is not None:
            self.protocol.connectionLost(reason)

    @staticmethod
    def aborted(message: str) -> Failure:
        return Failure(ConnectionAborted(message))

    # ------------------------------------------------------------ subclass hooks

    def _raw_write(self, data: bytes) -> None:
        raise NotImplementedError

    def _raw_close(self) -> None:
        raise NotImplementedError

    def _raw_abort(self) -> None:
        raise NotImplementedError

    def _raw_pause_reading(self) -> None:
        """Stop the source (optional: a stream simply withholds acknowledgements)."""

    def _raw_resume_reading(self) -> None:
        """Restart the source."""

    def _raw_consumed(self, amount: int) -> None:
        """*amount* wire bytes were delivered (a yamux stream returns window here)."""


class DirectStream(Stream):
    """A whole TCP(+TLS) connection used as one stream (frpc ``tcpMux = false``).

    The owning protocol feeds it with :meth:`data_received` and reports the end with
    :meth:`connection_lost`.  Producer registration goes straight to the transport
    below, which already pauses a producer when its write buffer is full.

    *guard* is the connection's :class:`~harp.frp.backlog.OutputGuard`: it measures the
    queue after every write (a peer flooding ``Ping`` without reading its ``Pong``) and
    owns pausing the socket's reading, which this stream also asks for when its consumer
    is full.
    """

    CONSUMER_REASON = "consumer"

    def __init__(self, transport: Any, guard: OutputGuard | None = None) -> None:
        super().__init__()
        self._transport = transport
        self._guard = guard
        self._forwarded = False

    def getPeer(self) -> IAddress:
        peer: IAddress = self._transport.getPeer()
        return peer

    def getHost(self) -> IAddress:
        host: IAddress = self._transport.getHost()
        return host

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if not streaming:
            raise ValueError("FRP streams accept streaming (push) producers only")
        if self._gone or self.disconnecting:
            return
        if self._forwarded:
            self._transport.unregisterProducer()
        self._transport.registerProducer(producer, True)
        self._forwarded = True

    def unregisterProducer(self) -> None:
        if self._forwarded:
            self._forwarded = False
            if not self._gone:
                self._transport.unregisterProducer()

    def _raw_write(self, data: bytes) -> None:
        self._transport.write(data)
        if self._guard is not None:
            self._guard.check()

    def _raw_close(self) -> None:
        # A still-registered producer would keep a Twisted transport from closing.
        self.unregisterProducer()
        self._transport.loseConnection()

    def _raw_abort(self) -> None:
        self.unregisterProducer()
        self._transport.abortConnection()
        self.connection_lost(self.aborted("FRP connection aborted"))

    def _raw_pause_reading(self) -> None:
        if self._guard is not None:
            self._guard.pause_reading(self.CONSUMER_REASON)
        else:
            self._transport.pauseProducing()

    def _raw_resume_reading(self) -> None:
        if self._guard is not None:
            self._guard.resume_reading(self.CONSUMER_REASON)
        else:
            self._transport.resumeProducing()
