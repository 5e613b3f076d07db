"""harp.logs: the rate limiter of lasting-condition warnings, and which of Twisted's own
events count as per-connection noise (shown at debug only)."""

from __future__ import annotations

import pytest
from twisted.internet.protocol import Factory
from twisted.logger import LogEvent, LogLevel
from twisted.python import log as legacy_log

from harp import logs
from harp.logs import Throttle, is_noise, level_filter


def test_throttle_fires_once_per_interval() -> None:
    throttle = Throttle(60.0)
    assert throttle.fire(1000.0)
    assert not throttle.fire(1000.0)
    assert not throttle.fire(1059.9)
    assert throttle.next_at == 1060.0
    assert throttle.fire(1060.0)
    assert not throttle.fire(1100.0)
    assert throttle.fire(5000.0)  # a long quiet spell: the next one is due at once


def test_throttle_first_warning_at_any_time() -> None:
    assert Throttle(3600.0).fire(0.0)
    assert Throttle(3600.0).fire(-5.0)  # a monotonic clock may start anywhere


def test_factory_and_port_lines_are_noise(events: list[LogEvent]) -> None:
    factory = Factory()
    factory.doStart()
    factory.doStop()
    legacy_log.msg("HarpSite starting on 8780")
    legacy_log.msg("(TCP Port 23000 Closed)")
    assert len(events) == 4
    assert all(is_noise(event) for event in events), events


def test_other_events_are_not_noise(events: list[LogEvent]) -> None:
    legacy_log.msg("Received SIGTERM, shutting down.")
    logs.HarpLogger("harp.test").warn("upstream {host} starting on fire", host="x")
    assert [is_noise(event) for event in events] == [False, False]


@pytest.mark.parametrize(("level", "shown"), [("debug", True), ("info", False)])
def test_noise_shown_only_at_debug(events: list[LogEvent], level: str, shown: bool) -> None:
    logs.set_level(level)
    try:
        factory = Factory()
        factory.doStart()
        factory.doStop()
        legacy_log.msg("Main loop terminated.")
        predicate = level_filter()
        verdicts = [predicate(event) for event in events]
    finally:
        logs.set_level("info")
    passed = [v.name == "maybe" for v in verdicts]
    assert passed == [shown, shown, True]
    assert events[0]["log_level"] == LogLevel.info  # Twisted's level; demoted by the filter
