"""A leaner event dispatch for Twisted's epoll reactor.

Why: for every ready descriptor, ``EPollReactor.doPoll`` goes through
``twisted.python.log.callWithLogger``, which pushes a logging context (the legacy log
system's ``logPrefix``) with ``context.call`` and catches whatever escapes.  A proxy gets
two or three ready descriptors per small request (the client, the upstream, the next
request), and that wrapping was ≈5 % of a small request's CPU (docs/performance.md).  The
dispatch itself, ``_doReadOrWrite``, already catches and logs every exception of
``doRead``/``doWrite`` and disconnects the descriptor, so the wrapper only added the log
prefix, which HaRP's log lines do not use.

:func:`install` replaces the reactor's ``doIteration`` with the same poll and a plain call
per event; what the reactor does with an event (reads, writes, disconnections, errors)
is unchanged.  The most common event, "readable" alone, goes straight to ``doRead`` with
the dispatch's own handling of what it returns or raises (its checks for hang-ups,
errors, writability and a closed descriptor's ``fileno()`` of -1 cannot apply to it, and
a ``recv`` on a closed socket fails into the same disconnection).  Other reactors are
left alone.

For a plain TCP connection (one whose class reads with Twisted's own
``tcp.Connection.doRead``, or a unix socket connection whose protocol takes no file
descriptors), that read is done here, in the same steps: ``recv`` of up to
``bufferSize`` bytes, "would block" ignored, any other socket error is a lost
connection, no bytes is the peer's close, anything else goes to the protocol's
``dataReceived``.  The module is compiled (harp/compiled.py), so the two interpreted
calls Twisted makes per read (``doRead`` and ``_dataReceived``, ≈ 3 % of a small
request) become C.  Any other readable descriptor (listening ports, unix sockets that
pass descriptors, pipes) still gets its own ``doRead``.
"""

from __future__ import annotations

import errno
import select
import sys
from typing import Any, Final

from twisted.internet import main, tcp, unix
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.python import log as legacy_log

from harp.logs import HarpLogger

log = HarpLogger("harp.poll")

#: Twisted's own read of a TCP connection, which :func:`read_plain` does in its place.
_TCP_READ: Final = tcp.Connection.doRead
_TCP_RECEIVED: Final = tcp.Connection._dataReceived
#: A unix socket connection's read: ``recvmsg``, for descriptors passed along the bytes.
_UNIX_READ: Final = unix.Server.doRead


def reads_plain(selectable: Any) -> bool:
    """True if *selectable* reads exactly as ``tcp.Connection.doRead`` (see the module).

    Asked of its class each time (a class may be changed at run time), and an instance
    may have been given a reader of its own.
    """
    kind = type(selectable)
    read = getattr(kind, "doRead", None)
    if read is not _TCP_READ and (
        # A unix socket (the local Docker engine's) reads the same way when its protocol
        # takes no descriptors: Twisted would close any that came, HaRP lets the kernel.
        read is not _UNIX_READ or IFileDescriptorReceiver.providedBy(selectable.protocol)
    ):
        return False
    return (
        getattr(kind, "_dataReceived", None) is _TCP_RECEIVED
        and "doRead" not in selectable.__dict__
    )


def read_plain(connection: Any) -> Any:
    """``tcp.Connection.doRead`` with its ``_dataReceived``, as one compiled call."""
    try:
        data = connection.socket.recv(connection.bufferSize)
    except OSError as err:
        if err.args[0] == errno.EWOULDBLOCK:
            return None
        return main.CONNECTION_LOST
    if not data:
        return main.CONNECTION_DONE
    connection.protocol.dataReceived(data)
    return None


def install(reactor: Any) -> bool:
    """Use the lean dispatch on an epoll reactor; False (nothing done) for others."""
    if not isinstance(reactor, EPollReactor):
        return False
    poller: Any = reactor._poller  # type: ignore[attr-defined]
    selectables: dict[int, Any] = reactor._selectables  # type: ignore[attr-defined]
    dispatch = reactor._doReadOrWrite
    disconnect = reactor._disconnectSelectable
    readable_only = select.EPOLLIN

    def do_poll(timeout: float | None) -> None:
        try:
            # As Twisted: at most one event per tracked descriptor, -1 waits forever.
            events = poller.poll(-1 if timeout is None else timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event == readable_only:
                # The common event, readable and nothing else: what the dispatch would
                # do for it, without its checks for hang-ups, errors and writability.
                try:
                    if reads_plain(selectable):
                        why = read_plain(selectable)
                    else:
                        why = selectable.doRead()
                except BaseException:
                    why = sys.exc_info()[1]
                    legacy_log.err()
                if why:
                    try:
                        disconnect(selectable, why, True)
                    except Exception:
                        log.failure("error while handling a ready descriptor")
                continue
            try:
                dispatch(selectable, fd, event)
            except Exception:
                # Only a failing connectionLost gets here (the dispatch catches the rest);
                # the other ready descriptors of this poll are still served.
                log.failure("error while handling a ready descriptor")

    reactor.doIteration = do_poll  # type: ignore[method-assign]

    # twisted.web resumes reading the client after every response (``requestDone`` →
    # ``resumeProducing`` → ``addReader``), almost always of a descriptor epoll already
    # watches for reading; the reactor's ``_add`` then finds it in its read set and does
    # nothing.  The same test, compiled, before the reactor's own call.
    reads: set[int] = reactor._reads  # type: ignore[attr-defined]
    add_reader = reactor.addReader

    def add_reader_once(reader: Any) -> None:
        if reader.fileno() not in reads:
            add_reader(reader)

    reactor.addReader = add_reader_once  # type: ignore[method-assign]
    return True
