"""The ``/k8s/exapp/*`` operations: each turns a validated payload into API calls and an
:class:`~harp.docker.lifecycle.Outcome` with the reference's status and body
(docs/kubernetes.md#endpoints).

No request in sight (:mod:`harp.k8s.routes` adapts them) and no cluster state kept: every
call asks the API.  An object of the app's name that another ExApp's operation made (the
names collide) is refused with 409 before anything changes (:mod:`harp.k8s.owners`).  An
API answer HaRP has no mapping for is a 503 naming its status; an unreachable API is a
:class:`~harp.k8s.client.K8sUnavailable` (503).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

from twisted.internet.task import deferLater

from harp.docker.lifecycle import NO_CONTENT, Outcome
from harp.docker.names import ExAppName, RemovePayload
from harp.exapps import ExAppRecord
from harp.k8s import manifests, owners, pods
from harp.k8s.client import STRATEGIC_MERGE, K8sClient, K8sUnavailable
from harp.k8s.discovery import Discovery, with_upstream
from harp.k8s.payloads import CreateSpec, ExposeSpec
from harp.k8s.services import (
    BadRecordedChoice,
    NoUpstream,
    Upstream,
    load_balancer_address,
    node_choice,
    recorded_host,
    service_port,
    service_type,
)
from harp.logs import HarpLogger
from harp.state import State

log = HarpLogger("harp.k8s")

GET: Final = b"GET"
POST: Final = b"POST"
PATCH: Final = b"PATCH"
DELETE: Final = b"DELETE"

#: Nextcloud's record of an app (``harp/exapp-meta``), not cached: ``expose`` stores it.
FetchRecord = Callable[[str], Awaitable[ExAppRecord | None]]


def _text(status: int, text: str) -> Outcome:
    return Outcome(status, text=text)


def _unexpected(what: str, status: int) -> K8sUnavailable:
    return K8sUnavailable(f"{what}: Status {status}")


class K8sLifecycle:
    def __init__(self, reactor: Any, client: K8sClient, discovery: Discovery, state: State,
                 fetch_record: FetchRecord) -> None:
        self.reactor = reactor
        self.client = client
        self.discovery = discovery
        self.state = state
        self.fetch_record = fetch_record
        settings = client.settings
        self.storage_size = settings.storage_size
        self.storage_class = settings.storage_class
        self.host_aliases = settings.host_aliases

    def _path(self, kind: str, name: str = "") -> str:
        return self.discovery.path(kind, name)

    async def exists(self, app: ExAppName) -> Outcome:
        deployment = await self._deployment(app)
        return Outcome(200, payload={"exists": deployment is not None})

    async def _deployment(self, app: ExAppName) -> dict[str, Any] | None:
        """The app's Deployment, None if there is none; another ExApp's (the names
        collide) raises :class:`~harp.k8s.owners.NameTaken`."""
        name = manifests.deployment_name(app)
        return await self._own("deployments", "Deployment", name, app)

    async def _own(self, kind: str, what: str, name: str, app: ExAppName) -> dict[str, Any] | None:
        """The object ``name`` of ``kind``, checked to be this app's (the PVC: any role's)."""
        reply = await self.client.call(GET, self._path(kind, name))
        if reply.status == 404:
            return None
        if reply.status != 200 or not isinstance(reply.data, dict):
            log.error("checking {what} {name}: {status} {error}", what=what, name=name,
                      status=reply.status, error=reply.error())
            raise _unexpected(f"Error checking {what.lower()} '{name}'", reply.status)
        owners.check(reply.data, app, what, name,
                     roles_share=kind == "persistentvolumeclaims")
        return reply.data

    async def create(self, spec: CreateSpec) -> Outcome:
        app = spec.exapp
        name, claim = manifests.deployment_name(app), manifests.pvc_name(app)
        if spec.mount_points:
            log.warn("{name}: mount_points are ignored on Kubernetes", name=name)
        pvc = manifests.pvc(app, self.storage_size, self.storage_class)
        reply = await self.client.call(POST, self._path("persistentvolumeclaims"), body=pvc)
        if reply.status == 409:  # another role's (shared), or another ExApp's (refused)
            await self._own("persistentvolumeclaims", "PVC", claim, app)
        elif reply.status not in (200, 201):
            log.error("creating PVC {name}: {status} {error}", name=claim, status=reply.status,
                      error=reply.error())
            raise _unexpected(f"Failed to create PVC '{claim}'", reply.status)
        body = manifests.deployment(spec, self.host_aliases)
        reply = await self.client.call(POST, self._path("deployments"), body=body)
        if reply.status in (200, 201):
            log.info("created deployment {name} (PVC {claim})", name=name, claim=claim)
            return Outcome(201, payload={"name": name})
        if reply.status == 409:
            await self._deployment(app)  # another ExApp's: say so
            return _text(409, f"Deployment '{name}' already exists.")
        log.error("creating deployment {name}: {status} {error}", name=name,
                  status=reply.status, error=reply.error())
        raise _unexpected(f"Error creating deployment '{name}'", reply.status)

    async def start(self, app: ExAppName) -> Outcome:
        return await self._scale(app, 1, "starting")

    async def stop(self, app: ExAppName) -> Outcome:
        return await self._scale(app, 0, "stopping")

    async def _scale(self, app: ExAppName, replicas: int, verb: str) -> Outcome:
        """Idempotent: a second start (stop) is 204 again, unlike Docker's 200."""
        name = manifests.deployment_name(app)
        if await self._deployment(app) is None:
            return _text(404, f"Deployment '{name}' not found.")
        reply = await self.client.call(
            PATCH, self._path("deployments", name), body=manifests.replicas_patch(replicas),
            content_type=STRATEGIC_MERGE,
        )
        if reply.status in (200, 201):
            log.info("deployment {name} scaled to {n}", name=name, n=replicas)
            return NO_CONTENT
        if reply.status == 404:
            return _text(404, f"Deployment '{name}' not found.")
        log.error("{verb} deployment {name}: {status} {error}", verb=verb, name=name,
                  status=reply.status, error=reply.error())
        raise _unexpected(f"Error {verb} deployment '{name}'", reply.status)

    async def wait_for_start(self, app: ExAppName) -> Outcome:
        name = manifests.deployment_name(app)
        query = {"labelSelector": manifests.app_selector(app)}
        watch = pods.PodWatch(self.reactor.seconds())
        while not watch.expired(self.reactor.seconds()):
            reply = await self.client.call(GET, self._path("pods"), query=query)
            if not reply.ok:
                raise _unexpected(f"Error listing pods for deployment '{name}'", reply.status)
            found = reply.items()
            answer = watch.see(found, self.reactor.seconds())
            if answer is None and not found and await self._deployment(app) is None:
                answer = pods.not_found(name)
            if answer is not None:
                log.info("deployment {name}: {status} ({health})", name=name,
                         status=answer["status"], health=answer["health"])
                return Outcome(200, payload=answer)
            await deferLater(self.reactor, pods.POLL_INTERVAL)
        log.warn("deployment {name} did not become ready in time", name=name)
        return Outcome(200, payload=watch.timeout())

    async def remove(self, spec: RemovePayload) -> Outcome:
        app = spec.exapp
        name, claim = manifests.deployment_name(app), manifests.pvc_name(app)
        # Checked before anything is deleted: another ExApp's objects all stay.
        await self._deployment(app)
        if spec.remove_data:
            await self._own("persistentvolumeclaims", "PVC", claim, app)
        reply = await self.client.call(DELETE, self._path("deployments", name))
        if reply.status not in (200, 202, 404):
            raise _unexpected(f"Error removing deployment '{name}'", reply.status)
        if spec.remove_data:
            reply = await self.client.call(DELETE, self._path("persistentvolumeclaims", claim))
            if reply.status not in (200, 202, 404):
                raise _unexpected(f"Error removing PVC '{claim}'", reply.status)
        # Only a Service HaRP made (managed-by=harp): an operator's own stays (#95).
        reply = await self.client.call(GET, self._path("services", name))
        if reply.status == 200 and isinstance(reply.data, dict):
            svc_labels = (reply.data.get("metadata") or {}).get("labels") or {}
            mine = svc_labels.get(manifests.LABEL_MANAGED_BY) == manifests.MANAGED_BY_HARP
            try:
                owners.check(reply.data, app, "Service", name)
            except owners.NameTaken:
                mine = False
            if mine:
                reply = await self.client.call(DELETE, self._path("services", name))
                if reply.status not in (200, 202, 404):
                    raise _unexpected(f"Error removing Service '{name}'", reply.status)
            else:
                log.info("keeping Service {name}: not managed by HaRP for this ExApp",
                         name=name)
        elif reply.status != 404:
            log.warn("Service {name}: lookup answered {status}, not removed", name=name,
                     status=reply.status)
        log.info("removed deployment {name} (data: {data})", name=name, data=spec.remove_data)
        return NO_CONTENT

    async def expose(self, spec: ExposeSpec) -> Outcome:
        name = manifests.deployment_name(spec.exapp)
        if spec.expose_type == "manual":
            upstream = await self._expose_manual(spec, name)
        else:
            upstream = await self._expose_service(spec, name)
        app_id = spec.app_id
        log.info("expose {app} ({kind}): upstream {host}:{port}", app=app_id,
                 kind=spec.expose_type, host=upstream[0], port=upstream[1])
        try:
            record = await self.fetch_record(app_id)
        except Exception as exc:
            log.warn("expose {app}: exapp-meta failed: {error}", app=app_id, error=str(exc))
            return _text(503, f"Failed to fetch metadata for '{app_id}'")
        if record is None:
            return _text(404, f"No ExApp metadata for '{app_id}'")
        self.state.put_exapp(app_id, with_upstream(record, upstream))
        return Outcome(200, payload={
            "appId": app_id, "host": upstream[0], "port": upstream[1],
            "exposeType": spec.expose_type, "serviceName": name,
            "namespace": self.client.namespace,
        })

    async def _expose_manual(self, spec: ExposeSpec, name: str) -> Upstream:
        """The given upstream, noted on the Deployment when the cluster is usable (best
        effort: the expose succeeds without it, as in the reference)."""
        assert spec.upstream_host is not None
        upstream = spec.upstream_host, spec.upstream_port or spec.port
        if self.client.unusable() is None:
            try:
                if await self._deployment(spec.exapp) is None:
                    log.warn("could not annotate deployment {name}: there is none", name=name)
                    return upstream
                reply = await self.client.call(
                    PATCH, self._path("deployments", name),
                    body=manifests.manual_patch(*upstream), content_type=STRATEGIC_MERGE,
                )
                if not reply.ok:
                    log.warn("could not annotate deployment {name}: {status} {error}",
                             name=name, status=reply.status, error=reply.error())
            except K8sUnavailable as exc:
                log.warn("could not annotate deployment {name}: {error}", name=name,
                         error=exc.message)
        return upstream

    async def _expose_service(self, spec: ExposeSpec, name: str) -> Upstream:
        reply = await self.client.call(
            POST, self._path("services"), body=manifests.service(spec)
        )
        if reply.status not in (200, 201, 409):
            log.error("creating Service {name}: {status} {error}", name=name,
                      status=reply.status, error=reply.error())
            raise _unexpected(f"Failed to create Service '{name}'", reply.status)
        service = await self._read_service(name)
        if reply.status == 409:
            owners.check(service, spec.exapp, "Service", name)
        upstream = await self._upstream(spec, name, service)
        if reply.status == 409:  # only once it answered: a failed expose changes nothing
            await self._record_reach(spec, name, service)
        return upstream

    async def _upstream(self, spec: ExposeSpec, name: str, service: dict[str, Any]) -> Upstream:
        try:
            if spec.expose_type == "loadbalancer":
                port = service_port(service)
                host = spec.upstream_host or load_balancer_address(service)
                if host is None:
                    host = await self._wait_for_load_balancer(spec, name)
                return host, port
            return await self.discovery.service_upstream(service, spec.node,
                                                         spec.upstream_host)
        except NoUpstream as exc:
            raise K8sUnavailable(str(exc)) from None

    async def _record_reach(self, spec: ExposeSpec, name: str,
                            service: dict[str, Any]) -> None:
        """An existing Service (409) gets this ``expose``'s upstream host and (NodePort)
        node choice, so that re-discovery reaches the app as answered now (a new Service
        has them from :func:`~harp.k8s.manifests.service`).  Best effort, like the manual
        annotations: without it, routing after a cache miss uses what was recorded before."""
        kind = service_type(service)
        try:
            if recorded_host(service) == spec.upstream_host and (
                    kind != "NodePort" or node_choice(service) == spec.node):
                return
        except BadRecordedChoice:
            pass  # replaced below
        try:
            reply = await self.client.call(
                PATCH, self._path("services", name),
                body=manifests.reach_patch(spec, kind), content_type=STRATEGIC_MERGE,
            )
        except K8sUnavailable as exc:
            log.warn("could not record the upstream choice on Service {name}: {error}",
                     name=name, error=exc.message)
            return
        if not reply.ok:
            log.warn("could not record the upstream choice on Service {name}: {status} "
                     "{error}", name=name, status=reply.status, error=reply.error())

    async def _read_service(self, name: str) -> dict[str, Any]:
        reply = await self.client.call(GET, self._path("services", name))
        if reply.status != 200 or not isinstance(reply.data, dict):
            raise _unexpected(f"Failed to read Service '{name}'", reply.status)
        return reply.data

    async def _wait_for_load_balancer(self, spec: ExposeSpec, name: str) -> str:
        end = self.reactor.seconds() + spec.wait_timeout
        while True:
            host = load_balancer_address(await self._read_service(name))
            if host is not None:
                return host
            if self.reactor.seconds() >= end:
                raise K8sUnavailable(
                    f"Timed out waiting for LoadBalancer address for Service '{name}'"
                )
            await deferLater(self.reactor, spec.wait_interval)
