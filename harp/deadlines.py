"""Coarse deadlines: many timers of whole seconds for the price of one reactor timer.

Why: every proxied request armed four limits of whole seconds and nearly always
cancelled them a millisecond later: ``HP_TIMEOUT_SERVER`` for the upstream's answer, the
connection's idle limit (Twisted's ``TimeoutMixin``, set and unset around each request),
the deadline for the next request head, and the idle limit of the upstream connection
going back to the pool.  With ``reactor.callLater`` each is a ``DelayedCall`` pushed on
the reactor's heap and then cancelled, together several per cent of a small request's
CPU (docs/performance.md).  A limit counted in seconds does not need microsecond
precision: :class:`Deadlines` keeps the armed deadlines in a set and one reactor timer
sweeps it every :data:`TICK` seconds, so arming is an object and a set insertion and
cancelling a set removal.  A deadline fires up to one tick late.

:func:`deadlines_for` gives every user of one clock the same :class:`Deadlines`, so one
sweeping timer serves them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final
from weakref import WeakKeyDictionary

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from harp.logs import HarpLogger

log = HarpLogger("harp.deadlines")

#: How often the armed deadlines are checked, in seconds: the most a deadline fires late.
TICK: Final = 0.25


class Deadline:
    """One armed limit; :meth:`reset` moves it, :meth:`cancel` disarms it (idempotent).

    A deadline made by :meth:`Deadlines.rearm` is *kept*: cancelling it only disarms it
    and leaves it in the owner's set until the next sweep, so the cancel-then-restart
    of every request (a connection's idle limit and head deadline, a pooled
    connection's idle limit) costs no set removal and insertion.
    """

    __slots__ = ("_first", "_kept", "_listed", "_owner", "action", "due")

    def __init__(
        self, owner: Deadlines, due: float, action: Callable[[], object], kept: bool = False,
    ) -> None:
        self._owner = owner
        self.due = due
        self._first = action
        self.action: Callable[[], object] | None = action
        self._kept = kept
        #: In the owner's set (armed, or cancelled and kept until the next sweep).
        self._listed = False

    def active(self) -> bool:
        return self.action is not None

    def restart(self, seconds: float) -> None:
        """Fire ``seconds`` from now, armed again if it had fired or was cancelled.

        For a limit re-armed on every request of a connection: the object is reused.
        """
        owner = self._owner
        self.due = owner.clock.seconds() + seconds
        if self.action is None:
            self.action = self._first
            if not self._listed:
                owner.arm(self)

    def reset(self, seconds: float) -> None:
        """Fire ``seconds`` from now instead (a moving idle limit)."""
        self.due = self._owner.clock.seconds() + seconds

    def cancel(self) -> None:
        if self.action is not None:
            self.action = None
            if not self._kept:
                self._listed = False
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
        self.arm(deadline)
        return deadline

    def rearm(
        self, deadline: Deadline | None, seconds: float, action: Callable[[], object]
    ) -> Deadline:
        """``deadline`` restarted ``seconds`` from now, or a new one running ``action``.

        For a limit a connection arms again and again (per request, per return to a
        pool): one deadline for the connection's life instead of one per use.
        """
        if deadline is None:
            deadline = Deadline(self, self.clock.seconds() + seconds, action, kept=True)
            self.arm(deadline)
            return deadline
        deadline.restart(seconds)
        return deadline

    def arm(self, deadline: Deadline) -> None:
        deadline._listed = True
        self.armed.add(deadline)
        if self._sweeper is None:
            self._sweeper = self.clock.callLater(self.tick, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.clock.seconds()
        # Due ones fire; cancelled kept ones leave the set (restarting lists them again).
        for deadline in [d for d in self.armed if d.due <= now or d.action is None]:
            action, deadline.action = deadline.action, None
            self.armed.discard(deadline)
            deadline._listed = False
            if action is None:
                continue
            try:
                action()
            except Exception:
                log.failure("a deadline's action failed")
        if self.armed and self._sweeper is None:
            self._sweeper = self.clock.callLater(self.tick, self._sweep)


_shared: WeakKeyDictionary[IReactorTime, Deadlines] = WeakKeyDictionary()


#: The clock asked for last and its deadlines: a process has one reactor, and a look-up
#: in the weak dictionary makes a weak reference per call (asked twice per request).
_last: tuple[IReactorTime, Deadlines] | None = None


def deadlines_for(clock: IReactorTime) -> Deadlines:
    """The one :class:`Deadlines` of ``clock`` (the reactor, or a test's fake clock)."""
    global _last
    last = _last
    if last is not None and last[0] is clock:
        return last[1]
    deadlines = _shared.get(clock)
    if deadlines is None:
        deadlines = _shared[clock] = Deadlines(clock)
    _last = (clock, deadlines)
    return deadlines
