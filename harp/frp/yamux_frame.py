"""yamux frames, sans I/O: the 12-byte header, frame types, flags and builders.

Protocol summary (docs/compatibility.md#frp-yamux): a 12-byte big-endian header ``version(0) |
type | flags | stream id | length``; type 0 Data (length = payload bytes),
1 WindowUpdate (length = window delta), 2 Ping (length = opaque, echoed),
3 GoAway (length = error code); flags SYN/ACK/FIN/RST.

This is the wire vocabulary only (hashicorp/yamux ``const.go``); what a session does with
frames -- streams, windows, pings -- is :mod:`harp.frp.yamux`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "HEADER_LEN",
    "INITIAL_WINDOW",
    "MAX_DATA_FRAME",
    "MAX_U32",
    "VERSION",
    "Flag",
    "Frame",
    "FrameDecoder",
    "FrameHeader",
    "FrameType",
    "GoAwayCode",
    "YamuxProtocolError",
    "data_frame",
    "encode_header",
    "go_away_frame",
    "ping_frame",
    "window_update_frame",
]

VERSION: Final = 0
HEADER_LEN: Final = 12
INITIAL_WINDOW: Final = 256 * 1024
"""Window every stream starts with, in each direction (not negotiable)."""
MAX_DATA_FRAME: Final = 64 * 1024
"""Largest Data payload we emit; keeps streams interleaved fairly."""
MAX_U32: Final = 0xFFFFFFFF
"""Largest stream id, window, ping opaque and length a header can carry."""

_HEADER = struct.Struct(">BBHII")


class FrameType(enum.IntEnum):
    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3


class Flag(enum.IntFlag):
    NONE = 0
    SYN = 0x1
    ACK = 0x2
    FIN = 0x4
    RST = 0x8


class GoAwayCode(enum.IntEnum):
    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class YamuxProtocolError(Exception):
    """A frame that no yamux peer may send (bad version/type, oversize payload)."""


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """A decoded 12-byte frame header."""

    type: FrameType
    flags: Flag
    stream_id: int
    length: int

    def encode(self) -> bytes:
        return _HEADER.pack(VERSION, self.type, self.flags, self.stream_id, self.length)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> FrameHeader:
        """Parse the first 12 bytes of *data*.

        Unknown versions and types are fatal for a yamux session, so they raise
        :class:`YamuxProtocolError`.  Unknown flag bits are kept as-is (yamux
        ignores them).
        """
        if len(data) < HEADER_LEN:
            raise ValueError("need 12 bytes for a yamux header")
        version, type_, flags, stream_id, length = _HEADER.unpack_from(data)
        if version != VERSION:
            raise YamuxProtocolError(f"invalid protocol version {version}")
        if type_ > FrameType.GO_AWAY:
            raise YamuxProtocolError(f"invalid message type {type_}")
        return cls(FrameType(type_), Flag(flags), stream_id, length)


def encode_header(type_: FrameType, flags: Flag, stream_id: int, length: int) -> bytes:
    """The 12 header bytes alone (a Data frame's payload is appended by the caller)."""
    return _HEADER.pack(VERSION, type_, flags, stream_id, length)


def data_frame(stream_id: int, payload: bytes, flags: Flag = Flag.NONE) -> bytes:
    """A Data frame carrying *payload* (header + payload bytes)."""
    return encode_header(FrameType.DATA, flags, stream_id, len(payload)) + payload


def window_update_frame(stream_id: int, delta: int, flags: Flag = Flag.NONE) -> bytes:
    """A WindowUpdate; also how SYN/ACK/FIN/RST travel without data."""
    return encode_header(FrameType.WINDOW_UPDATE, flags, stream_id, delta)


def ping_frame(opaque: int, flags: Flag) -> bytes:
    """A Ping on stream 0: ``Flag.SYN`` to ask, ``Flag.ACK`` to answer."""
    return encode_header(FrameType.PING, flags, 0, opaque)


def go_away_frame(code: GoAwayCode) -> bytes:
    """A GoAway on stream 0."""
    return encode_header(FrameType.GO_AWAY, Flag.NONE, 0, code)


@dataclass(frozen=True, slots=True)
class Frame:
    """A whole frame: header plus the payload of a Data frame (else ``b""``)."""

    header: FrameHeader
    payload: bytes = b""


class FrameDecoder:
    """Buffering frame decoder, for tests and tools that want whole frames.

    :class:`harp.frp.yamux.Session` does not use it: the session streams payloads
    instead of buffering them.  *max_payload* bounds what a Data frame may declare.
    """

    def __init__(self, *, max_payload: int = MAX_U32) -> None:
        self._buffer = bytearray()
        self._max_payload = max_payload

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes; return every frame now complete.  Raises YamuxProtocolError."""
        self._buffer += data
        frames: list[Frame] = []
        while len(self._buffer) >= HEADER_LEN:
            header = FrameHeader.decode(self._buffer)
            size = header.length if header.type is FrameType.DATA else 0
            if size > self._max_payload:
                raise YamuxProtocolError(f"data frame of {size} bytes exceeds limit")
            if len(self._buffer) < HEADER_LEN + size:
                break
            payload = bytes(self._buffer[HEADER_LEN : HEADER_LEN + size])
            del self._buffer[: HEADER_LEN + size]
            frames.append(Frame(header, payload))
        return frames
