"""The two questions HaRP asks Nextcloud: "what is this ExApp?" and "who is this user?".

``harp/exapp-meta`` and ``harp/user-info`` (docs/compatibility.md#nextcloud-lookups).  Both
go through one treq client on a shared keep-alive pool that **stores no cookies**: a cookie
jar would leak one user's ``Set-Cookie`` into another user's lookups (reference #111).

- exapp-meta: concurrent misses for one app share a single request (single flight);
  "not found" is remembered by the caller's state for 15 s.
- user-info: answers are cached for ``HP_SESSION_LIFETIME`` under a hash of the
  credential (``oc_sessionPassphrase`` cookie, else the ``Authorization`` header) and
  the app id — never under the raw value, which must not sit in memory as a key.
  Rejected credentials (4xx) are cached as anonymous too (docs/differences.md#17), so
  replaying a bad cookie does not cost a Nextcloud round trip per request.
- Redirects are never followed.  Nextcloud answers a made-up session cookie with a redirect
  to the same URL (after dropping the session); following it loops until the client gives
  up, which turned every such request into a 401, even on PUBLIC routes.  For user-info a
  3xx means "anonymous" (cached like a rejected credential); for exapp-meta it means
  "unavailable" (an error, nothing cached, nobody charged: a redirect there is a
  misconfigured ``NC_INSTANCE_URL``, e.g. http redirected to https, not a client's doing).
- Uncached user lookups are rate-limited per client address (:meth:`may_look_up`): a
  client sending a fresh random cookie with every request would otherwise cost one
  Nextcloud request each, uncounted by the brute-force protection.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterable, Sequence
from http.cookiejar import Cookie
from typing import Any, Final, Generic, TypeVar
from urllib.parse import quote

from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar  # type: ignore[attr-defined]
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from harp.bans import ban_key
from harp.exapps import ExAppRecord, RecordError, parse_record
from harp.logs import HarpLogger
from harp.lru import TokenBuckets
from harp.state import ANONYMOUS, State, UserInfo

log = HarpLogger("harp.nextcloud")

TOTAL_TIMEOUT: Final = 25.0
CONNECT_TIMEOUT: Final = 5.0
MAX_BODY: Final = 1 << 20
#: Uncached user lookups a client address (ban key: IPv4, IPv6 /64) may make at once, and
#: how many it regains per second.  A browser opening an ExApp page costs a handful of
#: lookups per HP_SESSION_LIFETIME; the limit only bites a client inventing credentials.
LOOKUP_BURST: Final = 20
LOOKUP_RATE: Final = 5.0
#: Client addresses whose lookup budget is remembered (least recently used forgotten).
MAX_LOOKUP_CLIENTS: Final = 100_000

#: Client headers not forwarded to user-info: hop-by-hop ones, the body framing of a
#: request we do not forward the body of, and encodings we would have to undo.
_SKIP: Final = frozenset(
    {
        b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
        b"upgrade", b"te", b"trailer", b"proxy-authorization", b"proxy-connection",
        b"expect", b"accept-encoding", b"harp-shared-key", b"content-type",
    }
)


class NextcloudError(Exception):
    """Nextcloud could not answer usefully (network error, 5xx, malformed body)."""


#: Gives a fetched record its real upstream before it is cached (harp.k8s: the app's
#: Kubernetes Service); raising makes the lookup fail with nothing cached.
UpstreamResolver = Callable[[str, ExAppRecord], Awaitable[ExAppRecord]]


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """Concurrent requests for one key share one call and its outcome.

    A page that opens many connections at once (or a load balancer's burst after a
    cache expired) costs Nextcloud one round trip per key, not one per connection.
    Every caller gets its own Deferred, so one caller's callbacks cannot change what
    the others receive; a failure reaches them all.
    """

    def __init__(self) -> None:
        self._waiters: dict[K, list[Deferred[V]]] = {}

    def __contains__(self, key: K) -> bool:
        """Is a call for *key* in flight?"""
        return key in self._waiters

    def run(self, key: K, call: Callable[[], Coroutine[Any, Any, V]]) -> Deferred[V]:
        """The outcome of ``call()``, or of the call for *key* already in flight."""
        waiter: Deferred[V] = Deferred()
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._waiters[key] = [waiter]
        Deferred.fromCoroutine(call()).addBoth(self._done, key)
        return waiter

    def _done(self, result: V | Failure, key: K) -> None:
        for waiter in self._waiters.pop(key, []):
            waiter.callback(result)  # a Failure errbacks the waiter


class _NoCookies(IndexableCookieJar):  # type: ignore[misc]
    """A cookie jar that never stores or sends anything: lookups stay per request."""

    def extract_cookies(self, response: object, request: object) -> None:
        return None

    def set_cookie(self, cookie: Cookie) -> None:
        return None

    def add_cookie_header(self, request: object) -> None:
        return None


class NextcloudClient:
    def __init__(
        self, reactor: IReactorTime, base_url: str, shared_key: str, state: State,
        upstream: UpstreamResolver | None = None,
    ):
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 100
        pool.cachedConnectionTimeout = 50
        pool.retryAutomatically = True
        self._http = HTTPClient(
            Agent(reactor, connectTimeout=CONNECT_TIMEOUT, pool=pool), cookiejar=_NoCookies()
        )
        self._pool = pool
        self._meta_url = f"{base_url}/index.php/apps/app_api/harp/exapp-meta?appId="
        self._user_url = f"{base_url}/index.php/apps/app_api/harp/user-info?appId="
        self._key = shared_key.encode("ascii")
        self._state = state
        self._upstream = upstream
        self._meta_flights: SingleFlight[str, ExAppRecord | None] = SingleFlight()
        self._user_flights: SingleFlight[bytes, UserInfo] = SingleFlight()
        self._lookups: TokenBuckets[str] = TokenBuckets(
            MAX_LOOKUP_CLIENTS, LOOKUP_BURST, LOOKUP_RATE
        )

    def close(self) -> Deferred[None]:
        return self._pool.closeCachedConnections()  # type: ignore[no-any-return]

    async def _get_json(self, url: str, headers: Headers) -> tuple[int, Any]:
        try:
            response = await self._http.get(
                url, headers=headers, timeout=TOTAL_TIMEOUT, allow_redirects=False
            )
            body: bytes = await response.content()
        except Exception as exc:
            raise NextcloudError(f"{type(exc).__name__}: {exc}") from None
        if len(body) > MAX_BODY:
            raise NextcloudError("answer too large")
        if not 200 <= response.code < 300:
            return response.code, None
        try:
            return response.code, json.loads(body)
        except (ValueError, RecursionError):  # nested too deep is no JSON either
            raise NextcloudError(f"HTTP {response.code} with a body that is not JSON") from None

    # --- exapp-meta

    def exapp_meta(self, app_id: str) -> Deferred[ExAppRecord | None]:
        """The record for ``app_id`` (lower case), None if Nextcloud does not know it.

        Fails with :class:`NextcloudError` when Nextcloud cannot answer; then nothing is
        cached.  Callers waiting for the same app share one request.
        """
        return self._meta_flights.run(app_id, lambda: self._fetch_meta(app_id))

    async def _fetch_meta(self, app_id: str) -> ExAppRecord | None:
        record = await self.fetch_record(app_id)
        if record is None:
            self._state.mark_missing(app_id)
            return None
        if self._upstream is not None:
            try:
                record = await self._upstream(app_id, record)
            except Exception as exc:
                raise NextcloudError(f"upstream of {app_id}: {exc}") from None
        self._state.put_exapp(app_id, record)
        return record

    async def fetch_record(self, app_id: str) -> ExAppRecord | None:
        """Nextcloud's record for ``app_id`` as it is, None if unknown; nothing cached."""
        headers = Headers({b"harp-shared-key": [self._key], b"accept": [b"application/json"]})
        status, payload = await self._get_json(self._meta_url + quote(app_id, safe=""), headers)
        if status in (401, 404):
            return None
        if payload is None:
            if 300 <= status < 400:
                raise NextcloudError(
                    f"exapp-meta answered a redirect (HTTP {status}), which is not followed; "
                    "check NC_INSTANCE_URL"
                )
            raise NextcloudError(f"exapp-meta answered HTTP {status}")
        try:
            return parse_record(app_id, payload)
        except RecordError as exc:
            raise NextcloudError(f"exapp-meta for {app_id}: {exc}") from None

    # --- user-info

    def cached_user(self, key: bytes) -> UserInfo | None:
        """The user cached under the credential ``key``, if any (no lookup, no cost)."""
        return self._state.get_user(key)

    def may_look_up(self, key: bytes, client: str) -> bool:
        """May ``client`` have the credential ``key`` resolved now?

        True without cost when the answer is cached or a lookup for it is in flight;
        otherwise one token of the client's bucket (keyed by its ban key, so an IPv6
        client cannot rotate through its /64) is spent, and False when it has none. The
        caller then treats the request as anonymous, which PUBLIC routes accept and the
        others refuse (counting a failure as usual).
        """
        if self._state.get_user(key) is not None or key in self._user_flights:
            return True
        return self._lookups.take(ban_key(client))

    async def user_info(
        self, app_id: str, key: bytes, headers: Iterable[tuple[bytes, Sequence[bytes]]]
    ) -> UserInfo:
        """Resolve the user behind the client's credentials; cached under ``key``.

        Concurrent lookups for one key share a single Nextcloud request
        (:class:`SingleFlight`).
        """
        cached = self._state.get_user(key)
        if cached is not None:
            return cached
        return await self._user_flights.run(
            key, lambda: self._lookup_user(app_id, key, headers)
        )

    async def _lookup_user(
        self, app_id: str, key: bytes, headers: Iterable[tuple[bytes, Sequence[bytes]]]
    ) -> UserInfo:
        forwarded = Headers()
        for name, values in headers:
            if name.lower() not in _SKIP:
                forwarded.setRawHeaders(name, values)
        forwarded.setRawHeaders(b"harp-shared-key", [self._key])
        status, payload = await self._get_json(self._user_url + quote(app_id, safe=""), forwarded)
        if 300 <= status < 500:
            # 4xx: credentials rejected.  3xx: Nextcloud dropped an unknown session and
            # redirects to itself; not followed (module docstring).  Both: anonymous.
            user = ANONYMOUS
        elif payload is None:
            raise NextcloudError(f"user-info answered HTTP {status}")
        else:
            user = _parse_user(payload)
        self._state.put_user(key, user)
        return user


def _parse_user(payload: Any) -> UserInfo:
    if not isinstance(payload, dict):
        raise NextcloudError("user-info answer is not a JSON object")
    user_id = payload.get("user_id")
    level = payload.get("access_level")
    if isinstance(level, str) and level.isdigit():
        level = int(level)
    if not isinstance(user_id, str) or isinstance(level, bool) or level not in (0, 1, 2):
        raise NextcloudError("user-info answer lacks user_id/access_level")
    # A disabled user comes back with level 0 and a user id: present it as anonymous
    # rather than telling the ExApp who it is (docs/differences.md#16).
    if level == 0:
        return ANONYMOUS
    return UserInfo(user_id, level)
