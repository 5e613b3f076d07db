"""First-byte classification (docs/compatibility.md#frp-transport)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harp.frp.sniff import (
    PayloadKind,
    TransportKind,
    sniff_payload,
    sniff_transport,
    tls_bytes,
)

CLIENT_HELLO = bytes.fromhex("160301 05a8 01")
YAMUX_SYN = bytes.fromhex("00 01 0001 00000001 005c0000")


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (CLIENT_HELLO, TransportKind.TLS),
        (b"\x17" + CLIENT_HELLO, TransportKind.CUSTOM_TLS),
        (YAMUX_SYN, TransportKind.PLAIN),
        (b"o\x00", TransportKind.PLAIN),
        (b"w", TransportKind.PLAIN),
        (b"GET /~!frp HTTP/1.1\r\n", TransportKind.PLAIN),
    ],
)
def test_sniff_transport_observed_first_bytes(data: bytes, kind: TransportKind) -> None:
    assert sniff_transport(data) is kind


def test_sniff_needs_a_byte() -> None:
    assert sniff_transport(b"") is None
    assert sniff_payload(b"") is None


def test_tls_bytes_drops_only_the_custom_marker() -> None:
    assert tls_bytes(TransportKind.CUSTOM_TLS, b"\x17" + CLIENT_HELLO) == CLIENT_HELLO
    assert tls_bytes(TransportKind.TLS, CLIENT_HELLO) == CLIENT_HELLO
    assert tls_bytes(TransportKind.CUSTOM_TLS, b"\x17") == b""
    with pytest.raises(ValueError):
        tls_bytes(TransportKind.CUSTOM_TLS, CLIENT_HELLO)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (YAMUX_SYN, PayloadKind.YAMUX),
        (b"o\x00\x00", PayloadKind.LOGIN),
        (b"w", PayloadKind.WORK),
        (b"v", PayloadKind.VISITOR),
        (b"GET /~!frp", PayloadKind.UNKNOWN),
        (b"\x16\x03\x01", PayloadKind.UNKNOWN),
        (b"p", PayloadKind.UNKNOWN),  # NewProxy is never a first message
    ],
)
def test_sniff_payload(data: bytes, kind: PayloadKind) -> None:
    assert sniff_payload(data) is kind


def test_direct_message_kinds() -> None:
    direct = {k for k in PayloadKind if k.is_direct_messages}
    assert direct == {PayloadKind.LOGIN, PayloadKind.WORK, PayloadKind.VISITOR}


@given(st.binary(min_size=1))
def test_sniffers_are_total_and_look_at_one_byte(data: bytes) -> None:
    kind = sniff_transport(data)
    assert kind is sniff_transport(data[:1])
    payload = sniff_payload(data)
    assert payload is sniff_payload(data[:1])
    replay = tls_bytes(kind, data) if kind is not None else data
    assert replay == (data[1:] if data[0] == 0x17 else data)
