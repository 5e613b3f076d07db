"""Request bodies that stream: from the client's socket to the upstream, bounded.

``twisted.web`` buffers a whole request body (in memory or a temporary file) before it
calls ``render``.  HaRP instead starts deciding as soon as the headers are in, and the
body flows through :class:`BodyPipe`: chunks are handed to the upstream connection as
they arrive, and when the upstream (or the decision, or Nextcloud) is slower than the
client, at most :data:`WINDOW` bytes wait here while the client's socket is paused.
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import Final, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

#: Bytes buffered before the client is paused.
WINDOW: Final = 256 * 1024


class FlowControl(Protocol):
    """The client connection, as far as the body pipe needs it."""

    def pause_client(self) -> None: ...

    def resume_client(self) -> None: ...


class BodyTooLarge(Exception):
    """A collected body exceeded its limit."""


@implementer(IBodyProducer)
class BodyPipe:
    """The request body as an ``IBodyProducer`` for the upstream ``Agent``.

    Fed by the request (:meth:`write`, :meth:`finish`), drained by the upstream
    connection (:meth:`startProducing`, with pause/resume from its transport).
    """

    def __init__(self, flow: FlowControl, length: int | None) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        # Weak: the request holds its pipe, and a strong link back would make every
        # request with a body a cycle only the garbage collector frees.  A request that
        # is gone has no client to pause.
        self._flow = weakref.ref(flow)
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._consumer: IConsumer | None = None
        self._finished: Deferred[None] | None = None
        self._upstream_paused = False
        self._client_paused = False
        self._discarding = False
        self._collect: tuple[Deferred[bytes], int] | None = None
        self.complete = False

    # --- fed by the request

    def write(self, data: bytes) -> None:
        if self._discarding or not data:
            return
        if self._consumer is not None and not self._upstream_paused and not self._chunks:
            self._consumer.write(data)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._collect is not None:
            waiter, limit = self._collect
            if self._buffered > limit:
                self._collect = None
                self.discard()
                waiter.errback(BodyTooLarge(limit))
            return
        if self._buffered >= WINDOW:
            self._pause_client()

    def finish(self) -> None:
        """The client sent the last byte of the body."""
        self.complete = True
        if self._collect is not None:
            waiter, _ = self._collect
            self._collect = None
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            waiter.callback(data)
        elif self._consumer is not None and not self._chunks:
            self._fire_finished()

    def discard(self) -> None:
        """Nobody wants the body (any more): drop what is buffered and what comes."""
        self._discarding = True
        self._chunks.clear()
        self._buffered = 0
        self._resume_client()

    def collect(self, limit: int) -> Deferred[bytes]:
        """The whole body (at most ``limit`` bytes), for the control plane's JSON calls."""
        if self.complete:
            data = b"".join(self._chunks)
            self._chunks.clear()
            if len(data) > limit:
                return fail(BodyTooLarge(limit))
            return succeed(data)
        waiter: Deferred[bytes] = Deferred()
        self._collect = (waiter, limit)
        self._resume_client()
        return waiter

    # --- IBodyProducer, driven by the upstream connection

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        # Keep our own reference: when the whole body arrived before the upstream
        # connection was ready, _flush() fires and clears self._finished at once, and
        # the Agent must still get the (already fired) Deferred back, never None.
        finished: Deferred[None] = Deferred()
        self._finished = finished
        self._flush()
        return finished

    def pauseProducing(self) -> None:
        self._upstream_paused = True
        self._pause_client()

    def resumeProducing(self) -> None:
        self._upstream_paused = False
        self._flush()

    def stopProducing(self) -> None:
        # The upstream request failed or was cancelled: its Deferred must not fire.
        self._finished = None
        self._consumer = None
        self.discard()

    # --- internals

    def _flush(self) -> None:
        consumer = self._consumer
        while consumer is not None and self._chunks and not self._upstream_paused:
            chunk = self._chunks.popleft()
            self._buffered -= len(chunk)
            consumer.write(chunk)
            consumer = self._consumer  # write() may have stopped us
        if self._consumer is None or self._upstream_paused:
            return
        if self._buffered < WINDOW:
            self._resume_client()
        if self.complete and not self._chunks:
            self._fire_finished()

    def _fire_finished(self) -> None:
        finished, self._finished = self._finished, None
        if finished is not None:
            finished.callback(None)

    def _pause_client(self) -> None:
        if not self._client_paused and not self._discarding:
            self._client_paused = True
            flow = self._flow()
            if flow is not None:
                flow.pause_client()

    def _resume_client(self) -> None:
        if self._client_paused:
            self._client_paused = False
            flow = self._flow()
            if flow is not None:
                flow.resume_client()
