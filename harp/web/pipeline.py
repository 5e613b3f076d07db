"""The request decision pipeline (docs/compatibility.md#request-pipeline): data in, verdict out.

Each request meets every concern once, in the reference's order: client address →
ban → dot-dot → app id → control plane → AppAPI-signed → record → route access →
identity.  :meth:`Pipeline.decide` returns a verdict object and performs no response
I/O itself; the root resource carries the verdict out.  The only awaits are the
Nextcloud lookups, so a request whose record and user are cached is decided without
touching the reactor.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, cast

from mypy_extensions import mypyc_attr
from twisted.web.server import Request

from harp.client_address import ClientAddressResolver
from harp.credentials import credential_key
from harp.exapps import PUBLIC, ExAppRecord, Route, synthesized
from harp.logs import HarpLogger, Throttle
from harp.nextcloud import NextcloudClient, NextcloudError
from harp.state import ANONYMOUS, State
from harp.web.headers import KeyCheck, header_values, last_header
from harp.web.site import HarpRequest
from harp.web.target import endpoint_key, normalise_path, valid_target

log = HarpLogger("harp.pipeline")

# Compiled once: the hot path only runs them.
_APP_ID_RE: Final = re.compile(rb"(?:^|/)exapps/([^/]+)")
_DOTDOT_RE: Final = re.compile(rb"(?:^|/|%2f)(?:\.|%2e)(?:\.|%2e)(?=/|%2f|$)", re.IGNORECASE)
_SIGNED_HEADERS: Final = (
    b"ex-app-version", b"ex-app-id", b"ex-app-host", b"ex-app-port", b"harp-shared-key",
)
#: ExApp endpoints only AppAPI may call (signed requests).
_APPAPI_ONLY: Final = frozenset({b"/heartbeat", b"/init", b"/enabled"})
CONTROL_APP: Final = b"app_api"

#: Seconds between two warnings about requests that lost their ``/exapps`` prefix, and
#: about forwarding headers from a peer outside ``HP_TRUSTED_PROXY_IPS``.
STRIPPED_WARNING_INTERVAL: Final = 60.0
UNTRUSTED_WARNING_INTERVAL: Final = 3600.0
#: Seconds between two warnings about failing Nextcloud lookups (each failed request
#: says it in its access line).
NEXTCLOUD_WARNING_INTERVAL: Final = 60.0

#: The 404 body for a request that reached HaRP without its ``/exapps`` prefix.  The
#: status is the one any path without an app id gets (reference behaviour); the body
#: starts like the generic one and then says what is wrong and how to fix it.
STRIPPED_BODY: Final = (
    b"404 Not Found\n\n"
    b"HaRP received this request without the /exapps/ prefix: the reverse proxy in front "
    b"of HaRP strips it (e.g. nginx `proxy_pass http://harp:8780/;` under "
    b"`location /exapps/`).\n"
    b"Fix: pass the path on unchanged, e.g. `proxy_pass http://harp:8780;` (no path after "
    b"the port) or `proxy_pass http://harp:8780/exapps/;`.\n"
    b"See docs/deployment.md in HaRP's repository.\n"
)


def has_dotdot(path: bytes) -> bool:
    """A ``..`` segment in any spelling (``.``/``%2e``, ``/``/``%2f`` separators)."""
    if b"." not in path and b"%" not in path:
        return False  # the common case, without running the regex
    return _DOTDOT_RE.search(path) is not None


def split_app_path(path: bytes) -> tuple[bytes, bytes] | None:
    """``(app id as in the URL, target path)``, or None without an app id.

    The id is *searched* (a prefix such as ``/nc/exapps/x`` still names ``x``), but the
    ``/exapps/<id>`` prefix is stripped only when the path starts with it
    (docs/compatibility.md#request-pipeline).
    """
    match = _APP_ID_RE.search(path)
    if match is None:
        return None
    app = match.group(1)
    prefix_end = 8 + len(app)  # len(b"/exapps/") + id
    if path.startswith(b"/exapps/") and path[8:prefix_end] == app:
        return app, path[prefix_end:]
    return app, path


#: Paths up to this length are remembered by :func:`path_facts`.
_CACHED_PATH: Final = 512


@dataclass(frozen=True, slots=True)
class PathFacts:
    """What the decision needs from a request's raw path (a pure function of it)."""

    #: The normalised path, or None (a ``..`` segment or a malformed escape).
    path: bytes | None
    #: (app id as in the URL, target path), or None without an app id.
    split: tuple[bytes, bytes] | None
    #: :func:`~harp.web.target.endpoint_key` of the target (None without an app id).
    endpoint: bytes | None


def _path_facts(raw_path: bytes) -> PathFacts:
    path = None if has_dotdot(raw_path) else normalise_path(raw_path)
    split = split_app_path(path) if path is not None else None
    return PathFacts(path, split, endpoint_key(split[1]) if split is not None else None)


_cached_path_facts = lru_cache(maxsize=4096)(_path_facts)


def path_facts(raw_path: bytes) -> PathFacts:
    """:class:`PathFacts` of ``raw_path``, remembered for the paths that come back.

    The checks and rewrites behind it (``..`` in any spelling, percent-decoding, ``//``
    and ``.`` segments, the app id, the endpoint key) were ≈4 % of a small request, and
    an ExApp's pages and API calls use the same few paths again and again.
    """
    if len(raw_path) > _CACHED_PATH:
        return _path_facts(raw_path)
    return _cached_path_facts(raw_path)


def match_route(routes: tuple[Route, ...], target: str) -> Route | None:
    """The first route whose regex matches at the start of ``target`` (``re.match``)."""
    for route in routes:
        if route.pattern.match(target):
            return route
    return None


@lru_cache(maxsize=4096)
def identity_token(user_id: str, token: str) -> bytes:
    """``AUTHORIZATION-APP-API``: base64 of ``<user_id>:<exapp_token>``.

    Cached: the same few users of the same ExApps come back on every request.
    """
    return base64.b64encode(f"{user_id}:{token}".encode())


# --- verdicts


@dataclass(frozen=True, slots=True)
class Drop:
    """Close the connection without a response."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer with one of the generated error responses."""

    status: int
    reason: str
    #: A body of its own instead of the generic one for ``status``.
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class ControlPlaneCall:
    """Serve from the control plane; ``rest`` is the path after ``/exapps/app_api``."""

    rest: bytes


class Forward:
    """Proxy to the ExApp with these identity headers.

    A plain class, unlike the other verdicts: one is made for every proxied request.  A
    frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``, and
    even a plain dataclass's is generated Python, interpreted although this module is
    compiled (harp/compiled.py); this ``__init__`` is compiled.  Nothing changes it after.
    """

    def __init__(
        self, app_id: bytes, record: ExAppRecord, target: bytes, authorization: bytes,
        signed: bool, client: str, bruteforce: frozenset[int],
    ) -> None:
        self.app_id = app_id
        self.record = record
        self.target = target
        self.authorization = authorization
        self.signed = signed
        self.client = client
        self.bruteforce = bruteforce

    def __repr__(self) -> str:  # what the dataclass gave: test failures read it
        fields = (
            self.app_id, self.record, self.target, self.authorization, self.signed,
            self.client, self.bruteforce,
        )
        return "Forward({})".format(", ".join(repr(field) for field in fields))


Verdict = Drop | Reply | ControlPlaneCall | Forward


# tests/unit/test_root.py records verdicts with an interpreted subclass (harp/compiled.py).
@mypyc_attr(allow_interpreted_subclasses=True)
class Pipeline:
    def __init__(
        self,
        state: State,
        nextcloud: NextcloudClient,
        key_ok: KeyCheck,
        resolver: ClientAddressResolver,
    ) -> None:
        self.state = state
        self.nextcloud = nextcloud
        self.key_ok = key_ok
        self.resolver = resolver
        self._untrusted_warning = Throttle(UNTRUSTED_WARNING_INTERVAL)
        self._stripped_warning = Throttle(STRIPPED_WARNING_INTERVAL)
        self._nextcloud_warning = Throttle(NEXTCLOUD_WARNING_INTERVAL)

    def client_address(self, request: Request, now: float | None = None) -> str:
        """The address failures are charged to: every X-Forwarded-For line goes to the
        resolver, which walks them from the right (docs/differences.md#11).

        With ``now`` (the request's start, monotonic), forwarding headers from a peer
        outside ``HP_TRUSTED_PROXY_IPS`` are reported once an hour; while that warning
        is quiet this costs one comparison.
        """
        peer = request.getClientAddress()
        host = getattr(peer, "host", None) or "unix"
        headers = request.requestHeaders
        xff = header_values(headers, b"x-forwarded-for")
        xri = header_values(headers, b"x-real-ip")
        client = self.resolver.resolve(host, xff, xri[-1] if xri else None)
        # An untrusted peer is always charged itself; a trusted one almost never is.
        if (
            now is not None and now >= self._untrusted_warning.next_at and client == host
            and (xff or xri)
        ):
            self._untrusted_forwarding(host, now)
        return client

    def _untrusted_forwarding(self, peer: str, now: float) -> None:
        if self.resolver.is_trusted(peer) or not self._untrusted_warning.fire(now):
            return
        log.warn(
            "requests from {peer} carry X-Forwarded-For or X-Real-IP, but {peer} is not in "
            "HP_TRUSTED_PROXY_IPS: HaRP ignores those headers and charges every failure to "
            "{peer}, so all users behind that proxy share one ban bucket and one attacker "
            "can get everybody locked out, Nextcloud's own control calls included.  If "
            "{peer} is your reverse proxy, set HP_TRUSTED_PROXY_IPS={peer} (comma-separated "
            "addresses or CIDR networks, see docs/configuration.md).  "
            "This warning repeats at most once an hour.",
            peer=peer,
        )

    def stripped_prefix(self, request: Request, path: bytes) -> bool:
        """Does a path without an app id look like ``/exapps/...`` with the prefix cut off?

        Asked only for a path already refused for lacking ``exapps/<id>`` (never on the
        way of a real ExApp request), and only believed for a first segment that names
        the control plane (``/app_api/...``), an ExApp HaRP already holds a record of,
        or the ExApp that the request's own ``EX-APP-ID`` header names (AppAPI's
        calls).  No Nextcloud lookup: that would let any client make HaRP ask Nextcloud
        about made-up names.  A made-up path of that shape only gets the explanatory
        body instead of the generic one, with the same status.
        """
        first = path[1:].split(b"/", 1)[0]
        if not first or first == b"exapps":
            return False
        if first != CONTROL_APP:
            app_id = first.decode("latin-1").lower()
            named = last_header(request, b"ex-app-id")
            if self.state.get_exapp(app_id) is None and (
                named is None or named.decode("latin-1").lower() != app_id
            ):
                return False
        if self._stripped_warning.fire(time.monotonic()):
            log.warn(
                "{method} {path} from {peer}: requests arrive without the /exapps/ prefix, "
                "so every ExApp request fails with 404.  The reverse proxy in front of HaRP "
                "strips it (e.g. nginx `proxy_pass http://harp:8780/;` under "
                "`location /exapps/`); pass the path on unchanged: "
                "`proxy_pass http://harp:8780;` or `proxy_pass http://harp:8780/exapps/;` "
                "(docs/deployment.md).  This warning repeats at most once a minute.",
                method=request.method.decode("latin-1"), path=path.decode("latin-1"),
                peer=getattr(request.getClientAddress(), "host", "-"),
            )
        return True

    def nextcloud_failed(self, request: Request, what: str, app_id: str, error: str) -> None:
        """A Nextcloud lookup failed: said in the request's access line, and as a warning
        at most once a minute (an outage would otherwise warn once per request)."""
        cast(HarpRequest, request).detail = f"{what} failed: {error}"
        if self._nextcloud_warning.fire(time.monotonic()):
            log.warn(
                "{what} for {app} failed: {error} (repeated failures in the next minute are "
                "only in the access lines)", what=what, app=app_id, error=error,
            )

    def fail(self, client: str, why: str) -> None:
        """Count a brute-force failure; log the ban when it starts."""
        if self.state.record_failure(client):
            log.warn("banning {client}: too many failures (last: {why})", client=client, why=why)

    def malformed(self, request: Request) -> None:
        """A request dropped by the HTTP parser counts as a failure of its client.

        Never charged to a trusted proxy: its clients' garbage is not its own, and
        banning it would lock out everyone behind it.
        """
        client = self.client_address(request)
        if not self.resolver.is_trusted(client):
            self.fail(client, "malformed request")

    async def decide(self, request: Request, client: str) -> Verdict:
        if self.state.is_banned(client):
            return Drop("banned")
        if not valid_target(request.uri):
            # Not origin-form, or bytes no client should send (controls, non-ASCII).
            self.fail(client, "bad request-target")
            return Drop("bad request-target")
        raw_path = request.path
        key_valid = self.key_ok(last_header(request, b"harp-shared-key"))

        facts = path_facts(raw_path)
        path = facts.path
        if path is None:
            if not key_valid:
                self.fail(client, "dot-dot or malformed path")
            return Drop("dot-dot or malformed path")

        split = facts.split
        if split is None:
            if not key_valid:
                self.fail(client, "no app id")
            if self.stripped_prefix(request, path):
                return Reply(404, "no /exapps/ prefix", STRIPPED_BODY)
            return Reply(404, "no app id in path")
        app_raw, target = split
        if app_raw == CONTROL_APP:
            if not key_valid:
                self.fail(client, "bad shared key on app_api")
                return Reply(401, "bad shared key on app_api")
            return ControlPlaneCall(target)
        app_id = app_raw.decode("latin-1").lower()

        if self._is_signed(request):
            return await self._signed(request, app_raw, app_id, target, client, key_valid)

        record = self.state.get_exapp(app_id)
        if record is None:
            if self.state.is_missing(app_id):
                record = None
            else:
                try:
                    record = await self.nextcloud.exapp_meta(app_id)
                except NextcloudError as exc:
                    self.nextcloud_failed(request, "exapp-meta", app_id, str(exc))
                    return Reply(404, "ExApp metadata unavailable")
            if record is None:
                if not key_valid:
                    self.fail(client, "unknown ExApp")
                return Reply(404, "unknown ExApp")

        if facts.endpoint in _APPAPI_ONLY:
            self.fail(client, "unsigned AppAPI-only endpoint")
            return Drop("unsigned AppAPI-only endpoint")

        user = ANONYMOUS
        cookie = request.received_cookies.get(b"oc_sessionPassphrase")
        authorization = last_header(request, b"authorization")
        if cookie or authorization is not None:
            # Uncached lookups are rate-limited per client; over the limit the request is
            # anonymous without asking Nextcloud (harp.nextcloud.NextcloudClient.may_look_up).
            lookup_key = credential_key(app_id, cookie, authorization)
            cached = self.nextcloud.cached_user(lookup_key)
            try:
                if cached is not None:
                    # The common case, answered without a coroutine of the client's.
                    user = cached
                elif self.nextcloud.may_look_up(lookup_key, client):
                    user = await self.nextcloud.user_info(
                        app_id, lookup_key, request.requestHeaders.getAllRawHeaders()
                    )
                else:
                    log.debug("user lookup limit reached for {client}", client=client)
            except NextcloudError as exc:
                self.nextcloud_failed(request, "user-info", app_id, str(exc))
                return Reply(401, "user lookup failed")

        route = match_route(record.routes, target.decode("latin-1"))
        if route is None:
            self.fail(client, "no matching route")
            return Reply(404, "no matching route")
        if route.access_level != PUBLIC and not (
            user.user_id and route.access_level <= user.access_level
        ):
            self.fail(client, "access denied")
            return Reply(403, "access denied")
        return Forward(
            app_raw, record, target, identity_token(user.user_id, record.token), False, client,
            route.bruteforce,
        )

    @staticmethod
    def _is_signed(request: Request) -> bool:
        """All six AppAPI headers present and the identity non-empty
        (docs/compatibility.md#request-pipeline)."""
        headers = request.requestHeaders
        if not last_header(request, b"authorization-app-api"):
            return False
        for name in _SIGNED_HEADERS:
            # header_values, not hasHeader: no name canonicalised per call (None: absent).
            if header_values(headers, name) is None:
                return False
        return True

    async def _signed(
        self, request: Request, app_raw: bytes, app_id: str, target: bytes, client: str,
        key_valid: bool,
    ) -> Verdict:
        if not key_valid:
            # The reference counts this against the raw peer; we count the true client
            # (docs/differences.md#19).
            self.fail(client, "bad shared key on signed request")
            return Drop("bad shared key on signed request")
        record = self.state.get_exapp(app_id)
        if record is None and not self.state.is_missing(app_id):
            try:
                record = await self.nextcloud.exapp_meta(app_id)
            except NextcloudError:
                record = None
        if record is None:
            port_text = last_header(request, b"ex-app-port") or b""
            host = (last_header(request, b"ex-app-host") or b"").decode("latin-1")
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535 or not host:
                return Reply(503, "signed request with a bad ex-app-host/ex-app-port")
            version = (last_header(request, b"ex-app-version") or b"").decode("latin-1")
            record = synthesized(version, host, int(port_text))
        authorization = last_header(request, b"authorization-app-api") or b""
        return Forward(app_raw, record, target, authorization, True, client, frozenset())
