"""Coarse deadlines on a fake clock: fire once, no sooner, at most a tick late.

Why: the proxy's ``HP_TIMEOUT_SERVER``, the connection's idle limit, the head deadline
and the pool's idle limit ride on :mod:`harp.deadlines` instead of one reactor timer per
request, so a 504 must still come, a cancelled limit must never fire,
an idle limit must move with ``reset``, and the sweeping timer must stop when nothing
is armed (no reactor timer left behind by an idle proxy).
"""

from __future__ import annotations

from twisted.internet.task import Clock

from harp.deadlines import TICK, Deadlines, deadlines_for


def test_fires_once_not_sooner_and_at_most_a_tick_late() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    fired: list[float] = []
    deadline = deadlines.call_later(2.0, lambda: fired.append(clock.seconds()))
    clock.advance(1.9)
    assert fired == [] and deadline.active()
    for _ in range(int(1 / TICK) + 1):
        clock.advance(TICK)
    assert len(fired) == 1 and 2.0 <= fired[0] <= 2.0 + TICK + 1e-9
    assert not deadline.active()
    assert clock.getDelayedCalls() == []  # nothing armed: the sweeper stopped


def test_cancelled_never_fires_and_cancel_is_idempotent() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    fired: list[str] = []
    deadline = deadlines.call_later(1.0, lambda: fired.append("x"))
    deadline.cancel()
    deadline.cancel()
    clock.advance(5)
    assert fired == [] and not deadlines.armed


def test_reset_moves_the_limit() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    fired: list[float] = []
    deadline = deadlines.call_later(1.0, lambda: fired.append(clock.seconds()))
    clock.advance(0.75)
    deadline.reset(1.0)  # data arrived: the idle limit starts again
    clock.advance(0.75)
    assert fired == []
    clock.advance(0.5)
    assert len(fired) == 1 and fired[0] >= 1.75


def test_a_failing_action_does_not_stop_the_others() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    fired: list[str] = []

    def broken() -> None:
        raise RuntimeError("bug")

    deadlines.call_later(0.1, broken)
    deadlines.call_later(0.1, lambda: fired.append("ok"))
    clock.advance(TICK)
    assert fired == ["ok"]


def test_restart_rearms_a_fired_or_cancelled_deadline_with_its_action() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    fired: list[float] = []
    deadline = deadlines.call_later(1.0, lambda: fired.append(clock.seconds()))
    deadline.cancel()
    deadline.restart(2.0)  # the next request of the same connection
    assert deadline.active() and deadline in deadlines.armed
    clock.advance(1.5)
    assert fired == []
    clock.advance(0.75)
    assert len(fired) == 1 and not deadline.active()
    deadline.restart(1.0)  # after it fired, too
    clock.advance(1.25)
    assert len(fired) == 2
    deadline.restart(5.0)
    deadline.restart(5.0)  # restarting an armed deadline only moves it
    assert len(deadlines.armed) == 1


def test_one_deadlines_per_clock() -> None:
    first, second = Clock(), Clock()
    assert deadlines_for(first) is deadlines_for(first)
    assert deadlines_for(first) is not deadlines_for(second)


def test_rearm_makes_one_deadline_then_restarts_it() -> None:
    clock = Clock()
    deadlines = Deadlines(clock)
    fired: list[str] = []
    first = deadlines.rearm(None, 1.0, lambda: fired.append("first"))
    first.cancel()  # a request ran: the limit was off meanwhile
    again = deadlines.rearm(first, 1.0, lambda: fired.append("other"))
    assert again is first and again.active()
    clock.advance(1.25)
    assert fired == ["first"]  # the deadline keeps the action it was made with


def test_a_kept_deadline_cancelled_and_restarted_stays_in_the_set_until_a_sweep() -> None:
    # A connection's limits are cancelled and restarted around every request: the set
    # is not touched for that, a cancelled one never fires, and the sweep drops it.
    clock = Clock()
    deadlines = Deadlines(clock)
    fired: list[str] = []
    kept = deadlines.rearm(None, 1.0, lambda: fired.append("kept"))
    one_shot = deadlines.call_later(1.0, lambda: fired.append("one-shot"))
    one_shot.cancel()
    assert one_shot not in deadlines.armed  # a one-shot leaves at once
    kept.cancel()
    assert kept in deadlines.armed and not kept.active()
    kept.restart(1.0)
    kept.cancel()
    clock.advance(TICK)
    assert kept not in deadlines.armed and fired == []  # swept, never fired
    assert clock.getDelayedCalls() == []  # and the sweeper stopped
    kept.restart(1.0)
    assert kept in deadlines.armed
    clock.advance(1.0 + TICK)
    assert fired == ["kept"] and kept not in deadlines.armed
