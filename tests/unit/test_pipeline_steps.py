"""Pure steps of the decision pipeline and record parsing."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harp.exapps import RecordError, parse_record
from harp.web.pipeline import has_dotdot, identity_token, match_route, split_app_path


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
