"""Logging through ``twisted.logger``, gated at ``HP_LOG_LEVEL`` before any work.

twistd owns the log observer (stdout with ``-n``), so the level cannot be set on it
from a plugin.  Instead every HaRP module logs through :class:`HarpLogger`, which drops
an event below the configured level *before* building it: a debug call on the
per-request hot path then costs one dict lookup and a comparison.
"""

from __future__ import annotations

from typing import Any, Final

from twisted.logger import Logger, LogLevel

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
