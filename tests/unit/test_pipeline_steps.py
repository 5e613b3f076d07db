"""Pure steps of the decision pipeline and record parsing."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harp.client_address import ClientAddressResolver, parse_trusted_proxies
from harp.exapps import RecordError, parse_record
from harp.state.memory import MemoryState
from harp.web.headers import KeyCheck
from harp.web.pipeline import (
    Pipeline,
    _path_facts,
    has_dotdot,
    identity_token,
    match_route,
    path_facts,
    split_app_path,
)


@pytest.mark.parametrize(
    "path",
    [
        b"/exapps/app/../x", b"/exapps/app/..", b"/..", b"/exapps/%2e%2e/x", b"/exapps/.%2E/x",
        b"/exapps/app%2f..%2fx", b"/a/%2E%2e%2F", b"/x/%2e.",
    ],
)
def test_dotdot_detected(path: bytes) -> None:
    assert has_dotdot(path)


@pytest.mark.parametrize(
    "path", [b"/exapps/app/..x", b"/exapps/app/x..", b"/exapps/a.b/c", b"/exapps/app/...", b"/."]
)
def test_not_dotdot(path: bytes) -> None:
    assert not has_dotdot(path)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/exapps/app/x/y", (b"app", b"/x/y")),
        (b"/exapps/app", (b"app", b"")),
        (b"/exapps/App?x", (b"App?x", b"")),
        (b"/exapps/app_api/info", (b"app_api", b"/info")),
        (b"/nc/exapps/app/x", (b"app", b"/nc/exapps/app/x")),  # searched, not stripped
        (b"/exapps/", None),
        (b"/other", None),
        (b"/myexapps/app/x", None),
    ],
)
def test_split_app_path(path: bytes, expected: tuple[bytes, bytes] | None) -> None:
    assert split_app_path(path) == expected


@given(st.binary(max_size=200))
def test_split_never_raises(path: bytes) -> None:
    result = split_app_path(path)
    if result is not None:
        app, _target = result
        assert app and b"/" not in app
    has_dotdot(path)


def record(routes: list[dict[str, object]]) -> dict[str, object]:
    return {"exapp_token": "t", "exapp_version": "1.0", "host": "h", "port": 23000,
            "routes": routes}


def test_routes_match_at_start_verb_ignored_invalid_skipped() -> None:
    rec = parse_record("app", record([
        {"url": "[bad(", "access_level": 0},
        {"url": "^/api/.*$", "access_level": "1", "bruteforce_protection": [401, "403"],
         "verb": "POST"},
        {"url": "/public", "access_level": 0},
    ]))
    assert len(rec.routes) == 2
    api = match_route(rec.routes, "/api/x")
    assert api is not None and api.access_level == 1 and api.bruteforce == {401, 403}
    public = match_route(rec.routes, "/public/and/more")
    assert public is not None and public.access_level == 0
    assert match_route(rec.routes, "/x/public") is None


@pytest.mark.parametrize(
    "bad",
    [
        [], {"exapp_token": 1}, {**record([]), "port": "x"}, {**record([]), "port": 70000},
        record([{"url": "^/", "access_level": 3}]), record([{"access_level": 0}]),
        {**record([]), "routes": "x"}, record([{"url": "^/", "bruteforce_protection": "401"}]),
    ],
)
def test_bad_records(bad: object) -> None:
    with pytest.raises(RecordError):
        parse_record("app", bad)


def test_record_defaults() -> None:
    rec = parse_record("app", {"exapp_token": "SeCrEt", "exapp_version": "1", "host": "h",
                               "port": "23000"})
    assert rec.routes == () and rec.port == 23000
    assert "SeCrEt" not in repr(rec)


def test_identity_token() -> None:
    assert base64.b64decode(identity_token("", "s3")) == b":s3"
    assert base64.b64decode(identity_token("ünï", "s")) == "ünï:s".encode()


# --- malformed requests count for bans, never against a trusted proxy


class _Peer:
    def __init__(self, host: str) -> None:
        self.host = host


class _Malformed:
    """What the HTTP parser leaves of a request it drops: peer and headers so far."""

    def __init__(self, peer: str, headers: dict[bytes, list[bytes]]) -> None:
        from twisted.web.http_headers import Headers

        self._peer = _Peer(peer)
        self.requestHeaders = Headers(headers)

    def getClientAddress(self) -> _Peer:
        return self._peer


def _pipeline(count: int = 2) -> tuple[Pipeline, MemoryState]:
    state = MemoryState(count, 60, 3)
    trusted, _ = parse_trusted_proxies("10.0.0.1")
    return Pipeline(state, None, KeyCheck("k"), ClientAddressResolver(trusted)), state  # type: ignore[arg-type]


def test_malformed_requests_ban_their_client() -> None:
    pipeline, state = _pipeline()
    for _ in range(2):
        pipeline.malformed(_Malformed("192.0.2.7", {}))  # type: ignore[arg-type]
    assert state.is_banned("192.0.2.7")


def test_malformed_requests_behind_a_trusted_proxy_charge_the_client() -> None:
    pipeline, state = _pipeline()
    for _ in range(2):
        pipeline.malformed(
            _Malformed("10.0.0.1", {b"X-Forwarded-For": [b"198.51.100.9"]})  # type: ignore[arg-type]
        )
    assert state.is_banned("198.51.100.9") and not state.is_banned("10.0.0.1")


def test_malformed_request_line_from_a_trusted_proxy_is_not_charged_to_it() -> None:
    pipeline, state = _pipeline()
    for _ in range(5):
        pipeline.malformed(_Malformed("10.0.0.1", {}))  # type: ignore[arg-type]
    assert not state.is_banned("10.0.0.1")


_PATH_PARTS = st.sampled_from(
    [b"/", b"exapps", b"app", b"..", b".", b"%2e", b"%2F", b"%41", b"%zz", b"x", b"init", b"//"]
)


@given(st.lists(_PATH_PARTS, max_size=8), st.integers(0, 700))
def test_remembered_path_facts_are_the_computed_ones(parts: list[bytes], pad: int) -> None:
    """The decision reads its path checks from a cache: it must hold what computing gives,
    for short paths (remembered) and long ones (computed every time) alike."""
    raw = b"/" + b"".join(parts) + b"x" * pad
    computed = _path_facts(raw)
    assert path_facts(raw) == computed
    assert path_facts(raw) == computed  # second time: from the cache when short
    if computed.path is not None:
        assert computed.split == split_app_path(computed.path)
    else:
        assert computed.split is None and computed.endpoint is None
