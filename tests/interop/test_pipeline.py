"""The ExApp request pipeline against real peers: the twistd harp process, a fake
Nextcloud speaking the two harp/* endpoints, and a real nc_py_api ExApp."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.interop.conftest import APP, DROPPED, ok, record_for, request, start_harp
from tests.peers.exapp_runner import ExAppProcess
from tests.peers.fake_nextcloud import FakeNextcloud
from tests.peers.harp import HarpProcess

pytestmark = pytest.mark.interop

# tests/interop/test_redis_state.py still imports these from here; their home is
# tests/interop/conftest.py.
def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def nextcloud(nextcloud: FakeNextcloud, exapp: ExAppProcess) -> FakeNextcloud:
    """The shared fake Nextcloud, knowing the test ExApp and a user, an admin and a
    disabled user (by session cookie and by app password)."""
    nextcloud.apps[APP] = record_for(exapp)
    nextcloud.add_session("sess-user", "usr", 1)
    nextcloud.add_session("sess-admin", "admin", 2)
    nextcloud.add_session("sess-disabled", "gone", 0)
    nextcloud.add_app_password("usr", "usr-app-pw", 1)
    nextcloud.add_app_password("admin", "admin-app-pw", 2)
    return nextcloud


@pytest.fixture(scope="module")
def harp_settings() -> dict[str, str]:
    # Long enough that test_session_cache sees its lookups cached.
    return {"HP_SESSION_LIFETIME": "10"}


# --- the access matrix of docs/compatibility.md#request-pipeline, through the real nc_py_api app

ANON: dict[str, str] = {}
CREDENTIALS = {
    "anonymous": ANON,
    "user-cookie": {"Cookie": "oc_sessionPassphrase=sess-user; ocabc=xyz"},
    "admin-cookie": {"Cookie": "oc_sessionPassphrase=sess-admin"},
    "user-basic": basic("usr", "usr-app-pw"),
    "admin-basic": basic("admin", "admin-app-pw"),
}
EXPECTED = {
    ("anonymous", "public"): (200, ""),
    ("anonymous", "user"): (403, None),
    ("anonymous", "admin"): (403, None),
    ("user", "public"): (200, "usr"),
    ("user", "user"): (200, "usr"),
    ("user", "admin"): (403, None),
    ("admin", "public"): (200, "admin"),
    ("admin", "user"): (200, "admin"),
    ("admin", "admin"): (200, "admin"),
}


@pytest.mark.parametrize("who", sorted(CREDENTIALS))
@pytest.mark.parametrize("route", ["public", "user", "admin"])
def test_access_matrix(harp: HarpProcess, who: str, route: str) -> None:
    status, user = EXPECTED[(who.split("-")[0], route)]
    resp = ok(request(harp.http_port, f"/exapps/{APP}/{route}", CREDENTIALS[who]))
    assert resp.status == status, resp.body
    if status == 200:
        # nc_py_api accepted HaRP's identity headers and decoded this user from them.
        assert resp.json() == {"route": route, "user": user, "query": ""}
    else:
        assert resp.body == b"403 Forbidden"
        assert resp.headers["content-type"] == "text/plain"


def test_disabled_user_is_anonymous(harp: HarpProcess) -> None:
    cookie = {"Cookie": "oc_sessionPassphrase=sess-disabled"}
    assert ok(request(harp.http_port, f"/exapps/{APP}/public", cookie)).json()["user"] == ""
    assert ok(request(harp.http_port, f"/exapps/{APP}/user", cookie)).status == 403


def test_wrong_basic_password_is_anonymous(harp: HarpProcess) -> None:
    creds = basic("usr", "wrong")
    assert ok(request(harp.http_port, f"/exapps/{APP}/user", creds)).status == 403
    assert ok(request(harp.http_port, f"/exapps/{APP}/public", creds)).json()["user"] == ""


def test_prefix_stripped_query_kept_identity_headers(harp: HarpProcess,
                                                     exapp: ExAppProcess) -> None:
    resp = ok(request(harp.http_port, f"/exapps/{APP}/public?a=1&b=%20x&c"))
    assert resp.json() == {"route": "public", "user": "", "query": "a=1&b=%20x&c"}
    seen = ok(request(harp.http_port, f"/exapps/{APP}/echo-headers",
                      {"AA-VERSION": "33.0.1", "X-Custom": "kept",
                       **CREDENTIALS["user-cookie"]})).json()
    assert seen["ex-app-id"] == APP
    assert seen["ex-app-version"] == exapp.version
    assert seen["aa-version"] == "32"
    assert base64.b64decode(seen["authorization-app-api"]).decode() == f"usr:{exapp.secret}"
    assert seen["x-custom"] == "kept"
    assert "oc_sessionPassphrase=sess-user" in seen["cookie"]


def test_unknown_app_and_unmatched_route(harp: HarpProcess) -> None:
    resp = ok(request(harp.http_port, "/exapps/no-such-app/public"))
    assert (resp.status, resp.body) == (404, b"404 Not Found")
    assert ok(request(harp.http_port, f"/exapps/{APP}/nothing-here")).status == 404
    assert ok(request(harp.http_port, "/not-exapps")).status == 404


def test_app_id_case(harp: HarpProcess) -> None:
    # Lookups use the lower-case id; EX-APP-ID keeps the URL's case, which nc_py_api
    # then rejects because it is not its APP_ID (the reference behaves the same).
    resp = ok(request(harp.http_port, f"/exapps/{APP.upper()}/public"))
    assert resp.status == 401


def test_wrong_secret_is_rejected_by_nc_py_api(
    tmp_path: Path, key: str, exapp: ExAppProcess, harp: HarpProcess
) -> None:
    bad = record_for(exapp, exapp_token="not-the-secret")
    store = f"/exapps/app_api/exapp_storage/{APP}-bad"
    assert ok(request(harp.http_port, store, {"harp-shared-key": key}, "POST",
                      json.dumps(bad).encode())).status == 204
    resp = ok(request(harp.http_port, f"/exapps/{APP}-bad/public"))
    assert resp.status == 401  # nc_py_api's own sign_check
    assert ok(request(harp.http_port, store, {"harp-shared-key": key}, "DELETE")).status == 204


def signed_headers(key: str, exapp: ExAppProcess, user: str = "") -> dict[str, str]:
    return {
        "AA-VERSION": "33.0.1", "EX-APP-ID": APP, "EX-APP-VERSION": exapp.version,
        "AUTHORIZATION-APP-API": base64.b64encode(f"{user}:{exapp.secret}".encode()).decode(),
        "AA-REQUEST-ID": "CLI", "harp-shared-key": key, "ex-app-port": str(exapp.port),
        "ex-app-host": "127.0.0.1",
    }


def test_signed_requests_bypass_routes(harp: HarpProcess, key: str, exapp: ExAppProcess) -> None:
    headers = signed_headers(key, exapp, "alice")
    resp = ok(request(harp.http_port, f"/exapps/{APP}/admin", headers))
    assert resp.json()["user"] == "alice"
    assert ok(request(harp.http_port, f"/exapps/{APP}/heartbeat", headers)).json() == {
        "status": "ok"}
    enabled = ok(request(harp.http_port, f"/exapps/{APP}/enabled?enabled=1", headers, "PUT"))
    assert enabled.status == 200
    # Unsigned calls to AppAPI-only endpoints are dropped silently.
    assert request(harp.http_port, f"/exapps/{APP}/heartbeat") == DROPPED
    assert request(harp.http_port, f"/exapps/{APP}/init", method="POST", body=b"{}") == DROPPED
    # A wrong key on a signed request is dropped too.
    assert request(harp.http_port, f"/exapps/{APP}/admin",
                   {**headers, "harp-shared-key": "wrong"}) == DROPPED


def test_signed_request_for_app_unknown_to_nextcloud(harp: HarpProcess, key: str,
                                                     exapp: ExAppProcess) -> None:
    # During /init Nextcloud may not serve exapp-meta yet: host/port come from headers.
    headers = signed_headers(key, exapp)
    headers["EX-APP-ID"] = "fresh-app"
    resp = ok(request(harp.http_port, "/exapps/fresh-app/echo-headers", headers))
    # nc_py_api refuses the foreign app id, proving the request reached it via the
    # synthesized record.
    assert resp.status == 401
    bad_port = {**headers, "ex-app-port": "nope"}
    assert ok(request(harp.http_port, "/exapps/fresh-app/x", bad_port)).status == 503


def test_registry_push_and_delete(harp: HarpProcess, key: str, exapp: ExAppProcess,
                                  nextcloud: FakeNextcloud) -> None:
    path = "/exapps/app_api/exapp_storage/Pushed-App"
    body = json.dumps(record_for(exapp)).encode()
    assert ok(request(harp.http_port, path, method="POST", body=body)).status == 401
    assert ok(request(harp.http_port, path, {"harp-shared-key": key}, "POST", b"{")).status == 400
    bad = json.dumps({"exapp_token": 1}).encode()
    resp = ok(request(harp.http_port, path, {"harp-shared-key": key}, "POST", bad))
    assert resp.status == 400 and resp.body.startswith(b"Payload validation error")
    assert ok(request(harp.http_port, path, {"harp-shared-key": key}, "POST", body)).status == 204
    before = nextcloud.count("exapp-meta")
    # Known from the push: no Nextcloud lookup. nc_py_api rejects the foreign app id
    # (EX-APP-ID is the URL's), so a 401 proves the request went to the ExApp.
    assert ok(request(harp.http_port, "/exapps/pushed-app/public")).status == 401
    assert nextcloud.count("exapp-meta") == before
    assert ok(request(harp.http_port, path, {"harp-shared-key": key}, "DELETE")).status == 204
    assert ok(request(harp.http_port, path, {"harp-shared-key": key}, "DELETE")).status == 404
    assert ok(request(harp.http_port, "/exapps/pushed-app/public")).status == 404


def test_session_cache(harp: HarpProcess, nextcloud: FakeNextcloud) -> None:
    nextcloud.add_session("sess-cache", "cached", 1)
    cookie = {"Cookie": "oc_sessionPassphrase=sess-cache"}
    before = nextcloud.count("user-info")
    for _ in range(20):
        assert ok(request(harp.http_port, f"/exapps/{APP}/user", cookie)).status == 200
    assert nextcloud.count("user-info") - before <= 2
    # Basic credentials are cached too (keyed by a hash of the header).
    nextcloud.add_app_password("carol", "carol-pw", 1)
    creds = {**basic("carol", "carol-pw"), "X-Forwarded-For": "192.0.2.1", "Host": "cloud.test"}
    before = nextcloud.count("user-info")
    for _ in range(10):
        assert ok(request(harp.http_port, f"/exapps/{APP}/user", creds)).status == 200
    assert nextcloud.count("user-info") - before == 1
    # What HaRP sends to user-info: the client's headers but Host, plus the shared key.
    call = nextcloud.calls_to("user-info")[-1]
    assert call.query == {"appId": APP}
    assert call.headers["authorization"] == creds["Authorization"]
    assert call.headers["x-forwarded-for"] == "192.0.2.1"
    assert call.headers["host"] != "cloud.test"
    assert call.headers["harp-shared-key"] == nextcloud.shared_key


def test_negative_cache(harp: HarpProcess, nextcloud: FakeNextcloud,
                        exapp: ExAppProcess) -> None:
    name = "late-app"
    before = nextcloud.count("exapp-meta")
    assert ok(request(harp.http_port, f"/exapps/{name}/public")).status == 404
    assert ok(request(harp.http_port, f"/exapps/{name}/public")).status == 404
    assert nextcloud.count("exapp-meta") - before == 1
    nextcloud.apps[name] = record_for(exapp)
    time.sleep(12)
    assert ok(request(harp.http_port, f"/exapps/{name}/public")).status == 404  # still cached
    time.sleep(4)
    # Now fetched: nc_py_api answers 401 for the foreign app id, i.e. it was forwarded.
    assert ok(request(harp.http_port, f"/exapps/{name}/public")).status == 401
    assert nextcloud.count("exapp-meta") - before == 2


# --- bans


@pytest.fixture
def ban_harp(tmp_path: Path, key: str, nextcloud: FakeNextcloud) -> Iterator[HarpProcess]:
    proc = start_harp(tmp_path, key, nextcloud, HP_BLACKLIST_COUNT="3",
                      HP_BLACKLIST_WINDOW="4", HP_TRUSTED_PROXY_IPS="127.0.0.3")
    yield proc
    proc.stop()


def test_ban_after_count_failures(ban_harp: HarpProcess, key: str) -> None:
    port = ban_harp.http_port
    good = f"/exapps/{APP}/public"
    for _ in range(3):
        assert ok(request(port, f"/exapps/{APP}/admin")).status == 403
    assert request(port, good) == DROPPED  # the 4th request: banned, silently dropped
    assert request(port, "/exapps/app_api/info", {"harp-shared-key": key}) == DROPPED
    assert ok(request(port, good, source="127.0.0.2")).status == 200  # others unaffected
    time.sleep(4.5)
    assert ok(request(port, good)).status == 200  # the window expired


def test_ban_kinds_and_exemptions(ban_harp: HarpProcess, key: str) -> None:
    port = ban_harp.http_port
    src = "127.0.0.4"
    with_key = {"harp-shared-key": key}
    # Failures that a correct shared key exempts (Nextcloud behind a misconfigured proxy).
    for path in ("/nothing", "/exapps/no-such-app/x", "/exapps/%2e%2e/x", "/exapps/x/../y"):
        result = request(port, path, with_key, source=src)
        assert result == DROPPED or ok(result).status == 404
    assert ok(request(port, f"/exapps/{APP}/public", source=src)).status == 200
    # Without the key they count: dot-dot (dropped), unknown app (404), no app id (404).
    assert request(port, "/exapps/%2E./x", source=src) == DROPPED
    assert ok(request(port, "/exapps/no-such-app/x", source=src)).status == 404
    assert ok(request(port, "/elsewhere", source=src)).status == 404
    assert request(port, f"/exapps/{APP}/public", source=src) == DROPPED
    # A wrong key on the control plane counts.
    src = "127.0.0.5"
    for _ in range(3):
        assert ok(request(port, "/exapps/app_api/info", {"harp-shared-key": "x"},
                          source=src)).status == 401
    assert request(port, "/exapps/app_api/info", with_key, source=src) == DROPPED


def test_trusted_proxy_bans_the_forwarded_client(ban_harp: HarpProcess) -> None:
    port = ban_harp.http_port
    proxy = "127.0.0.3"
    attacker = {"X-Forwarded-For": "203.0.113.9, 10.0.0.1"}
    for _ in range(3):
        assert ok(request(port, f"/exapps/{APP}/admin", attacker, source=proxy)).status == 403
    assert request(port, f"/exapps/{APP}/public", attacker, source=proxy) == DROPPED
    # The proxy itself and other clients behind it are not banned.
    assert ok(request(port, f"/exapps/{APP}/public", source=proxy)).status == 200
    other = {"X-Real-IP": "198.51.100.7"}
    assert ok(request(port, f"/exapps/{APP}/public", other, source=proxy)).status == 200
    # An untrusted peer cannot choose its address: its own address gets banned.
    liar = "127.0.0.6"
    for i in range(3):
        spoof = {"X-Forwarded-For": f"192.0.2.{i}"}
        assert ok(request(port, f"/exapps/{APP}/admin", spoof, source=liar)).status == 403
    assert request(port, f"/exapps/{APP}/public", source=liar) == DROPPED


def test_bruteforce_protection_statuses(ban_harp: HarpProcess, key: str,
                                        exapp: ExAppProcess) -> None:
    # /guarded does not exist in the ExApp with valid identity? It answers 404; make
    # the ExApp answer 401 instead by registering a record with a wrong secret.
    port = ban_harp.http_port
    bad = json.dumps(record_for(exapp, exapp_token="wrong")).encode()
    assert ok(request(port, "/exapps/app_api/exapp_storage/guard-app", {"harp-shared-key": key},
                      "POST", bad)).status == 204
    src = "127.0.0.7"
    for _ in range(3):
        assert ok(request(port, "/exapps/guard-app/guarded", source=src)).status == 401
    assert request(port, "/exapps/guard-app/public", source=src) == DROPPED
    # The same 401 on a route without bruteforce_protection does not count.
    src = "127.0.0.8"
    for _ in range(5):
        assert ok(request(port, "/exapps/guard-app/public", source=src)).status == 401


# --- Nextcloud down or slow


def test_nextcloud_errors_give_401(tmp_path: Path, key: str, exapp: ExAppProcess) -> None:
    with FakeNextcloud(key) as fake:
        fake.apps[APP] = record_for(exapp)
        fake.add_session("s", "usr", 1)
        proc = start_harp(tmp_path, key, fake)
        try:
            cookie = {"Cookie": "oc_sessionPassphrase=s"}
            assert ok(request(proc.http_port, f"/exapps/{APP}/user", cookie)).status == 200
            for mode in ("error500", "badjson"):
                fake.mode = mode
                other = {"Cookie": f"oc_sessionPassphrase={mode}"}
                resp = ok(request(proc.http_port, f"/exapps/{APP}/user", other))
                assert (resp.status, resp.body) == (401, b"401 Unauthorized")
            fake.mode = "ok"
            fake.stop()
            other = {"Cookie": "oc_sessionPassphrase=after-stop"}
            resp = ok(request(proc.http_port, f"/exapps/{APP}/user", other, timeout=10))
            assert resp.status == 401
            # The record is cached, anonymous public requests need no Nextcloud.
            assert ok(request(proc.http_port, f"/exapps/{APP}/public")).status == 200
        finally:
            proc.stop()


def test_hanging_nextcloud_does_not_block_others(tmp_path: Path, key: str,
                                                 exapp: ExAppProcess) -> None:
    with FakeNextcloud(key) as fake:
        fake.apps[APP] = record_for(exapp)
        proc = start_harp(tmp_path, key, fake)
        try:
            assert ok(request(proc.http_port, f"/exapps/{APP}/public")).status == 200
            fake.mode = "hang"
            results: list[Any] = []
            started = time.monotonic()

            def slow() -> None:
                cookie = {"Cookie": "oc_sessionPassphrase=hangs"}
                results.append(request(proc.http_port, f"/exapps/{APP}/user", cookie, timeout=60))
                results.append(time.monotonic() - started)

            thread = threading.Thread(target=slow)
            thread.start()
            assert fake.wait_for_calls("user-info", 1, timeout=10)
            # Meanwhile the reactor serves other requests promptly.
            for _ in range(20):
                t0 = time.monotonic()
                assert ok(request(proc.http_port, f"/exapps/{APP}/public")).status == 200
                assert time.monotonic() - t0 < 2.0
            thread.join(timeout=60)
            resp, elapsed = results
            assert ok(resp).status == 401
            assert 20 <= elapsed <= 40  # the 25 s Nextcloud timeout, not forever
        finally:
            fake.mode = "ok"
            proc.stop()


def test_direct_mode_dns_name(harp: HarpProcess, key: str, exapp: ExAppProcess) -> None:
    # Direct mode: the record's host is a DNS name, resolved without blocking.
    record = json.dumps(record_for(exapp, host="localhost")).encode()
    path = "/exapps/app_api/exapp_storage/by-name"
    assert ok(request(harp.http_port, path, {"harp-shared-key": key}, "POST", record)).status == 204
    # nc_py_api answers (401: the URL's app id is not its APP_ID): the name resolved.
    assert ok(request(harp.http_port, "/exapps/by-name/public")).status == 401
    assert ok(request(harp.http_port, path, {"harp-shared-key": key}, "DELETE")).status == 204


def test_an_upstream_name_that_does_not_resolve(harp: HarpProcess, key: str,
                                                exapp: ExAppProcess) -> None:
    # Direct mode with a host name that never resolves (RFC 6761 ".invalid"): 404, as the
    # reference answers; a signed call gets 503, because a 404 of ours would tell Nextcloud
    # that the ExApp's /init is done (docs/differences.md#18).
    record = json.dumps(record_for(exapp, host="no-such-exapp.invalid")).encode()
    path = "/exapps/app_api/exapp_storage/nowhere"
    assert ok(request(harp.http_port, path, {"harp-shared-key": key}, "POST", record)).status == 204
    assert ok(request(harp.http_port, "/exapps/nowhere/public")).status == 404
    signed = {**signed_headers(key, exapp), "EX-APP-ID": "nowhere"}
    assert ok(request(harp.http_port, "/exapps/nowhere/public", signed)).status == 503
    assert ok(request(harp.http_port, path, {"harp-shared-key": key}, "DELETE")).status == 204


def test_metrics(harp: HarpProcess, key: str) -> None:
    ok(request(harp.http_port, f"/exapps/{APP}/public"))
    assert ok(request(harp.http_port, "/exapps/app_api/metrics")).status == 401
    resp = ok(request(harp.http_port, "/exapps/app_api/metrics", {"harp-shared-key": key}))
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = resp.body.decode()
    assert 'harp_responses_total{code="200"}' in text
    assert "harp_request_duration_seconds_count" in text
    assert "harp_exapps_known" in text and "harp_tunnel_ports 0" in text
    assert key not in text


def test_concurrent_lookups_share_one_user_info_call(harp: HarpProcess,
                                                     nextcloud: FakeNextcloud) -> None:
    nextcloud.add_session("burst", "bursty", 1)
    cookie = {"Cookie": "oc_sessionPassphrase=burst"}
    before = nextcloud.count("user-info")
    nextcloud.delay = 0.5
    try:
        results: list[Any] = []
        threads = [
            threading.Thread(target=lambda: results.append(
                request(harp.http_port, f"/exapps/{APP}/user", cookie)))
            for _ in range(10)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        nextcloud.delay = 0
    assert [ok(r).status for r in results] == [200] * 10
    assert nextcloud.count("user-info") - before == 1
