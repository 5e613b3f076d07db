"""``Pipeline.decide`` in memory: every verdict, in milliseconds.

Why here and not only in tests/interop/test_pipeline.py: the interop suite proves the
decisions through the real process and a real ExApp, but each case costs a subprocess
round trip.  ``decide`` is data in, verdict out (harp/web/pipeline.py), so a routing
change is checked here against a real ``twisted.web`` request, the in-memory state and
a fake Nextcloud client that answers at once and records what it was asked.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from harp.client_address import ClientAddressResolver, parse_trusted_proxies
from harp.credentials import credential_key
from harp.exapps import ExAppRecord, parse_record
from harp.nextcloud import NextcloudError
from harp.state import ANONYMOUS, UserInfo
from harp.state.memory import MemoryState
from harp.web import pipeline as P
from harp.web.headers import KeyCheck
from harp.web.site import HarpRequest, HarpSite

CONTROL = P.ControlPlaneCall

KEY = "the-shared-key"
CLIENT = "192.0.2.10"
APP = "myapp"
TOKEN = "app-secret"


class FakeNextcloudClient:
    """What the pipeline asks ``NextcloudClient``, answered synchronously from tables."""

    def __init__(self) -> None:
        #: app id -> record; a missing id is "Nextcloud does not know it".
        self.records: dict[str, ExAppRecord] = {}
        #: credential key -> user; a missing key is anonymous.
        self.users: dict[bytes, UserInfo] = {}
        self.meta_error = False
        self.user_error = False
        self.lookups_allowed = True
        self.meta_calls: list[str] = []
        self.user_calls: list[str] = []

    def exapp_meta(self, app_id: str) -> defer.Deferred[ExAppRecord | None]:
        self.meta_calls.append(app_id)
        if self.meta_error:
            return defer.fail(NextcloudError("down"))
        return defer.succeed(self.records.get(app_id))

    def cached_user(self, key: bytes) -> UserInfo | None:
        return None  # no cache here: every credential goes through user_info

    def may_look_up(self, key: bytes, client: str) -> bool:
        return self.lookups_allowed

    async def user_info(
        self, app_id: str, key: bytes, headers: Iterable[tuple[bytes, Sequence[bytes]]]
    ) -> UserInfo:
        self.user_calls.append(app_id)
        if self.user_error:
            raise NextcloudError("down")
        return self.users.get(key, ANONYMOUS)

    def sign_in(self, cookie: bytes, user: UserInfo, app_id: str = APP) -> None:
        """``cookie`` (an ``oc_sessionPassphrase``) now belongs to ``user``."""
        self.users[credential_key(app_id, cookie, None)] = user


ROUTES = [
    {"url": "^/public", "access_level": 0},
    {"url": "^/user$", "access_level": 1},
    {"url": "^/admin$", "access_level": 2, "bruteforce_protection": [401]},
]


def record(**changes: Any) -> ExAppRecord:
    data = {"exapp_token": TOKEN, "exapp_version": "1.2.3", "host": "127.0.0.1",
            "port": 23001, "routes": ROUTES, **changes}
    return parse_record(APP, data)


class World:
    """A pipeline over MemoryState and the fake Nextcloud.

    One failure bans (``HP_BLACKLIST_COUNT=1``), so :meth:`charged` tells whether the
    last decision counted a brute-force failure against the client.
    """

    def __init__(self) -> None:
        self.state = MemoryState(1, 60, 3)
        self.nextcloud = FakeNextcloudClient()
        trusted, _ = parse_trusted_proxies("")
        self.pipeline = P.Pipeline(
            self.state, self.nextcloud, KeyCheck(KEY),  # type: ignore[arg-type]
            ClientAddressResolver(trusted),
        )

    def charged(self, client: str = CLIENT) -> bool:
        return self.state.is_banned(client)

    def decide(self, uri: bytes, headers: dict[bytes, bytes] | None = None,
               method: bytes = b"GET", client: str = CLIENT) -> P.Verdict:
        out: list[Any] = []
        request = make_request(uri, headers or {}, method)
        defer.Deferred.fromCoroutine(self.pipeline.decide(request, client)).addBoth(out.append)
        assert out, "decide waited for something the fakes do not provide"
        if isinstance(out[0], Failure):
            out[0].raiseException()
        verdict: P.Verdict = out[0]
        return verdict


def make_request(uri: bytes, headers: dict[bytes, bytes], method: bytes = b"GET") -> HarpRequest:
    """A request as HaRP's channel leaves it once the head is parsed (no timers armed)."""
    channel = HarpSite(Resource(), head_timeout=0, timeout=None).buildProtocol(None)
    channel.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", CLIENT, 40000)))
    request = HarpRequest(channel)
    request.method, request.uri, request.clientproto = method, uri, b"HTTP/1.1"
    request.path = uri.split(b"?", 1)[0]
    for name, value in headers.items():
        request.requestHeaders.addRawHeader(name, value)
    request.parseCookies()
    return request


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def known(world: World) -> World:
    """A world where Nextcloud knows :data:`APP`."""
    world.nextcloud.records[APP] = record()
    return world


WITH_KEY = {b"harp-shared-key": KEY.encode()}
BAD_KEY = {b"harp-shared-key": b"not-the-key"}


def signed(key: str = KEY, app: str = APP, user: str = "alice") -> dict[bytes, bytes]:
    """The headers of an AppAPI-signed request (all six present, identity non-empty)."""
    return {
        b"ex-app-version": b"1.2.3", b"ex-app-id": app.encode(), b"ex-app-host": b"10.0.0.5",
        b"ex-app-port": b"23005", b"harp-shared-key": key.encode(),
        b"authorization-app-api": base64.b64encode(f"{user}:{TOKEN}".encode()),
    }


def cookie(passphrase: bytes) -> dict[bytes, bytes]:
    return {b"cookie": b"oc_sessionPassphrase=" + passphrase}


# --- refused before any lookup


def test_banned_client_is_dropped_before_anything_else(known: World) -> None:
    known.state.record_failure(CLIENT)
    assert known.decide(b"/exapps/app_api/info", WITH_KEY) == P.Drop("banned")
    assert known.decide(b"/exapps/myapp/public", client="192.0.2.11") != P.Drop("banned")
    assert known.nextcloud.meta_calls == [APP]  # only the other client's request


@pytest.mark.parametrize(
    "uri", [b"http://evil/exapps/myapp/public", b"*", b"0/exapps/myapp/x", b"/exapps/a b",
            b"/exapps/myapp/\xff", b"/exapps/myapp/#frag"],
)
def test_bad_request_target_is_dropped_and_charged(world: World, uri: bytes) -> None:
    assert world.decide(uri, WITH_KEY) == P.Drop("bad request-target")
    assert world.charged()  # even with the key: no client of ours sends these


@pytest.mark.parametrize("uri", [b"/exapps/myapp/../x", b"/exapps/%2e%2E/x", b"/exapps/a%zz"])
def test_dotdot_is_dropped_and_charged_without_the_key(world: World, uri: bytes) -> None:
    assert world.decide(uri) == P.Drop("dot-dot or malformed path")
    assert world.charged()


def test_dotdot_with_the_key_is_dropped_but_not_charged(world: World) -> None:
    assert world.decide(b"/exapps/x/../y", WITH_KEY) == P.Drop("dot-dot or malformed path")
    assert not world.charged()


@pytest.mark.parametrize("key_headers", [{}, WITH_KEY])
def test_no_app_id_is_404(world: World, key_headers: dict[bytes, bytes]) -> None:
    assert world.decide(b"/elsewhere", key_headers) == P.Reply(404, "no app id in path")
    assert world.charged() == (not key_headers)  # the key exempts a misrouted Nextcloud


STRIPPED = P.Reply(404, "no /exapps/ prefix", P.STRIPPED_BODY)


@pytest.mark.parametrize(
    ("uri", "headers"),
    [
        (b"/app_api/info", WITH_KEY),  # Nextcloud's control call behind the stripping proxy
        (b"/app_api/docker/exapp/exists", {}),
        (b"/myapp/public", {}),  # an ExApp HaRP holds the record of
        (b"/MyApp/public?x=1", {}),  # app ids are compared lower-cased
        (b"//myapp", {}),  # `location /exapps` (no slash) with `proxy_pass http://h:8780/;`
        (b"/other/heartbeat", {b"ex-app-id": b"Other"}),  # AppAPI names the app itself
    ],
)
def test_stripped_prefix_gets_the_explaining_404(
    world: World, uri: bytes, headers: dict[bytes, bytes]
) -> None:
    world.state.put_exapp(APP, record())
    assert world.decide(uri, headers) == STRIPPED
    assert world.charged() == (b"harp-shared-key" not in headers)  # counted as before
    assert world.nextcloud.meta_calls == []  # never asks Nextcloud about a guess


@pytest.mark.parametrize(
    ("uri", "headers"),
    [
        (b"/myapp/public", {}),  # not held: could be anything
        (b"/other/heartbeat", {b"ex-app-id": b"myapp"}),  # the header names another app
        (b"/exapps", {}),
        (b"/exapps/", {}),
        (b"/", {}),
        (b"/favicon.ico", {}),
    ],
)
def test_other_paths_without_an_app_id_keep_the_generic_404(
    world: World, uri: bytes, headers: dict[bytes, bytes]
) -> None:
    assert world.decide(uri, headers) == P.Reply(404, "no app id in path")


def test_real_exapp_paths_never_meet_the_stripped_check(known: World) -> None:
    known.state.put_exapp(APP, record())
    for uri in (b"/exapps/myapp/public", b"/nc/exapps/myapp/public", b"/exapps/app_api/info"):
        assert known.decide(uri, WITH_KEY) != STRIPPED, uri


def test_untrusted_forwarding_is_checked_only_when_the_warning_is_due(world: World) -> None:
    """The once-an-hour warning: quiet, it is one comparison per request."""
    request = make_request(b"/exapps/myapp/public", {b"x-forwarded-for": b"198.51.100.7"})
    throttle = world.pipeline._untrusted_warning
    assert world.pipeline.client_address(request, 1000.0) == CLIENT
    assert throttle.next_at == 1000.0 + P.UNTRUSTED_WARNING_INTERVAL  # fired
    assert world.pipeline.client_address(request, 2000.0) == CLIENT
    assert throttle.next_at == 1000.0 + P.UNTRUSTED_WARNING_INTERVAL  # quiet
    plain = make_request(b"/exapps/myapp/public", {})
    assert world.pipeline.client_address(plain, 10_000.0) == CLIENT
    assert throttle.next_at == 1000.0 + P.UNTRUSTED_WARNING_INTERVAL  # nothing forwarded


def test_trusted_proxy_forwarding_is_not_warned_about() -> None:
    world = World()
    world.pipeline.resolver = ClientAddressResolver(parse_trusted_proxies(CLIENT)[0])
    request = make_request(b"/", {b"x-forwarded-for": b"garbage"})  # charged to the proxy
    assert world.pipeline.client_address(request, 1000.0) == CLIENT
    assert world.pipeline._untrusted_warning.next_at == float("-inf")


# --- the control plane


def test_control_plane_with_the_key(world: World) -> None:
    assert world.decide(b"/exapps/app_api/info", WITH_KEY) == CONTROL(b"/info")
    assert world.decide(b"/exapps/app_api/docker/exapp/exists?x=1", WITH_KEY, b"POST") == (
        CONTROL(b"/docker/exapp/exists")
    )
    assert not world.charged()
    assert world.nextcloud.meta_calls == []


@pytest.mark.parametrize("key_headers", [{}, BAD_KEY])
def test_control_plane_without_the_key_is_401_and_charged(
    world: World, key_headers: dict[bytes, bytes]
) -> None:
    verdict = world.decide(b"/exapps/app_api/info", key_headers)
    assert verdict == P.Reply(401, "bad shared key on app_api")
    assert world.charged()


# --- AppAPI-signed requests


def test_signed_request_bypasses_routes_and_keeps_its_identity(known: World) -> None:
    headers = signed()
    verdict = known.decide(b"/exapps/myapp/admin", headers)
    assert isinstance(verdict, P.Forward)
    assert verdict.signed and verdict.record == record()
    assert verdict.authorization == headers[b"authorization-app-api"]
    assert verdict.bruteforce == frozenset()  # signed calls are never charged
    # The reserved endpoints are open to signed calls.
    assert isinstance(known.decide(b"/exapps/myapp/init", headers, b"POST"), P.Forward)


def test_signed_request_with_a_bad_key_is_dropped_and_charged(known: World) -> None:
    verdict = known.decide(b"/exapps/myapp/admin", signed(key="wrong"))
    assert verdict == P.Drop("bad shared key on signed request")
    assert known.charged()


def test_signed_request_for_an_app_nextcloud_does_not_know(world: World) -> None:
    verdict = world.decide(b"/exapps/fresh/x", signed(app="fresh"))
    assert isinstance(verdict, P.Forward) and verdict.signed
    assert (verdict.record.host, verdict.record.port) == ("10.0.0.5", 23005)
    assert verdict.record.version == "1.2.3"
    assert world.state.get_exapp("fresh") is None  # synthesized, never cached


def test_signed_request_survives_a_nextcloud_error(world: World) -> None:
    world.nextcloud.meta_error = True
    assert isinstance(world.decide(b"/exapps/fresh/x", signed(app="fresh")), P.Forward)


@pytest.mark.parametrize("port", [b"nope", b"0", b"65536", b""])
def test_signed_request_with_a_bad_port_is_503(world: World, port: bytes) -> None:
    headers = {**signed(app="fresh"), b"ex-app-port": port}
    verdict = world.decide(b"/exapps/fresh/x", headers)
    assert verdict == P.Reply(503, "signed request with a bad ex-app-host/ex-app-port")
    assert not world.charged()


def test_incomplete_signature_is_an_ordinary_request(known: World) -> None:
    headers = signed()
    del headers[b"ex-app-host"]
    verdict = known.decide(b"/exapps/myapp/admin", headers)
    assert verdict == P.Reply(403, "access denied")  # the route decides, not the signature


# --- the ExApp record


def test_unknown_exapp_is_404_and_charged(world: World) -> None:
    assert world.decide(b"/exapps/nope/x") == P.Reply(404, "unknown ExApp")
    assert world.charged()
    assert world.nextcloud.meta_calls == ["nope"]


def test_unknown_exapp_with_the_key_is_not_charged(world: World) -> None:
    assert world.decide(b"/exapps/nope/x", WITH_KEY) == P.Reply(404, "unknown ExApp")
    assert not world.charged()


def test_app_known_to_be_missing_is_not_asked_again(world: World) -> None:
    world.state.mark_missing("nope")
    assert world.decide(b"/exapps/nope/x", WITH_KEY) == P.Reply(404, "unknown ExApp")
    assert world.nextcloud.meta_calls == []


def test_nextcloud_error_on_exapp_meta_is_404_uncharged(world: World) -> None:
    world.nextcloud.meta_error = True
    assert world.decide(b"/exapps/myapp/public") == P.Reply(404, "ExApp metadata unavailable")
    assert not world.charged()


def test_cached_record_needs_no_nextcloud(world: World) -> None:
    world.state.put_exapp(APP, record())
    assert isinstance(world.decide(b"/exapps/myapp/public"), P.Forward)
    assert world.nextcloud.meta_calls == []


def test_app_id_is_looked_up_in_lower_case_and_forwarded_as_written(known: World) -> None:
    verdict = known.decide(b"/exapps/MyApp/public?q=1")
    assert isinstance(verdict, P.Forward)
    assert verdict.app_id == b"MyApp" and verdict.target == b"/public"
    assert known.nextcloud.meta_calls == [APP]


# --- reserved endpoints


@pytest.mark.parametrize(
    "uri", [b"/exapps/myapp/heartbeat", b"/exapps/myapp/init", b"/exapps/myapp/enabled?x=1",
            b"/exapps/myapp//init/", b"/exapps/myapp/%69nit", b"/exapps/myapp/init%2F"],
)
def test_unsigned_reserved_endpoint_is_dropped_and_charged(known: World, uri: bytes) -> None:
    assert known.decide(uri, WITH_KEY) == P.Drop("unsigned AppAPI-only endpoint")
    assert known.charged()


# --- route access and identity


def test_public_route_anonymous(known: World) -> None:
    verdict = known.decide(b"/exapps/myapp/public/deep")
    assert isinstance(verdict, P.Forward) and not verdict.signed
    assert base64.b64decode(verdict.authorization) == f":{TOKEN}".encode()
    assert verdict.client == CLIENT
    assert known.nextcloud.user_calls == []  # no credential: Nextcloud is not asked


@pytest.mark.parametrize(
    ("route", "level", "allowed"),
    [
        ("public", 1, True), ("user", 0, False), ("user", 1, True), ("user", 2, True),
        ("admin", 0, False), ("admin", 1, False), ("admin", 2, True),
    ],
)
def test_route_access_levels(known: World, route: str, level: int, allowed: bool) -> None:
    if level:
        known.nextcloud.sign_in(b"sess", UserInfo("usr", level))
    verdict = known.decide(f"/exapps/myapp/{route}".encode(), cookie(b"sess"))
    if allowed:
        assert isinstance(verdict, P.Forward)
        assert base64.b64decode(verdict.authorization) == f"usr:{TOKEN}".encode()
        assert not known.charged()
    else:
        assert verdict == P.Reply(403, "access denied")
        assert known.charged()


def test_no_matching_route_is_404_and_charged(known: World) -> None:
    assert known.decide(b"/exapps/myapp/nothing") == P.Reply(404, "no matching route")
    assert known.charged()


def test_route_bruteforce_statuses_travel_with_the_verdict(known: World) -> None:
    known.nextcloud.sign_in(b"sess", UserInfo("root", 2))
    verdict = known.decide(b"/exapps/myapp/admin", cookie(b"sess"))
    assert isinstance(verdict, P.Forward) and verdict.bruteforce == frozenset({401})


def test_basic_credentials_are_resolved_too(known: World) -> None:
    auth = b"Basic " + base64.b64encode(b"usr:pw")
    known.nextcloud.users[credential_key(APP, None, auth)] = UserInfo("usr", 1)
    verdict = known.decide(b"/exapps/myapp/user", {b"authorization": auth})
    assert isinstance(verdict, P.Forward)
    assert known.nextcloud.user_calls == [APP]


def test_user_lookup_failure_is_401_uncharged(known: World) -> None:
    known.nextcloud.user_error = True
    verdict = known.decide(b"/exapps/myapp/public", cookie(b"sess"))
    assert verdict == P.Reply(401, "user lookup failed")
    assert not known.charged()


def test_over_the_lookup_limit_the_request_is_anonymous(known: World) -> None:
    known.nextcloud.sign_in(b"sess", UserInfo("usr", 1))
    known.nextcloud.lookups_allowed = False
    assert isinstance(known.decide(b"/exapps/myapp/public", cookie(b"sess")), P.Forward)
    assert known.decide(b"/exapps/myapp/user", cookie(b"sess"), client="192.0.2.12") == (
        P.Reply(403, "access denied")
    )
    assert known.nextcloud.user_calls == []


def test_identity_token() -> None:
    assert P.identity_token("usr", TOKEN) == base64.b64encode(f"usr:{TOKEN}".encode())
    assert P.identity_token("", TOKEN) == base64.b64encode(f":{TOKEN}".encode())
