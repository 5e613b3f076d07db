"""Brute-force protection: the failure table and what a failure is charged to
(docs/compatibility.md#brute-force-protection).

Which address a request comes from is decided before, by :mod:`harp.client_address`; this
module only counts.  Both pieces are pure and synchronous (no reactor, no I/O, time from an
injected clock):

* :func:`ban_key` names what a failure is charged to: the IPv4 address, or the /64 network
  of an IPv6 address (one subscriber usually holds a whole /64, so counting per /128 would let
  one client rotate through 2**64 fresh addresses).
* :class:`FailureTable` counts failures per ban key in a sliding window and answers "is this
  address banned?". It is bounded in memory (docs/differences.md#6): at most ``count``
  timestamps per key and at most ``max_addresses`` keys, so a flood of failures from many
  distinct addresses cannot grow memory without limit -- and an active ban is never evicted
  to make room for a newcomer.

:meth:`FailureTable.is_banned` runs on every request, so ban keys are memoised in a small
bounded cache.
"""

from __future__ import annotations

import heapq
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache

from harp.client_address import MAX_ADDR_LEN, parse_ip

__all__ = ["IPV6_BAN_PREFIX", "FailureTable", "ban_key"]

_BAN_KEY_CACHE_SIZE = 4096

#: IPv6 failures are counted per network of this prefix length (see :func:`ban_key`).
IPV6_BAN_PREFIX = 64
_V6_BAN_MASK = ((1 << IPV6_BAN_PREFIX) - 1) << (128 - IPV6_BAN_PREFIX)


@lru_cache(maxsize=_BAN_KEY_CACHE_SIZE)
def _ban_key(text: str) -> str:
    parsed = parse_ip(text)
    if parsed is None:
        return text
    canonical, version, value = parsed
    if version == 4:
        return canonical
    network = ipaddress.IPv6Address(value & _V6_BAN_MASK)
    return f"{network}/{IPV6_BAN_PREFIX}"


def ban_key(addr: str) -> str:
    """The key failures of ``addr`` are counted under and bans are kept by.

    * IPv4 (also written IPv4-mapped, ``::ffff:1.2.3.4``): the canonical address.
    * IPv6: its /64 network, e.g. ``2001:db8:1:2::/64``. A single end site gets at least a
      /64 (RFC 6177), so an attacker on one line can pick a fresh /128 for every request;
      charging the /64 makes that rotation useless. The price: hosts sharing one /64 (a
      NAT64-less office LAN) share a ban, as IPv4 clients behind one NAT always have.
    * Anything else (a UNIX socket peer, an already computed key such as a network string
      received from another replica) is returned unchanged, so the function is idempotent.
    """
    if len(addr) > MAX_ADDR_LEN:
        return addr
    return _ban_key(addr)


class FailureTable:
    """Failure timestamps per ban key in a sliding window: the ban decision
    (docs/compatibility.md#brute-force-protection).

    A key (see :func:`ban_key`: an IPv4 address or an IPv6 /64) is banned while at least
    ``count`` of its failures are younger than ``window`` seconds (a failure at ``t`` counts
    while ``now - t < window``, as in the reference). With ``count=3`` the third failure bans
    the key, so its fourth request is dropped. A success never resets the count; a ban
    simply lapses ``window`` seconds after the ``count``-th most recent failure.

    Memory is bounded (docs/differences.md#6) without giving attackers a way to lift bans:

    * per key at most ``count`` timestamps are kept (older ones cannot matter), and expired
      ones are dropped whenever the key fails again;
    * at most ``max_addresses`` keys are tracked. When full, room is made by evicting the
      *not banned* key whose last failure is the oldest. An active ban is never evicted:
      otherwise a flood of failures from fresh addresses would push the attacker's own ban
      out. If every slot holds an active ban, a new key's failure is not stored (and
      ``on_full`` is called, once per such episode, for a log line); the bans still lapse
      on time and their slots are then reused;
    * :meth:`sweep`, called periodically, drops keys with no live failure.

    Internally, keys that are not banned live in ``_data`` (ordered by last failure, so the
    eviction candidate is the first) and banned ones in ``_banned``, with a heap of
    ``(time the entry needs another look, key)`` so lapsed bans are found in O(log n). A key
    whose ban lapsed stays in ``_banned`` until its last failure expires or it fails again.

    The clock must be non-decreasing (the default is :func:`time.monotonic`).
    """

    __slots__ = (
        "_banned", "_clock", "_count", "_data", "_due", "_full", "_max_addresses",
        "_on_full", "_window",
    )

    def __init__(
        self,
        count: int,
        window: float,
        max_addresses: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        on_full: Callable[[], object] | None = None,
    ) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count!r}")
        if not window > 0:  # also rejects NaN
            raise ValueError(f"window must be > 0, got {window!r}")
        if max_addresses < 1:
            raise ValueError(f"max_addresses must be >= 1, got {max_addresses!r}")
        self._count = count
        self._window = float(window)
        self._max_addresses = max_addresses
        self._clock = clock
        self._on_full = on_full
        self._full = False  # inside a "full of bans" episode (on_full already called)
        # key -> ascending failure timestamps (at most `count`), keys not banned, oldest
        # last failure first: record() moves a key to the end.
        self._data: OrderedDict[str, list[float]] = OrderedDict()
        # key -> timestamps, keys banned (or whose ban lapsed but whose failures live on).
        self._banned: dict[str, list[float]] = {}
        # min-heap of (when to look at the key again, key); stale entries are skipped.
        self._due: list[tuple[float, str]] = []

    @property
    def count(self) -> int:
        return self._count

    @property
    def window(self) -> float:
        return self._window

    @property
    def max_addresses(self) -> int:
        return self._max_addresses

    def _stamps(self, key: str) -> list[float] | None:
        stamps = self._data.get(key)
        return self._banned.get(key) if stamps is None else stamps

    def record(self, addr: str) -> bool:
        """Record one failure for ``addr``; return True if its ban key is now banned."""
        key = ban_key(addr)
        now = self._clock()
        self._expire(now)
        stamps = self._data.get(key)
        in_banned = False
        if stamps is None:
            stamps = self._banned.get(key)
            in_banned = stamps is not None
        if stamps is None:
            if not self._make_room():
                return False
            stamps = []
            self._data[key] = stamps
            self._full = False
        else:
            window = self._window
            if now - stamps[0] >= window:  # drop expired failures (the list is ascending)
                i = 1
                while i < len(stamps) and now - stamps[i] >= window:
                    i += 1
                del stamps[:i]
            if not in_banned:
                self._data.move_to_end(key)
        stamps.append(now)
        if len(stamps) > self._count:
            del stamps[0]
        banned = len(stamps) >= self._count
        if banned:
            if not in_banned:
                del self._data[key]
                self._banned[key] = stamps
            heapq.heappush(self._due, (stamps[0] + self._window, key))
            self._compact()
        elif in_banned:  # a lapsed ban failing again: an ordinary record once more
            del self._banned[key]
            self._data[key] = stamps
        return banned

    def _make_room(self) -> bool:
        """Free one slot if the table is full: False if only active bans are left."""
        if len(self._data) + len(self._banned) < self._max_addresses:
            return True
        if self._data:
            self._data.popitem(last=False)
            return True
        if not self._full:
            self._full = True
            if self._on_full is not None:
                self._on_full()
        return False

    def _expire(self, now: float) -> None:
        """Handle every banned key whose heap entry is due: lapsed bans and dead keys."""
        due = self._due
        window = self._window
        while due and due[0][0] <= now:
            _, key = heapq.heappop(due)
            stamps = self._banned.get(key)
            if stamps is None:
                continue
            if now - stamps[-1] >= window:  # no live failure left
                del self._banned[key]
            elif len(stamps) < self._count or now - stamps[0] >= window:
                # The ban lapsed; look again when the last failure expires.
                heapq.heappush(due, (stamps[-1] + window, key))
            # else: still banned; a newer heap entry (pushed by record) covers it

    def _compact(self) -> None:
        """Rebuild the heap when stale entries outnumber live ones (bounded memory)."""
        if len(self._due) > 2 * len(self._banned) + 64:
            window = self._window
            self._due = [(s[0] + window, k) for k, s in self._banned.items()]
            heapq.heapify(self._due)

    def is_banned(self, addr: str) -> bool:
        """True while the ban key of ``addr`` has ``count`` failures in the window. O(1)."""
        stamps = self._banned.get(ban_key(addr))
        if stamps is None or len(stamps) < self._count:
            return False
        # stamps holds at most `count` entries, so stamps[0] is the count-th most recent.
        return self._clock() - stamps[0] < self._window

    def ban_left(self, addr: str) -> float:
        """Seconds the ban of ``addr``'s key still lasts (0 when it is not banned)."""
        stamps = self._banned.get(ban_key(addr))
        if stamps is None or len(stamps) < self._count:
            return 0.0
        return max(0.0, stamps[0] + self._window - self._clock())

    def active_bans(self) -> list[tuple[str, float]]:
        """Every banned key with the seconds its ban still lasts."""
        return [(key, left) for key in list(self._banned) if (left := self.ban_left(key)) > 0]

    def failures(self, addr: str) -> int:
        """Number of failures of ``addr``'s ban key inside the window (capped at ``count``)."""
        stamps = self._stamps(ban_key(addr))
        if not stamps:
            return 0
        now = self._clock()
        window = self._window
        return sum(1 for t in stamps if now - t < window)

    def sweep(self) -> int:
        """Drop every key without a failure inside the window; return how many."""
        now = self._clock()
        before = len(self)
        self._expire(now)
        window = self._window
        data = self._data
        expired: list[str] = []
        for key, stamps in data.items():
            if now - stamps[-1] < window:
                break  # ordered by last failure: everything after this is live too
            expired.append(key)
        for key in expired:
            del data[key]
        if len(self) < self._max_addresses:
            self._full = False
        return before - len(self)

    def clear(self) -> None:
        self._data.clear()
        self._banned.clear()
        self._due.clear()
        self._full = False

    def __len__(self) -> int:
        """Number of tracked keys (including expired ones not yet swept)."""
        return len(self._data) + len(self._banned)

    def __repr__(self) -> str:
        return (
            f"FailureTable(count={self._count}, window={self._window}, "
            f"max_addresses={self._max_addresses}, len={len(self)}, "
            f"banned={len(self._banned)})"
        )
