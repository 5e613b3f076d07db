"""One flush per reactor turn for connected TCP and unix sockets, instead of epoll churn.

Why: Twisted's ``FileDescriptor.write`` buffers the bytes and calls ``startWriting``, which
asks epoll to report the socket writable (one ``epoll_ctl``); the next poll reports it, the
reactor dispatches ``doWrite`` (the ``send``), and ``stopWriting`` takes the socket out of
the write set again (a second ``epoll_ctl``).  A proxy writes on almost every request (the
forwarded head upstream, the answer downstream), so two system calls and one event
dispatch per write were a tenth of the CPU of a small request (docs/performance.md).

A connected socket is nearly always writable, so asking epoll first is wasted work.  The
:class:`WriteCoalescer` wraps the reactor's ``addWriter``/``removeWriter``: a connected
TCP or unix connection that starts writing is put on a pending list, and one call
scheduled for the end of the current reactor turn runs ``doWrite`` for every pending
connection, through the reactor's own ``_doReadOrWrite`` so errors and disconnections are
handled exactly as when epoll reports the socket.  All the writes a connection receives
in one turn (a response head and its body, say) still leave in one ``send``.  Only a
connection whose ``send`` could not take everything is registered with epoll, as before,
and it stays there until Twisted's own ``stopWriting``.

Anything else (a connection still connecting, where "writable" means "connected", pipes
to child processes, listening ports) goes straight to the reactor untouched.

The write itself can be compiled too (:func:`use_buffered_write`): a plain TCP
connection's ``write`` becomes :func:`buffered_write`, the same steps as Twisted's
``FileDescriptor.write`` (check the bytes, buffer them, pause a streaming producer
whose buffer is full, ask for a flush) in one C call instead of four interpreted ones,
twice per proxied request (the head upstream, the answer to the client).

The flush also does the common write itself (:func:`send_now`): a connection with nothing
left over from an earlier send and nothing Twisted must do once its buffer drains (no
producer to resume, no close or half-close waiting, no descriptor queued to pass on a
unix socket) gets its buffered bytes joined and sent in one ``send``, and its buffer
emptied, exactly as Twisted's ``doWrite`` would.
That skips the dispatch and three interpreted calls per write (``doWrite``,
``writeSomeData``, ``stopWriting``); anything else — an error, a short send, more than
Twisted's ``SEND_LIMIT`` — goes the reactor's way as before.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Final

from twisted.internet import _newtls, abstract, tcp, unix

#: Twisted's own write steps, which :func:`send_now` takes in their place.
_DO_WRITE: Final = abstract.FileDescriptor.doWrite
_WRITE_SOME: Final = tcp.Connection.writeSomeData
#: A unix socket connection's: descriptors queued by ``sendFileDescriptor`` go first (with
#: ``sendmsg``), then the bytes as a TCP connection sends them.  HaRP passes none, so with
#: the queue empty it is the same send (the local Docker engine's socket, on every call).
_UNIX_WRITE_SOME: Final = unix.Client.writeSomeData

#: Twisted's steps of ``write`` that :func:`buffered_write` takes in their place, each
#: with the forms it may have.  A unix socket connection's buffer is also full with more
#: than 64 descriptors queued to pass; HaRP passes none, so its bytes decide alone, as
#: :func:`buffered_write` checks.
_WRITE_STEPS: Final = {
    "startWriting": (abstract.FileDescriptor.startWriting,),
    "_maybePauseProducer": (abstract.FileDescriptor._maybePauseProducer,),
    "_isSendBufferFull": (
        abstract.FileDescriptor._isSendBufferFull, unix.Client._isSendBufferFull,
    ),
}
#: A TCP connection's ``write``: Twisted's TLS switch (``startTLS``) in front of
#: ``FileDescriptor.write``.
_TCP_WRITES: Final = (_newtls.ConnectionMixin.write, abstract.FileDescriptor.write)


def buffered_write(transport: Any, data: object) -> None:
    """``write`` of a plain TCP *transport*, step by step (see the module)."""
    if transport.TLS:
        # Twisted's TLS was started on it since: its own write encrypts first.
        type(transport).write(transport, data)
        return
    if not isinstance(data, bytes):
        raise TypeError("Data must be bytes")  # Twisted's own check and words
    if not transport.connected or transport._writeDisconnected:
        return
    if data:
        transport._tempDataBuffer.append(data)
        transport._tempDataLen += len(data)
        producer = transport.producer
        if (
            producer is not None and transport.streamingProducer
            and len(transport.dataBuffer) + transport._tempDataLen > transport.bufferSize
        ):
            transport.producerPaused = True
            producer.pauseProducing()
        transport.reactor.addWriter(transport)


def use_buffered_write(transport: Any) -> bool:
    """Give a plain TCP (or unix socket) connection :func:`buffered_write` as its ``write``.

    Only a connection whose class writes with Twisted's own steps (a TLS-started one
    does not).  The connection then holds a reference to itself: the owner calls
    :func:`end_buffered_write` when it is lost, so that no cycle is left to the
    garbage collector.
    """
    kind = type(transport)
    if not isinstance(transport, tcp.Connection) or getattr(kind, "write", None) not in _TCP_WRITES:
        return False
    for name, steps in _WRITE_STEPS.items():
        if getattr(kind, name, None) not in steps:
            return False
    if "write" in transport.__dict__:
        return False
    transport.write = partial(buffered_write, transport)  # type: ignore[method-assign]
    return True


def end_buffered_write(transport: Any) -> None:
    """Undo :func:`use_buffered_write` (on connection loss; nothing if never given)."""
    own = getattr(transport, "__dict__", None)
    if own is not None:
        write = own.get("write")
        if isinstance(write, partial) and write.func is buffered_write:
            del own["write"]


def send_now(writer: Any) -> bool:
    """Send what *writer* buffered, as Twisted's ``doWrite`` would; False: not done here.

    True means everything was sent and the connection is left as ``doWrite`` leaves it
    after a complete send (its buffers empty, nothing to resume or close).  On False the
    caller runs Twisted's ``doWrite``: either nothing was sent or changed, or a short send
    left the rest in ``dataBuffer`` from ``offset``, where ``doWrite`` sends it from.
    """
    # Only a connection that writes with Twisted's own steps (asked of its class each
    # time: a class may be changed at run time), and not one given a writer of its own
    # (a spliced body's).
    kind = type(writer)
    write_some = getattr(kind, "writeSomeData", None)
    if (
        getattr(kind, "doWrite", None) is not _DO_WRITE
        or (
            write_some is not _WRITE_SOME
            and (write_some is not _UNIX_WRITE_SOME or writer._sendmsgQueue)
        )
        or "doWrite" in writer.__dict__
    ):
        return False
    if writer.dataBuffer or writer.disconnecting or writer._writeDisconnecting:
        return False
    producer = writer.producer
    if producer is not None and (not writer.streamingProducer or writer.producerPaused):
        return False  # doWrite would resume it once drained
    pieces: list[bytes] = writer._tempDataBuffer
    if not pieces:
        return False
    data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    if len(data) > writer.SEND_LIMIT:
        return False
    try:
        sent: int = writer.socket.send(data)
    except OSError:
        return False  # doWrite sends again and handles the error as Twisted does
    writer._tempDataBuffer = []
    writer._tempDataLen = 0
    if sent == len(data):
        return True
    # A short send: the rest waits where doWrite keeps it, for epoll to report space.
    writer.dataBuffer = data
    writer.offset = sent
    return False


class WriteCoalescer:
    """Runs pending writes once per reactor turn; epoll only sees sockets that push back."""

    def __init__(self, reactor: Any) -> None:
        #: A poll-like reactor (epoll, poll, select): Twisted gives it no interface.
        self._reactor: Any = reactor
        self._add = reactor.addWriter
        self._remove = reactor.removeWriter
        self._pending: dict[Any, None] = {}
        #: Connections handed to the reactor's own addWriter (their send fell short).
        self._registered: set[Any] = set()
        self._scheduled = False
        #: The connection being flushed, and whether it stopped writing meanwhile.
        self._flushing: Any = None
        self._stopped = False

    def install(self) -> None:
        """Wrap the reactor's write registration (once per process)."""
        reactor = self._reactor
        reactor.addWriter = self.add_writer
        reactor.removeWriter = self.remove_writer

    def add_writer(self, writer: Any) -> None:
        if writer in self._pending or writer in self._registered:
            return
        if not (isinstance(writer, tcp.Connection) and writer.connected):
            self._add(writer)
            return
        if writer is self._flushing:
            self._stopped = False
        self._pending[writer] = None
        if not self._scheduled:
            self._scheduled = True
            self._reactor.callLater(0, self.flush)

    def remove_writer(self, writer: Any) -> None:
        if writer is self._flushing:
            self._stopped = True
        if self._pending.pop(writer, 0) is None:
            return  # it never reached epoll
        if writer in self._registered:
            self._registered.discard(writer)
        elif writer is self._flushing:
            return  # written this turn, not in epoll
        self._remove(writer)

    def flush(self) -> None:
        """``doWrite`` for each pending connection; register the ones left with data."""
        self._scheduled = False
        pending, self._pending = self._pending, {}
        event = self._reactor._POLL_OUT
        for writer in pending:
            if not writer.connected:
                continue
            if send_now(writer):
                continue  # all sent: nothing left for epoll
            self._flushing = writer
            self._stopped = False
            try:
                self._reactor._doReadOrWrite(writer, writer.fileno(), event)
            finally:
                self._flushing = None
            if self._stopped or not writer.connected or writer in self._pending:
                continue
            # The send fell short: let epoll say when the socket drains, as Twisted does.
            self._registered.add(writer)
            self._add(writer)


def install(reactor: Any) -> WriteCoalescer | None:
    """Install a :class:`WriteCoalescer` on a poll-like reactor; ``None`` for others."""
    if not hasattr(reactor, "_doReadOrWrite") or not hasattr(reactor, "_POLL_OUT"):
        return None
    existing = getattr(reactor.addWriter, "__self__", None)
    if isinstance(existing, WriteCoalescer):
        return existing
    coalescer = WriteCoalescer(reactor)
    coalescer.install()
    return coalescer
