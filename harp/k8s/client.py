"""HaRP's Kubernetes API client: non-blocking, verified, bounded, and quiet about its token.

One treq client on a keep-alive pool (the reactor's, no thread).  What it guarantees:

* **TLS**: an ``https`` API server is verified against ``HP_K8S_CA_FILE`` (the service
  account's ``ca.crt`` by default, when it exists; otherwise the system's trust store),
  host name or IP SAN included; ``HP_K8S_VERIFY_SSL=false`` turns verification off.  A CA
  file that was named explicitly but does not load stops start-up (exit 2).
* **Token**: ``HP_K8S_BEARER_TOKEN`` if set, else the token file is read at every call, so
  a rotated projected service-account token is used as soon as the kubelet writes it.
  The token only ever goes into the ``Authorization`` header: it is in no log line and no
  error message.
* **Time**: every call has its own timeout (``call_timeout``, less for ``/info``'s probe);
  a call that runs out is a :class:`K8sUnavailable` (→ 503), never a hung request.
* **Load**: at most ``max_concurrent`` calls are in flight; the rest queue
  (``DeferredSemaphore``), so a burst of cache misses cannot open hundreds of connections.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlencode

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from treq.client import HTTPClient
from treq.content import collect
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import Certificate, CertificateOptions, trustRootFromCertificates
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from harp.config.values import ConfigError
from harp.docker.client import EngineError
from harp.k8s.settings import K8sSettings
from harp.k8s.token import read_token
from harp.logs import HarpLogger

log = HarpLogger("harp.k8s")

CALL_TIMEOUT: Final = 30.0
MAX_CONCURRENT: Final = 8
BODY_LIMIT: Final = 16 << 20
JSON: Final = b"application/json"
#: Merge patches as the API server understands them for built-in kinds (docs/kubernetes.md).
STRATEGIC_MERGE: Final = b"application/strategic-merge-patch+json"

DISABLED: Final = "Kubernetes backend is disabled in HaRP."
NO_API_SERVER: Final = "Kubernetes API server is not configured."
NO_TOKEN: Final = "Kubernetes token is not configured."  # noqa: S105 -- a message
UNREACHABLE: Final = "Error communicating with Kubernetes API"


class K8sError(EngineError):
    """A Kubernetes exchange HaRP cannot answer usefully: 503 with ``message``.

    An :class:`~harp.docker.client.EngineError` (a backend's failure, its ``status`` and
    ``message`` what HaRP answers), so both backends' endpoints answer it the same way.
    """


class K8sUnavailable(K8sError):
    """Not configured, unreachable, timed out, or an unusable answer."""


@dataclass(frozen=True, slots=True)
class K8sReply:
    status: int
    data: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def error(self) -> str:
        """The API's own error message (a ``Status`` object), for logs."""
        if isinstance(self.data, dict) and isinstance(self.data.get("message"), str):
            return str(self.data["message"])[:300]
        return f"HTTP {self.status}"

    def items(self) -> list[Any]:
        items = self.data.get("items") if isinstance(self.data, dict) else None
        return items if isinstance(items, list) else []


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """TLS without certificate checks (``HP_K8S_VERIFY_SSL=false`` only)."""

    def __init__(self) -> None:
        self._context = CertificateOptions().getContext()

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tls_protocol)
        connection.set_connect_state()
        return connection


@implementer(IPolicyForHTTPS)
class _NoVerification:
    def creatorForNetloc(self, hostname: bytes, port: int) -> _Unverified:
        return _Unverified()


def tls_policy(settings: K8sSettings) -> IPolicyForHTTPS:
    """How ``https`` API servers are checked (see the module docstring)."""
    if not settings.verify_ssl:
        return _NoVerification()
    ca = settings.ca_file
    if ca is None or not (settings.ca_file_explicit or ca.exists()):
        return BrowserLikePolicyForHTTPS()
    try:
        certificates = x509.load_pem_x509_certificates(ca.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "HP_K8S_CA_FILE", str(ca), f"cannot load the CA certificates ({exc})"
        ) from None
    trust = trustRootFromCertificates(
        [Certificate.loadPEM(cert.public_bytes(Encoding.PEM)) for cert in certificates]
    )
    return BrowserLikePolicyForHTTPS(trustRoot=trust)


class K8sClient:
    """Calls to one API server within one namespace (paths are given in full)."""

    def __init__(
        self, reactor: Any, settings: K8sSettings, connect_timeout: float,
        call_timeout: float = CALL_TIMEOUT, max_concurrent: int = MAX_CONCURRENT,
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.call_timeout = call_timeout
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = max_concurrent
        self.pool.cachedConnectionTimeout = 30
        agent = Agent(reactor, contextFactory=tls_policy(settings),
                      connectTimeout=connect_timeout, pool=self.pool)
        self._http = HTTPClient(agent)
        self._limit = DeferredSemaphore(max_concurrent)
        self._token_missing_logged = False

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()  # type: ignore[no-any-return]

    def unusable(self) -> str | None:
        """Why no call can be made (the 503 message), or None when one can."""
        return self._token()[1]

    def _token(self) -> tuple[str, None] | tuple[None, str]:
        """(the token now, None), or (None, why no call can be made)."""
        if not self.settings.enabled:
            return None, DISABLED
        if not self.settings.api_server:
            return None, NO_API_SERVER
        token = read_token(self.settings)
        if token is None:
            if not self._token_missing_logged:
                self._token_missing_logged = True
                log.error("no Kubernetes bearer token: set HP_K8S_BEARER_TOKEN or "
                          "HP_K8S_BEARER_TOKEN_FILE ({path})", path=str(self.settings.token_file))
            return None, NO_TOKEN
        self._token_missing_logged = False
        return token, None

    async def call(
        self, method: bytes, path: str, *, query: dict[str, str] | None = None,
        body: Any = None, content_type: bytes = JSON, timeout: float | None = None,
    ) -> K8sReply:
        """One request, its JSON answer read; :class:`K8sUnavailable` when none came.

        The timeout covers the wait for a free slot too: a probe queued behind hung calls
        still ends in time.
        """
        token, why = self._token()
        if token is None:
            raise K8sUnavailable(why or NO_TOKEN)
        url = self.settings.api_server + path
        if query:
            url += "?" + urlencode(query)
        headers = Headers({b"Authorization": [b"Bearer " + token.encode("latin-1")],
                           b"Accept": [JSON]})
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers.setRawHeaders(b"Content-Type", [content_type])
        timed_out = False

        def on_timeout(result: Any, seconds: float) -> Any:
            nonlocal timed_out
            timed_out = True
            return result

        limited = Deferred.fromCoroutine(self._limited(method, url, headers, data))
        limited.addTimeout(timeout or self.call_timeout, self.reactor, onTimeoutCancel=on_timeout)
        try:
            return await limited
        except K8sError:
            raise
        except CancelledError:
            if not timed_out:
                raise  # our caller was cancelled (AppAPI hung up): not an API failure
            log.warn("Kubernetes API {method} {path}: no answer in time",
                     method=method.decode(), path=path)
        except Exception as exc:
            log.warn("Kubernetes API {method} {path} failed: {error}",
                     method=method.decode(), path=path, error=_describe(exc))
        raise K8sUnavailable(UNREACHABLE)

    async def _limited(
        self, method: bytes, url: str, headers: Headers, data: bytes | None
    ) -> K8sReply:
        await self._limit.acquire()
        try:
            return await self._exchange(method, url, headers, data)
        finally:
            self._limit.release()

    async def _exchange(
        self, method: bytes, url: str, headers: Headers, data: bytes | None
    ) -> K8sReply:
        response = await self._http.request(
            method.decode(), url, headers=headers, data=data, allow_redirects=False
        )
        parts: list[bytes] = []
        size = 0

        def keep(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)
            if size > BODY_LIMIT:
                raise K8sUnavailable(f"Kubernetes API answer larger than {BODY_LIMIT} bytes")
            parts.append(chunk)

        await collect(response, keep)
        raw = b"".join(parts)
        try:
            payload = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError, RecursionError):  # nested too deep: no JSON
            payload = None
        return K8sReply(response.code, payload)


def _describe(exc: Exception) -> str:
    reasons = getattr(exc, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return str(exc) or type(exc).__name__
