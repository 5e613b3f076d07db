"""A Kubernetes API server for the tests: kmock's ``KubernetesEmulator`` over HTTP(S).

Why an emulator: no real API server installs on the test machines, and HaRP's Kubernetes
backend only ever makes plain REST calls (get, list, create, patch, delete of Deployments,
PVCs, Services, Pods and Nodes), which kmock's stateful in-memory emulator serves.  It runs
no controllers, so the tests play controller and kubelet: they create the Pods a Deployment
would get (:meth:`KubeAPI.add_pod`) and the Nodes (:meth:`KubeAPI.add_node`).

:class:`ApiServer` extends the emulator where kmock 0.8 lacks what the real API server does
and what HaRP relies on:

* bearer-token authentication (401 for a missing or unknown token), so the tests can
  rotate the token file, and a token without any permission (403: RBAC is not modelled
  beyond that);
* ``labelSelector`` on lists (equality-based: ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``);
* PATCH only with a patch content type (``application/strategic-merge-patch+json`` or
  ``merge-patch+json``), else 415 as the real server answers a plain ``application/json``;
* 201 (not 200) for a create;
* the API server's own allocations on a Service create: ``spec.clusterIP`` (the address
  the test ExApp listens on, 127.0.0.1) and a ``nodePort`` for NodePort/LoadBalancer.

kmock 0.8 already answers 409 to a create of an existing object.

The server runs on its own asyncio loop in a thread (kmock is asyncio/aiohttp; the tests
are synchronous); everything that touches the emulator's state is run on that loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TypeVar

import aiohttp.web
from kmock import KubernetesEmulator, Request, action, resource

from tests.peers.base import Peer, free_port

T = TypeVar("T")

PATCH_TYPES = ("application/strategic-merge-patch+json", "application/merge-patch+json")
RESOURCES = ("v1/pods", "v1/services", "v1/nodes", "v1/persistentvolumeclaims",
             "apps/v1/deployments")


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    return aiohttp.web.json_response({
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "code": code, "reason": reason, "message": message,
    }, status=code)


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """An equality-based label selector, as the API server evaluates it."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class ApiServer(KubernetesEmulator):
    """The emulator with the real API server's behaviours listed in the module docstring."""

    def __init__(self, tokens: set[str], cluster_ip: str = "127.0.0.1") -> None:
        super().__init__()
        self.tokens = tokens
        #: Tokens that authenticate but may do nothing (a service account without a Role).
        self.powerless: set[str] = set()
        self.cluster_ip = cluster_ip
        self.node_ports = itertools.count(30080)
        for kind in RESOURCES:
            self.resources[kind] = {}

    async def _handle(self, request: Request) -> aiohttp.web.StreamResponse:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token in self.powerless:
            return _status(403, "Forbidden", "forbidden by RBAC")
        if token not in self.tokens:
            return _status(401, "Unauthorized", "Unauthorized")
        if request.method == "PATCH":
            kind = request.headers.get("Content-Type", "").split(";")[0].strip()
            if kind not in PATCH_TYPES:
                return _status(415, "UnsupportedMediaType",
                               f"the body of the request was in an unknown format: {kind}")
        if request.action == action.CREATE and request.resource is not None:
            if request.resource.plural == "services" and isinstance(request.data, dict):
                self._allocate(request.data)
        response = await super()._handle(request)
        if request.action == action.CREATE and response.status == 200:
            response.set_status(201)
        return response

    def _allocate(self, service: dict[str, Any]) -> None:
        spec = service.setdefault("spec", {})
        spec.setdefault("clusterIP", self.cluster_ip)
        if spec.get("type") in ("NodePort", "LoadBalancer"):
            for port in spec.get("ports") or []:
                port.setdefault("nodePort", next(self.node_ports))

    async def _serve_list(self, request: Request) -> Any:
        result = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector and isinstance(result, dict):
            result["items"] = [
                item for item in result["items"]
                if selector_matches(selector, (item.get("metadata") or {}).get("labels") or {})
            ]
        return result


class KubeAPI(Peer):
    """:class:`ApiServer` listening on 127.0.0.1 (HTTPS when given a cert and key)."""

    def __init__(self, token: str, namespace: str = "nextcloud-exapps",
                 tls: tuple[Path, Path] | None = None) -> None:
        self.tokens = {token}
        self.namespace = namespace
        self.tls = tls
        self.port = free_port()
        self.server = ApiServer(self.tokens)
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._runner: aiohttp.web.ServerRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.run(self.server.__aenter__())
        self.up()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self.down()
        self.run(self.server.__aexit__(None, None, None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    def up(self) -> None:
        """Listen (again, on the same port: the API server is back)."""
        self.run(self._listen())

    def down(self) -> None:
        """Stop listening and drop every connection: the API server is gone."""
        if self._runner is not None:
            self.run(self._runner.cleanup())
            self._runner = None

    async def _listen(self) -> None:
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self.tls)
        self._runner = aiohttp.web.ServerRunner(aiohttp.web.Server(self.server))
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=context)
        await site.start()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop (the emulator's state is not thread-safe)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def target() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(target)
        return future.result(10)

    # --- the cluster's state, as the tests see and change it

    def get(self, kind: str, name: str, namespace: str | None = "") -> dict[str, Any] | None:
        ns = self.namespace if namespace == "" else namespace

        def read() -> dict[str, Any] | None:
            key = (resource(kind), ns, name)
            if key not in self.server.objects or self.server.objects[key].deleted:
                return None
            return dict(self.server.objects[key].raw)

        return self.call(read)

    def put(self, kind: str, name: str, body: dict[str, Any],
            namespace: str | None = "") -> None:
        ns = self.namespace if namespace == "" else namespace
        meta = {"name": name, **({"namespace": ns} if ns else {}), **body.get("metadata", {})}
        full = {**body, "metadata": meta}

        def write() -> None:
            key = (resource(kind), ns, name)
            if key in self.server.objects:
                self.server.objects[key].create(full)  # a new version (or re-created)
            else:
                self.server.objects[key] = full

        self.call(write)

    def patch(self, kind: str, name: str, changes: dict[str, Any]) -> None:
        self.call(lambda: self.server.objects[kind, self.namespace, name].patch(changes))

    def delete(self, kind: str, name: str) -> None:
        self.call(lambda: self.server.objects[kind, self.namespace, name].delete())

    def add_pod(self, deployment: str, name: str, status: dict[str, Any]) -> None:
        """The pod a Deployment's controller would make, in the state the kubelet reports."""
        self.put("v1/pods", name, {"metadata": {"labels": {"app": deployment}},
                                   "status": status})

    def add_node(self, name: str, addresses: list[tuple[str, str]], ready: bool = True) -> None:
        self.put("v1/nodes", name, {"status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "addresses": [{"type": kind, "address": address} for kind, address in addresses],
        }}, namespace=None)

    def remove_nodes(self) -> None:
        """Every node gone (nodes are cluster-wide, so a test that needs a known node order
        starts from none, and leaves none behind)."""
        nodes = resource("v1/nodes")

        def remove() -> None:
            for key, obj in self.server.objects.items():
                if key[0] == nodes and not obj.deleted:
                    obj.delete()

        self.call(remove)

    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        """(method, path with query, headers) of every request served so far."""
        return self.call(lambda: [
            (r.method, str(r.url.path_qs), dict(r.headers)) for r in self.server
        ])


RUNNING_READY = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
                 "containerStatuses": [{"name": "app", "state": {"running": {}}}]}


def image_error(reason: str = "ErrImagePull", message: str = "pull access denied") -> dict[
        str, Any]:
    return {"phase": "Pending", "containerStatuses": [
        {"name": "app", "state": {"waiting": {"reason": reason, "message": message}}}]}


def free_node_port() -> int:
    """A free loopback port inside Kubernetes' NodePort range (30000-32767), so one ExApp
    can be reached through every expose type (NodePort requires that range)."""
    import random
    import socket

    for port in random.sample(range(30000, 32768), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 30000-32767")


def write_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) PEM files,
    like a cluster's service-account ``ca.crt`` and its API server's certificate."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())

    def issue(subject: str, key: Any, issuer: str, ca: bool, **extensions: Any) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        for extension in extensions.values():
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    ca = issue("test-kubernetes-ca", ca_key, "test-kubernetes-ca", True)
    server = issue("kube-apiserver", server_key, "test-kubernetes-ca", False, san=x509.
                   SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    paths = directory / "ca.crt", directory / "apiserver.crt", directory / "apiserver.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return paths
