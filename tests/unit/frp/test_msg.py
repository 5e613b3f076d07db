"""FRP messages: framing (codec), structs (msg) and their Go JSON bodies
(docs/compatibility.md#frp-messages)."""

from __future__ import annotations

import dataclasses
import json
import struct
import typing

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from harp.frp import gojson
from harp.frp.codec import (
    MAX_MSG_LENGTH,
    MalformedMessage,
    MessageDecoder,
    MessageTooLarge,
    ProtocolError,
    UnknownMessageType,
    decode_body,
    decode_message,
    encode_message,
)
from harp.frp.crypto import StreamDecryptor, StreamEncryptor, derive_key
from harp.frp.msg import (
    ClientSpec,
    CloseProxy,
    Login,
    LoginResp,
    Message,
    MsgType,
    NewProxy,
    NewProxyResp,
    NewVisitorConn,
    NewVisitorConnResp,
    NewWorkConn,
    Ping,
    Pong,
    RawMessage,
    ReqWorkConn,
    StartWorkConn,
)

LOGIN_JSON = (
    b'{"version":"0.65.0","os":"linux","arch":"arm64",'
    b'"privilege_key":"7fb269aa30f4b60c7415670e0676a9f5","timestamp":1795586873,'
    b'"metas":{"token":"s3cret"},"client_spec":{},"pool_count":1}'
)
LOGIN = Login(
    version="0.65.0",
    os="linux",
    arch="arm64",
    privilege_key="7fb269aa30f4b60c7415670e0676a9f5",
    timestamp=1795586873,
    metas={"token": "s3cret"},
    pool_count=1,
)


def frame(type_char: bytes, body: bytes) -> bytes:
    return type_char + struct.pack(">q", len(body)) + body


# --------------------------------------------------------------------- vectors


def test_type_table_matches_spec() -> None:
    expected = {
        "LOGIN": "o", "LOGIN_RESP": "1", "NEW_PROXY": "p", "NEW_PROXY_RESP": "2",
        "CLOSE_PROXY": "c", "NEW_WORK_CONN": "w", "REQ_WORK_CONN": "r",
        "START_WORK_CONN": "s", "NEW_VISITOR_CONN": "v", "NEW_VISITOR_CONN_RESP": "3",
        "PING": "h", "PONG": "4", "UDP_PACKET": "u", "NAT_HOLE_VISITOR": "i",
        "NAT_HOLE_CLIENT": "n", "NAT_HOLE_RESP": "m", "NAT_HOLE_SID": "5",
        "NAT_HOLE_REPORT": "6",
    }  # fmt: skip
    assert {t.name: chr(t) for t in MsgType} == expected


def test_empty_messages_encode_as_in_spec() -> None:
    assert encode_message(ReqWorkConn()) == bytes.fromhex("72 0000000000000002 7b7d")
    assert encode_message(Pong()) == bytes.fromhex("34 0000000000000002 7b7d")


def test_real_login_decodes_and_reencodes_byte_identically() -> None:
    wire = bytes.fromhex("6f00000000000000b5") + LOGIN_JSON
    assert len(LOGIN_JSON) == 0xB5
    assert decode_message(wire) == LOGIN
    assert encode_message(LOGIN) == wire


def test_login_with_run_id_and_user_keeps_go_field_order() -> None:
    login = dataclasses.replace(LOGIN, user="alice", run_id="0a36a532e4dab57a")
    body = json.loads(encode_message(login)[9:])
    assert list(body) == [
        "version", "os", "arch", "user", "privilege_key", "timestamp", "run_id",
        "metas", "client_spec", "pool_count",
    ]  # fmt: skip


def test_login_resp_vector() -> None:
    wire = encode_message(LoginResp(version="0.65.0", run_id="0123456789abcdef"))
    assert wire == bytes.fromhex("31 0000000000000030") + (
        b'{"version":"0.65.0","run_id":"0123456789abcdef"}'
    )


def test_new_proxy_example() -> None:
    body = b'{"proxy_name":"app1","proxy_type":"tcp","remote_port":39750}'
    message = decode_message(frame(b"p", body))
    assert message == NewProxy(proxy_name="app1", proxy_type="tcp", remote_port=39750)
    assert encode_message(message) == frame(b"p", body)


def test_start_work_conn_and_resp_shapes() -> None:
    swc = StartWorkConn(
        proxy_name="app1", src_addr="127.0.0.1", src_port=50000, dst_addr="127.0.0.1",
        dst_port=23000,
    )  # fmt: skip
    assert encode_message(swc)[9:] == (
        b'{"proxy_name":"app1","src_addr":"127.0.0.1","dst_addr":"127.0.0.1",'
        b'"src_port":50000,"dst_port":23000}'
    )
    assert encode_message(NewProxyResp(proxy_name="a", remote_addr=":23000"))[9:] == (
        b'{"proxy_name":"a","remote_addr":":23000"}'
    )
    assert encode_message(NewProxyResp(proxy_name="a", error="port not allowed"))[9:] == (
        b'{"proxy_name":"a","error":"port not allowed"}'
    )


@pytest.mark.parametrize(
    ("message", "body"),
    [
        (Login(), b'{"client_spec":{}}'),  # struct fields are never omitted
        (Login(client_spec=ClientSpec(always_auth_pass=True)),
         b'{"client_spec":{"always_auth_pass":true}}'),
        (NewProxy(), b"{}"),
        (NewProxy(metas={}, custom_domains=[], use_encryption=False), b"{}"),
        (StartWorkConn(src_port=0), b"{}"),
        (Ping(), b"{}"),
        (NewWorkConn(run_id="r"), b'{"run_id":"r"}'),
        (CloseProxy(proxy_name="p"), b'{"proxy_name":"p"}'),
    ],
)  # fmt: skip
def test_omitempty(message: Message, body: bytes) -> None:
    assert encode_message(message)[9:] == body


def test_encoding_escapes_like_go() -> None:
    body = encode_message(Pong(error="<a&b> é \u2028 \n"))[9:]
    assert body == b'{"error":"\\u003ca\\u0026b\\u003e \\u00e9 \\u2028 \\n"}'
    assert decode_message(encode_message(Pong(error="<a&b> é"))) == Pong(error="<a&b> é")


def test_encoder_refuses_oversize_bodies() -> None:
    encode_message(Pong(error="x" * (MAX_MSG_LENGTH - len('{"error":""}'))))
    with pytest.raises(MessageTooLarge):
        encode_message(Pong(error="x" * MAX_MSG_LENGTH))


# --------------------------------------------------------------------- decoding rules


def test_decoding_is_lenient_like_go() -> None:
    body = (
        b' {"PROXY_NAME":"a","Remote_Port":1,"unknown":[1,{"x":null}],'
        b'"metas":null,"use_encryption":null,"sk":"\\ud800"} '
    )
    assert decode_body(ord("p"), body) == NewProxy(proxy_name="a", remote_port=1, sk="\ufffd")
    assert decode_body(ord("r"), b"null") == ReqWorkConn()
    assert decode_body(ord("c"), b'{"proxy_name":"a","proxy_name":"b"}') == CloseProxy(
        proxy_name="b"
    )
    assert decode_body(ord("p"), b'{"metas":{"k":null},"locations":[null,"/"]}') == NewProxy(
        metas={"k": ""}, locations=["", "/"]
    )
    # invalid UTF-8 inside a string is replaced, as Go does
    assert decode_body(ord("4"), b'{"error":"\xff"}') == Pong(error="\ufffd")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'"x"',
        b"1",
        b"{} {}",
        b'{"timestamp":"1"}',
        b'{"timestamp":1.0}',
        b'{"timestamp":1e3}',
        b'{"timestamp":true}',
        b'{"timestamp":9223372036854775808}',
        b'{"timestamp":NaN}',
        b'{"timestamp":Infinity}',
        b'{"pool_count":[]}',
        b'{"version":1}',
        b'{"metas":{"a":1}}',
        b'{"metas":[]}',
        b'{"client_spec":[]}',
        b'{"client_spec":{"always_auth_pass":"yes"}}',
        b"\xef\xbb\xbf{}",
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_malformed_login_bodies(body: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_body(ord("o"), body)


@pytest.mark.parametrize("body", [b'{"locations":[1]}', b'{"custom_domains":{}}'])
def test_lists_hold_strings(body: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_body(ord("p"), body)


def test_decode_body_checks_type_byte() -> None:
    with pytest.raises(UnknownMessageType):
        decode_body(ord("G"), b"{}")


@pytest.mark.parametrize("port", [b"-1", b"65536", b"1.5", b'"80"'])
def test_ports_are_uint16(port: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_body(ord("s"), b'{"src_port":' + port + b"}")


def test_unmodelled_known_types_are_raw() -> None:
    message = decode_message(frame(b"m", b'{"transaction_id":"t","error":"e"}'))
    assert message == RawMessage(MsgType.NAT_HOLE_RESP, {"transaction_id": "t", "error": "e"})
    assert encode_message(message) == frame(b"m", b'{"transaction_id":"t","error":"e"}')
    assert isinstance(decode_message(frame(b"u", b"{}")), RawMessage)


# --------------------------------------------------------------------- decoder


def test_unknown_type_fails_on_first_byte() -> None:
    decoder = MessageDecoder()
    decoder.feed(b"G")
    with pytest.raises(UnknownMessageType) as info:
        decoder.next_message()
    assert info.value.type_byte == ord("G")
    with pytest.raises(UnknownMessageType):  # poisoned
        decoder.next_message()


@pytest.mark.parametrize("length", [MAX_MSG_LENGTH + 1, 2**62, -1])
def test_bad_length_fails_before_body(length: int) -> None:
    decoder = MessageDecoder()
    decoder.feed(b"o" + struct.pack(">q", length))
    with pytest.raises(MessageTooLarge):
        decoder.next_message()


def test_max_length_body_is_accepted() -> None:
    body = b'{"error":"' + b"x" * (MAX_MSG_LENGTH - 12) + b'"}'
    assert len(body) == MAX_MSG_LENGTH
    assert decode_message(frame(b"4", body)) == Pong(error="x" * (MAX_MSG_LENGTH - 12))


def test_custom_max_length() -> None:
    with pytest.raises(MessageTooLarge):
        decode_message(encode_message(Pong(error="xx")), max_length=10)


def test_decode_message_requires_exactly_one() -> None:
    wire = encode_message(Pong())
    with pytest.raises(MalformedMessage):
        decode_message(wire[:-1])
    with pytest.raises(MalformedMessage):
        decode_message(wire + b"4")


def test_reads_exactly_one_message_then_hands_over_raw_bytes() -> None:
    decoder = MessageDecoder()
    decoder.feed(encode_message(NewWorkConn(run_id="r")) + b"\x00raw\xffbytes")
    assert decoder.next_message() == NewWorkConn(run_id="r")
    assert decoder.buffered == 10
    assert decoder.take_unconsumed() == b"\x00raw\xffbytes"
    assert decoder.next_message() is None


def test_control_stream_switches_to_decryption_mid_segment() -> None:
    # The client's Login and its first encrypted message can share a segment.
    key = derive_key("")
    wire_enc = StreamEncryptor(key)
    proxies: list[Message] = [
        NewProxy(proxy_name="app1", proxy_type="tcp", remote_port=23000),
        Ping(),
    ]
    encrypted = b"".join(wire_enc.encrypt(encode_message(m)) for m in proxies)
    segment = encode_message(LOGIN) + encrypted
    for split in (1, 9, len(segment) - len(encrypted) + 3, len(segment)):
        decoder = MessageDecoder()
        decoder.feed(segment[:split])
        first = decoder.next_message()
        if first is None:  # Login still incomplete: feed the rest before switching
            decoder.feed(segment[split:])
            first = decoder.next_message()
            tail = b""
        else:
            tail = segment[split:]
        assert first == LOGIN
        decoder.set_transform(StreamDecryptor(key).decrypt)
        decoder.feed(tail)
        assert decoder.pop_messages() == proxies
    with pytest.raises(RuntimeError):
        decoder.set_transform(lambda b: b)


# --------------------------------------------------------------------- properties

_text = st.text(max_size=8)
_STRATEGIES: dict[object, st.SearchStrategy[typing.Any]] = {
    str: _text,
    bool: st.booleans(),
    int: st.integers(min_value=-(2**63), max_value=2**63 - 1),
    gojson.Uint16: st.integers(min_value=0, max_value=0xFFFF),
    dict[str, str]: st.dictionaries(_text, _text, max_size=3),
    list[str]: st.lists(_text, max_size=3),
}
MESSAGE_CLASSES: list[type[typing.Any]] = [
    Login, LoginResp, NewProxy, NewProxyResp, CloseProxy, NewWorkConn, ReqWorkConn,
    StartWorkConn, NewVisitorConn, NewVisitorConnResp, Ping, Pong,
]  # fmt: skip


def _struct_strategy(cls: type[typing.Any]) -> st.SearchStrategy[typing.Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    kwargs = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        kwargs[f.name] = _struct_strategy(hint) if hint is ClientSpec else _STRATEGIES[hint]
    return st.builds(cls, **kwargs)


messages: st.SearchStrategy[Message] = st.one_of([_struct_strategy(cls) for cls in MESSAGE_CLASSES])


def _fits(message: Message) -> bool:
    try:
        encode_message(message)
    except MessageTooLarge:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(messages)
def test_round_trip(message: Message) -> None:
    assume(_fits(message))
    wire = encode_message(message)
    assert decode_message(wire) == message
    assert json.loads(wire[9:]) == message.to_json_obj()


@settings(max_examples=60, deadline=None)
@given(st.lists(messages, min_size=1, max_size=6), st.data())
def test_random_chunking_and_byte_by_byte(batch: list[Message], data: st.DataObject) -> None:
    batch = [m for m in batch if _fits(m)]
    wire = b"".join(encode_message(m) for m in batch)
    decoder = MessageDecoder()
    got: list[Message] = []
    pos = 0
    while pos < len(wire):
        size = data.draw(st.integers(min_value=1, max_value=max(1, len(wire) - pos)))
        decoder.feed(wire[pos : pos + size])
        got.extend(decoder.pop_messages())
        pos += size
    assert got == batch
    decoder = MessageDecoder()
    got = []
    for i in range(len(wire)):
        decoder.feed(wire[i : i + 1])
        got.extend(decoder.pop_messages())
    assert got == batch
    assert decoder.buffered == 0


def _only_protocol_errors(stream: bytes) -> None:
    decoder = MessageDecoder()
    decoder.feed(stream)
    try:
        decoder.pop_messages()
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_bytes_only_raise_protocol_error(stream: bytes) -> None:
    _only_protocol_errors(stream)


_type_bytes = st.sampled_from([int(t) for t in MsgType])
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
_field_names = st.sampled_from(
    [
        *sorted({f.name for cls in MESSAGE_CLASSES for f in dataclasses.fields(cls)}),
        *["CLIENT_SPEC", "Metas", "x"],
    ]
)


@settings(max_examples=300, deadline=None)
@given(_type_bytes, st.dictionaries(_field_names, _json_values, max_size=6))
def test_plausible_json_bodies_only_raise_malformed(type_byte: int, obj: dict[str, object]) -> None:
    body = json.dumps(obj).encode()
    try:
        decoded = decode_body(type_byte, body)
    except MalformedMessage:
        return
    # whatever decoded must encode again (strings sanitised, ranges checked)
    try:
        encode_message(decoded)
    except MessageTooLarge:
        pass


@settings(max_examples=300, deadline=None)
@given(_type_bytes, st.binary(max_size=200))
def test_framed_garbage_bodies_only_raise_protocol_error(type_byte: int, body: bytes) -> None:
    _only_protocol_errors(bytes([type_byte]) + struct.pack(">q", len(body)) + body)
