"""Small bounded per-key structures for the per-request hot path.

:class:`TTLCache` is an LRU cache with per-entry expiry; :class:`TokenBuckets` a per-key
rate limit (Nextcloud user lookups per client address). Both are bounded by ``maxsize``.

The cache is used for the Nextcloud user-lookup cache (``HP_SESSION_LIFETIME``,
docs/differences.md#7). The reference keeps an unbounded dict there, so a client sending
a flood of distinct ``oc_sessionPassphrase`` cookies (or ``Authorization`` headers) grows the
agent's memory without limit. This cache is bounded by ``maxsize`` (least recently used
entries are evicted first) and expired entries are dropped lazily on access and in bulk by
:meth:`TTLCache.sweep`, which the owner calls periodically.

Pure and synchronous: no reactor, no I/O. Time comes from an injected clock (default
:func:`time.monotonic`, so wall-clock jumps never expire or resurrect entries), which also
makes the cache trivially testable.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["TTLCache", "TokenBuckets", "remember"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def remember(table: dict[K, V], key: K, value: V, limit: int) -> None:
    """Store a pure function's answer in ``table``, emptied first when it holds ``limit``.

    For the parse memos of the request path (harp/web): cheaper than an LRU's ordering,
    and a table refills from the traffic that follows."""
    if len(table) >= limit:
        table.clear()
    table[key] = value


class TTLCache(Generic[K, V]):
    """Bounded LRU mapping whose entries expire ``ttl`` seconds after they were set.

    * Every operation is O(1) except :meth:`sweep`, which is O(len).
    * An entry set at time ``t`` with lifetime ``ttl`` is returned while
      ``now - t <= ttl`` (inclusive, as the reference's session cache) and is gone after.
    * ``get`` refreshes an entry's LRU position but never its expiry: a hot entry is still
      re-validated against Nextcloud every ``ttl`` seconds.
    * When full, ``set`` of a new key evicts the least recently used entry, expired or not.
    * **``ttl == 0`` disables the cache**: ``set`` stores nothing and ``get`` always returns
      ``None`` (``HP_SESSION_LIFETIME=0``). This holds even if a per-call ``ttl`` is given.
    * ``None`` is the "miss" value of :meth:`get` and :meth:`pop`, so storing ``None`` as a
      value cannot be told apart from a miss; store a sentinel object instead.
    """

    __slots__ = ("_clock", "_data", "_maxsize", "_ttl")

    def __init__(
        self,
        maxsize: int,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize!r}")
        if not ttl >= 0:  # also rejects NaN
            raise ValueError(f"ttl must be >= 0, got {ttl!r}")
        self._maxsize = maxsize
        self._ttl = float(ttl)
        self._clock = clock
        # key -> (deadline, value); insertion order is the LRU order (oldest first).
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @property
    def ttl(self) -> float:
        return self._ttl

    @property
    def enabled(self) -> bool:
        """False when constructed with ``ttl == 0``: nothing is ever stored."""
        return self._ttl > 0

    def get(self, key: K) -> V | None:
        """Return the live value for ``key`` (marking it most recently used), else None.

        An expired entry is removed and reported as a miss.
        """
        entry = self._data.get(key)
        if entry is None:
            return None
        if self._clock() > entry[0]:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return entry[1]

    def set(self, key: K, value: V, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (default: the cache's ttl).

        A per-call ``ttl <= 0`` removes any existing entry and stores nothing. With the
        cache disabled (constructed with ``ttl == 0``) this is a no-op.
        """
        if self._ttl <= 0:
            return
        data = self._data
        if ttl is None:
            ttl = self._ttl
        elif not ttl > 0:  # zero, negative or NaN: expire now
            data.pop(key, None)
            return
        if key in data:
            data.move_to_end(key)
        elif len(data) >= self._maxsize:
            data.popitem(last=False)
        data[key] = (self._clock() + ttl, value)

    def set_if_room(self, key: K, value: V, ttl: float | None = None) -> bool:
        """Like :meth:`set`, but never evicts a live entry: return False if there is no room.

        When full, expired entries at the least recently used end are dropped first; if the
        oldest remaining entry is still live, nothing is stored. For tables whose entries must
        not be pushed out by a flood of new ones (bans learnt from other replicas).
        """
        if self._ttl <= 0:
            return False
        data = self._data
        if key not in data and len(data) >= self._maxsize:
            now = self._clock()
            while data:
                oldest = next(iter(data.values()))
                if now <= oldest[0]:
                    break
                data.popitem(last=False)
            if len(data) >= self._maxsize:
                return False
        self.set(key, value, ttl)
        return True

    def pop(self, key: K) -> V | None:
        """Remove ``key``; return its value if it was present and not expired, else None."""
        entry = self._data.pop(key, None)
        if entry is None or self._clock() > entry[0]:
            return None
        return entry[1]

    def remaining(self) -> list[tuple[K, float]]:
        """Every live key with the seconds it has left (a snapshot, oldest first)."""
        now = self._clock()
        return [(key, expiry - now) for key, (expiry, _) in self._data.items() if expiry > now]

    def clear(self) -> None:
        self._data.clear()

    def sweep(self) -> int:
        """Drop every expired entry; return how many were removed. Call periodically."""
        now = self._clock()
        data = self._data
        expired = [key for key, (deadline, _) in data.items() if now > deadline]
        for key in expired:
            del data[key]
        return len(expired)

    def __len__(self) -> int:
        """Number of stored entries, including expired ones not yet swept."""
        return len(self._data)

    def __repr__(self) -> str:
        return f"TTLCache(maxsize={self._maxsize}, ttl={self._ttl}, len={len(self._data)})"


class TokenBuckets(Generic[K]):
    """Token buckets per key (a rate limit per client address), bounded in memory.

    Each key starts with ``burst`` tokens and regains ``rate`` tokens per second up to
    ``burst``; :meth:`take` spends one token or answers False. At most ``maxsize`` keys are
    tracked; when full, the least recently used key is forgotten. Forgetting a bucket only
    gives that key a fresh burst, so the bound trades a little precision for memory, never
    correctness of the limit for keys in active use (they are the most recently used).

    Pure and synchronous, time from an injected clock (default :func:`time.monotonic`).
    """

    __slots__ = ("_burst", "_clock", "_data", "_maxsize", "_rate")

    def __init__(
        self,
        maxsize: int,
        burst: float,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize!r}")
        if not burst >= 1:  # also rejects NaN
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate!r}")
        self._maxsize = maxsize
        self._burst = float(burst)
        self._rate = float(rate)
        self._clock = clock
        # key -> (tokens at `stamp`, stamp); insertion order is the LRU order.
        self._data: OrderedDict[K, tuple[float, float]] = OrderedDict()

    def tokens(self, key: K) -> float:
        """Tokens ``key`` has now (``burst`` for an unknown key). Does not spend any."""
        entry = self._data.get(key)
        if entry is None:
            return self._burst
        return min(self._burst, entry[0] + (self._clock() - entry[1]) * self._rate)

    def take(self, key: K) -> bool:
        """Spend one token of ``key``; False (and nothing spent) if it has less than one."""
        now = self._clock()
        data = self._data
        entry = data.get(key)
        if entry is None:
            if len(data) >= self._maxsize:
                data.popitem(last=False)
            tokens = self._burst
        else:
            data.move_to_end(key)
            tokens = min(self._burst, entry[0] + (now - entry[1]) * self._rate)
        if tokens < 1:
            data[key] = (tokens, now)
            return False
        data[key] = (tokens - 1, now)
        return True

    def sweep(self) -> int:
        """Forget keys whose bucket is full again (same as unknown); return how many."""
        now = self._clock()
        full = [
            key for key, (tokens, stamp) in self._data.items()
            if tokens + (now - stamp) * self._rate >= self._burst
        ]
        for key in full:
            del self._data[key]
        return len(full)

    def __len__(self) -> int:
        return len(self._data)
