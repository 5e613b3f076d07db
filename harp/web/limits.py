"""A cap on open client connections across the ExApp frontends (``HP_MAX_CONNECTIONS``).

Like HAProxy's ``maxconn``: at the cap HaRP stops accepting, so new connections wait
in the kernel's listen backlog (and are refused by the kernel once it is full) instead
of costing a file descriptor and memory each.  Accepting resumes as soon as one
connection closes.  Connections that are already open keep being served, so a flood
of idle connections cannot take the process down; the idle ones are closed by
``HP_TIMEOUT_CLIENT``.

The count is kept by the site itself (one increment in ``buildProtocol``, one
decrement in the channel's ``connectionLost``), not by a wrapping factory, so the
per-byte path is not lengthened by a protocol wrapper.
"""

from __future__ import annotations

from typing import Protocol

from harp.logs import HarpLogger

log = HarpLogger("harp.limits")


class Pausable(Protocol):
    """A listening port that can stop and resume accepting (``tcp.Port``)."""

    def stopReading(self) -> None: ...

    def startReading(self) -> None: ...


class ConnectionLimit:
    """Counts open connections; pauses every registered listener at ``cap``."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open = 0
        self.paused = False
        self.ports: list[Pausable] = []

    def add_port(self, port: Pausable) -> None:
        self.ports.append(port)
        if self.paused:
            port.stopReading()

    def remove_port(self, port: Pausable) -> None:
        if port in self.ports:
            self.ports.remove(port)

    def try_open(self) -> bool:
        """Count a new connection; False if it is over the cap (close it at once).

        A single wake-up of a listening socket may accept several connections before
        the pause takes effect: those past the cap are refused here.
        """
        if self.open >= self.cap:
            self._pause()
            return False
        self.open += 1
        if self.open >= self.cap:
            self._pause()
        return True

    def closed(self) -> None:
        self.open -= 1
        if self.paused and self.open < self.cap:
            self.paused = False
            log.info("connections below HP_MAX_CONNECTIONS again: accepting")
            for port in self.ports:
                port.startReading()

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            log.warn(
                "HP_MAX_CONNECTIONS={cap} open connections reached: new connections wait",
                cap=self.cap,
            )
            for port in self.ports:
                port.stopReading()
