"""Property-based fuzzing of the FRP codecs and of the server stack as a whole.

Complements the per-module properties in ``test_msg.py`` / ``test_yamux.py`` with what a
hostile peer can aim at:

* **mutated valid traffic** (bit flips, cuts, insertions in real message streams) only
  ever raises the codec's own :class:`~harp.frp.codec.ProtocolError`;
* whatever decodes is **stable**: decode → encode → decode gives the same message, so
  a normalisation never turns one client's input into something else on the way out;
* yamux headers **round-trip** and random 12-byte headers fail only with
  :class:`~harp.frp.yamux_frame.YamuxProtocolError`;
* a yamux session **never answers more than it was sent** (plus one GoAway): the bound
  that makes the output guard of :mod:`harp.frp.backlog` sufficient
  (docs/compatibility.md#frp-yamux);
* random bytes after a valid first byte never raise out of the Twisted protocol.

Each test stays well under a second or two: ``max_examples`` <= 200, no deadline.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from harp.frp import codec, msg, yamux, yamux_frame
from harp.frp.codec import MessageDecoder, ProtocolError, encode_message
from tests.unit.frp.test_control import Env
from tests.unit.frp.test_msg import _fits, messages

FUZZ = settings(max_examples=200, deadline=None)


def _decode_all(stream: bytes) -> list[msg.Message]:
    decoder = MessageDecoder()
    decoder.feed(stream)
    return decoder.pop_messages()


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    batch = [m for m in draw(st.lists(messages, min_size=1, max_size=4)) if _fits(m)]
    wire = bytearray(b"".join(encode_message(m) for m in batch))
    for _ in range(draw(st.integers(1, 4))):
        if not wire:
            break
        pos = draw(st.integers(0, len(wire) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            wire[pos] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del wire[pos : pos + draw(st.integers(1, 16))]
        else:
            wire[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(wire)


@FUZZ
@given(_mutated())
def test_mutated_message_streams_only_raise_protocol_error(wire: bytes) -> None:
    try:
        _decode_all(wire)
    except ProtocolError:
        pass


@FUZZ
@given(_mutated())
def test_whatever_decodes_is_stable(wire: bytes) -> None:
    decoder = MessageDecoder()
    decoder.feed(wire)
    while True:
        try:
            message = decoder.next_message()
        except ProtocolError:
            return
        if message is None:
            return
        if not _fits(message):
            continue  # a body that grew past 10 240 bytes on re-encode is refused, not sent
        again = codec.decode_message(encode_message(message))
        assert again == message


@FUZZ
@given(
    st.sampled_from(yamux_frame.FrameType),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)
def test_yamux_header_round_trip(
    kind: yamux_frame.FrameType, flags: int, sid: int, length: int
) -> None:
    header = yamux_frame.FrameHeader(kind, yamux_frame.Flag(flags), sid, length)
    assert yamux_frame.FrameHeader.decode(header.encode()) == header


@FUZZ
@given(st.binary(min_size=yamux_frame.HEADER_LEN, max_size=yamux_frame.HEADER_LEN))
def test_random_yamux_headers_decode_or_raise_protocol_error(raw: bytes) -> None:
    try:
        header = yamux_frame.FrameHeader.decode(raw)
    except yamux_frame.YamuxProtocolError:
        assert raw[0] != yamux_frame.VERSION or raw[1] > yamux_frame.FrameType.GO_AWAY
        return
    assert header.encode() == raw


_frames = st.builds(
    lambda kind, flags, sid, length, payload: yamux_frame.FrameHeader(
        yamux_frame.FrameType(kind), yamux_frame.Flag(flags), sid, length if kind else len(payload)
    ).encode() + (payload if kind == yamux_frame.FrameType.DATA else b""),
    st.integers(0, 3),
    st.integers(0, 15),
    st.integers(0, 12),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=30),
)


@FUZZ
@given(st.lists(_frames | st.binary(max_size=20), max_size=40), st.integers(1, 64))
def test_session_never_answers_more_than_it_was_sent(pieces: list[bytes], chunk: int) -> None:
    session = yamux.Session(max_inbound_streams=4)
    wire = b"".join(pieces)
    out = 0
    for pos in range(0, len(wire), chunk):
        session.receive_data(wire[pos : pos + chunk])
        out += len(session.data_to_send())
    assert out <= len(wire) + yamux_frame.HEADER_LEN  # + the GoAway of a protocol error
    assert len(session.stream_ids) <= 4


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([b"\x00", b"o", b"w", b"v", b"\x16", b"\x17", b"G"]),
       st.lists(st.binary(max_size=200), max_size=6))
def test_random_bytes_never_raise_out_of_the_server(first: bytes, chunks: list[bytes]) -> None:
    env = Env()
    peer = IPv4Address("TCP", "192.0.2.5", 40000)
    transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "0.0.0.0", 1))
    proto = env.factory.buildProtocol(peer)
    proto.makeConnection(transport)
    for data in [first, *chunks]:
        if transport.disconnecting:
            break
        proto.dataReceived(data)
    env.reactor.advance(60)  # every deadline fires without raising either
    proto.connectionLost()
