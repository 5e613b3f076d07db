"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest


class FakeClock:
    """A ``time.monotonic`` stand-in for the pure tables (bans, caches, token buckets)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
