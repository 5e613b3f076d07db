"""yamux frame codec and sans-I/O session (docs/compatibility.md#frp-yamux)."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.frp.yamux import (
    DataReceived,
    Event,
    GoAwayReceived,
    PingAcknowledged,
    PingReceived,
    SendWindowUpdated,
    Session,
    SessionTerminated,
    StreamClosedError,
    StreamEnded,
    StreamOpened,
    StreamRejected,
    StreamReset,
)
from harp.frp.yamux_frame import (
    HEADER_LEN,
    INITIAL_WINDOW,
    Flag,
    Frame,
    FrameDecoder,
    FrameHeader,
    FrameType,
    GoAwayCode,
    YamuxProtocolError,
    data_frame,
    go_away_frame,
    ping_frame,
    window_update_frame,
)

FRPS_WINDOW = 6 * 1024 * 1024
FRPC_SYN = bytes.fromhex("00 01 0001 00000001 005c0000")
LOGIN_DATA_HEADER = bytes.fromhex("00 00 0000 00000001 000000be")


def frames(data: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    out = decoder.feed(data)
    assert decoder.feed(b"") == []
    return out


def open_server(max_stream_window: int = INITIAL_WINDOW) -> Session:
    """A server session on which the client has opened stream 1 with frpc's SYN."""
    server = Session(max_stream_window=max_stream_window)
    assert server.receive_data(FRPC_SYN) == [StreamOpened(1)]
    server.data_to_send()
    return server


# ------------------------------------------------------------------ codec


def test_spec_frames() -> None:
    assert window_update_frame(1, 0x5C0000, Flag.SYN) == FRPC_SYN
    assert FrameHeader.decode(FRPC_SYN) == FrameHeader(
        FrameType.WINDOW_UPDATE, Flag.SYN, 1, FRPS_WINDOW - INITIAL_WINDOW
    )
    assert ping_frame(0, Flag.SYN) == bytes.fromhex("00 02 0001 00000000 00000000")
    assert window_update_frame(5, 0, Flag.FIN) == bytes.fromhex("00 01 0004 00000005 00000000")
    assert go_away_frame(GoAwayCode.PROTOCOL_ERROR) == bytes.fromhex("00 03 0000 00000000 00000001")
    assert data_frame(1, b"ab") == bytes.fromhex("00 00 0000 00000001 00000002") + b"ab"


@given(
    st.sampled_from(FrameType),
    st.integers(0, 0xFFFF),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)
def test_header_round_trip(type_: FrameType, flags: int, sid: int, length: int) -> None:
    header = FrameHeader(type_, Flag(flags), sid, length)
    encoded = header.encode()
    assert len(encoded) == HEADER_LEN
    assert FrameHeader.decode(encoded) == header


@pytest.mark.parametrize("raw", ["01 00 0000 00000001 00000000", "00 04 0000 00000001 00000000"])
def test_header_rejects_bad_version_and_type(raw: str) -> None:
    with pytest.raises(YamuxProtocolError):
        FrameHeader.decode(bytes.fromhex(raw))
    with pytest.raises(ValueError):
        FrameHeader.decode(b"\x00" * 11)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 99), st.binary(max_size=40)), max_size=8), st.data())
def test_frame_decoder_any_chunking(items: list[tuple[int, bytes]], data: st.DataObject) -> None:
    wire = b"".join(data_frame(sid, payload) + ping_frame(sid, Flag.ACK) for sid, payload in items)
    decoder = FrameDecoder()
    got: list[Frame] = []
    pos = 0
    while pos < len(wire):
        size = data.draw(st.integers(1, 30))
        got.extend(decoder.feed(wire[pos : pos + size]))
        pos += size
    expected = []
    for sid, payload in items:
        expected.append(Frame(FrameHeader(FrameType.DATA, Flag.NONE, sid, len(payload)), payload))
        expected.append(Frame(FrameHeader(FrameType.PING, Flag.ACK, 0, sid)))
    assert got == expected


def test_frame_decoder_payload_limit() -> None:
    with pytest.raises(YamuxProtocolError):
        FrameDecoder(max_payload=10).feed(data_frame(1, b"x" * 11)[:HEADER_LEN])


# ------------------------------------------------------------------ opening, login exchange


def test_frpc_login_exchange_default_window() -> None:
    server = Session()
    login = b"o" + bytes(8) + b"x" * 181
    events = server.receive_data(FRPC_SYN + LOGIN_DATA_HEADER + login)
    assert events == [StreamOpened(1), DataReceived(1, login)]
    # ACK with delta 0: our window stays at 256 KiB (accepted by frpc)
    assert server.data_to_send() == bytes.fromhex("00 01 0002 00000001 00000000")
    assert server.send_window(1) == FRPS_WINDOW  # 256 KiB + client's delta
    server.send(1, b"resp")
    assert server.data_to_send() == data_frame(1, b"resp")


def test_frps_sized_window_ack_matches_frps() -> None:
    server = Session(max_stream_window=FRPS_WINDOW)
    server.receive_data(FRPC_SYN)
    assert server.data_to_send() == bytes.fromhex("00 01 0002 00000001 005c0000")


def test_data_syn_opens_stream_and_fin_follows_data() -> None:
    server = Session()
    events = server.receive_data(data_frame(3, b"hello", Flag.SYN | Flag.FIN))
    assert events == [StreamOpened(3), DataReceived(3, b"hello"), StreamEnded(3)]
    assert server.send_window(3) == INITIAL_WINDOW  # a Data SYN carries no delta


def test_byte_by_byte_input() -> None:
    server = Session()
    wire = FRPC_SYN + data_frame(1, b"abc") + ping_frame(9, Flag.SYN)
    events: list[Event] = []
    for i in range(len(wire)):
        events.extend(server.receive_data(wire[i : i + 1]))
    assert events == [
        StreamOpened(1),
        DataReceived(1, b"a"),
        DataReceived(1, b"b"),
        DataReceived(1, b"c"),
        PingReceived(9),
    ]


def test_max_inbound_streams_rejects_with_rst() -> None:
    server = Session(max_inbound_streams=1)
    server.receive_data(FRPC_SYN)
    server.data_to_send()
    events = server.receive_data(window_update_frame(3, 0, Flag.SYN) + data_frame(3, b"dropped"))
    assert events == [StreamRejected(3, "more than 1 open streams")]
    assert server.data_to_send() == window_update_frame(3, 0, Flag.RST)
    server.reset_stream(1)
    server.data_to_send()
    assert server.receive_data(window_update_frame(5, 0, Flag.SYN)) == [StreamOpened(5)]


def test_open_stream_parity_and_go_away() -> None:
    client, server = Session(client=True), Session()
    assert [client.open_stream() for _ in range(3)] == [1, 3, 5]
    assert server.open_stream() == 2
    server.go_away()
    server.go_away()  # idempotent: one GoAway only
    assert server.data_to_send()[-2 * HEADER_LEN :] == window_update_frame(
        2, 0, Flag.SYN
    ) + go_away_frame(GoAwayCode.NORMAL)
    with pytest.raises(StreamClosedError):
        server.open_stream()
    # later SYNs are refused, existing streams are not affected
    events = server.receive_data(client.data_to_send())
    assert events == [
        StreamRejected(1, "session is going away"),
        StreamRejected(3, "session is going away"),
        StreamRejected(5, "session is going away"),
    ]
    assert client.receive_data(go_away_frame(GoAwayCode.NORMAL)) == [GoAwayReceived(0)]
    assert client.remote_go_away
    with pytest.raises(StreamClosedError):
        client.open_stream()


# ------------------------------------------------------------------ ping


def test_ping_is_answered_with_same_opaque() -> None:
    server = Session()
    assert server.receive_data(ping_frame(0xDEADBEEF, Flag.SYN)) == [PingReceived(0xDEADBEEF)]
    assert server.data_to_send() == bytes.fromhex("00 02 0002 00000000 deadbeef")


def test_own_pings_are_matched() -> None:
    server = Session()
    assert server.ping() == 0
    assert server.ping() == 1
    assert server.data_to_send() == ping_frame(0, Flag.SYN) + ping_frame(1, Flag.SYN)
    assert server.receive_data(ping_frame(1, Flag.ACK)) == [PingAcknowledged(1)]
    assert server.receive_data(ping_frame(1, Flag.ACK)) == []  # not outstanding any more
    assert server.receive_data(ping_frame(77, Flag.ACK)) == []  # unknown opaque ignored
    assert server.data_to_send() == b""


# ------------------------------------------------------------------ flow control


def test_send_never_exceeds_window_and_queues_the_rest() -> None:
    server = Session()
    server.receive_data(window_update_frame(1, 0, Flag.SYN))  # client grants no extra window
    server.data_to_send()
    payload = bytes(range(256)) * 1200  # 300 KiB
    server.send(1, payload)
    sent = frames(server.data_to_send())
    assert sum(len(f.payload) for f in sent) == INITIAL_WINDOW
    assert all(len(f.payload) <= 64 * 1024 for f in sent)
    assert server.send_window(1) == 0
    assert server.buffered_amount(1) == len(payload) - INITIAL_WINDOW
    server.send(1, b"more")  # still queued, nothing on the wire
    assert server.data_to_send() == b""
    events = server.receive_data(window_update_frame(1, 10))
    assert events == [SendWindowUpdated(1, 0, len(payload) - INITIAL_WINDOW + 4 - 10)]
    assert frames(server.data_to_send())[0].payload == payload[INITIAL_WINDOW : INITIAL_WINDOW + 10]
    events = server.receive_data(window_update_frame(1, 1 << 20))
    remaining = len(payload) + 4 - INITIAL_WINDOW - 10
    assert events == [SendWindowUpdated(1, (1 << 20) - remaining, 0)]
    rest = b"".join(f.payload for f in frames(server.data_to_send()))
    assert rest == payload[INITIAL_WINDOW + 10 :] + b"more"


def test_window_updates_follow_consumption_in_batches() -> None:
    server = open_server()
    chunk = b"x" * (100 * 1024)
    for _ in range(2):
        assert server.receive_data(data_frame(1, chunk)) == [DataReceived(1, chunk)]
    assert server.unconsumed(1) == 200 * 1024
    server.consume(1, 100 * 1024)
    assert server.data_to_send() == b""  # 100 KiB < half the window: batch it
    server.consume(1, 50 * 1024)
    assert server.data_to_send() == window_update_frame(1, 150 * 1024)
    server.consume(1, 50 * 1024)
    assert server.data_to_send() == b""
    with pytest.raises(ValueError):
        server.consume(1, 1)
    # the client may now send a full window again
    assert server.receive_data(data_frame(1, b"y" * (206 * 1024)))[0] == DataReceived(
        1, b"y" * (206 * 1024)
    )


def test_unconsumed_data_stalls_the_client_not_our_memory() -> None:
    server = open_server()
    assert server.receive_data(data_frame(1, b"x" * INITIAL_WINDOW))
    assert server.data_to_send() == b""  # nothing consumed, no window given back
    events = server.receive_data(data_frame(1, b"!"))
    assert events == [
        SessionTerminated(GoAwayCode.PROTOCOL_ERROR, "receive window exceeded on stream 1: 1 > 0")
    ]
    assert server.data_to_send() == go_away_frame(GoAwayCode.PROTOCOL_ERROR)
    assert server.terminated
    assert server.stream_ids == []
    assert server.receive_data(ping_frame(1, Flag.SYN)) == []  # dead session stays quiet
    with pytest.raises(StreamClosedError):
        server.send(1, b"x")
    server.ping()
    assert server.data_to_send() == b""


def test_window_overrun_detected_at_header_before_payload() -> None:
    server = open_server()
    header = struct.pack(">BBHII", 0, 0, 0, 1, INITIAL_WINDOW + 1)
    events = server.receive_data(header)
    assert isinstance(events[-1], SessionTerminated)


def test_larger_window_lets_more_in_flight() -> None:
    server = open_server(max_stream_window=FRPS_WINDOW)
    big = b"z" * (FRPS_WINDOW - 1)
    events = server.receive_data(data_frame(1, big))
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == len(big)
    server.consume(1, len(big))
    assert server.data_to_send() == window_update_frame(1, len(big))


# ------------------------------------------------------------------ FIN / RST


def test_fin_waits_for_queued_data_and_stream_is_forgotten_after_both_fins() -> None:
    server = open_server()
    server.send(1, b"a" * (FRPS_WINDOW + 5))
    server.close_stream(1)
    server.close_stream(1)  # idempotent
    wire = frames(server.data_to_send())
    assert all(f.header.type is FrameType.DATA for f in wire)  # FIN must wait
    with pytest.raises(StreamClosedError):
        server.send(1, b"late")
    server.receive_data(window_update_frame(1, 5))
    tail = frames(server.data_to_send())
    assert tail[0].payload == b"aaaaa"
    assert tail[1].header == FrameHeader(FrameType.WINDOW_UPDATE, Flag.FIN, 1, 0)
    assert server.stream_ids == [1]
    assert server.receive_data(window_update_frame(1, 0, Flag.FIN)) == [StreamEnded(1)]
    assert server.stream_ids == []


def test_remote_fin_first_then_local_close() -> None:
    server = open_server()
    assert server.receive_data(window_update_frame(1, 0, Flag.FIN)) == [StreamEnded(1)]
    assert server.receive_data(window_update_frame(1, 0, Flag.FIN)) == []  # duplicate
    assert server.receive_data(data_frame(1, b"after fin")) == []  # ignored
    server.send(1, b"reply")  # half-close: we may still send
    server.close_stream(1)
    assert frames(server.data_to_send())[-1].header.flags == Flag.FIN
    assert server.stream_ids == []
    server.consume(1, 0)  # harmless on a forgotten stream


def test_remote_rst_drops_queue() -> None:
    server = Session()
    server.receive_data(window_update_frame(1, 0, Flag.SYN))
    server.send(1, b"q" * (INITIAL_WINDOW + 100))
    server.data_to_send()
    assert server.receive_data(window_update_frame(1, 0, Flag.RST)) == [StreamReset(1)]
    assert server.stream_ids == []
    with pytest.raises(StreamClosedError):
        server.buffered_amount(1)
    assert server.receive_data(window_update_frame(1, 1000)) == []
    assert server.data_to_send() == b""


def test_local_reset_mid_payload_discards_rest() -> None:
    server = open_server()
    wire = data_frame(1, b"0123456789")
    assert server.receive_data(wire[:15]) == [DataReceived(1, b"012")]
    server.reset_stream(1)
    server.reset_stream(1)  # idempotent
    assert server.data_to_send() == window_update_frame(1, 0, Flag.RST)
    assert server.receive_data(wire[15:] + ping_frame(3, Flag.SYN)) == [PingReceived(3)]


def test_unknown_stream_frames_are_skipped_without_buffering() -> None:
    server = Session()
    header = struct.pack(">BBHII", 0, 0, 0, 41, 2**32 - 1)
    assert server.receive_data(header) == []
    for _ in range(4):
        assert server.receive_data(b"\x00" * 1_000_000) == []
    assert server.receive_data(window_update_frame(43, 5, Flag.FIN | Flag.ACK)) == []
    assert not server.terminated


# ------------------------------------------------------------------ protocol errors


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (FRPC_SYN + FRPC_SYN, "duplicate SYN for stream 1"),
        (window_update_frame(2, 0, Flag.SYN), "SYN for stream 2 has our parity"),
        (window_update_frame(0, 0, Flag.SYN), "SYN for stream 0 has our parity"),
        (bytes.fromhex("01 00 0000 00000001 00000000"), "invalid protocol version 1"),
        (bytes.fromhex("00 07 0000 00000001 00000000"), "invalid message type 7"),
    ],
)
def test_protocol_errors_send_go_away(wire: bytes, reason: str) -> None:
    server = Session()
    events = server.receive_data(wire + ping_frame(1, Flag.SYN))
    assert events[-1] == SessionTerminated(GoAwayCode.PROTOCOL_ERROR, reason)
    assert server.data_to_send().endswith(go_away_frame(GoAwayCode.PROTOCOL_ERROR))


def test_constructor_validates_window() -> None:
    with pytest.raises(ValueError):
        Session(max_stream_window=INITIAL_WINDOW - 1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=60), max_size=8))
def test_garbage_never_raises(chunks: list[bytes]) -> None:
    server = Session(max_inbound_streams=4)
    for chunk in chunks:
        server.receive_data(chunk)
        server.data_to_send()


_frame_bytes = st.builds(
    lambda t, f, s, n, p: struct.pack(">BBHII", 0, t, f, s, n) + p,
    st.integers(0, 3),
    st.integers(0, 15),
    st.integers(0, 8),
    st.integers(0, 40),
    st.binary(max_size=40),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_frame_bytes, max_size=20))
def test_plausible_frames_never_raise(wire: list[bytes]) -> None:
    server = Session(max_inbound_streams=3)
    for piece in wire:
        for event in server.receive_data(piece):
            if isinstance(event, DataReceived) and event.stream_id in server.stream_ids:
                server.consume(event.stream_id, len(event.data))
        for sid in server.stream_ids:
            assert server.unconsumed(sid) == 0


# ------------------------------------------------------------------ client <-> server


class Pair:
    """A client and a server session connected back to back, with random chunking."""

    def __init__(self, chunk_sizes: list[int], window: int) -> None:
        self.client = Session(client=True, max_stream_window=window)
        self.server = Session(max_stream_window=INITIAL_WINDOW)
        self.chunk_sizes = itertools.cycle(chunk_sizes)
        self.received: dict[int, bytearray] = {}
        self.ended: set[int] = set()

    def _deliver(self, src: Session, dst: Session, consume: bool) -> bool:
        wire = src.data_to_send()
        pos = 0
        while pos < len(wire):
            size = next(self.chunk_sizes)
            for event in dst.receive_data(wire[pos : pos + size]):
                assert not isinstance(event, SessionTerminated), event
                if isinstance(event, DataReceived):
                    self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
                    if consume:
                        dst.consume(event.stream_id, len(event.data))
                elif isinstance(event, StreamEnded):
                    self.ended.add(event.stream_id)
            pos += size
        return bool(wire)

    def pump(self, server_consumes: bool = True) -> None:
        while self._deliver(self.client, self.server, server_consumes) | self._deliver(
            self.server, self.client, True
        ):
            pass


_chunk_sizes = st.lists(st.integers(1, 70_000), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(
    _chunk_sizes,
    st.sampled_from([INITIAL_WINDOW, FRPS_WINDOW]),
    st.lists(st.integers(0, 700_000), min_size=1, max_size=4),
)
def test_pair_transfers_everything_without_window_violations(
    chunk_sizes: list[int], window: int, sizes: list[int]
) -> None:
    pair = Pair(chunk_sizes, window)
    payloads = {}
    for i, size in enumerate(sizes):
        sid = pair.client.open_stream()
        payloads[sid] = bytes([i]) * size
        pair.client.send(sid, payloads[sid])
        pair.client.close_stream(sid)
    pair.pump()
    assert {sid: bytes(buf) for sid, buf in pair.received.items()} == {
        sid: p for sid, p in payloads.items() if p
    }
    assert pair.ended == set(payloads)
    # the server echoes on each stream (its sends limited by the client window)
    for sid in payloads:
        pair.server.send(sid, b"echo" * 70_000)
        pair.server.close_stream(sid)
    pair.received.clear()
    pair.pump()
    assert all(bytes(pair.received[sid]) == b"echo" * 70_000 for sid in payloads)
    assert pair.server.stream_ids == [] and pair.client.stream_ids == []


@settings(max_examples=10, deadline=None)
@given(_chunk_sizes)
def test_pair_slow_consumer_applies_backpressure(chunk_sizes: list[int]) -> None:
    pair = Pair(chunk_sizes, INITIAL_WINDOW)
    sid = pair.client.open_stream()
    pair.client.send(sid, b"p" * 1_000_000)
    pair.pump(server_consumes=False)
    assert len(pair.received[sid]) == INITIAL_WINDOW  # the client stalls...
    assert pair.client.buffered_amount(sid) == 1_000_000 - INITIAL_WINDOW
    assert pair.client.send_window(sid) == 0
    pair.server.consume(sid, INITIAL_WINDOW)  # ...until we consume
    pair.pump()
    assert len(pair.received[sid]) == 1_000_000
    assert pair.client.buffered_amount(sid) == 0
