"""The FRP service: what every frpc connection of this process shares.

Named after frps's ``server/service.go``.  :class:`FrpServer` holds run_id →
:class:`~harp.frp.control.Control`, the ban table and the
:class:`~harp.frp.tunnels.TunnelRegistry`.  Every stream -- a yamux stream or a direct
connection -- starts with a :class:`FirstMessage` dispatcher, because frpc says what a
stream is by its first message, not by any id (docs/compatibility.md#frp-transport):

* ``Login`` → authentication (``metas.token`` against the shared key, constant-time;
  banned addresses refused; failures counted for the ban table, IPv6 included) and a new
  :class:`~harp.frp.control.Control`, which from then on owns the stream;
* ``NewWorkConn`` → if it arrived on its control's yamux session (or, without tcpMux, from
  its control's address), the stream is parked in its control's pool until a user
  connection needs it (``StartWorkConn``, then raw bytes);
* anything else → closed.

Login failures send the reference HaRP's texts: its Login plugin answered a wrong token
with HTTP 400 (frps: ``send Login request to plugin error``) and a banned address with
``banned``.

:class:`FrpService` is the process lifecycle around it (``twisted.application``): it
owns the FRP listener and, on stop, closes the listener first, then every control
(their proxies' ports and work connections), then whatever the tunnel registry still
holds -- so SIGTERM leaves no frpc session or tunnel port behind.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from typing import Any, Final, Protocol

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from harp import timers
from harp.client_address import normalize_ip
from harp.frp import codec, msg
from harp.frp.control import SERVER_VERSION, Control, describe
from harp.frp.crypto import derive_key, verify_auth_key
from harp.frp.stream import Stream
from harp.frp.tunnels import TunnelRegistry
from harp.logs import HarpLogger

__all__ = [
    "FIRST_MESSAGE_TIMEOUT",
    "HEARTBEAT_TIMEOUT",
    "LOGIN_BAD_PRIVILEGE_KEY",
    "LOGIN_BAD_TOKEN",
    "LOGIN_BANNED",
    "WORK_CONN_TIMEOUT",
    "BanTable",
    "FirstMessage",
    "FrpServer",
    "FrpService",
    "client_ip",
]

log = HarpLogger("harp.frp")

FIRST_MESSAGE_TIMEOUT: Final = 10.0
"""frps ``connReadTimeout``: a stream must say what it is this fast."""
WORK_CONN_TIMEOUT: Final = 10.0
"""frps ``userConnTimeout``: the longest a user connection waits for a work connection."""
HEARTBEAT_TIMEOUT: Final = 90.0
"""frps ``heartbeatTimeout`` for controls without yamux (tcpMux=false)."""

LOGIN_BAD_TOKEN: Final = "send Login request to plugin error"  # noqa: S105 - not a secret
LOGIN_BANNED: Final = "banned"
LOGIN_BAD_PRIVILEGE_KEY: Final = "token in login doesn't match token from configuration"


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

    # ------------------------------------------------------------ streams

    def new_stream(
        self, stream: Stream, on_identified: Callable[[], object] | None = None
    ) -> None:
        """Start the first-message dispatcher on a fresh stream."""
        stream.attach(FirstMessage(self, on_identified))

    # ------------------------------------------------------------ login

    def login(self, stream: Stream, login: msg.Login, decoder: codec.MessageDecoder) -> bool:
        """Authenticate *login*; on success a :class:`Control` takes over *stream*."""
        peer = stream.getPeer()
        ip = client_ip(peer)
        where = ip or str(peer)
        if ip is not None and self.bans.is_banned(ip):
            log.info("FRP login from {addr} rejected: address is banned", addr=where)
            self._refuse(stream, LOGIN_BANNED)
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
            self._refuse(stream, LOGIN_BAD_TOKEN)
            return False
        if not verify_auth_key(self.auth_token, login.timestamp, login.privilege_key):
            log.info("FRP login from {addr} rejected: privilege_key does not match "
                     "(the client sets auth.token; HaRP's clients must not)", addr=where)
            self._refuse(stream, LOGIN_BAD_PRIVILEGE_KEY)
            return False
        run_id = login.run_id or secrets.token_hex(8)
        old = self.controls.get(run_id)
        control = Control(self, stream, login, run_id, decoder, where)
        self.controls[run_id] = control
        stream.attach(control)
        released: Deferred[None] = succeed(None)
        if old is not None:
            released = old.shutdown("replaced by a new login with the same run_id")
        released.addCallback(lambda _: control.start())
        released.addErrback(lambda f: log.failure("FRP login of {run_id} failed", f,
                                                  run_id=run_id))
        return True

    def _refuse(self, stream: Stream, error: str) -> None:
        stream.write(codec.encode_message(msg.LoginResp(version=SERVER_VERSION, error=error)))
        stream.loseConnection()

    # ------------------------------------------------------------ work connections

    def work_conn(self, stream: Stream, message: msg.NewWorkConn) -> None:
        """Park a work connection in its control's pool, if it really belongs to it.

        frps looks the control up by ``run_id`` alone, but a run_id is no secret: it
        travels in every NewWorkConn (in clear with ``HP_FRP_DISABLE_TLS=true``) and is
        logged.  A stranger holding it could otherwise receive the users' traffic of
        that client.  So the work connection must come the way frpc sends it: on the
        control's own yamux session, or -- without tcpMux, one TCP connection each --
        from the control's address.  A privilege_key, sent only by clients with the
        ``NewWorkConns`` scope, must match too (docs/compatibility.md#frp-login).  Refusals
        count towards a ban like failed logins.  An unknown run_id is only closed: after a
        control ends, its client may still answer a ReqWorkConn that was in flight.
        """
        control = self.controls.get(message.run_id)
        if control is None or not control.started or control.closed:
            log.debug("FRP work connection for unknown run_id {run_id} closed",
                      run_id=describe(message.run_id))
            stream.loseConnection()
            return
        why = self._work_conn_mismatch(control, stream, message)
        if why is not None:
            peer = stream.getPeer()
            ip = client_ip(peer)
            banned = ip is not None and self.bans.record_failure(ip)
            log.info("FRP work connection from {addr} for client {run_id} rejected: "
                     "{why}{ban}", addr=ip or str(peer), run_id=control.run_id, why=why,
                     ban=" (address now banned)" if banned else "")
            stream.abortConnection()
            return
        control.add_work_conn(stream)

    def _work_conn_mismatch(
        self, control: Control, stream: Stream, message: msg.NewWorkConn
    ) -> str | None:
        """Why *stream* cannot be a work connection of *control*, or None if it can."""
        if control.stream.multiplexed:
            if stream.carrier is not control.stream.carrier:
                return "not on the yamux session of its control connection"
        elif stream.multiplexed:
            return "on a yamux session, but its control connection has no tcpMux"
        else:
            ip = client_ip(stream.getPeer())
            if ip is None or ip != client_ip(control.stream.getPeer()):
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
    """Reads a stream's first message (≤ 10 s) and hands the stream to its owner."""

    def __init__(
        self, server: FrpServer, on_identified: Callable[[], object] | None = None
    ) -> None:
        self.server = server
        self.decoder = codec.MessageDecoder()
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
            self._stream().abortConnection()

    def _stream(self) -> Stream:
        assert isinstance(self.transport, Stream)
        return self.transport

    def _peer(self) -> str:
        peer = self._stream().getPeer()
        return client_ip(peer) or str(peer)

    def _finish(self) -> None:
        self._done = True
        timers.cancel(self._timer)
        self._timer = None

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self.decoder.feed(data)
        try:
            message = self.decoder.next_message()
        except codec.ProtocolError as exc:
            self._finish()
            log.info("FRP connection from {peer}: bad first message, closing: {error}",
                     peer=self._peer(), error=str(exc))
            self._stream().abortConnection()
            return
        if message is None:
            return
        self._finish()
        stream = self._stream()
        if self._on_identified is not None:
            self._on_identified()
        if isinstance(message, msg.Login):
            self.server.login(stream, message, self.decoder)
        elif isinstance(message, msg.NewWorkConn):
            self.server.work_conn(stream, message)
        elif isinstance(message, msg.NewVisitorConn):
            log.info("FRP visitor connection from {peer} refused (not supported)",
                     peer=self._peer())
            stream.write(codec.encode_message(msg.NewVisitorConnResp(
                proxy_name=message.proxy_name, error="visitors are not supported")))
            stream.loseConnection()
        else:
            log.info("FRP connection from {peer}: unexpected first message {kind}, closing",
                     peer=self._peer(), kind=type(message).__name__)
            stream.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._finish()


class FrpService(MultiService):
    """The FRP server's lifecycle: its listener, then its sessions, then its tunnels.

    *listener* is the service that binds ``HP_FRP_ADDRESS`` with the
    :class:`~harp.frp.listener.FrpServerFactory` of *server* (``harp.service`` builds it,
    so a bind failure is reported like every other listener's).  Stopping closes it
    first, so no new frpc session can start while the others are being shut down, then
    ends every control -- which closes its proxies' ports and work connections -- and
    finally whatever *registry* still holds.  The returned Deferred fires when the ports
    are free, which ``twistd`` waits for before the process exits.
    """

    def __init__(
        self, server: FrpServer, listener: IService, registry: TunnelRegistry | None = None
    ) -> None:
        super().__init__()
        self.server = server
        self.registry = registry
        self.setName("frp")
        listener.setServiceParent(self)

    def stopService(self) -> Deferred[None]:
        listener_stopped = maybeDeferred(super().stopService)

        def sessions(_: object) -> Deferred[None]:
            return self.server.shutdown()

        def tunnels(_: object) -> Deferred[None] | None:
            return None if self.registry is None else self.registry.close_all()

        return listener_stopped.addCallback(sessions).addCallback(tunnels).addCallback(
            lambda _: None
        )
