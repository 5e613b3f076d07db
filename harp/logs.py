"""Logging through ``twisted.logger``, gated at ``HP_LOG_LEVEL`` before any work.

twistd owns the log observer (stdout with ``-n``), so the level cannot be set on it
from a plugin.  Instead every HaRP module logs through :class:`HarpLogger`, which drops
an event below the configured level *before* building it: a debug call on the
per-request hot path then costs one dict lookup and a comparison.
"""

from __future__ import annotations

from typing import Any, Final

from constantly import NamedConstant  # type: ignore[import-untyped]
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    LogEvent,
    Logger,
    LogLevel,
    PredicateResult,
    globalLogPublisher,
)
from zope.interface import implementer

_PRIORITY: Final = {
    LogLevel.debug: 0,
    LogLevel.info: 1,
    LogLevel.warn: 2,
    LogLevel.error: 3,
    LogLevel.critical: 4,
}
_BY_NAME: Final = {"debug": 0, "info": 1, "warning": 2, "error": 3}
_threshold = [_BY_NAME["info"]]


def set_level(name: str) -> None:
    """Apply ``HP_LOG_LEVEL`` (already validated by :mod:`harp.config`)."""
    _threshold[0] = _BY_NAME[name]


def enabled(level: LogLevel) -> bool:
    """True when an event at ``level`` would be emitted (guard costly arguments)."""
    return _PRIORITY[level] >= _threshold[0]


class HarpLogger(Logger):
    """A :class:`Logger` that respects ``HP_LOG_LEVEL``."""

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        if _PRIORITY[level] >= _threshold[0]:
            super().emit(level, format, **kwargs)


def govern_all_loggers(publisher: Any = None) -> None:
    """Make ``HP_LOG_LEVEL`` apply to Twisted's own loggers too.

    :class:`HarpLogger` drops HaRP's events before they are built, but Twisted's
    modules (factories starting and stopping, the HTTP client) log at info through
    plain loggers.  Under load that was one line per upstream connection.  twistd
    installs its observers on the global publisher before services start; each is
    wrapped here in a level filter (``LogPublisher`` keeps them in ``_observers``,
    the only way to reach them once logging has begun).
    """
    target = globalLogPublisher if publisher is None else publisher
    observers = getattr(target, "_observers", None)
    if observers is None:
        return
    for observer in list(observers):
        if isinstance(observer, FilteringLogObserver):
            continue
        target.removeObserver(observer)
        target.addObserver(FilteringLogObserver(observer, [_LevelFilter()]))


@implementer(ILogFilterPredicate)
class _LevelFilter:
    """HaRP's own events pass (already gated, or deliberately always shown, such as the
    plain-text FRP warning); Twisted's pass only at ``HP_LOG_LEVEL`` or above."""

    def __call__(self, event: LogEvent) -> NamedConstant:
        namespace = event.get("log_namespace") or ""
        if namespace.startswith("harp"):
            return PredicateResult.maybe
        level = event.get("log_level")
        if level is None or _PRIORITY.get(level, 4) >= _threshold[0]:
            return PredicateResult.maybe
        return PredicateResult.no
