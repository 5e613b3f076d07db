"""The passthrough's query allow-list (docs/differences.md#22): strict parsing, decoded names."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.docker.allowlist import LOGS_PARAMS, PULL_PARAMS, allowed_request
from harp.docker.query import encode_query, filter_query, parse_query

PULL = b"/v1.44/images/create"
LOGS = b"/v1.44/containers/nc_app_x/logs"


@pytest.mark.parametrize(
    ("method", "path", "query", "forwarded"),
    [
        # exactly what AppAPI sends, canonical form forwarded
        # (docs/compatibility.md#docker-allow-list)
        (b"POST", PULL, b"fromImage=ghcr.io%2Fnextcloud%2Fx%3Arelease-cpu",
         b"fromImage=ghcr.io%2Fnextcloud%2Fx%3Arelease-cpu"),
        (b"POST", PULL, b"fromImage=127.0.0.1:5000/nextcloud/x:release",
         b"fromImage=127.0.0.1%3A5000%2Fnextcloud%2Fx%3Arelease"),
        (b"POST", PULL, b"fromImage=busybox&tag=latest&platform=linux%2Famd64",
         b"fromImage=busybox&tag=latest&platform=linux%2Famd64"),
        (b"POST", PULL, b"from%49mage=busybox", b"fromImage=busybox"),
        (b"GET", LOGS, b"stdout=true&stderr=true&tail=all", b"stdout=true&stderr=true&tail=all"),
        (b"GET", LOGS, b"stdout=true&stderr=true&tail=100", b"stdout=true&stderr=true&tail=100"),
        (b"GET", b"/v1.41/_ping", b"", b""),
        (b"HEAD", b"/_ping", b"", b""),
        (b"GET", b"/v1.44/containers/nc_app_x/json", b"", b""),
        (b"GET", b"/v1.44/images/busybox:latest/json", b"", b""),
    ],
)
def test_appapi_queries_pass(method: bytes, path: bytes, query: bytes, forwarded: bytes) -> None:
    assert allowed_request(method, path, query) == (path, forwarded)


@pytest.mark.parametrize(
    ("method", "path", "query"),
    [
        (b"POST", PULL, b"fromSrc=http://169.254.169.254/x.tar&repo=evil"),
        (b"POST", PULL, b"fromSrc=-&repo=evil"),
        (b"POST", PULL, b"fromImage=busybox&fromSrc=http://x/"),
        (b"POST", PULL, b"from%53rc=http://x/"),
        (b"POST", PULL, b"from%53Rc=http://x/"),
        (b"POST", PULL, b"fromsrc=http://x/"),
        (b"POST", PULL, b"fromImage=a;fromSrc=http://x/"),
        (b"POST", PULL, b"fromImage=a%3BfromSrc=x;"),
        (b"POST", PULL, b"fromImage=a&fromImage=b"),
        (b"POST", PULL, b"fromImage=a&from%49mage=b"),
        (b"POST", PULL, b"fromImage=a&"),
        (b"POST", PULL, b"&fromImage=a"),
        (b"POST", PULL, b"=x"),
        (b"POST", PULL, b"fromImage=a%zz"),
        (b"POST", PULL, b"fromImage=a%"),
        (b"POST", PULL, b"fromImage=a%0d%0aX: y"),
        (b"POST", PULL, b"fromImage=a#fromSrc=x"),
        (b"POST", PULL, b"fromImage=a b"),
        (b"POST", PULL, b"fromImage=%ff"),
        (b"POST", PULL, b"changes=CMD%20x&fromImage=a"),
        (b"POST", PULL, b"repo=a&fromImage=b"),
        (b"POST", PULL, b"message=x"),
        (b"GET", LOGS, b"follow=true&stdout=true"),
        (b"GET", LOGS, b"stdout=true&since=0&until=9"),
        (b"GET", b"/v1.44/_ping", b"x=1"),
        (b"GET", b"/v1.44/containers/nc_app_x/json", b"size=true"),
        (b"GET", b"/v1.44/images/busybox/json", b"a=b"),
        (b"GET", b"/v1.44/containers/json", b"all=1"),
    ],
)
def test_other_queries_are_refused(method: bytes, path: bytes, query: bytes) -> None:
    assert allowed_request(method, path, query) is None


def test_parse_query_decodes_names_and_values() -> None:
    assert parse_query(b"a+b=c%2Fd&e=") == [("a b", "c/d"), ("e", "")]
    assert parse_query(b"stdout") == [("stdout", "")]
    assert parse_query(b"") == []


NAMES = st.sampled_from(["fromImage", "tag", "platform", "fromSrc", "repo", "x"])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_accepted_queries_only_use_allowed_names(raw: bytes) -> None:
    canonical = filter_query(raw, PULL_PARAMS)
    if canonical is None:
        return
    pairs = parse_query(canonical)
    assert pairs is not None
    assert {name for name, _ in pairs} <= PULL_PARAMS
    assert len(pairs) == len({name for name, _ in pairs})
    assert parse_query(raw) == pairs  # canonical form means the same


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(NAMES, st.text(max_size=12)), max_size=4, unique_by=lambda p: p[0]))
def test_encode_parse_round_trip(pairs: list[tuple[str, str]]) -> None:
    pairs = [(n, "".join(c for c in v if c.isprintable())) for n, v in pairs]
    assert parse_query(encode_query(pairs)) == pairs
    allowed = filter_query(encode_query(pairs), LOGS_PARAMS | PULL_PARAMS)
    if any(n not in LOGS_PARAMS | PULL_PARAMS for n, _ in pairs):
        assert allowed is None


def test_remembered_answers_are_the_fresh_ones() -> None:
    from harp.docker import allowlist

    cases = [
        (b"GET", b"/v1.44/_ping", b""), (b"GET", b"/v1.44/containers/x/json", b"a=1"),
        (b"POST", b"/images/create", b"fromImage=busybox&tag=1"),
        (b"POST", b"/images/create", b"fromImage=busybox;fromSrc=x"),
        (b"DELETE", b"/containers/x", b""), (b"GET", b"/../etc", b""),
    ]
    for _ in range(2):  # the second round is answered from memory
        for method, rest, query in cases:
            assert allowed_request(method, rest, query) == allowlist._allowed(method, rest, query)
    long_query = b"fromImage=busybox&x=" + b"a" * allowlist._MAX_REMEMBERED
    before = allowlist._remembered.cache_info().currsize
    allowed_request(b"POST", b"/images/create", long_query)
    assert allowlist._remembered.cache_info().currsize == before  # not remembered
