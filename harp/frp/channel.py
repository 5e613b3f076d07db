"""Transitional alias: the FRP stream is :class:`harp.frp.stream.Stream`.

Only :mod:`harp.frp.tunnels` still imports the old name (it belongs to the relay
refactor, which switches it to ``from harp.frp.stream import Stream``); delete this
module once nothing imports it.
"""

from __future__ import annotations

from harp.frp.stream import Stream as Channel

__all__ = ["Channel"]
