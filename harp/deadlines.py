"""Coarse deadlines: many timers of whole seconds for the price of one reactor timer.

Why: every proxied request arms ``HP_TIMEOUT_SERVER`` (seconds, usually tens of them)
and nearly always cancels it a millisecond later.  With ``reactor.callLater`` that is a
``DelayedCall`` pushed on the reactor's heap and then cancelled, about 3 % of a small
request's CPU (docs/performance.md).  A limit counted in seconds does not need
microsecond precision: :class:`Deadlines` keeps the armed deadlines in a set and one
reactor timer sweeps it every :data:`TICK` seconds, so arming is an object and a set
insertion and cancelling a set removal.  A deadline fires up to one tick late.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from harp.logs import HarpLogger

log = HarpLogger("harp.deadlines")

#: How often the armed deadlines are checked, in seconds: the most a deadline fires late.
TICK: Final = 0.25


class Deadline:
    """One armed limit; :meth:`reset` moves it, :meth:`cancel` disarms it (idempotent)."""

    __slots__ = ("_owner", "action", "due")

    def __init__(self, owner: Deadlines, due: float, action: Callable[[], object]) -> None:
        self._owner = owner
        self.due = due
        self.action: Callable[[], object] | None = action

    def active(self) -> bool:
        return self.action is not None

    def reset(self, seconds: float) -> None:
        """Fire ``seconds`` from now instead (a moving idle limit)."""
        self.due = self._owner.clock.seconds() + seconds

    def cancel(self) -> None:
        if self.action is not None:
            self.action = None
            self._owner.armed.discard(self)


class Deadlines:
    """The armed deadlines of one owner, swept by one reactor timer while any is armed."""

    def __init__(self, clock: IReactorTime, tick: float = TICK) -> None:
        self.clock = clock
        self.tick = tick
        self.armed: set[Deadline] = set()
        self._sweeper: IDelayedCall | None = None

    def call_later(self, seconds: float, action: Callable[[], object]) -> Deadline:
        """Run ``action`` about ``seconds`` from now (no sooner, at most a tick later)."""
        deadline = Deadline(self, self.clock.seconds() + seconds, action)
        self.armed.add(deadline)
        if self._sweeper is None:
            self._sweeper = self.clock.callLater(self.tick, self._sweep)
        return deadline

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.clock.seconds()
        for deadline in [d for d in self.armed if d.due <= now]:
            action, deadline.action = deadline.action, None
            self.armed.discard(deadline)
            if action is None:
                continue
            try:
                action()
            except Exception:
                log.failure("a deadline's action failed")
        if self.armed and self._sweeper is None:
            self._sweeper = self.clock.callLater(self.tick, self._sweep)
