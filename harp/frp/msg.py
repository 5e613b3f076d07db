"""FRP message framing and the messages a tcp-only frps needs.

Wire format (golib ``msg/json``), one message::

    +--------+------------------------------+---------------------+
    | type   | length: int64, big-endian    | JSON body (length)  |
    | 1 byte | (signed; negative = error)   | max 10 240 bytes    |
    +--------+------------------------------+---------------------+

Why the decoder looks the way it does:

* frpc reads exactly ``1 + 8 + length`` bytes per message and never reads
  ahead, and it relies on the server doing the same: the plaintext ``Login`` /
  ``LoginResp`` is followed *in the same segment* by AES-CFB ciphertext, and a
  ``NewWorkConn`` by raw tunnelled bytes.  :class:`MessageDecoder` therefore
  hands out one message at a time (:meth:`MessageDecoder.next_message`) and lets
  the caller either take the unconsumed bytes (:meth:`~MessageDecoder.take_unconsumed`,
  for a work stream that turns raw) or install a byte transform such as a
  decryptor for everything not yet parsed (:meth:`~MessageDecoder.set_transform`,
  for the control stream after ``Login``).
* An unknown type byte, a negative or oversized length, or a body that is not a
  JSON object of the right shape is fatal for the connection in frp, so every
  such case raises a :class:`ProtocolError` subclass -- and *only* that, no
  matter how garbled the input (the tests feed random bytes to prove it).
* Bodies mirror Go ``encoding/json`` with ``omitempty``: empty strings, zero
  numbers, ``false``, empty maps and empty lists are omitted on encode; nested
  structs (``client_spec``) are always present.  Keys are emitted in Go struct
  field order, which is the dataclass field order below.  On decode, unknown
  keys are ignored, keys match case-insensitively (as Go does), and ``null``
  leaves a field at its zero value.  Type mismatches (a string where Go has an
  int, a float for an int, an out-of-range port) are :class:`MalformedMessage`,
  because Go's decoder fails on them too.

Only the messages a tcp-only server acts on are modelled as dataclasses.  The
remaining types in frp's table (``UDPPacket`` and the ``NatHole*`` family) are
*known* -- they must not be treated as garbage -- but are decoded into a
:class:`RawMessage` holding the JSON object, so the control loop can ignore
them.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import struct
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Final, Self

__all__ = [
    "HEADER_LEN",
    "MAX_MSG_LENGTH",
    "ClientSpec",
    "CloseProxy",
    "Login",
    "LoginResp",
    "MalformedMessage",
    "Message",
    "MessageDecoder",
    "MessageTooLarge",
    "MsgType",
    "NewProxy",
    "NewProxyResp",
    "NewVisitorConn",
    "NewVisitorConnResp",
    "NewWorkConn",
    "Ping",
    "Pong",
    "ProtocolError",
    "RawMessage",
    "ReqWorkConn",
    "StartWorkConn",
    "Uint16",
    "UnknownMessageType",
    "decode_body",
    "decode_message",
    "encode_message",
]

MAX_MSG_LENGTH: Final = 10240
"""Largest body either side accepts (golib ``defaultMaxMsgLength``)."""

HEADER_LEN: Final = 9
"""Type byte plus the int64 length."""

_HEADER = struct.Struct(">cq")


# --------------------------------------------------------------------------
# Errors


class ProtocolError(Exception):
    """The peer sent something that is not valid FRP; close the connection."""


class MessageTooLarge(ProtocolError):
    """Declared body length is negative or above the limit (also raised on encode)."""


class UnknownMessageType(ProtocolError):
    """The type byte is not in frp's message table."""

    def __init__(self, type_byte: int) -> None:
        super().__init__(f"unknown message type byte 0x{type_byte:02x}")
        self.type_byte = type_byte


class MalformedMessage(ProtocolError):
    """The body is not JSON, not an object, or a field has the wrong type."""


# --------------------------------------------------------------------------
# Type table


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


_KNOWN_TYPES: Final = frozenset(int(t) for t in MsgType)


# --------------------------------------------------------------------------
# JSON struct machinery (Go encoding/json with omitempty, in miniature)


class _U16Marker:
    """Annotation marker: the Go field is ``uint16`` (ports)."""


Uint16 = Annotated[int, _U16Marker]
"""An ``int`` that must fit Go's ``uint16``; used for ports in StartWorkConn."""

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

# A field "kind" is one of these tags, or a nested _JsonStruct subclass.
_STR, _INT64, _UINT16, _BOOL, _MAP, _LIST = "str", "int64", "uint16", "bool", "map", "list"
_Kind = str | type["_JsonStruct"]


@dataclass(frozen=True)
class _Schema:
    fields: tuple[tuple[str, _Kind], ...]
    by_folded_key: Mapping[str, tuple[str, _Kind]]


def _kind_of(hint: object) -> _Kind:
    if typing.get_origin(hint) is Annotated and _U16Marker in typing.get_args(hint):
        return _UINT16
    if hint is str:
        return _STR
    if hint is bool:
        return _BOOL
    if hint is int:
        return _INT64
    if hint == dict[str, str]:
        return _MAP
    if hint == list[str]:
        return _LIST
    if isinstance(hint, type) and issubclass(hint, _JsonStruct):
        return hint
    raise TypeError(f"unsupported field type {hint!r}")  # programming error


def _fix_str(value: str) -> str:
    # json.loads keeps lone surrogates from "\ud800" escapes; Go turns them
    # into U+FFFD.  Doing the same keeps every decoded string encodable.
    return _LONE_SURROGATE.sub("\ufffd", value)


def _convert(kind: _Kind, key: str, value: object) -> object:
    """Check one decoded JSON value against its Go type; return the Python value."""
    if kind == _STR:
        if isinstance(value, str):
            return _fix_str(value)
    elif kind == _BOOL:
        if isinstance(value, bool):
            return value
    elif kind in (_INT64, _UINT16):
        if isinstance(value, int) and not isinstance(value, bool):
            low, high = (0, 0xFFFF) if kind == _UINT16 else (_INT64_MIN, _INT64_MAX)
            if low <= value <= high:
                return value
            raise MalformedMessage(f"field {key!r}: {value} out of range")
    elif kind == _MAP:
        if isinstance(value, dict):
            out: dict[str, str] = {}
            for k, v in value.items():
                if v is None:
                    v = ""
                if not isinstance(v, str):
                    raise MalformedMessage(f"field {key!r}: map values must be strings")
                out[_fix_str(k)] = _fix_str(v)
            return out
    elif kind == _LIST:
        if isinstance(value, list):
            items: list[str] = []
            for v in value:
                if v is None:
                    v = ""
                if not isinstance(v, str):
                    raise MalformedMessage(f"field {key!r}: list items must be strings")
                items.append(_fix_str(v))
            return items
    elif isinstance(kind, type):
        if isinstance(value, dict):
            return kind.from_json_obj(value)
    raise MalformedMessage(f"field {key!r}: unexpected JSON type {type(value).__name__}")


def _is_empty(kind: _Kind, value: object) -> bool:
    if isinstance(kind, type):
        return False  # Go's omitempty never omits a struct
    return not value  # "", 0, False, {}, []


class _JsonStruct:
    """Base for dataclasses that map 1:1 onto a Go struct with omitempty tags.

    Attribute names *are* the JSON keys (frp uses snake_case tags throughout),
    and the field order is Go's struct order, so encoding needs no metadata.
    """

    __slots__ = ()
    _schemas: ClassVar[dict[type, _Schema]] = {}

    @classmethod
    def _schema(cls) -> _Schema:
        schema = _JsonStruct._schemas.get(cls)
        if schema is None:
            hints = typing.get_type_hints(cls, include_extras=True)
            pairs = tuple(
                (f.name, _kind_of(hints[f.name]))
                for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            )
            schema = _Schema(pairs, {name.casefold(): (name, kind) for name, kind in pairs})
            _JsonStruct._schemas[cls] = schema
        return schema

    def to_json_obj(self) -> dict[str, object]:
        """The JSON object Go would marshal: zero values left out."""
        out: dict[str, object] = {}
        for name, kind in self._schema().fields:
            value = getattr(self, name)
            if _is_empty(kind, value):
                continue
            if isinstance(value, _JsonStruct):
                out[name] = value.to_json_obj()
            elif isinstance(value, dict):
                out[name] = dict(value)
            elif isinstance(value, list):
                out[name] = list(value)
            else:
                out[name] = value
        return out

    @classmethod
    def from_json_obj(cls, obj: Mapping[str, object]) -> Self:
        """Build from a decoded JSON object, the way Go's Unmarshal would.

        Unknown keys are ignored, keys match case-insensitively, ``null``
        keeps the zero value, and the last of several matching keys wins.
        Raises :class:`MalformedMessage` on a type mismatch.  Also useful to
        apply a plugin's rewritten ``content`` object.
        """
        schema = cls._schema()
        values: dict[str, object] = {}
        for key, value in obj.items():
            hit = schema.by_folded_key.get(key.casefold())
            if hit is None or value is None:
                continue
            name, kind = hit
            values[name] = _convert(kind, name, value)
        return typing.cast(Self, typing.cast(typing.Any, cls)(**values))


# --------------------------------------------------------------------------
# Messages


class _Message(_JsonStruct):
    __slots__ = ()
    TYPE: ClassVar[MsgType]


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientSpec(_JsonStruct):
    """``Login.client_spec``; frpc always sends it, normally as ``{}``."""

    type: str = ""
    always_auth_pass: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class Login(_Message):
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
class LoginResp(_Message):
    """S->C, plaintext reply to Login.  Non-empty ``error`` = login failed;
    on success ``run_id`` must be non-empty (frpc copies it into NewWorkConn)."""

    TYPE: ClassVar[MsgType] = MsgType.LOGIN_RESP
    version: str = ""
    run_id: str = ""
    error: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class NewProxy(_Message):
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
class NewProxyResp(_Message):
    """S->C: ``remote_addr`` is ``":<port>"`` on success, else ``error`` is set."""

    TYPE: ClassVar[MsgType] = MsgType.NEW_PROXY_RESP
    proxy_name: str = ""
    remote_addr: str = ""
    error: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class CloseProxy(_Message):
    """C->S: the proxy is gone; release its port.  No reply."""

    TYPE: ClassVar[MsgType] = MsgType.CLOSE_PROXY
    proxy_name: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class NewWorkConn(_Message):
    """C->S, first (plaintext) message on a work stream; ``run_id`` finds the control."""

    TYPE: ClassVar[MsgType] = MsgType.NEW_WORK_CONN
    run_id: str = ""
    privilege_key: str = ""
    timestamp: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class ReqWorkConn(_Message):
    """S->C on control: please open one more work stream.  Body is ``{}``."""

    TYPE: ClassVar[MsgType] = MsgType.REQ_WORK_CONN


@dataclass(frozen=True, kw_only=True, slots=True)
class StartWorkConn(_Message):
    """S->C, plaintext on a pooled work stream: a user connected; raw bytes follow."""

    TYPE: ClassVar[MsgType] = MsgType.START_WORK_CONN
    proxy_name: str = ""
    src_addr: str = ""
    dst_addr: str = ""
    src_port: Uint16 = 0
    dst_port: Uint16 = 0
    error: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class NewVisitorConn(_Message):
    """C->S, first message on a visitor stream (stcp/xtcp); HaRP rejects these."""

    TYPE: ClassVar[MsgType] = MsgType.NEW_VISITOR_CONN
    run_id: str = ""
    proxy_name: str = ""
    sign_key: str = ""
    timestamp: int = 0
    use_encryption: bool = False
    use_compression: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class NewVisitorConnResp(_Message):
    """S->C reply to NewVisitorConn (used to refuse visitors with an error)."""

    TYPE: ClassVar[MsgType] = MsgType.NEW_VISITOR_CONN_RESP
    proxy_name: str = ""
    error: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class Ping(_Message):
    """C->S app-level heartbeat (tcpMux=false, or explicitly configured)."""

    TYPE: ClassVar[MsgType] = MsgType.PING
    privilege_key: str = ""
    timestamp: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Pong(_Message):
    """S->C heartbeat reply; a non-empty ``error`` makes frpc reconnect."""

    TYPE: ClassVar[MsgType] = MsgType.PONG
    error: str = ""


_MODELLED: Final[Mapping[int, type[_Message]]] = {
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
"""Everything :class:`MessageDecoder` can return."""


# --------------------------------------------------------------------------
# Encoding


def _go_json(obj: Mapping[str, object]) -> bytes:
    # ASCII-only output can never fail to encode (even with lone surrogates),
    # and escaping <, > and & matches Go's default HTML-safe marshalling.
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode("ascii")


def encode_message(message: Message) -> bytes:
    """Frame *message* for the wire: type byte, int64 BE length, JSON body.

    Raises :class:`MessageTooLarge` rather than emit a body frpc would refuse
    (and then drop the control connection over).
    """
    type_byte = message.type if isinstance(message, RawMessage) else message.TYPE
    body = _go_json(message.to_json_obj())
    if len(body) > MAX_MSG_LENGTH:
        raise MessageTooLarge(f"body of {len(body)} bytes exceeds {MAX_MSG_LENGTH}")
    return _HEADER.pack(bytes((type_byte,)), len(body)) + body


# --------------------------------------------------------------------------
# Decoding


def _reject_constant(name: str) -> object:
    raise MalformedMessage(f"non-standard JSON constant {name}")


def decode_body(type_byte: int, body: bytes) -> Message:
    """Parse the JSON *body* of a message whose type byte is *type_byte*.

    Raises :class:`UnknownMessageType` or :class:`MalformedMessage`; never any
    other exception, whatever the bytes.
    """
    if type_byte not in _KNOWN_TYPES:
        raise UnknownMessageType(type_byte)
    try:
        # Go accepts invalid UTF-8 inside strings (replacing it); so do we.
        obj = json.loads(body.decode("utf-8", "replace"), parse_constant=_reject_constant)
    except MalformedMessage:
        raise
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage(f"invalid JSON body: {exc}") from None
    if obj is None:
        obj = {}  # Go: unmarshalling null into a struct is a no-op
    if not isinstance(obj, dict):
        raise MalformedMessage(f"body is a JSON {type(obj).__name__}, not an object")
    cls = _MODELLED.get(type_byte)
    if cls is None:
        return RawMessage(MsgType(type_byte), obj)
    return typing.cast(Message, cls.from_json_obj(obj))


def decode_message(data: bytes, *, max_length: int = MAX_MSG_LENGTH) -> Message:
    """Decode exactly one complete framed message (handy in tests and tools)."""
    decoder = MessageDecoder(max_length=max_length)
    decoder.feed(data)
    message = decoder.next_message()
    if message is None:
        raise MalformedMessage("incomplete message")
    if decoder.buffered:
        raise MalformedMessage(f"{decoder.buffered} trailing bytes after message")
    return message


class MessageDecoder:
    """Incremental decoder: feed bytes as they arrive, pull messages one by one.

    Typical control-stream use::

        decoder.feed(data)
        login = decoder.next_message()          # plaintext Login
        decoder.set_transform(decryptor.decrypt)  # everything after is AES-CFB
        while (msg := decoder.next_message()) is not None: ...

    and on a work stream, after ``NewWorkConn``, :meth:`take_unconsumed`
    returns any raw bytes that arrived with it.

    Errors are detected as early as possible (the type byte alone, then the
    length) so a peer cannot make us buffer a body we will reject.  After a
    :class:`ProtocolError` the decoder is poisoned and re-raises it on every
    call: the connection must be closed.
    """

    def __init__(self, *, max_length: int = MAX_MSG_LENGTH) -> None:
        self._max_length = max_length
        self._buffer = bytearray()
        self._transform: Callable[[bytes], bytes] | None = None
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed by a returned message."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Append bytes from the transport (passed through the transform, if any)."""
        if self._transform is not None:
            data = self._transform(data)
        self._buffer += data

    def set_transform(self, transform: Callable[[bytes], bytes]) -> None:
        """Route all bytes not yet parsed, and all future input, through *transform*.

        Exists for the plaintext-to-encrypted switch on the control stream:
        bytes after ``Login`` that already sit in our buffer are ciphertext and
        must be decrypted before parsing.  *transform* must be a stateful
        stream function (a CFB decryptor), applied exactly once per byte.
        """
        if self._transform is not None:
            raise RuntimeError("a transform is already installed")
        self._transform = transform
        pending = bytes(self._buffer)
        self._buffer = bytearray(transform(pending))

    def take_unconsumed(self) -> bytes:
        """Remove and return everything buffered after the last message.

        Used when the stream stops carrying messages (a work stream after
        ``NewWorkConn``); the decoder should not be used afterwards.
        """
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def next_message(self) -> Message | None:
        """Return the next complete message, or ``None`` if more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._parse_one()
        except ProtocolError as exc:
            self._error = exc
            raise

    def pop_messages(self) -> list[Message]:
        """All complete messages currently buffered (for streams that stay framed)."""
        out: list[Message] = []
        while (message := self.next_message()) is not None:
            out.append(message)
        return out

    def _parse_one(self) -> Message | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] not in _KNOWN_TYPES:
            raise UnknownMessageType(buf[0])
        if len(buf) < HEADER_LEN:
            return None
        type_char, length = _HEADER.unpack_from(buf)
        if length < 0:
            raise MessageTooLarge(f"negative message length {length}")
        if length > self._max_length:
            raise MessageTooLarge(f"message length {length} exceeds {self._max_length}")
        end = HEADER_LEN + length
        if len(buf) < end:
            return None
        body = bytes(buf[HEADER_LEN:end])
        del buf[:end]
        return decode_body(type_char[0], body)
