"""Output backlog of one FRP connection: stop reading a peer that does not read.

Every byte frpc sends can make us write: a yamux Ping is echoed, a SYN is ACKed (or
refused with RST), an FRP ``Ping`` gets a ``Pong`` (docs/compatibility.md#frp-yamux,
docs/compatibility.md#frp-heartbeats).  Twisted's transports
never refuse a write; they queue it.  So a peer that keeps sending while never reading
would make HaRP queue the answers without limit -- tens of MB within seconds.

:class:`OutputGuard` sits on the raw TCP connection (below TLS, which writes everything it
encrypts straight into that buffer) and applies the only back-pressure that works against
such a peer: **while our unsent output is above** :data:`HIGH_WATER` **we stop reading
from it**, and start again once it has drained below :data:`LOW_WATER`.  What we do not
read stays in the kernel's socket buffers and, beyond them, in the peer's own memory; the
answers we owe it stay bounded by one read's worth of requests.

Two limits end the connection, each with one log line:

* **hard cap** (:data:`HARD_CAP`): the backlog can still grow while reading is paused
  (tunnelled data within the peer's yamux windows, keepalive pings).  Above the cap the
  peer is not a client we can serve.
* **stall** (:data:`STALL_TIMEOUT`): reading has been paused and not one byte of the
  backlog went out for that long.  frpc's yamux gives up on a write that makes no progress
  for 10 s (``ConnectionWriteTimeout``), so a real client in that state is gone anyway.

Why poll while paused instead of waiting for a producer callback: the transport's single
producer slot already belongs to the layer above (the yamux session, or a tunnel's
producer on a direct connection, registered through the TLS layer's membrane).  The
poll runs only while reading is paused, and measuring the backlog is O(1).

Reading can also be paused on behalf of a consumer above (a direct work connection whose
user socket is full, see :mod:`harp.frp.stream`); the guard keeps one set of reasons so
that neither side resumes reading the other one paused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from twisted.internet.interfaces import IDelayedCall

from harp import timers
from harp.logs import HarpLogger

__all__ = [
    "HARD_CAP",
    "HIGH_WATER",
    "LOW_WATER",
    "POLL_INTERVAL",
    "STALL_TIMEOUT",
    "OutputGuard",
    "tcp_backlog",
    "tls_backlog",
]

log = HarpLogger("harp.frp")

HIGH_WATER: Final = 1024 * 1024
"""Unsent bytes above which we stop reading the peer."""
LOW_WATER: Final = 256 * 1024
"""Unsent bytes below which reading resumes."""
HARD_CAP: Final = 8 * 1024 * 1024
"""Unsent bytes above which the connection is dropped."""
STALL_TIMEOUT: Final = 15.0
"""Seconds reading may stay paused for the backlog without any of it going out."""
POLL_INTERVAL: Final = 0.1
"""How often the backlog is measured while reading is paused."""

BACKLOG_REASON: Final = "backlog"
"""The reason the guard itself pauses reading."""


def tcp_backlog(transport: Any) -> int:
    """Bytes a Twisted TCP transport still holds (accepted by ``write``, not yet sent).

    ``twisted.internet.abstract.FileDescriptor`` keeps them in ``dataBuffer`` (from
    ``offset`` on) plus ``_tempDataBuffer`` (``_tempDataLen`` bytes); a transport
    without these attributes reports 0.
    """
    data = getattr(transport, "dataBuffer", b"")
    offset = getattr(transport, "offset", 0)
    temp = getattr(transport, "_tempDataLen", 0)
    pending = len(data) - offset if isinstance(data, bytes | bytearray) else 0
    return max(pending, 0) + (temp if isinstance(temp, int) else 0)


def tls_backlog(tls: Any) -> int:
    """Cleartext a ``TLSMemoryBIOProtocol`` holds back (written before the handshake ended).

    Everything it has encrypted is already in the TCP transport's buffer; only
    ``_appSendBuffer`` is its own.
    """
    pending = getattr(tls, "_appSendBuffer", None)
    if not isinstance(pending, list):
        return 0
    return sum(len(chunk) for chunk in pending)


class OutputGuard:
    """Pauses reading from *transport* while *measure()* bytes of output are unsent.

    *transport* is the raw TCP transport (an ``IPushProducer`` for reading).  Call
    :meth:`check` after anything that may have written (every read, every write);
    :meth:`stop` when the connection is gone.  *on_drop* is called once when a limit is
    hit, after the log line; the guard aborts *transport* itself.
    """

    def __init__(
        self,
        reactor: Any,
        transport: Any,
        measure: Callable[[], int],
        peer: str,
        *,
        high_water: int = HIGH_WATER,
        low_water: int = LOW_WATER,
        hard_cap: int = HARD_CAP,
        stall_timeout: float = STALL_TIMEOUT,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        if not 0 <= low_water <= high_water <= hard_cap:
            raise ValueError("need 0 <= low_water <= high_water <= hard_cap")
        self.reactor = reactor
        self.transport = transport
        self.measure = measure
        self.peer = peer
        self.high_water = high_water
        self.low_water = low_water
        self.hard_cap = hard_cap
        self.stall_timeout = stall_timeout
        self.poll_interval = poll_interval
        self.dropped = False
        self._stopped = False
        self._reasons: set[str] = set()
        self._poll: IDelayedCall | None = None
        self._last = 0
        self._progress_at = 0.0

    @property
    def reading_paused(self) -> bool:
        """True while reading is paused for any reason."""
        return bool(self._reasons)

    @property
    def backlogged(self) -> bool:
        """True while reading is paused because of our own unsent output."""
        return BACKLOG_REASON in self._reasons

    # ------------------------------------------------------------ reasons

    def pause_reading(self, reason: str) -> None:
        """Stop reading from the peer until every reason is withdrawn."""
        if self._stopped or reason in self._reasons:
            return
        first = not self._reasons
        self._reasons.add(reason)
        if first:
            self.transport.pauseProducing()

    def resume_reading(self, reason: str) -> None:
        """Withdraw *reason*; reading resumes when no other reason is left."""
        if reason not in self._reasons:
            return
        self._reasons.discard(reason)
        if not self._reasons and not self._stopped:
            self.transport.resumeProducing()

    # ------------------------------------------------------------ measuring

    def check(self) -> None:
        """Compare the backlog with the marks; pause, resume or drop accordingly."""
        if self._stopped:
            return
        pending = self.measure()
        if pending > self.hard_cap:
            self._drop(f"{pending} bytes of output not read by the peer "
                       f"(limit {self.hard_cap})")
            return
        if self.backlogged:
            now = self.reactor.seconds()
            if pending < self._last:  # some of it went out since the last look
                self._progress_at = now
            self._last = pending
            if pending <= self.low_water:
                self._cancel_poll()
                self.resume_reading(BACKLOG_REASON)
            elif now - self._progress_at >= self.stall_timeout:
                self._drop(f"the peer read nothing for {now - self._progress_at:.0f}s "
                           f"with {pending} bytes of output pending")
        elif pending > self.high_water:
            self._last, self._progress_at = pending, self.reactor.seconds()
            self.pause_reading(BACKLOG_REASON)
            self._schedule()

    def _schedule(self) -> None:
        if self._poll is None and not self._stopped:
            self._poll = self.reactor.callLater(self.poll_interval, self._polled)

    def _polled(self) -> None:
        self._poll = None
        self.check()
        if self.backlogged:
            self._schedule()

    def _cancel_poll(self) -> None:
        timers.cancel(self._poll)
        self._poll = None

    def _drop(self, why: str) -> None:
        self.dropped = True
        log.warn("FRP connection from {peer}: {why}, closing", peer=self.peer, why=why)
        self.stop()
        self.transport.abortConnection()

    def stop(self) -> None:
        """The connection is gone (or being dropped): no more polls, no more changes."""
        self._stopped = True
        self._cancel_poll()
