"""A response body moved by the kernel: ``splice(2)`` from the upstream's socket to the client's.

Why: a large body relayed through Python is copied twice by HaRP (``recv`` into a bytes
object, ``send`` out of it) and handed through the reactor in 256 KiB pieces; on 1 MB and
100 MB GETs HaRP spent ≈80 % of its time in those copies (docs/performance.md#spliced-bodies).
Spliced through a pipe, the pages go from one socket to the other without entering the
process, the way HAProxy's ``option splice-response`` does.

Only the plain case is spliced (the caller checks): a Content-Length body still to come
of at least :data:`SPLICE_MIN` bytes, from a plain TCP or unix socket to a plain
HTTP/1.x client socket (no TLS, no HTTP/2, no chunked re-framing), with nothing else to
write to the client until the body is complete.

How it shares the sockets with Twisted:

* the upstream's transport stops reading; a small reader (:class:`_SourceReader`) takes
  its descriptor in the reactor while bytes are moved, and gives it back at the end;
* the client's transport keeps reading (a client that hangs up is still noticed), and
  its ``doWrite`` is taken over for the splice's lifetime: Twisted's own buffered bytes
  (the response head) are written first by Twisted's ``doWrite``, then the pipe is
  emptied into the socket whenever it is writable.

The pipe is read into only when it is empty: a socket-to-pipe splice can stop short when
the pipe runs out of slots, and "would block" cannot then tell a full pipe from an idle
socket; emptying first keeps every "would block" meaningful (no busy loop).

States: ``flushing`` (Twisted's buffered bytes go first) → ``pumping`` → ``done``;
any state → ``ended`` on failure or :meth:`Splice.cancel`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from collections.abc import Callable
from typing import Any, ClassVar, Final

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from harp.logs import HarpLogger

#: Smallest body worth the pipe and the reactor changes (≈10 system calls).
SPLICE_MIN: Final = 128 * 1024

#: Pipe capacity asked for (``F_SETPIPE_SZ``; Linux's default maximum for a user).
#: A smaller pipe means more system calls per megabyte; a refusal keeps the default 64 KiB.
PIPE_SIZE: Final = 1024 * 1024

_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)

#: splice(2) exists (Linux, Python 3.10+); elsewhere bodies go through the process.
AVAILABLE: Final = sys.platform.startswith("linux") and hasattr(os, "splice")

#: What a kernel (or a sandbox such as gVisor) answers when it cannot splice these
#: descriptors: the body then goes through the process, and no splice is tried again.
_UNSUPPORTED: Final = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})


def _no_splice(*args: object, **kwargs: object) -> int:
    raise OSError(errno.ENOSYS, "splice(2) is not available")


#: ``os.splice``; where it does not exist, a stand-in that refuses like such a kernel.
_splice: Callable[..., int] = getattr(os, "splice", _no_splice)

log = HarpLogger("harp.splice")


class _Support:
    """Whether splicing still works in this process (cleared on the first refusal)."""

    usable: ClassVar[bool] = AVAILABLE


def socket_fd(transport: Any) -> int | None:
    """The descriptor of a plain socket transport, or None (TLS, HTTP/2, tunnels...).

    Twisted's ``tcp.Connection`` is the socket itself (unix sockets too); a TLS
    connection's transport is the TLS protocol wrapping one, and an FRP tunnel's is a
    yamux stream: neither can be spliced.
    """
    if not _Support.usable or not isinstance(transport, tcp.Connection):
        return None
    if transport.disconnecting or transport.disconnected or getattr(transport, "TLS", False):
        return None  # closing, or TLS started on the socket itself (Twisted's startTLS)
    fileno: int = transport.fileno()
    return fileno if fileno >= 0 else None


@implementer(IReadDescriptor)
class _SourceReader:
    """Holds the upstream's descriptor in the reactor while :class:`Splice` reads it."""

    def __init__(self, splice: Splice, fd: int) -> None:
        self.splice = splice
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self.splice._pump()

    def connectionLost(self, reason: Failure) -> None:
        # Only if the reactor gives up on the descriptor (an epoll error): end the splice.
        self.splice._fail("upstream", "upstream connection failed")

    def logPrefix(self) -> str:
        return "splice"


class Splice:
    """Move ``length`` body bytes from ``source`` (upstream) to ``sink`` (client).

    ``progress(n)`` is called after bytes reached the client (for the exchange's timers
    and the access line's byte count), ``done()`` once all ``length`` bytes did, and
    ``failed(side, reason)`` once if either socket fails first (``side`` is
    ``"upstream"`` or ``"client"``), and ``fallback(pending, remaining)`` once if the
    kernel refuses to splice these sockets: ``pending`` are bytes already taken from
    the upstream but not yet sent, ``remaining`` the bytes still to read.  After any of
    the last three, both transports are Twisted's again; the caller decides what to do
    with the connections.
    """

    def __init__(
        self, reactor: IReactorFDSet, source: tcp.Connection, sink: tcp.Connection,
        length: int, progress: Callable[[int], None], done: Callable[[], None],
        failed: Callable[[str, str], None], fallback: Callable[[bytes, int], None],
    ) -> None:
        self.reactor = reactor
        self.source = source
        self.sink = sink
        self.remaining = length
        self.progress = progress
        self.done = done
        self.failed = failed
        self.fallback = fallback
        self.state = "new"
        self.in_pipe = 0
        self.pipe_r = -1
        self.pipe_w = -1
        self.reader = _SourceReader(self, source.fileno())
        self.reading = False
        self.writing = False
        self.sink_fd = sink.fileno()

    def start(self) -> None:
        """Take the two sockets over; the client's buffered bytes are written first."""
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.pipe_w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # over the user's pipe allowance: the default size still works
        self.source.stopReading()
        sink: Any = self.sink
        sink.doWrite = self._sink_writable  # the reactor calls this one until the end
        if sink.dataBuffer or sink._tempDataLen:
            self.state = "flushing"
            self._want_write(True)  # Twisted is writing already; made sure
        else:
            self.state = "pumping"
            self._pump()

    def cancel(self) -> None:
        """Stop now (the exchange ended otherwise): give the sockets back, nothing called."""
        if self.state in ("flushing", "pumping", "new"):
            self._release()

    # --- reactor events

    def _sink_writable(self) -> Any:
        if self.state == "flushing":
            sink: Any = self.sink
            why = type(sink).doWrite(sink)  # Twisted's own bytes (the head) first
            if why is not None:
                return why  # the reactor ends the client connection as it would have
            if sink.dataBuffer or sink._tempDataLen:
                return None
            self.state = "pumping"
            self.writing = False  # Twisted's doWrite stopped writing when it drained
        self._pump()
        return None

    def _pump(self) -> None:
        if self.state != "pumping":
            return
        moved = 0
        while True:
            if self.in_pipe:
                n = self._move(self.pipe_r, self.sink_fd, self.in_pipe, "client", moved)
                if n is None:
                    return
                if n < 0:
                    self._want_read(False)
                    self._want_write(True)
                    break
                self.in_pipe -= n
                moved += n
                continue
            if not self.remaining:
                self._report(moved)
                self._release()
                self.state = "done"
                self.done()
                return
            n = self._move(
                self.source.fileno(), self.pipe_w, min(self.remaining, PIPE_SIZE), "upstream",
                moved,
            )
            if n is None:
                return
            if n < 0:
                self._want_write(False)
                self._want_read(True)
                break
            if n == 0:
                self._report(moved)
                self._fail("upstream", "upstream closed the connection mid-body")
                return
            self.remaining -= n
            self.in_pipe += n
        self._report(moved)

    def _move(self, src: int, dst: int, count: int, side: str, moved: int) -> int | None:
        """One splice: the bytes moved, -1 if it would block, None if the splice ended
        (a failure or the kernel's refusal, reported after the ``moved`` bytes)."""
        try:
            n: int = _splice(src, dst, count, flags=_FLAGS)
        except BlockingIOError:
            return -1
        except OSError as exc:
            self._report(moved)
            if exc.errno in _UNSUPPORTED:
                self._give_back(exc)
            else:
                self._fail(side, f"{side} connection failed: {_name(exc)}")
            return None
        return n

    def _report(self, moved: int) -> None:
        if moved:
            self.progress(moved)

    # --- registration

    def _want_read(self, want: bool) -> None:
        if want != self.reading:
            self.reading = want
            if want:
                self.reactor.addReader(self.reader)
            else:
                self.reactor.removeReader(self.reader)

    def _want_write(self, want: bool) -> None:
        if want != self.writing:
            self.writing = want
            if want:
                self.sink.startWriting()
            else:
                self.sink.stopWriting()

    def _fail(self, side: str, reason: str) -> None:
        if self.state in ("done", "ended"):
            return
        self._release()
        self.failed(side, reason)

    def _give_back(self, exc: OSError) -> None:
        """The kernel refuses: hand the body back to the process, and never splice again."""
        if _Support.usable:
            _Support.usable = False
            log.warn(
                "splice(2) refused ({error}): large bodies are relayed through HaRP",
                error=_name(exc),
            )
        pending = []
        while self.in_pipe:
            data = os.read(self.pipe_r, self.in_pipe)
            self.in_pipe -= len(data)
            pending.append(data)
        self._release()
        self.fallback(b"".join(pending), self.remaining)

    def _release(self) -> None:
        """Give both sockets back to Twisted and close the pipe."""
        self.state = "ended"
        self._want_read(False)
        if self.writing:
            self.writing = False
            if not self.sink.disconnected:
                self.sink.stopWriting()
        sink: Any = self.sink
        sink.__dict__.pop("doWrite", None)
        for fd in (self.pipe_r, self.pipe_w):
            if fd >= 0:
                os.close(fd)
        self.pipe_r = self.pipe_w = -1
        if not self.source.disconnected:
            self.source.startReading()


def _name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc))
