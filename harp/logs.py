"""Logging through ``twisted.logger``, gated at ``HP_LOG_LEVEL`` before any work.

twistd owns the log observer (stdout with ``-n``), so the level cannot be set on it
from a plugin.  Instead every HaRP module logs through :class:`HarpLogger`, which drops
an event below the configured level *before* building it: a debug call on the
per-request hot path then costs one dict lookup and a comparison.

What an operator reads at ``info`` is one access line per request and the events that
need them (docs/operations.md, "Logs").  Two helpers keep it that way:

- :class:`_LevelFilter` treats Twisted's per-connection chatter ("Starting factory",
  "Stopping factory", a port opening or closing) as debug, whatever level Twisted
  gives it: every Nextcloud lookup, upstream or tunnel connection would otherwise
  add a line.
- :class:`Throttle` lets a warning about a lasting condition (a misconfigured reverse
  proxy) be said once per interval instead of once per request, at the cost of one
  comparison per request while it is quiet.
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

#: Twisted's own per-connection events, shown only at debug.
_NOISE_FORMATS: Final = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})


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
        if is_noise(event):
            return PredicateResult.maybe if _threshold[0] == 0 else PredicateResult.no
        level = event.get("log_level")
        if level is None or _PRIORITY.get(level, 4) >= _threshold[0]:
            return PredicateResult.maybe
        return PredicateResult.no


def level_filter() -> ILogFilterPredicate:
    """The predicate :func:`govern_all_loggers` installs, for observers set up elsewhere
    (a worker process builds its own)."""
    return _LevelFilter()


def is_noise(event: LogEvent) -> bool:
    """Is *event* Twisted's per-connection chatter (a debug matter, whatever its level)?

    A factory starting or stopping (each outgoing connection of an HTTP client pool
    has its own factory), and the legacy lines of a listening port opening
    (``<factory> starting on <port>``) or closing (``(TCP Port <port> Closed)``), which
    FRP tunnel ports do per registered proxy.  HaRP logs its own listeners by name.
    """
    if event.get("log_format") in _NOISE_FORMATS:
        return True
    if event.get("log_namespace") != "log_legacy":
        return False
    text = event.get("log_text")
    if not isinstance(text, str):
        return False
    return " starting on " in text or (text.startswith("(") and text.endswith(" Closed)"))


class Throttle:
    """At most one "go" per *interval* seconds: for warnings about a lasting condition.

    Pure (the caller passes the time, e.g. the request's start, which it already has).
    On the hot path the caller first compares ``now >= throttle.next_at`` inline, so a
    quiet throttle costs one comparison; only then does it check the condition and
    call :meth:`fire`.
    """

    __slots__ = ("interval", "next_at")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        #: The earliest time the next warning may be given (monotonic seconds).
        self.next_at = float("-inf")

    def fire(self, now: float) -> bool:
        """True (and quiet for *interval* from *now*) if a warning is due at *now*."""
        if now < self.next_at:
            return False
        self.next_at = now + self.interval
        return True
