"""Reactor timers: one spelling of "cancel this call if it is still pending".

``IDelayedCall.cancel`` raises once the call has run or was cancelled, so every owner
of a timer used to check ``active()`` first.  :func:`cancel` is that check, once.
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall


def cancel(call: IDelayedCall | None) -> None:
    """Cancel *call* unless it is None, has already run or was already cancelled."""
    if call is not None and call.active():
        call.cancel()
