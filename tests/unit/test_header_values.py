"""``header_values`` answers exactly what ``Headers.getRawHeaders`` answers.

Why: the request path reads a few headers by HaRP's own constant names straight from
the ``Headers`` dictionary instead of through ``getRawHeaders`` (which canonicalises the
name on every call); the shared key, ``Authorization`` and ``X-Forwarded-For`` are read
this way, so any difference would be a security bug, whatever case a client sends.
"""

from __future__ import annotations

import pytest
from twisted.web.http_headers import Headers

from harp.web.headers import header_values

NAMES = (b"harp-shared-key", b"authorization", b"x-forwarded-for", b"x-real-ip", b"upgrade",
         b"authorization-app-api", b"ex-app-port", b"www-authenticate", b"content-md5")


@pytest.mark.parametrize("sent", [b"HARP-SHARED-KEY", b"harp-shared-key", b"Harp-Shared-Key",
                                  b"x-forwarded-for", b"X-Forwarded-FOR", b"WWW-Authenticate",
                                  b"content-MD5", b"Upgrade"])
def test_same_answer_as_get_raw_headers_whatever_the_case_sent(sent: bytes) -> None:
    headers = Headers()
    headers.addRawHeader(sent, b"one")
    headers.addRawHeader(sent, b"two")
    for name in NAMES:
        assert header_values(headers, name) == headers.getRawHeaders(name), name


def test_absent_and_removed_headers_are_none() -> None:
    headers = Headers()
    assert header_values(headers, b"authorization") is None
    headers.setRawHeaders(b"Authorization", [b"Basic x"])
    assert header_values(headers, b"authorization") == [b"Basic x"]
    headers.removeHeader(b"authorization")
    assert header_values(headers, b"authorization") is None
