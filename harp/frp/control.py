"""FRP control logic: logins, proxies and work connections of each frpc client.

:class:`FrpServer` is the state shared by all connections (run_id → :class:`Control`,
the ban table, the :class:`~harp.frp.tunnels.TunnelRegistry`).  Every channel -- a yamux
stream or a direct connection -- starts with a :class:`FirstMessage` dispatcher, because
frpc says what a channel is by its first message, not by any id (spec §1):

* ``Login`` → authentication (``metas.token`` against the shared key, constant-time;
  banned addresses refused; failures counted for the ban table, IPv6 included) and a new
  :class:`Control`, which from then on owns the channel: plaintext ``LoginResp``,
  AES-128-CFB both ways, ``pool_count`` x ``ReqWorkConn``, ``NewProxy``/``CloseProxy``,
  ``Ping``/``Pong``;
* ``NewWorkConn`` → if it arrived on its control's yamux session (or, without tcpMux, from
  its control's address), the channel is parked in its control's pool until a user
  connection needs it (``StartWorkConn``, then raw bytes);
* anything else → closed.

Error texts sent to frpc are frps's own (spec §5, §8), so frpc logs what operators know.
Login failures send the reference HaRP's texts: its Login plugin answered a wrong token
with HTTP 400 (frps: ``send Login request to plugin error``) and a banned address with
``banned``.

When a control ends (its channel closed, a heartbeat missed, or the same run_id logged in
again) everything of that client goes: its proxies' ports, parked and active work
connections, and the yamux session they share.  A re-login with the same run_id waits
until the old proxies' ports are released, so frpc's immediate re-registration does not
fail with ``port already used`` (spec §8.6).
"""

from __future__ import annotations

import hmac
import secrets
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Protocol

from twisted.internet.defer import Deferred, TimeoutError, gatherResults, succeed
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from harp.bans import normalize_ip
from harp.frp import msg
from harp.frp.channel import Channel
from harp.frp.crypto import StreamDecryptor, StreamEncryptor, derive_key, verify_auth_key
from harp.frp.tunnels import ProxyError, TunnelHandle, TunnelRegistry
from harp.logs import HarpLogger

__all__ = [
    "FIRST_MESSAGE_TIMEOUT",
    "HEARTBEAT_TIMEOUT",
    "LOGIN_BAD_TOKEN",
    "LOGIN_BANNED",
    "MAX_POOL_COUNT",
    "MAX_PORTS_PER_CLIENT",
    "SERVER_VERSION",
    "WORK_CONN_TIMEOUT",
    "BanTable",
    "Control",
    "FirstMessage",
    "FrpServer",
]

log = HarpLogger("harp.frp")

SERVER_VERSION: Final = "0.65.0"
"""Reported in LoginResp; frpc only logs it."""
FIRST_MESSAGE_TIMEOUT: Final = 10.0
"""frps ``connReadTimeout``: a channel must say what it is this fast."""
WORK_CONN_TIMEOUT: Final = 10.0
"""frps ``userConnTimeout``: the longest a user connection waits for a work connection."""
HEARTBEAT_TIMEOUT: Final = 90.0
"""frps ``heartbeatTimeout`` for controls without yamux (tcpMux=false)."""
MAX_POOL_COUNT: Final = 5
"""frps ``transport.maxPoolCount``."""
POOL_SLACK: Final = 10
"""frps parks at most pool_count + 10 idle work connections."""
MAX_PORTS_PER_CLIENT: Final = 1
"""Reference HaRP ``maxPortsPerClient``."""

LOGIN_BAD_TOKEN: Final = "send Login request to plugin error"  # noqa: S105 - not a secret
LOGIN_BANNED: Final = "banned"
LOGIN_BAD_PRIVILEGE_KEY: Final = "token in login doesn't match token from configuration"

_KNOWN_PROXY_TYPES: Final = frozenset(
    {"tcp", "udp", "http", "https", "stcp", "sudp", "xtcp", "tcpmux"}
)
_ERR_COMPRESSION: Final = (
    "compression (transport.useCompression) is not supported by this server; disable it"
)


class BanTable(Protocol):
    """The synchronous ban interface of :class:`harp.state.memory.MemoryState`."""

    def is_banned(self, addr: str) -> bool: ...

    def record_failure(self, addr: str) -> bool: ...


def client_ip(address: IAddress) -> str | None:
    """The canonical IP of a peer address (IPv4-mapped IPv6 folded to IPv4), or None."""
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    return normalize_ip(host)


def _describe(value: str, limit: int = 64) -> str:
    """A client-supplied string made safe and short for a log line."""
    text = value.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


class FrpServer:
    """State shared by every FRP connection of this process."""

    def __init__(
        self,
        reactor: Any,
        shared_key: str,
        bans: BanTable,
        registry: TunnelRegistry,
        *,
        auth_token: str = "",
        first_message_timeout: float = FIRST_MESSAGE_TIMEOUT,
        work_conn_timeout: float = WORK_CONN_TIMEOUT,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self._shared_key = shared_key.encode("utf-8")
        self.bans = bans
        self.registry = registry
        # frps's own auth.token: empty in HaRP, so the control-stream key derives from "".
        self.auth_token = auth_token
        self.cipher_key = derive_key(auth_token)
        self.first_message_timeout = first_message_timeout
        self.work_conn_timeout = work_conn_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.controls: dict[str, Control] = {}

    # ------------------------------------------------------------ channels

    def new_channel(
        self, channel: Channel, on_identified: Callable[[], object] | None = None
    ) -> None:
        """Start the first-message dispatcher on a fresh channel."""
        channel.attach(FirstMessage(self, on_identified))

    # ------------------------------------------------------------ login

    def login(self, channel: Channel, login: msg.Login, decoder: msg.MessageDecoder) -> bool:
        """Authenticate *login*; on success a :class:`Control` takes over *channel*."""
        peer = channel.getPeer()
        ip = client_ip(peer)
        where = ip or str(peer)
        if ip is not None and self.bans.is_banned(ip):
            log.info("FRP login from {addr} rejected: address is banned", addr=where)
            self._refuse(channel, LOGIN_BANNED)
            return False
        token = login.metas.get("token")
        if token is None or not hmac.compare_digest(token.encode("utf-8"), self._shared_key):
            banned = ip is not None and self.bans.record_failure(ip)
            log.info(
                "FRP login from {addr} rejected: {why}{ban}",
                addr=where,
                why="no token in metadatas" if token is None else "wrong token",
                ban=" (address now banned)" if banned else "",
            )
            self._refuse(channel, LOGIN_BAD_TOKEN)
            return False
        if not verify_auth_key(self.auth_token, login.timestamp, login.privilege_key):
            log.info("FRP login from {addr} rejected: privilege_key does not match "
                     "(the client sets auth.token; HaRP's clients must not)", addr=where)
            self._refuse(channel, LOGIN_BAD_PRIVILEGE_KEY)
            return False
        run_id = login.run_id or secrets.token_hex(8)
        old = self.controls.get(run_id)
        control = Control(self, channel, login, run_id, decoder, where)
        self.controls[run_id] = control
        channel.attach(control)
        released: Deferred[None] = succeed(None)
        if old is not None:
            released = old.shutdown("replaced by a new login with the same run_id")
        released.addCallback(lambda _: control.start())
        released.addErrback(lambda f: log.failure("FRP login of {run_id} failed", f,
                                                  run_id=run_id))
        return True

    def _refuse(self, channel: Channel, error: str) -> None:
        channel.write(msg.encode_message(msg.LoginResp(version=SERVER_VERSION, error=error)))
        channel.loseConnection()

    # ------------------------------------------------------------ work connections

    def work_conn(self, channel: Channel, message: msg.NewWorkConn) -> None:
        """Park a work connection in its control's pool, if it really belongs to it.

        frps looks the control up by ``run_id`` alone, but a run_id is no secret: it
        travels in every NewWorkConn (in clear with ``HP_FRP_DISABLE_TLS=true``) and is
        logged.  A stranger holding it could otherwise receive the users' traffic of
        that client.  So the work connection must come the way frpc sends it: on the
        control's own yamux session, or -- without tcpMux, one TCP connection each --
        from the control's address.  A privilege_key, sent only by clients with the
        ``NewWorkConns`` scope, must match too (spec §5).  Refusals count towards a ban
        like failed logins.  An unknown run_id is only closed: after a control ends, its
        client may still answer a ReqWorkConn that was in flight.
        """
        control = self.controls.get(message.run_id)
        if control is None or not control.started or control.closed:
            log.debug("FRP work connection for unknown run_id {run_id} closed",
                      run_id=_describe(message.run_id))
            channel.loseConnection()
            return
        why = self._work_conn_mismatch(control, channel, message)
        if why is not None:
            peer = channel.getPeer()
            ip = client_ip(peer)
            banned = ip is not None and self.bans.record_failure(ip)
            log.info("FRP work connection from {addr} for client {run_id} rejected: "
                     "{why}{ban}", addr=ip or str(peer), run_id=control.run_id, why=why,
                     ban=" (address now banned)" if banned else "")
            channel.abortConnection()
            return
        control.add_work_conn(channel)

    def _work_conn_mismatch(
        self, control: Control, channel: Channel, message: msg.NewWorkConn
    ) -> str | None:
        """Why *channel* cannot be a work connection of *control*, or None if it can."""
        if control.channel.multiplexed:
            if channel.carrier is not control.channel.carrier:
                return "not on the yamux session of its control connection"
        elif channel.multiplexed:
            return "on a yamux session, but its control connection has no tcpMux"
        else:
            ip = client_ip(channel.getPeer())
            if ip is None or ip != client_ip(control.channel.getPeer()):
                return "not from the address of its control connection"
        if (message.privilege_key or message.timestamp) and not verify_auth_key(
            self.auth_token, message.timestamp, message.privilege_key
        ):
            return "privilege_key does not match"
        return None

    def forget(self, control: Control) -> None:
        if self.controls.get(control.run_id) is control:
            del self.controls[control.run_id]

    def shutdown(self) -> Deferred[None]:
        """Close every control (service stop)."""
        ds = [c.shutdown("server shutting down") for c in list(self.controls.values())]
        return gatherResults(ds, consumeErrors=True).addCallback(lambda _: None)


class FirstMessage(TwistedProtocol):
    """Reads a channel's first message (≤ 10 s) and hands the channel to its owner."""

    def __init__(
        self, server: FrpServer, on_identified: Callable[[], object] | None = None
    ) -> None:
        self.server = server
        self.decoder = msg.MessageDecoder()
        self._timer: IDelayedCall | None = None
        self._done = False
        self._on_identified = on_identified

    def connectionMade(self) -> None:
        self._timer = self.server.reactor.callLater(
            self.server.first_message_timeout, self._expired
        )

    def _expired(self) -> None:
        self._timer = None
        if not self._done:
            self._done = True
            log.info("FRP connection from {peer}: no first message in time, closing",
                     peer=self._peer())
            self._channel().abortConnection()

    def _channel(self) -> Channel:
        assert isinstance(self.transport, Channel)
        return self.transport

    def _peer(self) -> str:
        peer = self._channel().getPeer()
        return client_ip(peer) or str(peer)

    def _finish(self) -> None:
        self._done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self.decoder.feed(data)
        try:
            message = self.decoder.next_message()
        except msg.ProtocolError as exc:
            self._finish()
            log.info("FRP connection from {peer}: bad first message, closing: {error}",
                     peer=self._peer(), error=str(exc))
            self._channel().abortConnection()
            return
        if message is None:
            return
        self._finish()
        channel = self._channel()
        if self._on_identified is not None:
            self._on_identified()
        if isinstance(message, msg.Login):
            self.server.login(channel, message, self.decoder)
        elif isinstance(message, msg.NewWorkConn):
            self.server.work_conn(channel, message)
        elif isinstance(message, msg.NewVisitorConn):
            log.info("FRP visitor connection from {peer} refused (not supported)",
                     peer=self._peer())
            channel.write(msg.encode_message(msg.NewVisitorConnResp(
                proxy_name=message.proxy_name, error="visitors are not supported")))
            channel.loseConnection()
        else:
            log.info("FRP connection from {peer}: unexpected first message {kind}, closing",
                     peer=self._peer(), kind=type(message).__name__)
            channel.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._finish()


class _Parked(TwistedProtocol):
    """A work connection waiting in its control's pool for ``StartWorkConn``."""

    def __init__(self, control: Control) -> None:
        self.control = control

    def dataReceived(self, data: bytes) -> None:
        # frpc sends nothing before StartWorkConn; a client that does is broken.
        assert isinstance(self.transport, Channel)
        log.debug("FRP run_id {run_id}: data on an idle work connection, closing it",
                  run_id=self.control.run_id)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        assert isinstance(self.transport, Channel)
        self.control.unpark(self.transport)


class Control(TwistedProtocol):
    """One logged-in frpc client; the protocol of its control channel."""

    def __init__(
        self,
        server: FrpServer,
        channel: Channel,
        login: msg.Login,
        run_id: str,
        decoder: msg.MessageDecoder,
        addr: str,
    ) -> None:
        self.server = server
        self.channel = channel
        self.login = login
        self.run_id = run_id
        self.addr = addr
        self.decoder = decoder
        self.pool_count = min(max(login.pool_count, 0), MAX_POOL_COUNT)
        self.started = False
        self.closed = False
        self.proxies: dict[str, TunnelHandle] = {}
        self._registering: set[str] = set()
        self._encryption: dict[str, bool] = {}
        self._pool: deque[Channel] = deque()
        self._waiters: deque[Deferred[Channel]] = deque()
        self._active: set[Channel] = set()
        self._encryptor: StreamEncryptor | None = None
        self._heartbeat: IDelayedCall | None = None
        self._released: Deferred[None] | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Reply LoginResp, switch to AES-CFB, fill the pool, process buffered input."""
        if self.closed:
            return
        self.started = True
        channel = self.channel
        channel.write(msg.encode_message(msg.LoginResp(version=SERVER_VERSION,
                                                       run_id=self.run_id)))
        key = self.server.cipher_key
        self._encryptor = StreamEncryptor(key)
        self.decoder.set_transform(StreamDecryptor(key).decrypt)
        if channel.multiplexed:
            # The yamux session's login deadline is met (StreamChannel.conn).
            conn = getattr(channel, "conn", None)
            if conn is not None:
                conn.mark_logged_in()
        else:  # no yamux keepalive: frps's app-level heartbeat timeout applies
            self._heartbeat = self.server.reactor.callLater(
                self.server.heartbeat_timeout, self._heartbeat_expired
            )
        login = self.login
        log.info(
            "FRP client {run_id} logged in from {addr} (frpc {version} {os}/{arch}, {mux}, "
            "pool {pool})",
            run_id=self.run_id, addr=self.addr, version=_describe(login.version),
            os=_describe(login.os), arch=_describe(login.arch),
            mux="tcpMux" if channel.multiplexed else "no tcpMux", pool=self.pool_count,
        )
        for _ in range(self.pool_count):
            self._send(msg.ReqWorkConn())
        self._process()

    def shutdown(self, why: str) -> Deferred[None]:
        """End this client's session; fires once its ports are free again."""
        if self._released is not None:
            return _chain(self._released)
        self.closed = True
        self.server.forget(self)
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.cancel()
        self._heartbeat = None
        failure = Failure(ConnectError(string=f"FRP client {self.run_id} disconnected"))
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.called:
                waiter.errback(failure)
        for channel in [*self._pool, *self._active]:
            channel.abortConnection()
        self._pool.clear()
        self._active.clear()
        names = sorted(self.proxies)
        released = [handle.close() for handle in self.proxies.values()]
        self.proxies.clear()
        self.channel.close_carrier()
        if self.started:
            log.info("FRP client {run_id} from {addr} logged out ({why}){proxies}",
                     run_id=self.run_id, addr=self.addr, why=why,
                     proxies=f"; closed proxies {', '.join(names)}" if names else "")
        self._released = gatherResults(released, consumeErrors=True).addCallback(
            lambda _: None
        )
        return _chain(self._released)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.shutdown("control connection closed")

    def _heartbeat_expired(self) -> None:
        self._heartbeat = None
        if not self.closed:
            self.shutdown(f"no heartbeat for {self.server.heartbeat_timeout:.0f}s")

    # ------------------------------------------------------------ messages

    def _send(self, message: msg.Message) -> None:
        if self.closed or self._encryptor is None:
            return
        self.channel.write(self._encryptor.encrypt(msg.encode_message(message)))

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self.decoder.feed(data)
        if self.started:
            self._process()

    def _process(self) -> None:
        while not self.closed:
            try:
                message = self.decoder.next_message()
            except msg.ProtocolError as exc:
                log.info("FRP client {run_id}: bad control message, closing: {error}",
                         run_id=self.run_id, error=str(exc))
                self.shutdown("protocol error")
                return
            if message is None:
                return
            self._handle(message)

    def _handle(self, message: msg.Message) -> None:
        if isinstance(message, msg.NewProxy):
            self._new_proxy(message)
        elif isinstance(message, msg.CloseProxy):
            self._close_proxy(message.proxy_name)
        elif isinstance(message, msg.Ping):
            if self._heartbeat is not None and self._heartbeat.active():
                self._heartbeat.reset(self.server.heartbeat_timeout)
            self._send(msg.Pong())
        else:  # NatHole*, UDPPacket, or a message that belongs elsewhere: frps ignores them
            log.debug("FRP client {run_id}: ignored {kind}", run_id=self.run_id,
                      kind=type(message).__name__)

    # ------------------------------------------------------------ proxies

    def _proxy_error(self, message: msg.NewProxy) -> str | None:
        kind = message.proxy_type or "tcp"
        if kind not in _KNOWN_PROXY_TYPES:
            return f"unknown proxy type: {kind}"
        if kind != "tcp":
            return f"proxy type [{kind}] is not supported by this server, only tcp"
        if message.use_compression:
            return _ERR_COMPRESSION
        if len(self.proxies) + len(self._registering) + 1 > MAX_PORTS_PER_CLIENT:
            return "exceed the max_ports_per_client"
        return None

    def _new_proxy(self, message: msg.NewProxy) -> None:
        name = message.proxy_name
        error = self._proxy_error(message)
        if error is None and name in self._registering:
            error = f"proxy [{name}] already exists"
        if error is not None:
            self._proxy_refused(name, message.remote_port, error)
            return
        self._registering.add(name)
        d = self.server.registry.register(name, message.remote_port, self)

        def registered(handle: TunnelHandle) -> None:
            self._registering.discard(name)
            if self.closed:
                handle.close()
                return
            self.proxies[name] = handle
            self._encryption[name] = message.use_encryption
            log.info("FRP proxy [{name}] of client {run_id} listening on {host}:{port}{enc}",
                     name=_describe(name), run_id=self.run_id,
                     host=self.server.registry.bind_host, port=handle.port,
                     enc=" (encrypted)" if message.use_encryption else "")
            self._send(msg.NewProxyResp(proxy_name=name, remote_addr=f":{handle.port}"))

        def refused(failure: Failure) -> None:
            self._registering.discard(name)
            failure.trap(ProxyError)
            self._proxy_refused(name, message.remote_port, str(failure.value))

        d.addCallbacks(registered, refused)
        d.addErrback(lambda f: log.failure("FRP proxy registration failed", f))

    def _proxy_refused(self, name: str, port: int, error: str) -> None:
        log.info("FRP proxy [{name}] (port {port}) of client {run_id} refused: {error}",
                 name=_describe(name), port=port, run_id=self.run_id, error=error)
        self._send(msg.NewProxyResp(proxy_name=name, error=error))

    def _close_proxy(self, name: str) -> None:
        handle = self.proxies.pop(name, None)
        self._encryption.pop(name, None)
        if handle is None:
            return
        handle.close()
        log.info("FRP proxy [{name}] of client {run_id} closed (port {port})",
                 name=_describe(name), run_id=self.run_id, port=handle.port)

    # ------------------------------------------------------------ work connections

    def add_work_conn(self, channel: Channel) -> None:
        """A NewWorkConn arrived for us: serve a waiter, or park it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.called:
                waiter.callback(channel)
                return
        if len(self._pool) >= self.pool_count + POOL_SLACK:
            log.debug("FRP client {run_id}: work connection pool is full", run_id=self.run_id)
            channel.loseConnection()
            return
        self._pool.append(channel)
        channel.attach(_Parked(self))

    def unpark(self, channel: Channel) -> None:
        try:
            self._pool.remove(channel)
        except ValueError:
            pass

    def _take_work_conn(self) -> Deferred[Channel]:
        while self._pool:
            channel = self._pool.popleft()
            if channel.alive:
                self._send(msg.ReqWorkConn())  # refill, as frps does
                return succeed(channel)

        def cancel(d: Deferred[Channel]) -> None:
            try:
                self._waiters.remove(d)
            except ValueError:
                pass

        waiter: Deferred[Channel] = Deferred(cancel)
        self._waiters.append(waiter)
        self._send(msg.ReqWorkConn())

        def failed(failure: Failure) -> Failure:
            if failure.check(TimeoutError):
                return Failure(ConnectError(
                    string=f"no FRP work connection from client {self.run_id} within "
                           f"{self.server.work_conn_timeout:.0f}s"))
            return failure

        def got(channel: Channel) -> Channel:
            self._send(msg.ReqWorkConn())  # refill, as frps does
            return channel

        waiter.addTimeout(self.server.work_conn_timeout, self.server.reactor)
        waiter.addCallbacks(got, failed)
        return waiter

    def open_work_conn(
        self, proxy_name: str, src: tuple[str, int], dst: tuple[str, int]
    ) -> Deferred[Channel]:
        """``WorkConnSource``: a work connection with StartWorkConn sent (see tunnels)."""
        if self.closed or proxy_name not in self.proxies:
            d: Deferred[Channel] = Deferred()
            d.errback(ConnectError(string=f"FRP proxy [{proxy_name}] is gone"))
            return d
        encrypted = self._encryption.get(proxy_name, False)

        def start(channel: Channel) -> Channel:
            if self.closed or not channel.alive:
                channel.abortConnection()
                raise ConnectError(string=f"FRP client {self.run_id} disconnected")
            channel.write(msg.encode_message(msg.StartWorkConn(
                proxy_name=proxy_name, src_addr=src[0], src_port=src[1] & 0xFFFF,
                dst_addr=dst[0], dst_port=dst[1] & 0xFFFF)))
            if encrypted:
                key = self.server.cipher_key
                channel.set_cipher(StreamEncryptor(key), StreamDecryptor(key))
            self._active.add(channel)
            channel.notify_lost(self._active.discard)
            return channel

        return self._take_work_conn().addCallback(start)


def _chain(d: Deferred[None]) -> Deferred[None]:
    """A fresh Deferred that fires with None when *d* does (without consuming its result)."""
    out: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        out.callback(None)
        return result

    d.addBoth(fire)
    return out
