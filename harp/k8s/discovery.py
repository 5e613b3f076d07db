"""An ExApp's upstream from the cluster, for routing (docs/kubernetes.md#routing).

AppAPI's record for a Kubernetes ExApp names the app id as its host, which means nothing
to HaRP; the real address is wherever ``expose`` put the app.  HaRP looks it up:

1. the Service named after the app (``nc-app-<id>``);
2. else the Services labelled ``app.kubernetes.io/part-of=nc-app-<id>`` (multi-role apps);
3. else the manual-expose annotations on the app's Deployment(s);

and replaces the record's host and port with it — reached as ``expose`` reached it: the
``upstream_host`` it was given (:func:`~harp.k8s.services.recorded_host`), else for a
NodePort Service the node it chose (:func:`~harp.k8s.services.node_choice`), both
recorded on the Service — on a registry cache miss (the record fetched
from Nextcloud) and on every ``/exapp_storage`` push, so a push can never put the app id
back as the host (reference regression #101).  When nothing is found (an app that
is not on Kubernetes) the record is used as it is.  An object recorded as another ExApp's
(their names collide, :mod:`harp.k8s.owners`) is never used: that would send this app's
requests to the other app.  An API error raises
:class:`~harp.k8s.client.K8sUnavailable`: the caller answers 503 (control plane) or 404
(routing) and caches nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

from harp.exapps import ExAppRecord
from harp.k8s import manifests
from harp.k8s.client import K8sClient, K8sUnavailable
from harp.k8s.owners import belongs_to
from harp.k8s.payloads import NodeChoice
from harp.k8s.services import (
    BadRecordedChoice,
    NoUpstream,
    Upstream,
    cluster_address,
    load_balancer_address,
    manual_upstream,
    node_address,
    node_choice,
    node_port,
    recorded_host,
    service_name,
    service_port,
    service_type,
)
from harp.logs import HarpLogger, Throttle

log = HarpLogger("harp.k8s")

GET = b"GET"
DEFAULT_CHOICE: Final = NodeChoice()
#: A recorded upstream host or node choice that cannot be used is said at most this
#: often: every cache miss of every worker would otherwise repeat it.
CHOICE_WARNING_INTERVAL: Final = 60.0


def with_upstream(record: ExAppRecord, upstream: Upstream) -> ExAppRecord:
    """``record`` pointing at ``upstream`` (its JSON source too, for shared state)."""
    host, port = upstream
    source = {**record.source, "host": host, "port": port}
    return dataclasses.replace(record, host=host, port=port, source=source)


class Discovery:
    """Finds the upstream of an app in the configured namespace."""

    def __init__(self, client: K8sClient) -> None:
        self.client = client
        self._choice_warning = Throttle(CHOICE_WARNING_INTERVAL)

    def path(self, kind: str, name: str = "") -> str:
        group = "/apis/apps/v1" if kind == "deployments" else "/api/v1"
        path = f"{group}/namespaces/{self.client.namespace}/{kind}"
        return f"{path}/{name}" if name else path

    async def apply(self, app_id: str, record: ExAppRecord) -> ExAppRecord:
        """``record`` with the app's Kubernetes upstream, if it has one."""
        upstream = await self.upstream(app_id)
        if upstream is None:
            return record
        log.info("ExApp {app}: Kubernetes upstream {host}:{port}", app=app_id,
                 host=upstream[0], port=upstream[1])
        return with_upstream(record, upstream)

    async def upstream(self, app_id: str) -> Upstream | None:
        """Where ``app_id`` is reached, None if Kubernetes does not know it (or is off)."""
        if self.client.unusable() is not None:
            return None
        name, part_of = manifests.app_names(app_id)
        reply = await self.client.call(GET, self.path("services", name))
        service = reply.data if reply.status == 200 and isinstance(reply.data, dict) else None
        if service is None and reply.status != 404:
            raise self._error(app_id, "Service", reply.status)
        if service is not None and not belongs_to(service, app_id):
            service = None
        if service is None:
            listed = await self.client.call(
                GET, self.path("services"),
                query={"labelSelector": manifests.part_of_selector(part_of)},
            )
            if not listed.ok:
                raise self._error(app_id, "Service", listed.status)
            found = [s for s in listed.items() if isinstance(s, dict) and belongs_to(s, app_id)]
            service = found[0] if found else None
        if service is None:
            return await self._manual(app_id, name, part_of)
        host = self._recorded_host(app_id, service)
        choice = self._recorded_choice(app_id, service)
        try:
            try:
                return await self.service_upstream(service, choice, host)
            except NoUpstream as exc:
                if choice == DEFAULT_CHOICE or host is not None:
                    raise
                # The recorded node is gone (or the selector matches none): any node
                # still serves a NodePort, which beats no route at all.
                self._warn_recorded(app_id, service, "node choice", f"no node for it ({exc})")
                return await self.service_upstream(service)
        except NoUpstream as exc:
            log.warn("ExApp {app}: Service {service} gives no upstream: {why}", app=app_id,
                     service=service_name(service), why=str(exc))
            return None

    def _recorded_host(self, app_id: str, service: dict[str, Any]) -> str | None:
        """The ``upstream_host`` ``expose`` left on the Service; None when there is none
        or it was edited into something ``expose`` would refuse (then the Service's own
        address is used, as for a Service without one)."""
        try:
            return recorded_host(service)
        except BadRecordedChoice as exc:
            self._warn_recorded(app_id, service, "upstream host", str(exc))
            return None

    def _recorded_choice(self, app_id: str, service: dict[str, Any]) -> NodeChoice:
        """The node choice ``expose`` left on a NodePort Service; the default when there
        is none or it was edited into something ``expose`` would refuse."""
        if service_type(service) != "NodePort":
            return DEFAULT_CHOICE
        try:
            return node_choice(service)
        except BadRecordedChoice as exc:
            self._warn_recorded(app_id, service, "node choice", str(exc))
            return DEFAULT_CHOICE

    def _warn_recorded(self, app_id: str, service: dict[str, Any], what: str,
                       why: str) -> None:
        fallback = ("the default node choice" if what == "node choice"
                    else "the address the Service gives")
        if self._choice_warning.fire(self.client.reactor.seconds()):
            log.warn("ExApp {app}: Service {service}'s recorded {what} is not usable "
                     "({why}); using {fallback} (said at most once a minute)",
                     app=app_id, service=service_name(service), what=what, why=why,
                     fallback=fallback)

    async def service_upstream(
        self, service: dict[str, Any], choice: NodeChoice = DEFAULT_CHOICE,
        host: str | None = None,
    ) -> Upstream:
        """The upstream a Service gives (:mod:`harp.k8s.services`); NodePort asks for the
        nodes ``choice`` allows.  ``host`` (an ``upstream_host``) replaces the address,
        not the port, and needs no node."""
        kind = service_type(service)
        if kind == "NodePort":
            port = node_port(service)
            return host or await self.node_address(choice), port
        if kind == "LoadBalancer":
            host = host or load_balancer_address(service)
            if host is None:
                raise NoUpstream("the LoadBalancer has no address yet")
            return host, service_port(service)
        return host or cluster_address(service, self.client.namespace), service_port(service)

    async def node_address(self, choice: NodeChoice) -> str:
        selector = choice.label_selector
        reply = await self.client.call(GET, "/api/v1/nodes",
                                       query={"labelSelector": selector} if selector else None)
        if reply.status == 400 and selector:
            # The selector itself is refused: no node for this choice, not an outage.
            raise NoUpstream(f"the node label selector is refused: {reply.error()}")
        if not reply.ok:
            raise K8sUnavailable(f"Failed to list K8s nodes: Status {reply.status}, "
                                 f"{reply.error()}")
        return node_address(reply.items(), choice.address_type, choice.node_name)

    async def _manual(self, app_id: str, name: str, part_of: str) -> Upstream | None:
        reply = await self.client.call(GET, self.path("deployments", name))
        if reply.status == 200 and isinstance(reply.data, dict):
            found = manual_upstream(reply.data) if belongs_to(reply.data, app_id) else None
            if found is not None:
                return found
        elif reply.status != 404:
            raise self._error(app_id, "Deployment", reply.status)
        listed = await self.client.call(
            GET, self.path("deployments"),
            query={"labelSelector": manifests.part_of_selector(part_of)},
        )
        if not listed.ok:
            raise self._error(app_id, "Deployment", listed.status)
        for deployment in listed.items():
            found = None
            if isinstance(deployment, dict) and belongs_to(deployment, app_id):
                found = manual_upstream(deployment)
            if found is not None:
                return found
        return None

    @staticmethod
    def _error(app_id: str, what: str, status: int) -> K8sUnavailable:
        log.warn("ExApp {app}: Kubernetes API answered {status} to the {what} lookup; "
                 "nothing cached", app=app_id, status=status, what=what)
        return K8sUnavailable(f"K8s API error during {what} lookup for '{app_id}'")
