"""Who a request is charged to, and what a client can make HaRP ask Nextcloud.

Raw-socket checks against the real ``twistd harp`` with the fake Nextcloud and a
:class:`~tests.hardening.helpers.RecordingUpstream` as the ExApp (routes ``/public``
PUBLIC, ``/user`` USER):

* docs/differences.md#11 -- behind a trusted proxy that *appends* to X-Forwarded-For (nginx
  ``$proxy_add_x_forwarded_for``), the left part is the client's own writing: it must not
  let the client dodge its ban or choose whom to ban;
* docs/differences.md#21 -- an IPv6 client rotating through its /64 is banned as one;
* docs/differences.md#17 -- fresh random cookies cannot make one client cost unlimited user lookups;
* docs/differences.md#17 -- a user-info redirect (Nextcloud's answer to a made-up session cookie)
  makes the request anonymous instead of a 401 after a redirect loop.

HaRP only ever sees loopback peers here, so the "trusted proxy" is ``127.0.0.1``
(``HP_TRUSTED_PROXY_IPS=127.0.0.1``) and the public client addresses, IPv4 and IPv6, travel
in X-Forwarded-For; direct clients connect from their own 127.0.30.x address.  Every case
uses addresses of its own, so the bans one causes (HP_BLACKLIST_COUNT=3) never hit another.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import HarpProcess, base_env
from tests.hardening.helpers import RecordingUpstream, Sources, build_request, exchange
from tests.peers.fake_nextcloud import FakeNextcloud

pytestmark = pytest.mark.interop

APP = "clients-app"
PROXY = "127.0.0.1"
SOURCES = Sources(30)


def record_for(port: int) -> dict[str, Any]:
    return {"exapp_token": "tok", "exapp_version": "1.0.0", "host": "127.0.0.1", "port": port,
            "routes": [{"url": "^/public$", "access_level": 0},
                       {"url": "^/user$", "access_level": 1}]}


@pytest.fixture(scope="module")
def nextcloud(key: str, upstream: RecordingUpstream) -> Iterator[FakeNextcloud]:
    with FakeNextcloud(key) as fake:
        fake.apps[APP] = record_for(upstream.port)
        fake.add_session("sess-user", "usr", 1)
        yield fake


@pytest.fixture(scope="module")
def harp(tmp_path_factory: pytest.TempPathFactory, key: str,
         nextcloud: FakeNextcloud) -> Iterator[HarpProcess]:
    tmp = tmp_path_factory.mktemp("harp")
    env = base_env(tmp, HP_SHARED_KEY=key, NC_INSTANCE_URL=nextcloud.url,
                   HP_FRP_DISABLE_TLS="true", HP_TRUSTED_PROXY_IPS=PROXY,
                   HP_BLACKLIST_COUNT="3", HP_BLACKLIST_WINDOW="600")
    proc = HarpProcess(env, tmp).start()
    yield proc
    proc.stop()


def get(harp: HarpProcess, path: str, headers: list[tuple[str, str]] | None = None,
        source: str = PROXY) -> str:
    """One request on a fresh connection: its status code, or ``drop``."""
    raw = build_request("GET", f"/exapps/{APP}{path}", headers or [])
    return exchange(harp.http_port, raw, source=source, timeout=10).first


def via_proxy(*chain: str) -> list[tuple[str, str]]:
    """X-Forwarded-For as an appending proxy forwards it: ``<client's part>, <peer>``."""
    return [("X-Forwarded-For", ", ".join(chain))]


# --- X-Forwarded-For is walked from the right


def test_hole5_spoofed_left_part_cannot_dodge_a_ban(harp: HarpProcess,
                                                    record_case: Any) -> None:
    attacker = "203.0.113.5"
    seen = []
    for i in range(3):  # a new made-up address in front each time
        seen.append(get(harp, "/user", via_proxy(f"198.51.100.{i + 1}", attacker)))
    after = get(harp, "/public", via_proxy("198.51.100.99", attacker))
    record_case(case="hole5/xff-rotate-left-part",
                input=f"3x /user XFF '198.51.100.N, {attacker}' then /public",
                expected="403,403,403 then drop", observed=",".join(seen) + " then " + after)
    assert seen == ["403"] * 3
    assert after == "drop"  # the appended (real) address is the one banned
    assert get(harp, "/public", via_proxy("198.51.100.1")) == "200"  # nobody else is


def test_hole5_spoofed_left_part_cannot_ban_a_victim(harp: HarpProcess,
                                                     record_case: Any) -> None:
    victim, attacker = "192.0.2.77", "203.0.113.6"
    for _ in range(3):
        assert get(harp, "/user", via_proxy(victim, attacker)) == "403"
    victim_status = get(harp, "/public", via_proxy(victim))
    # A second header line written by the client, before the proxy's line, is no better.
    two_lines = [("X-Forwarded-For", victim), ("X-Forwarded-For", attacker)]
    attacker_status = get(harp, "/public", two_lines)
    record_case(case="hole5/xff-frame-a-victim",
                input=f"3x /user XFF '{victim}, {attacker}'",
                expected="victim 200, attacker drop",
                observed=f"victim {victim_status}, attacker {attacker_status}")
    assert victim_status == "200"
    assert attacker_status == "drop"


def test_hole5_direct_client_headers_are_ignored(harp: HarpProcess, record_case: Any) -> None:
    src = SOURCES.new()  # not a trusted proxy: its X-Forwarded-For means nothing
    for i in range(3):
        assert get(harp, "/user", via_proxy(f"198.51.100.{50 + i}"), source=src) == "403"
    observed = get(harp, "/public", source=src)
    record_case(case="hole5/untrusted-peer-xff", input="3x /user from an untrusted peer",
                expected="drop", observed=observed)
    assert observed == "drop"


# --- IPv6 failures count per /64


def test_hole12_ipv6_client_rotating_its_64_is_banned(harp: HarpProcess,
                                                      record_case: Any) -> None:
    prefix = "2001:db8:4:12"
    seen = [get(harp, "/user", via_proxy(f"{prefix}::{secrets.token_hex(2)}:{i:x}"))
            for i in range(3)]
    fresh = f"{prefix}:{secrets.token_hex(2)}::1"  # yet another address of the /64
    after = get(harp, "/public", via_proxy(fresh))
    neighbour = get(harp, "/public", via_proxy("2001:db8:4:13::1"))
    record_case(case="hole12/ipv6-64-rotation",
                input=f"3x /user XFF {prefix}::<random>, then /public from {fresh}",
                expected="403,403,403; drop; other /64 200",
                observed=f"{','.join(seen)}; {after}; other /64 {neighbour}")
    assert seen == ["403"] * 3
    assert after == "drop"
    assert neighbour == "200"


# --- uncached user lookups are rate-limited per client


def test_hole13_random_cookies_cannot_flood_nextcloud(
    harp: HarpProcess, nextcloud: FakeNextcloud, record_case: Any,
) -> None:
    src = SOURCES.new()
    assert get(harp, "/public", source=src) == "200"  # the record is loaded
    before = nextcloud.count("user-info")
    sent, started = 60, time.monotonic()
    statuses = {
        get(harp, "/public", [("Cookie", f"oc_sessionPassphrase={secrets.token_hex(16)}")],
            source=src)
        for _ in range(sent)
    }
    elapsed = time.monotonic() - started
    lookups = nextcloud.count("user-info") - before
    # LOOKUP_BURST 20, LOOKUP_RATE 5/s (harp.nextcloud), one spare for timing.
    allowed = 20 + 5 * elapsed + 1
    record_case(case="hole13/random-cookie-flood",
                input=f"{sent}x /public, fresh random cookie each, one client",
                expected=f"all 200, <= {allowed:.0f} user-info calls",
                observed=f"{sorted(statuses)}, {lookups} user-info calls in {elapsed:.1f}s")
    assert statuses == {"200"}  # PUBLIC still works, as anonymous
    assert lookups <= allowed
    # With the budget spent (under one token left, a fraction more refilled meanwhile),
    # of two valid but uncached sessions at most one is looked up: the other is anonymous,
    # which a USER route refuses (a failure, as for any anonymous client).
    nextcloud.add_session("limited-1", "usr", 1)
    nextcloud.add_session("limited-2", "usr", 1)
    before = nextcloud.count("user-info")
    user_statuses = [get(harp, "/user", [("Cookie", f"oc_sessionPassphrase={s}")], source=src)
                     for s in ("limited-1", "limited-2")]
    assert "403" in user_statuses
    assert nextcloud.count("user-info") - before <= 1
    # Another client is served normally.
    cookie = [("Cookie", "oc_sessionPassphrase=limited-2")]
    assert get(harp, "/user", cookie, source=SOURCES.new()) == "200"


# --- redirects from Nextcloud are never followed


def test_hole14_user_info_redirect_means_anonymous(
    harp: HarpProcess, nextcloud: FakeNextcloud, record_case: Any,
) -> None:
    src = SOURCES.new()
    assert get(harp, "/public", source=src) == "200"
    nextcloud.redirect_unknown_sessions = True
    try:
        before = nextcloud.count("user-info")
        cookie = [("Cookie", f"oc_sessionPassphrase=made-up-{secrets.token_hex(8)}")]
        public = get(harp, "/public", cookie, source=src)
        calls = nextcloud.count("user-info") - before
        user = get(harp, "/user", cookie, source=src)
        known = get(harp, "/user", [("Cookie", "oc_sessionPassphrase=sess-user")],
                    source=src)
    finally:
        nextcloud.redirect_unknown_sessions = False
    record_case(case="hole14/user-info-302-loop",
                input="made-up oc_sessionPassphrase; user-info answers 302 to itself",
                expected="PUBLIC 200, 1 call, USER 403",
                observed=f"PUBLIC {public}, {calls} call(s), USER {user}")
    assert public == "200"
    assert calls == 1  # the redirect was not followed
    assert user == "403"  # anonymous (cached), not a 401
    assert known == "200"  # real sessions are unaffected
