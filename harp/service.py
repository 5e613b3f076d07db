"""makeService: settings in, one MultiService out.

This module only wires: it builds the shared objects and the listeners and hands
each what it needs.  Everything that can fail because of the operator's input fails
here, before the reactor runs, as a :class:`~harp.config.ConfigError` (exit code 2).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Protocol, cast

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorTCP
from twisted.web.server import Request

from harp import docker, logs
from harp.client_address import ClientAddressResolver
from harp.config import Address, ConfigError, Settings
from harp.exapps import ExAppRecord
from harp.frp.listener import FrpServerFactory, FrpTLSConfigError, FrpTLSContext
from harp.frp.service import FrpServer, FrpService
from harp.frp.tunnels import TunnelRegistry
from harp.k8s import wiring as k8s_wiring
from harp.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from harp.metrics import Metrics
from harp.nextcloud import NextcloudClient
from harp.pki import CertificateError, ensure_frp_certificates
from harp.state import State
from harp.state.memory import MemoryState
from harp.state.redis import RedisState, RedisStateService
from harp.tlsctx import ReloadableServerContext, TLSConfigError
from harp.tuning import tune
from harp.web import responses
from harp.web.control import ControlPlane
from harp.web.headers import KeyCheck
from harp.web.https import TLSServerFactory
from harp.web.limits import ConnectionLimit, Pausable
from harp.web.pipeline import Pipeline
from harp.web.proxy import ExAppProxy
from harp.web.root import Root
from harp.web.site import HarpSite
from harp.web.storage import PREFIX as STORAGE_PREFIX
from harp.web.storage import ExAppStorage
from harp.web.upstream import TunnelLookup, UpstreamEndpoints

log = logs.HarpLogger("harp.service")

#: How often expired bans, "not found" marks and cached user lookups are dropped.
SWEEP_INTERVAL = 30.0


class ListenerService(Service):
    """Listen on one configured address; a bind failure stops start-up clearly.

    ``StreamServerEndpointService`` would only log a failed bind and keep running
    without the listener; an operator is better served by exit code 2 and a line
    naming the variable.
    """

    def __init__(
        self, variable: str, address: Address, factory: IProtocolFactory,
        limit: ConnectionLimit | None = None,
    ) -> None:
        self.variable = variable
        self.address = address
        self.factory = factory
        self.limit = limit
        self.port: IListeningPort | None = None
        self.setName(variable)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        tcp = cast(IReactorTCP, reactor)
        try:
            self.port = tcp.listenTCP(
                self.address.port,
                self.factory,  # type: ignore[arg-type]
                backlog=1024,
                interface=self.address.host,
            )
        except CannotListenError as exc:
            reason = getattr(exc.socketError, "strerror", None) or str(exc.socketError)
            sys.stderr.write(
                f"harp: configuration error: {self.variable}={str(self.address)!r}: "
                f"cannot listen ({reason})\n"
            )
            sys.stderr.flush()
            raise SystemExit(2) from None
        if self.limit is not None:
            self.limit.add_port(cast(Pausable, self.port))
        log.info("{name} listening on {address}", name=self.variable, address=self.address)

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self.privilegedStartService()

    def stopService(self) -> object:
        super().stopService()
        port, self.port = self.port, None
        if port is not None and self.limit is not None:
            self.limit.remove_port(cast(Pausable, port))
        return None if port is None else port.stopListening()


class LogLevelService(Service):
    """Applies ``HP_LOG_LEVEL`` to Twisted's own loggers once twistd's observers exist.

    twistd installs them after ``makeService`` and before ``privilegedStartService``;
    this service comes first, so even the listeners' "starting on" lines are governed.
    """

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        logs.govern_all_loggers()

    def startService(self) -> None:
        super().startService()
        logs.govern_all_loggers()


class ClientPools(Service):
    """HaRP's outgoing keep-alive pools (Nextcloud, ExApps, Docker engines), closed at stop.

    Without it a SIGTERM leaves the reactor to cut those connections mid-flight; closing
    them first lets the shutdown wait for them.
    """

    def __init__(self, closers: list[Callable[[], object]]) -> None:
        self.closers = closers
        self.setName("client-pools")

    def stopService(self) -> Deferred[object]:
        super().stopService()
        closing = [maybeDeferred(close) for close in self.closers]
        return DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)


class CertificateReloader(Service):
    """SIGHUP reloads the HTTPS certificate without dropping connections."""

    def __init__(self, context: ReloadableServerContext) -> None:
        self.context = context

    def startService(self) -> None:
        super().startService()
        signal.signal(signal.SIGHUP, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        reactor.callFromThread(self.reload)  # type: ignore[attr-defined]

    def reload(self) -> None:
        try:
            self.context.reload()
        except TLSConfigError as exc:
            log.error("SIGHUP: keeping the current HTTPS certificate: {reason}", reason=str(exc))
        else:
            log.warn("SIGHUP: reloaded HTTPS certificate from {path}", path=str(self.context.path))


def prepare_certificates(settings: Settings) -> ReloadableServerContext | None:
    """Create the FRP PKI if needed and load the HTTPS certificate if there is one."""
    if settings.certs_dir.exists() and not settings.certs_dir.is_dir():
        raise ConfigError(
            "HP_CERTS_DIR", str(settings.certs_dir), "it exists but is not a directory"
        )
    if not settings.frp_disable_tls:
        try:
            if ensure_frp_certificates(settings.frp_certs_dir, settings.frp_cert_validity_days):
                log.warn("generated FRP certificates in {path}", path=str(settings.frp_certs_dir))
        except CertificateError as exc:
            raise ConfigError("HP_CERTS_DIR", str(settings.certs_dir), str(exc)) from None
    if not settings.https_cert_path.exists():
        return None
    try:
        return ReloadableServerContext(settings.https_cert_path, settings.http2)
    except TLSConfigError as exc:
        raise ConfigError(
            "HP_CERTS_DIR", str(settings.certs_dir), f"{exc}; fix or remove cert.pem"
        ) from None


@dataclass(frozen=True, slots=True)
class Frontend:
    """The ExApp frontends of one serving process, before they listen."""

    site: HarpSite
    control: ControlPlane
    metrics: Metrics
    limit: ConnectionLimit
    #: The outgoing keep-alive pools to close at stop (see :class:`ClientPools`).
    closers: list[Callable[[], object]]


class StorageEndpoints(Protocol):
    """``POST``/``DELETE /exapp_storage/<appid>``: :class:`ExAppStorage` or a worker's."""

    def post(self, request: Request, rest: bytes) -> bytes | int: ...

    def put(self, request: Request, app_id: str, record: ExAppRecord) -> bytes | int: ...

    def delete(self, request: Request, rest: bytes) -> bytes | int: ...


def build_frontend(
    settings: Settings, state: State, tunnels: TunnelLookup | None,
    storage: StorageEndpoints, max_connections: int,
) -> Frontend:
    """The request side, the same in a single process and in every worker.

    ``/metrics`` answers with this process's figures; a worker replaces the handler.
    """
    # Kubernetes backend (docs/kubernetes.md): built first, its upstream discovery is the
    # Nextcloud client's hook for records fetched on a cache miss.
    k8s = k8s_wiring.build(reactor, settings.k8s, settings.timeout_connect)
    storage = k8s.storage(storage)
    nextcloud = NextcloudClient(
        reactor, settings.nc_instance_url, settings.shared_key, state, upstream=k8s.upstream
    )
    pipeline = Pipeline(
        state, nextcloud, KeyCheck(settings.shared_key),
        ClientAddressResolver(settings.trusted_proxies),
    )
    control = ControlPlane()
    control.add_prefix(b"POST", STORAGE_PREFIX, storage.post)
    control.add_prefix(b"DELETE", STORAGE_PREFIX, storage.delete)
    k8s.register(control, state, nextcloud.fetch_record)
    # Docker engines: 24000 = HP_DOCKER_SOCKET, 24001-24099 = FRP engine tunnels.
    docker_side = docker.build(
        reactor, control,
        socket_path=settings.docker_socket,
        tunnels=tunnels,
        connect_timeout=settings.timeout_connect,
        server_timeout=settings.timeout_server,
        frp_certs_dir=None if settings.frp_disable_tls else settings.frp_certs_dir,
    )
    proxy = ExAppProxy(
        reactor, settings.timeout_connect, settings.timeout_server,
        endpoints=UpstreamEndpoints(reactor, settings.timeout_connect, tunnels=tunnels),
    )
    metrics = Metrics()
    control.add(b"GET", b"/metrics", lambda request, rest: responses.send(
        request, 200, metrics.render(), METRICS_CONTENT_TYPE))
    limit = ConnectionLimit(max_connections)
    site = HarpSite(
        Root(
            pipeline, control, proxy, settings.timeout_tunnel, docker=docker_side.passthrough
        ),
        head_timeout=settings.timeout_client,
        metrics=metrics,
        limit=limit,
        timeout=settings.timeout_client,
    )
    site.on_malformed = pipeline.malformed
    closers: list[Callable[[], object]] = [
        nextcloud.close, proxy.pool.close_all, *docker_side.closers, *k8s.closers,
    ]
    return Frontend(site, control, metrics, limit, closers)


def add_gauges(
    metrics: Metrics, tunnels: TunnelRegistry, state: State, connections: Callable[[], float]
) -> None:
    """The gauges of ``/metrics``, in their documented order."""
    metrics.gauge("harp_tunnel_ports", "Tunnel ports with a live FRP proxy.",
                  lambda: len(tunnels.ports()))
    metrics.gauge("harp_failure_addresses", "Client addresses with recent failures.",
                  state.count_ban_keys)
    metrics.gauge("harp_exapps_known", "ExApp records held.", state.count_exapps)
    metrics.gauge("harp_client_connections", "Open connections on the ExApp frontends.",
                  connections)


def make_service(settings: Settings, env: Mapping[str, str] | None = None) -> MultiService:
    """Assemble HaRP from validated settings.

    ``HP_WORKERS=1``: everything in this process.  More: this process keeps the state,
    the FRP server and the listening sockets, and ``HP_WORKERS`` worker processes serve
    the ExApp frontends (:mod:`harp.workers`); ``env`` is what they are started with.
    """
    logs.set_level(settings.log_level)
    for warning in settings.warnings:
        log.warn("configuration: {warning}", warning=warning)
    https_context = prepare_certificates(settings)
    workers = settings.workers > 1
    if workers:
        from harp.workers import primary, primary_state

        memory_class: type[MemoryState] = primary_state.PrimaryMemoryState
        redis_class: type[RedisState] = primary_state.PrimaryRedisState
    else:
        memory_class, redis_class = MemoryState, RedisState

    # HP_REDIS_URL: bans and the ExApp registry shared by all replicas (docs/differences.md#8).
    state: MemoryState | RedisState
    if settings.redis_url:
        state = redis_class(
            settings.redis_url, settings.blacklist_count, settings.blacklist_window,
            settings.session_lifetime,
        )
    else:
        state = memory_class(
            settings.blacklist_count, settings.blacklist_window, settings.session_lifetime
        )
    # FRP: tunnels meet the HTTP side only through the registry (design.md seams).
    frp_tls: FrpTLSContext | None = None
    if not settings.frp_disable_tls:
        try:
            frp_tls = FrpTLSContext(settings.frp_certs_dir)
        except FrpTLSConfigError as exc:
            raise ConfigError("HP_CERTS_DIR", str(settings.certs_dir), str(exc)) from None
    tunnels = TunnelRegistry(reactor, idle_timeout=settings.timeout_server)
    frp_server = FrpServer(reactor, settings.shared_key, state, tunnels)

    top = MultiService()
    LogLevelService().setServiceParent(top)
    if isinstance(state, RedisState):
        RedisStateService(state).setServiceParent(top)  # first started, last stopped
    TimerService(SWEEP_INTERVAL, state.sweep).setServiceParent(top)
    if https_context is None:
        log.warn(
            "HTTPS frontend disabled: {path} does not exist", path=str(settings.https_cert_path)
        )
    frp_listener = ListenerService(
        "HP_FRP_ADDRESS", settings.frp_address,
        FrpServerFactory(reactor, frp_server, frp_tls),  # type: ignore[arg-type]
    )
    if workers:
        FrpService(frp_server, frp_listener, tunnels).setServiceParent(top)
        # Added last, stopped first: the workers drain while the tunnels still work.
        primary.WorkerPool(
            settings, dict(env or {}), state, tunnels, https=https_context is not None
        ).setServiceParent(top)
        return top

    frontend = build_frontend(
        settings, state, tunnels, ExAppStorage(state), settings.max_connections
    )
    limit = frontend.limit
    add_gauges(frontend.metrics, tunnels, state, lambda: limit.open)
    # Stopped after the listeners (services stop in reverse order): no new request can
    # take a pooled connection while the pools are being closed.
    ClientPools(frontend.closers).setServiceParent(top)
    ListenerService(
        "HP_EXAPPS_ADDRESS", settings.exapps_address, frontend.site, limit  # type: ignore[arg-type]
    ).setServiceParent(top)
    if https_context is not None:
        tls_factory = TLSServerFactory(https_context, frontend.site)
        ListenerService(
            "HP_EXAPPS_HTTPS_ADDRESS", settings.exapps_https_address, tls_factory, limit
        ).setServiceParent(top)
        CertificateReloader(https_context).setServiceParent(top)
    FrpService(frp_server, frp_listener, tunnels).setServiceParent(top)
    return top


def make_service_from_env(env: Mapping[str, str]) -> MultiService:
    """The twistd entry point: a bad configuration exits with code 2 and one line."""
    try:
        settings = Settings.from_env(env)
        if settings.verbose_start:
            print_config(settings)
        service = make_service(settings, env)
    except ConfigError as exc:
        sys.stderr.write(f"harp: configuration error: {exc.line()}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    from twisted.internet import reactor

    tune(reactor)
    return service


def print_config(settings: Settings) -> None:
    """``HP_VERBOSE_START``: the effective configuration, every secret redacted."""
    width = max(len(name) for name, _ in settings.describe())
    lines = [f"harp: {name.ljust(width)} = {value}" for name, value in settings.describe()]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
