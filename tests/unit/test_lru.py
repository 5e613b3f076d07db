"""Unit tests for harp.lru.TTLCache."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.lru import TokenBuckets, TTLCache
from tests.unit.conftest import FakeClock


def test_get_missing_is_none(clock: FakeClock) -> None:
    cache: TTLCache[str, int] = TTLCache(4, 3.0, clock=clock)
    assert cache.get("nope") is None
    assert len(cache) == 0


def test_set_get_roundtrip(clock: FakeClock) -> None:
    cache: TTLCache[str, int] = TTLCache(4, 3.0, clock=clock)
    cache.set("a", 1)
    assert cache.get("a") == 1
    assert len(cache) == 1


def test_expiry_is_inclusive_of_ttl(clock: FakeClock) -> None:
    # Reference: valid while now - stored <= HP_SESSION_LIFETIME.
    cache: TTLCache[str, int] = TTLCache(4, 3.0, clock=clock)
    cache.set("a", 1)
    clock.advance(3.0)
    assert cache.get("a") == 1
    clock.advance(0.001)
    assert cache.get("a") is None
    assert len(cache) == 0  # expired entry evicted on access


def test_get_does_not_extend_lifetime(clock: FakeClock) -> None:
    cache: TTLCache[str, int] = TTLCache(4, 3.0, clock=clock)
    cache.set("a", 1)
    for _ in range(3):
        clock.advance(1.0)
        assert cache.get("a") == 1
    clock.advance(0.5)
    assert cache.get("a") is None


def test_set_again_refreshes_value_and_lifetime(clock: FakeClock) -> None:
    cache: TTLCache[str, int] = TTLCache(4, 3.0, clock=clock)
    cache.set("a", 1)
    clock.advance(2.0)
    cache.set("a", 2)
    clock.advance(2.0)
    assert cache.get("a") == 2
    assert len(cache) == 1


def test_per_entry_ttl_override(clock: FakeClock) -> None:
    cache: TTLCache[str, int] = TTLCache(4, 3.0, clock=clock)
    cache.set("short", 1, ttl=1.0)
    cache.set("long", 2, ttl=10.0)
    cache.set("default", 3)
    clock.advance(2.0)
    assert cache.get("short") is None
    assert cache.get("default") == 3
    clock.advance(2.0)
    assert cache.get("default") is None
    assert cache.get("long") == 2


@pytest.mark.parametrize("ttl", [0.0, -1.0, float("nan")])
def test_per_entry_nonpositive_ttl_removes(clock: FakeClock, ttl: float) -> None:
    cache: TTLCache[str, int] = TTLCache(4, 3.0, clock=clock)
    cache.set("a", 1)
    cache.set("a", 2, ttl=ttl)
    assert cache.get("a") is None
    assert len(cache) == 0


def test_lru_eviction_order(clock: FakeClock) -> None:
    cache: TTLCache[str, int] = TTLCache(3, 3.0, clock=clock)
    cache.set("a", 1)
    cache.set("b", 2)
    cache.set("c", 3)
    assert cache.get("a") == 1  # a becomes most recently used; b is now the LRU
    cache.set("d", 4)
    assert len(cache) == 3
    assert cache.get("b") is None
    assert cache.get("a") == 1
    assert cache.get("c") == 3
    assert cache.get("d") == 4


def test_set_existing_key_does_not_evict(clock: FakeClock) -> None:
    cache: TTLCache[str, int] = TTLCache(2, 3.0, clock=clock)
    cache.set("a", 1)
    cache.set("b", 2)
    cache.set("a", 10)  # update, and a becomes MRU
    assert len(cache) == 2
    cache.set("c", 3)  # evicts b
    assert cache.get("b") is None
    assert cache.get("a") == 10
    assert cache.get("c") == 3


def test_bounded_under_flood_of_distinct_keys(clock: FakeClock) -> None:
    cache: TTLCache[str, int] = TTLCache(100, 3.0, clock=clock)
    for i in range(10_000):
        cache.set(f"cookie-{i}", i)
    assert len(cache) == 100
    assert cache.get("cookie-9999") == 9999
    assert cache.get("cookie-9899") is None


def test_ttl_zero_disables_cache(clock: FakeClock) -> None:
    cache: TTLCache[str, int] = TTLCache(4, 0, clock=clock)
    assert not cache.enabled
    cache.set("a", 1)
    cache.set("b", 2, ttl=5.0)  # a per-call ttl does not re-enable a disabled cache
    assert cache.get("a") is None
    assert cache.get("b") is None
    assert len(cache) == 0
    assert cache.sweep() == 0


def test_pop(clock: FakeClock) -> None:
    cache: TTLCache[str, int] = TTLCache(4, 3.0, clock=clock)
    cache.set("a", 1)
    cache.set("b", 2)
    assert cache.pop("a") == 1
    assert cache.pop("a") is None
    assert cache.get("a") is None
    clock.advance(5.0)
    assert cache.pop("b") is None  # expired: removed, but reported as a miss
    assert len(cache) == 0
    assert cache.pop("never") is None


def test_sweep_removes_only_expired(clock: FakeClock) -> None:
    cache: TTLCache[str, int] = TTLCache(10, 3.0, clock=clock)
    cache.set("old1", 1)
    cache.set("old2", 2)
    cache.set("long", 3, ttl=100.0)
    clock.advance(2.0)
    cache.set("new", 4)
    clock.advance(2.0)
    assert cache.sweep() == 2
    assert len(cache) == 2
    assert cache.get("long") == 3
    assert cache.get("new") == 4
    assert cache.sweep() == 0


def test_clear(clock: FakeClock) -> None:
    cache: TTLCache[str, int] = TTLCache(4, 3.0, clock=clock)
    cache.set("a", 1)
    cache.clear()
    assert len(cache) == 0
    assert cache.get("a") is None


def test_default_clock_is_monotonic() -> None:
    cache: TTLCache[str, int] = TTLCache(4, 60.0)
    cache.set("a", 1)
    assert cache.get("a") == 1


@pytest.mark.parametrize(("maxsize", "ttl"), [(0, 1.0), (-1, 1.0), (1, -0.5), (1, float("nan"))])
def test_invalid_construction(maxsize: int, ttl: float) -> None:
    with pytest.raises(ValueError):
        TTLCache(maxsize, ttl)


def test_properties_and_repr() -> None:
    cache: TTLCache[str, int] = TTLCache(7, 2.5)
    assert cache.maxsize == 7
    assert cache.ttl == 2.5
    assert cache.enabled
    assert "maxsize=7" in repr(cache)


# A naive model: a list of (key, value, deadline) in LRU order, scanned linearly.
_ops = st.lists(
    st.tuples(
        st.sampled_from(["get", "set", "set_ttl", "pop", "sweep", "tick"]),
        st.integers(0, 7),
        st.floats(0.0, 4.0, allow_nan=False),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(maxsize=st.integers(1, 5), ttl=st.sampled_from([0.0, 1.0, 2.5]), ops=_ops)
def test_matches_naive_model(maxsize: int, ttl: float, ops: list[tuple[str, int, float]]) -> None:
    clock = FakeClock(0.0)
    cache: TTLCache[int, int] = TTLCache(maxsize, ttl, clock=clock)
    model: list[tuple[int, int, float]] = []  # LRU first
    counter = 0

    def find(key: int) -> int:
        for i, (k, _, _) in enumerate(model):
            if k == key:
                return i
        return -1

    for op, key, x in ops:
        now = clock.now
        if op == "tick":
            clock.advance(x)
        elif op in ("set", "set_ttl"):
            counter += 1
            entry_ttl = x if op == "set_ttl" else None
            cache.set(key, counter, ttl=entry_ttl)
            eff = ttl if entry_ttl is None else entry_ttl
            i = find(key)
            if ttl > 0:
                if i >= 0:
                    del model[i]
                if eff > 0:
                    if i < 0 and len(model) >= maxsize:
                        del model[0]
                    model.append((key, counter, now + eff))
        elif op == "get":
            i = find(key)
            expected = None
            if i >= 0:
                k, v, deadline = model.pop(i)
                if now <= deadline:
                    model.append((k, v, deadline))
                    expected = v
            assert cache.get(key) == expected
        elif op == "pop":
            i = find(key)
            expected = None
            if i >= 0:
                _, v, deadline = model.pop(i)
                expected = v if now <= deadline else None
            assert cache.pop(key) == expected
        else:
            live = [e for e in model if now <= e[2]]
            assert cache.sweep() == len(model) - len(live)
            model = live
        assert len(cache) == len(model) <= maxsize


# --- set_if_room (bans learnt from other replicas)


def test_set_if_room_never_evicts_a_live_entry(clock: FakeClock) -> None:
    cache: TTLCache[str, int] = TTLCache(2, 10.0, clock=clock)
    assert cache.set_if_room("a", 1) and cache.set_if_room("b", 2, ttl=1)
    assert not cache.set_if_room("c", 3)
    assert cache.get("a") == 1 and cache.get("b") == 2 and cache.get("c") is None
    assert cache.set_if_room("a", 9)  # an existing key is always updated
    clock.advance(2)  # "b" expired; it is now the LRU entry
    assert cache.set_if_room("c", 3)
    assert cache.get("c") == 3 and cache.get("a") == 9 and len(cache) == 2


def test_set_if_room_disabled_cache(clock: FakeClock) -> None:
    cache: TTLCache[str, int] = TTLCache(2, 0, clock=clock)
    assert not cache.set_if_room("a", 1)


# --- TokenBuckets (Nextcloud user lookups per client)


def test_token_bucket_burst_then_refill(clock: FakeClock) -> None:
    buckets: TokenBuckets[str] = TokenBuckets(100, burst=20, rate=5.0, clock=clock)
    assert all(buckets.take("c") for _ in range(20))
    assert not buckets.take("c")
    assert buckets.take("other")  # per key
    clock.advance(0.2)  # one token back
    assert buckets.take("c") and not buckets.take("c")
    clock.advance(100)
    assert buckets.tokens("c") == 20  # capped at the burst
    assert buckets.sweep() == 2 and len(buckets) == 0


def test_token_bucket_refusals_do_not_spend(clock: FakeClock) -> None:
    buckets: TokenBuckets[str] = TokenBuckets(10, burst=1, rate=1.0, clock=clock)
    assert buckets.take("c")
    for _ in range(10):
        clock.advance(0.05)
        assert not buckets.take("c")
    clock.advance(0.51)  # over 1 s since the token was spent, despite the refusals
    assert buckets.take("c")


def test_token_buckets_bounded(clock: FakeClock) -> None:
    buckets: TokenBuckets[int] = TokenBuckets(50, burst=2, rate=1.0, clock=clock)
    for i in range(10_000):
        buckets.take(i)
    assert len(buckets) == 50


@pytest.mark.parametrize(("maxsize", "burst", "rate"), [(0, 1, 1), (1, 0.5, 1), (1, 1, 0),
                                                        (1, float("nan"), 1)])
def test_token_buckets_invalid(maxsize: int, burst: float, rate: float) -> None:
    with pytest.raises(ValueError):
        TokenBuckets(maxsize, burst, rate)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.floats(0, 1, allow_nan=False), max_size=200))
def test_token_bucket_never_exceeds_rate(steps: list[float]) -> None:
    clock = FakeClock(0.0)
    buckets: TokenBuckets[str] = TokenBuckets(4, burst=3, rate=2.0, clock=clock)
    granted = 0
    for dt in steps:
        clock.advance(dt)
        granted += buckets.take("k")
    assert granted <= 3 + 2.0 * clock.now + 1e-9


def test_remember_empties_a_full_table_first() -> None:
    from harp.lru import remember

    table: dict[int, str] = {}
    for n in range(5):
        remember(table, n, str(n), 3)
    assert table == {3: "3", 4: "4"}  # emptied when the fourth came, then one more
