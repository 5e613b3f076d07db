"""The collector's settings once the reactor runs (harp/collector.py).

What matters is observable in the process: the threshold is raised, start-up's objects
are frozen, and cyclic garbage made afterwards is still collected.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from harp import collector


@pytest.fixture
def restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Node:
    other: object = None


class _Reactor:
    """Records what should run once the reactor does."""

    def __init__(self) -> None:
        self.when_running: list[object] = []

    def callWhenRunning(self, call: object) -> None:
        self.when_running.append(call)


def test_install_waits_for_the_reactor_to_run(restored: None) -> None:
    reactor = _Reactor()
    before = gc.get_threshold()
    collector.install(reactor)
    assert gc.get_threshold() == before  # nothing yet: start-up is not done
    assert reactor.when_running == [collector.settle]


def test_settle_freezes_start_up_and_raises_the_young_threshold(restored: None) -> None:
    _, middle, old = gc.get_threshold()
    collector.settle()
    assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, middle, old)
    assert gc.get_freeze_count() > 0


def test_cycles_made_after_settling_are_still_collected(restored: None) -> None:
    collector.settle()
    first, second = _Node(), _Node()
    first.other, second.other = second, first
    gone = weakref.ref(first)
    del first, second
    gc.collect()
    assert gone() is None
