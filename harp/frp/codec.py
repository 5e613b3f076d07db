"""FRP message framing: type byte, int64 length, JSON body (golib ``msg/json``).

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
* Bodies follow Go ``encoding/json`` with ``omitempty`` (:mod:`harp.frp.gojson`); the
  message structs are :mod:`harp.frp.msg`.
"""

from __future__ import annotations

import struct
import typing
from collections.abc import Callable
from typing import Final

from harp.frp import gojson
from harp.frp.msg import KNOWN_TYPES, MODELLED, Message, MsgType, RawMessage

__all__ = [
    "HEADER_LEN",
    "MAX_MSG_LENGTH",
    "MalformedMessage",
    "MessageDecoder",
    "MessageTooLarge",
    "ProtocolError",
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


def encode_message(message: Message) -> bytes:
    """Frame *message* for the wire: type byte, int64 BE length, JSON body.

    Raises :class:`MessageTooLarge` rather than emit a body frpc would refuse
    (and then drop the control connection over).
    """
    type_byte = message.type if isinstance(message, RawMessage) else message.TYPE
    body = gojson.dumps(message.to_json_obj())
    if len(body) > MAX_MSG_LENGTH:
        raise MessageTooLarge(f"body of {len(body)} bytes exceeds {MAX_MSG_LENGTH}")
    return _HEADER.pack(bytes((type_byte,)), len(body)) + body


def decode_body(type_byte: int, body: bytes) -> Message:
    """Parse the JSON *body* of a message whose type byte is *type_byte*.

    Raises :class:`UnknownMessageType` or :class:`MalformedMessage`; never any
    other exception, whatever the bytes.
    """
    if type_byte not in KNOWN_TYPES:
        raise UnknownMessageType(type_byte)
    try:
        obj = gojson.loads_object(body)
        cls = MODELLED.get(type_byte)
        if cls is None:
            return RawMessage(MsgType(type_byte), obj)
        return typing.cast(Message, cls.from_json_obj(obj))
    except gojson.GoJsonError as exc:
        raise MalformedMessage(str(exc)) from None


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
        if buf[0] not in KNOWN_TYPES:
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
