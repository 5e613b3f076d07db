"""Reactor timers: one spelling of "cancel this call if it is still pending".

``IDelayedCall.cancel`` raises once the call has run or was cancelled, so every owner
of a timer used to check ``active()`` first.  :func:`cancel` is that check, once; it
takes a coarse deadline (harp/deadlines.py) as well.
"""

from __future__ import annotations

from typing import Protocol


class Timer(Protocol):
    """A reactor ``DelayedCall`` or a coarse :class:`harp.deadlines.Deadline`."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


def cancel(call: Timer | None) -> None:
    """Cancel *call* unless it is None, has already run or was already cancelled."""
    if call is not None and call.active():
        call.cancel()
