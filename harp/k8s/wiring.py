"""Wires the Kubernetes backend into one serving process (called from harp.service).

Two steps, because the pieces meet in both directions: :func:`build` makes the client
and the discovery first, so that the Nextcloud client can be given
:attr:`K8sBackend.upstream` (re-discovery on a registry cache miss); :meth:`register`
then adds the endpoints, which need that Nextcloud client for ``expose``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harp.k8s.client import K8sClient
from harp.k8s.discovery import Discovery
from harp.k8s.lifecycle import FetchRecord, K8sLifecycle
from harp.k8s.probe import ReachabilityProbe
from harp.k8s.routes import K8sRoutes, K8sStorage, Storage
from harp.k8s.settings import K8sSettings
from harp.nextcloud import UpstreamResolver
from harp.state import State
from harp.web.control import ControlPlane


@dataclass(frozen=True, slots=True)
class K8sBackend:
    reactor: Any
    client: K8sClient
    discovery: Discovery

    @property
    def enabled(self) -> bool:
        return self.client.settings.enabled

    @property
    def upstream(self) -> UpstreamResolver | None:
        """For the Nextcloud client: records fetched on a cache miss get their upstream."""
        return self.discovery.apply if self.enabled else None

    @property
    def closers(self) -> tuple[Callable[[], object], ...]:
        return (self.client.close,)

    def register(self, control: ControlPlane, state: State,
                 fetch_record: FetchRecord) -> None:
        lifecycle = K8sLifecycle(self.reactor, self.client, self.discovery, state, fetch_record)
        probe = ReachabilityProbe(self.reactor, self.client)
        K8sRoutes(self.client, lifecycle, probe).register(control)

    def storage(self, inner: Storage) -> Storage:
        """``/exapp_storage`` that keeps the Kubernetes upstream (as is when disabled)."""
        return K8sStorage(inner, self.discovery) if self.enabled else inner


def build(reactor: Any, settings: K8sSettings, connect_timeout: float) -> K8sBackend:
    """The backend for ``settings`` (raises ConfigError for a CA file that does not load)."""
    client = K8sClient(reactor, settings, connect_timeout)
    return K8sBackend(reactor, client, Discovery(client))
