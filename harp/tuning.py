"""The process's reactor, tuned for proxying, in one place.

Three changes, each explained where it lives (docs/performance.md): the lean event
dispatch (:mod:`harp.poll`, which replaces the reactor's poll), the write coalescer
(:mod:`harp.writes`) and the garbage collector settled once the reactor runs
(:mod:`harp.collector`).  The primary process and every worker call :func:`tune`, so both
run the same reactor.
"""

from __future__ import annotations

from typing import Any

from harp import collector, poll, writes


def tune(reactor: Any) -> None:
    """Install the three on ``reactor`` (each leaves a reactor it does not fit alone)."""
    poll.install(reactor)
    writes.install(reactor)
    collector.install(reactor)
