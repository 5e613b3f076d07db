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
"""

from __future__ import annotations

import errno
import select
import sys
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.python import log as legacy_log

from harp.logs import HarpLogger

log = HarpLogger("harp.poll")


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
    return True
