"""Unit tests for harp.nextcloud.NextcloudClient without a network: redirects are never
followed and uncached user lookups are rate-limited per client (docs/differences.md#17)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from harp.credentials import credential_key
from harp.nextcloud import LOOKUP_BURST, NextcloudClient, NextcloudError
from harp.state import ANONYMOUS, UserInfo
from harp.state.memory import MemoryState


class FakeResponse:
    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self._body = body

    def content(self) -> defer.Deferred[bytes]:
        return defer.succeed(self._body)


class FakeHTTP:
    """Answers every GET with one canned response; records the keyword arguments."""

    def __init__(self, code: int, body: bytes = b"") -> None:
        self.code, self.body = code, body
        self.calls: list[dict[str, Any]] = []

    def get(self, url: str, **kwargs: Any) -> defer.Deferred[FakeResponse]:
        self.calls.append({"url": url, **kwargs})
        return defer.succeed(FakeResponse(self.code, self.body))


def _client(http: FakeHTTP) -> tuple[NextcloudClient, MemoryState]:
    state = MemoryState(10, 300, 5.0)
    client = NextcloudClient(Clock(), "http://nc.invalid", "key", state)
    client._http = http  # type: ignore[assignment]
    return client, state


def _result(d: defer.Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the fake answers synchronously"
    return out[0]


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_user_info_redirect_is_anonymous_and_cached(code: int) -> None:
    http = FakeHTTP(code)
    client, state = _client(http)
    key = credential_key("app", b"made-up", None)
    user = _result(defer.Deferred.fromCoroutine(client.user_info("app", key, [])))
    assert user == ANONYMOUS
    assert http.calls[0]["allow_redirects"] is False
    assert state.get_user(key) == ANONYMOUS  # cached like a rejected credential
    _result(defer.Deferred.fromCoroutine(client.user_info("app", key, [])))
    assert len(http.calls) == 1


def test_exapp_meta_redirect_is_unavailable_not_missing() -> None:
    http = FakeHTTP(302)
    client, state = _client(http)
    failure = _result(client.exapp_meta("app"))
    assert failure.check(NextcloudError)
    assert "redirect" in failure.getErrorMessage()
    assert http.calls[0]["allow_redirects"] is False
    assert not state.is_missing("app")  # nobody is charged for a misconfiguration


def test_user_info_ok_still_parsed() -> None:
    http = FakeHTTP(200, b'{"user_id": "alice", "access_level": 1}')
    client, _ = _client(http)
    key = credential_key("app", b"c", None)
    user = _result(defer.Deferred.fromCoroutine(client.user_info("app", key, [])))
    assert user == UserInfo("alice", 1)


def test_lookup_budget_per_client_and_cached_answers_are_free() -> None:
    client, state = _client(FakeHTTP(200))
    keys = [credential_key("app", str(i).encode(), None) for i in range(50)]
    granted = [client.may_look_up(k, "192.0.2.1") for k in keys]
    assert granted == [True] * LOOKUP_BURST + [False] * (50 - LOOKUP_BURST)
    assert client.may_look_up(keys[-1], "192.0.2.2")  # another client has its own budget
    state.put_user(keys[-1], UserInfo("bob", 1))
    assert client.may_look_up(keys[-1], "192.0.2.1")  # cached: no lookup, no cost


def test_lookup_budget_shared_by_an_ipv6_64() -> None:
    client, _ = _client(FakeHTTP(200))
    granted = [
        client.may_look_up(credential_key("app", str(i).encode(), None),
                           f"2001:db8:1:2::{i:x}")
        for i in range(LOOKUP_BURST + 5)
    ]
    assert granted.count(True) == LOOKUP_BURST


def test_exapp_meta_nested_too_deep_is_unavailable_not_a_crash() -> None:
    """JSON nested past the parser's recursion limit is "not JSON", as any garbage is."""
    http = FakeHTTP(200, b"[" * 100_000)
    client, _ = _client(http)
    failure = _result(client.exapp_meta("app"))
    assert failure.check(NextcloudError)
    assert "not JSON" in failure.getErrorMessage()


def test_the_credential_key_hashes_the_documented_bytes() -> None:
    # Replicas sharing Redis (and versions of HaRP during an upgrade) must agree on it.
    def expected(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=20).digest()

    assert credential_key("app", b"sess", b"Basic x") == expected(
        b"c\0sess\0app")  # the cookie decides when there is one
    assert credential_key("App\udcff", None, b"Basic x") == expected(
        b"a\0Basic x\0App\xff")
    assert credential_key("app", b"", None) == expected(b"a\0\0app")
