"""A request's Nextcloud credentials: its cookies, and the key its user is cached under.

Both run on every request that carries a cookie or an ``Authorization`` header (a
logged-in user's every click).  The HTTP/1.x channel, the HTTP/2 stream and the request
(twisted.web's ``parseCookies``) share the one parse here, and the pipeline the one key;
the module is compiled with the rest of the request path (harp/compiled.py), which
measured about even with the interpreted form (docs/performance.md, "The Docker
passthrough").
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def parse_cookies(values: Sequence[bytes] | None, into: dict[bytes, bytes]) -> None:
    """twisted.web's cookie parse of the ``Cookie`` header lines ``values`` into ``into``.

    ``name=value`` pairs split at ``;``, leading blanks dropped, the last of a name kept,
    pairs without ``=`` skipped (tests/unit/test_site_limits.py holds it to twisted.web's).
    """
    if not values:
        return
    for text in values:
        if text:
            for cookie in text.split(b";"):
                name, equals, value = cookie.lstrip().partition(b"=")
                if equals:
                    into[name] = value


def credential_key(app_id: str, cookie: bytes | None, authorization: bytes | None) -> bytes:
    """The user cache's key: a hash of the credential that decides the answer, and the app.

    The bytes hashed are ``c\\0<cookie>`` (or ``a\\0<authorization>``), then
    ``\\0<app id>``: replicas sharing Redis must compute the same key
    (tests/unit/test_nextcloud_client.py pins it).  Hashed, so no session or password
    is kept in memory or in Redis as a key.
    """
    digest = hashlib.blake2b(digest_size=20)
    if cookie:
        digest.update(b"c\0" + cookie)
    else:
        digest.update(b"a\0" + (authorization or b""))
    digest.update(b"\0" + app_id.encode("utf-8", "surrogateescape"))
    return digest.digest()
