"""``/info``'s ``kubernetes.reachable``: a probe of the API that never holds ``/info`` up.

AppAPI pings ``/info`` with a 5 s timeout before every Kubernetes deploy and from its
daemon check; the reference probes ``GET /api`` on every call and can hang for 60 s.
Here the answer is cached (:data:`TTL_REACHABLE` when reachable, :data:`TTL_UNREACHABLE`
when not, so a recovery shows quickly), concurrent ``/info`` calls share one probe, and a
probe gets :data:`PROBE_TIMEOUT` seconds, well inside AppAPI's 5.  Without an API server
or a token there is nothing to ask: unreachable, without a call.
"""

from __future__ import annotations

from typing import Any, Final

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from harp.k8s.client import K8sClient, K8sError
from harp.logs import HarpLogger

log = HarpLogger("harp.k8s")

PROBE_TIMEOUT: Final = 2.0
TTL_REACHABLE: Final = 10.0
TTL_UNREACHABLE: Final = 2.0


class ReachabilityProbe:
    def __init__(self, reactor: Any, client: K8sClient) -> None:
        self.reactor = reactor
        self.client = client
        self._value: bool | None = None
        self._until = 0.0
        self._waiters: list[Deferred[bool]] | None = None

    def cached(self) -> bool | None:
        """The answer without a call, when there is one (unusable, or fresh)."""
        if self.client.unusable() is not None:
            return False
        if self._value is not None and self.reactor.seconds() < self._until:
            return self._value
        return None

    def reachable(self) -> Deferred[bool]:
        known = self.cached()
        if known is not None:
            return succeed(known)
        waiter: Deferred[bool] = Deferred()
        if self._waiters is None:
            self._waiters = [waiter]
            Deferred.fromCoroutine(self._probe()).addBoth(self._done)
        else:
            self._waiters.append(waiter)
        return waiter

    async def _probe(self) -> bool:
        try:
            reply = await self.client.call(b"GET", "/api", timeout=PROBE_TIMEOUT)
        except K8sError:
            return False
        return reply.status == 200

    def _done(self, result: bool | Failure) -> None:
        if isinstance(result, Failure):  # a bug: it must not leave /info waiting forever
            log.failure("Kubernetes reachability probe failed", result)
        value = result is True
        self._value = value
        self._until = self.reactor.seconds() + (TTL_REACHABLE if value else TTL_UNREACHABLE)
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            waiter.callback(value)
