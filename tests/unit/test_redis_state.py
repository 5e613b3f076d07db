"""Unit tests for the pure parts of the Redis state: HP_REDIS_URL parsing (harp.config),
the event codec, the backoff, and how a replica's mirror applies events (no Redis, no
reactor running)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from harp.config import ConfigError, RedisURL
from harp.config.redis_url import parse_redis_url
from harp.config.values import redact_url
from harp.exapps import parse_record
from harp.state.redis import RedisState
from harp.state.redis.events import Event, decode_event, encode_delete, encode_put
from harp.state.redis.links import RECONNECT_MAX, backoff_delay

RECORD: dict[str, Any] = {
    "exapp_token": "t", "exapp_version": "1.0", "host": "127.0.0.1", "port": 23000,
    "routes": [{"url": "^/x$", "access_level": 0}],
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- HP_REDIS_URL


def test_parse_tcp_url_with_password_and_db() -> None:
    target = url("redis://:s3cr%40t@redis.internal:6380/2")
    assert (target.host, target.port, target.db, target.tls) == ("redis.internal", 6380, 2, False)
    assert target.password == "s3cr@t" and target.username is None
    assert target.describe() == "redis://redis.internal:6380/2"
    assert "s3cr" not in repr(target)


def test_parse_defaults_tls_acl_user_ipv6_and_unix() -> None:
    target = url("rediss://harp:pw@[::1]")
    assert (target.port, target.db, target.tls, target.username) == (6379, None, True, "harp")
    assert target.describe() == "rediss://[::1]:6379"
    unix = url("unix:///run/redis/redis.sock?db=3")
    assert (unix.path, unix.db, unix.host) == ("/run/redis/redis.sock", 3, None)
    assert unix.describe() == "unix:///run/redis/redis.sock/3"


@pytest.mark.parametrize("url", ["redis://:pw@host:6379/x", "redis://:pw@host:99999/0"])
def test_bad_url_is_a_config_error_without_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_redis_url(url)
    assert caught.value.var == "HP_REDIS_URL"
    assert ":pw@" not in caught.value.line() and "<redacted>" in caught.value.line()


def test_redact_url() -> None:
    assert redact_url("redis://u:p@h:1/0") == "redis://u:<redacted>@h:1/0"
    assert redact_url("redis://h:1") == "redis://h:1"


def test_parsed_url_keeps_only_the_redacted_text() -> None:
    target = url("redis://u:s3cret@h:1/0")
    assert target.redacted == "redis://u:<redacted>@h:1/0"
    assert "s3cret" not in repr(target)


@pytest.mark.parametrize("raw", ["redis://h/²", "unix:///s.sock?db=٣", "redis://h/" + "9" * 30])
def test_database_must_be_ascii_digits(raw: str) -> None:
    with pytest.raises(ConfigError):
        parse_redis_url(raw)


def url(text: str) -> RedisURL:
    parsed = parse_redis_url(text)
    assert parsed is not None
    return parsed


# --- events


def test_event_round_trip() -> None:
    put = decode_event(encode_put("o1", 7, "app", RECORD))
    assert put == Event("put", "o1", 7, "app", RECORD)
    assert decode_event(encode_delete("o1", 8, "app")) == Event("del", "o1", 8, "app")
    # As the Lua script's cjson.encode writes it.
    ban = decode_event(b'{"addr":"192.0.2.1","o":"o2","k":"ban","ttl":4000}')
    assert ban == Event("ban", "o2", addr="192.0.2.1", ttl=4000.0)


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"[]", b'{"k":"put","o":"x","app":"a"}', b'{"k":"del","o":"x"}',
    b'{"k":"ban","o":"x","addr":"1.2.3.4","ttl":0}', b'{"k":"ban","o":"x","addr":"a","ttl":true}',
    b'{"k":"zap","o":"x"}', b'{"k":"del","app":"a"}', b'{"k":"del","o":"x","app":"a","s":"1"}',
    b"\xff\xfe",
])
def test_malformed_events_are_ignored(raw: bytes) -> None:
    assert decode_event(raw) is None


def test_backoff_grows_and_is_capped() -> None:
    assert 0.4 <= backoff_delay(0) <= 0.6
    assert backoff_delay(1, lambda: 0.5) == 2 * backoff_delay(0, lambda: 0.5)
    assert backoff_delay(10_000, lambda: 1.0) == pytest.approx(RECONNECT_MAX * 1.2)


# --- a replica's mirror, not connected


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(clock: FakeClock) -> RedisState:
    return RedisState(url("redis://127.0.0.1:1/0"), 3, 10, 60, clock=clock)  # never started


def test_without_redis_it_behaves_like_memory_state(state: RedisState) -> None:
    assert [state.record_failure("::ffff:192.0.2.9") for _ in range(3)] == [False, False, True]
    assert state.is_banned("192.0.2.9")
    state.put_exapp("app", parse_record("app", dict(RECORD)))
    assert state.get_exapp("app") is not None
    assert state.delete_exapp("app") and not state.delete_exapp("app")
    state.put_exapp("kept", parse_record("kept", dict(RECORD)))
    assert state._dirty == {"app", "kept"}  # written when Redis is reachable


def test_counts_for_metrics(state: RedisState, clock: FakeClock) -> None:
    """The /metrics gauges read these through the State protocol."""
    assert (state.count_ban_keys(), state.count_exapps()) == (0, 0)
    state.record_failure("192.0.2.1")
    state.record_failure("2001:db8::1")
    state.record_failure("2001:db8::2")  # same /64
    state.put_exapp("app", parse_record("app", dict(RECORD)))
    assert (state.count_ban_keys(), state.count_exapps()) == (2, 1)
    clock.now += 11
    state.sweep()
    assert state.count_ban_keys() == 0


def test_events_from_other_replicas_update_the_mirror(
    state: RedisState, clock: FakeClock
) -> None:
    state.mark_missing("app")
    state.on_message(encode_put("other", 1, "app", RECORD))
    record = state.get_exapp("app")
    assert record is not None and record.port == 23000 and not state.is_missing("app")
    state.on_message(encode_put("other", 2, "app", RECORD))
    assert state.get_exapp("app") is record  # unchanged: not parsed again
    state.on_message(encode_delete("other", 3, "app"))
    assert state.get_exapp("app") is None
    state.on_message(json.dumps({"k": "ban", "o": "other", "addr": "::ffff:198.51.100.1",
                                 "ttl": 2000}))
    assert state.is_banned("198.51.100.1")
    clock.now += 2.5
    assert not state.is_banned("198.51.100.1")


def test_stale_echo_of_own_write_is_skipped(state: RedisState) -> None:
    state.records["app"] = parse_record("app", dict(RECORD))
    state._own_pending["app"] = 5  # our delete (seq 5) is on its way
    del state.records["app"]
    state.apply(Event("put", state.origin, 4, "app", RECORD))
    assert state.get_exapp("app") is None
    state.apply(Event("del", state.origin, 5, "app"))
    assert "app" not in state._own_pending
    state.apply(Event("put", "other", 1, "app", RECORD))  # others always apply
    assert state.get_exapp("app") is not None


def test_snapshot_replaces_mirror_but_keeps_newer_own_writes(state: RedisState) -> None:
    same = parse_record("same", dict(RECORD))
    state.records = {"same": same, "stale": same, "mine": same}
    state._own_pending["mine"] = 9
    text = json.dumps(RECORD)
    state._load({"same": text, "new": text, "bad": "{", "invalid": "{}"}, snapshot_seq=8)
    assert state.records.keys() == {"same", "new", "mine"}
    assert state.records["same"] is same


# --- bans by /64 across replicas (docs/differences.md#21)


def test_ipv6_failures_and_remote_bans_are_per_64(state: RedisState, clock: FakeClock) -> None:
    assert [state.record_failure(f"2001:db8:5:6::{i}") for i in (1, 2, 3)] == [
        False, False, True,
    ]
    assert state.is_banned("2001:db8:5:6:ffff::1")
    # A ban published by a replica (old or new: an address or the /64) covers the /64.
    for addr in ("2001:db8:7:8::1", "2001:db8:9:a::/64"):
        state.on_message(json.dumps({"k": "ban", "o": "other", "addr": addr, "ttl": 2000}))
    assert state.is_banned("2001:db8:7:8::dead")
    assert state.is_banned("2001:db8:9:a::beef")
    assert not state.is_banned("2001:db8:9:b::1")


def test_full_remote_ban_table_keeps_live_bans(clock: FakeClock) -> None:
    state = RedisState(url("redis://127.0.0.1:1/0"), 3, 10, 60, clock=clock)
    state.remote_bans = type(state.remote_bans)(2, 10, clock=clock)
    for addr in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        state.on_message(json.dumps({"k": "ban", "o": "o", "addr": addr, "ttl": 5000}))
    assert state.is_banned("192.0.2.1") and state.is_banned("192.0.2.2")
    assert not state.is_banned("192.0.2.3")  # no room: the newcomer is not kept
    clock.now += 6
    state.on_message(json.dumps({"k": "ban", "o": "o", "addr": "192.0.2.4", "ttl": 5000}))
    assert state.is_banned("192.0.2.4")


# --- a delete made while Redis was unreachable is not undone by re-seeding


def test_local_tombstone_survives_snapshot_and_foreign_puts(state: RedisState) -> None:
    state.put_exapp("app", parse_record("app", dict(RECORD)))
    assert state.delete_exapp("app")  # Redis unreachable: not written yet
    assert state._tombstones == {"app": -1} and "app" in state._dirty
    # Another replica re-seeds the app from its stale mirror, and the snapshot has it.
    state.apply(Event("put", "other", 1, "app", RECORD))
    assert state.get_exapp("app") is None
    state._load({"app": json.dumps(RECORD)}, snapshot_seq=0)
    assert state.get_exapp("app") is None
    # Our delete reaches Redis (its echo): the tombstone has done its job.
    state._tombstones["app"] = 7
    state.apply(Event("del", state.origin, 7, "app"))
    assert state._tombstones == {}
    state.apply(Event("put", "other", 2, "app", RECORD))  # a later put wins as usual
    assert state.get_exapp("app") is not None


def test_local_put_clears_the_tombstone(state: RedisState) -> None:
    state.put_exapp("app", parse_record("app", dict(RECORD)))
    state.delete_exapp("app")
    state.put_exapp("app", parse_record("app", dict(RECORD)))
    assert state._tombstones == {}
    assert state.get_exapp("app") is not None


def test_an_outage_is_logged_once_and_never_shows_the_password() -> None:
    from twisted.logger import LogEvent, formatEvent, globalLogPublisher
    from twisted.python.failure import Failure

    from harp.state.redis.outage import OutageLog

    seen: list[LogEvent] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        outage = OutageLog(url("redis://:s3cret@h:1/0"))
        for _ in range(3):
            outage.unavailable("commands", "refused")
            outage.call_failed("ping", Failure(ConnectionError("down")))
        outage.login_refused("WRONGPASS")
        outage.login_refused("WRONGPASS")
        outage.synced()
        outage.synced()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [formatEvent(e) for e in seen if e.get("log_namespace") == "harp.redis"]
    assert sum("unavailable" in line for line in lines) == 1
    assert sum("could not ping" in line for line in lines) == 1
    assert sum("WRONGPASS" in line for line in lines) == 1
    assert sum("reconnected" in line for line in lines) == 1
    assert not any("s3cret" in line for line in lines)
