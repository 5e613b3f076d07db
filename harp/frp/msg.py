"""The FRP messages a tcp-only frps needs, as typed structs (frp's ``pkg/msg/msg.go``).

Each message is a frozen dataclass whose attribute names *are* frp's JSON keys and whose
field order is Go's struct order, so :mod:`harp.frp.gojson` can marshal it exactly as
frpc expects; :mod:`harp.frp.codec` puts the type byte and length around it.

Only the messages a tcp-only server acts on are modelled as dataclasses.  The
remaining types in frp's table (``UDPPacket`` and the ``NatHole*`` family) are
*known* -- they must not be treated as garbage -- but are decoded into a
:class:`RawMessage` holding the JSON object, so the control loop can ignore
them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Final

from harp.frp.gojson import GoStruct, Uint16

__all__ = [
    "KNOWN_TYPES",
    "MODELLED",
    "ClientSpec",
    "CloseProxy",
    "Login",
    "LoginResp",
    "Message",
    "MsgType",
    "NewProxy",
    "NewProxyResp",
    "NewVisitorConn",
    "NewVisitorConnResp",
    "NewWorkConn",
    "Ping",
    "Pong",
    "RawMessage",
    "ReqWorkConn",
    "StartWorkConn",
    "Struct",
]


class MsgType(enum.IntEnum):
    """frp's message type bytes (``pkg/msg/msg.go``, identical in 0.61.1-0.65.0)."""

    LOGIN = ord("o")
    LOGIN_RESP = ord("1")
    NEW_PROXY = ord("p")
    NEW_PROXY_RESP = ord("2")
    CLOSE_PROXY = ord("c")
    NEW_WORK_CONN = ord("w")
    REQ_WORK_CONN = ord("r")
    START_WORK_CONN = ord("s")
    NEW_VISITOR_CONN = ord("v")
    NEW_VISITOR_CONN_RESP = ord("3")
    PING = ord("h")
    PONG = ord("4")
    UDP_PACKET = ord("u")
    NAT_HOLE_VISITOR = ord("i")
    NAT_HOLE_CLIENT = ord("n")
    NAT_HOLE_RESP = ord("m")
    NAT_HOLE_SID = ord("5")
    NAT_HOLE_REPORT = ord("6")


KNOWN_TYPES: Final = frozenset(int(t) for t in MsgType)


class Struct(GoStruct):
    """A message body; ``TYPE`` is its type byte."""

    __slots__ = ()
    TYPE: ClassVar[MsgType]


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientSpec(GoStruct):
    """``Login.client_spec``; frpc always sends it, normally as ``{}``."""

    type: str = ""
    always_auth_pass: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class Login(Struct):
    """C->S, first message on the control stream (plaintext).

    ``privilege_key`` is ``md5(token + str(timestamp))`` (see
    :func:`harp.frp.crypto.auth_key`); HaRP's real credential is
    ``metas["token"]``.  ``run_id`` is set only on a reconnect.
    """

    TYPE: ClassVar[MsgType] = MsgType.LOGIN
    version: str = ""
    hostname: str = ""
    os: str = ""
    arch: str = ""
    user: str = ""
    privilege_key: str = ""
    timestamp: int = 0
    run_id: str = ""
    metas: dict[str, str] = field(default_factory=dict)
    client_spec: ClientSpec = field(default_factory=ClientSpec)
    pool_count: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class LoginResp(Struct):
    """S->C, plaintext reply to Login.  Non-empty ``error`` = login failed;
    on success ``run_id`` must be non-empty (frpc copies it into NewWorkConn)."""

    TYPE: ClassVar[MsgType] = MsgType.LOGIN_RESP
    version: str = ""
    run_id: str = ""
    error: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class NewProxy(Struct):
    """C->S on the (encrypted) control stream: register a proxy.

    Empty ``proxy_type`` means ``tcp``.  ``remote_port`` 0 asks the server to
    choose.  Fields for other proxy types are kept so a rejection can name them.
    """

    TYPE: ClassVar[MsgType] = MsgType.NEW_PROXY
    proxy_name: str = ""
    proxy_type: str = ""
    use_encryption: bool = False
    use_compression: bool = False
    bandwidth_limit: str = ""
    bandwidth_limit_mode: str = ""
    group: str = ""
    group_key: str = ""
    metas: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    remote_port: int = 0
    custom_domains: list[str] = field(default_factory=list)
    subdomain: str = ""
    locations: list[str] = field(default_factory=list)
    http_user: str = ""
    http_pwd: str = ""
    host_header_rewrite: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)
    route_by_http_user: str = ""
    sk: str = ""
    allow_users: list[str] = field(default_factory=list)
    multiplexer: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class NewProxyResp(Struct):
    """S->C: ``remote_addr`` is ``":<port>"`` on success, else ``error`` is set."""

    TYPE: ClassVar[MsgType] = MsgType.NEW_PROXY_RESP
    proxy_name: str = ""
    remote_addr: str = ""
    error: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class CloseProxy(Struct):
    """C->S: the proxy is gone; release its port.  No reply."""

    TYPE: ClassVar[MsgType] = MsgType.CLOSE_PROXY
    proxy_name: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class NewWorkConn(Struct):
    """C->S, first (plaintext) message on a work stream; ``run_id`` finds the control."""

    TYPE: ClassVar[MsgType] = MsgType.NEW_WORK_CONN
    run_id: str = ""
    privilege_key: str = ""
    timestamp: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class ReqWorkConn(Struct):
    """S->C on control: please open one more work stream.  Body is ``{}``."""

    TYPE: ClassVar[MsgType] = MsgType.REQ_WORK_CONN


@dataclass(frozen=True, kw_only=True, slots=True)
class StartWorkConn(Struct):
    """S->C, plaintext on a pooled work stream: a user connected; raw bytes follow."""

    TYPE: ClassVar[MsgType] = MsgType.START_WORK_CONN
    proxy_name: str = ""
    src_addr: str = ""
    dst_addr: str = ""
    src_port: Uint16 = 0
    dst_port: Uint16 = 0
    error: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class NewVisitorConn(Struct):
    """C->S, first message on a visitor stream (stcp/xtcp); HaRP rejects these."""

    TYPE: ClassVar[MsgType] = MsgType.NEW_VISITOR_CONN
    run_id: str = ""
    proxy_name: str = ""
    sign_key: str = ""
    timestamp: int = 0
    use_encryption: bool = False
    use_compression: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class NewVisitorConnResp(Struct):
    """S->C reply to NewVisitorConn (used to refuse visitors with an error)."""

    TYPE: ClassVar[MsgType] = MsgType.NEW_VISITOR_CONN_RESP
    proxy_name: str = ""
    error: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class Ping(Struct):
    """C->S app-level heartbeat (tcpMux=false, or explicitly configured)."""

    TYPE: ClassVar[MsgType] = MsgType.PING
    privilege_key: str = ""
    timestamp: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Pong(Struct):
    """S->C heartbeat reply; a non-empty ``error`` makes frpc reconnect."""

    TYPE: ClassVar[MsgType] = MsgType.PONG
    error: str = ""


MODELLED: Final[Mapping[int, type[Struct]]] = {
    int(cls.TYPE): cls
    for cls in (
        Login,
        LoginResp,
        NewProxy,
        NewProxyResp,
        CloseProxy,
        NewWorkConn,
        ReqWorkConn,
        StartWorkConn,
        NewVisitorConn,
        NewVisitorConnResp,
        Ping,
        Pong,
    )
}


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A known but unmodelled message (``UDPPacket``, ``NatHole*``).

    A tcp-only server ignores these; they are kept as the decoded JSON object
    so that a log line can say what arrived.
    """

    type: MsgType
    fields: Mapping[str, object]

    def to_json_obj(self) -> dict[str, object]:
        return dict(self.fields)


Message = (
    Login
    | LoginResp
    | NewProxy
    | NewProxyResp
    | CloseProxy
    | NewWorkConn
    | ReqWorkConn
    | StartWorkConn
    | NewVisitorConn
    | NewVisitorConnResp
    | Ping
    | Pong
    | RawMessage
)
"""Everything :class:`harp.frp.codec.MessageDecoder` can return."""
