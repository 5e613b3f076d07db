"""Key derivation, auth key and the AES-128-CFB streams
(docs/compatibility.md#frp-login, docs/compatibility.md#frp-encryption)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.frp.crypto import (
    IV_LEN,
    StreamDecryptor,
    StreamEncryptor,
    auth_key,
    derive_key,
    verify_auth_key,
)

IV = bytes(range(16))
REQ_WORK_CONN = bytes.fromhex("72 0000000000000002 7b7d")
PONG = bytes.fromhex("34 0000000000000002 7b7d")
REQ_WORK_CONN_WIRE = IV + bytes.fromhex("8b30610abcb682c5556510")
PONG_WIRE = bytes.fromhex("0804400c67e6314b54130f")


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@pytest.mark.parametrize(
    ("token", "key"),
    [
        ("", "cdc9dc4c472c37331281df4c232a8407"),
        ("tok123", "c07bce98304a5168669b759775510ba6"),
        (b"tok123", "c07bce98304a5168669b759775510ba6"),
    ],
)
def test_derive_key_vectors(token: str | bytes, key: str) -> None:
    assert derive_key(token).hex() == key


@pytest.mark.parametrize(
    ("token", "ts", "key"),
    [
        ("", 1795586873, "7fb269aa30f4b60c7415670e0676a9f5"),
        ("tok123", 1795587129, "a7a90ab963bfc447f1526e81b3077a0a"),
    ],
)
def test_auth_key_vectors(token: str, ts: int, key: str) -> None:
    assert auth_key(token, ts) == key
    assert verify_auth_key(token, ts, key)
    assert not verify_auth_key(token, ts + 1, key)
    assert not verify_auth_key(token, ts, key.upper())
    assert not verify_auth_key(token, ts, "")
    assert not verify_auth_key(token, ts, "\udcff non-ascii é")


def test_encryptor_vector_iv_then_continuing_state() -> None:
    enc = StreamEncryptor(derive_key(""), iv=IV)
    assert not enc.iv_sent
    assert enc.encrypt(b"") == b""  # nothing on the wire until there is data
    assert enc.encrypt(REQ_WORK_CONN) == REQ_WORK_CONN_WIRE
    assert enc.iv_sent
    assert enc.encrypt(PONG) == PONG_WIRE


def test_decryptor_vector_byte_by_byte() -> None:
    dec = StreamDecryptor(derive_key(""))
    out = b""
    for i, byte in enumerate(REQ_WORK_CONN_WIRE + PONG_WIRE):
        out += dec.decrypt(bytes([byte]))
        assert dec.iv_received == (i >= IV_LEN - 1)
    assert out == REQ_WORK_CONN + PONG


def test_random_iv_is_sent_first_and_differs() -> None:
    key = derive_key("")
    a = StreamEncryptor(key).encrypt(b"hello")
    b = StreamEncryptor(key).encrypt(b"hello")
    assert len(a) == IV_LEN + 5
    assert a[:IV_LEN] != b[:IV_LEN]
    assert StreamDecryptor(key).decrypt(a) == b"hello"


def test_wrong_key_does_not_decrypt() -> None:
    wire = StreamEncryptor(derive_key("tok123"), iv=IV).encrypt(REQ_WORK_CONN)
    assert StreamDecryptor(derive_key("")).decrypt(wire) != REQ_WORK_CONN


@pytest.mark.parametrize("bad", [b"", b"x" * 15, b"x" * 32])
def test_key_and_iv_lengths_are_checked(bad: bytes) -> None:
    with pytest.raises(ValueError):
        StreamEncryptor(bad)
    with pytest.raises(ValueError):
        StreamDecryptor(bad)
    with pytest.raises(ValueError):
        StreamEncryptor(derive_key(""), iv=bad)


@settings(max_examples=150, deadline=None)
@given(
    key=st.binary(min_size=16, max_size=16),
    iv=st.binary(min_size=16, max_size=16),
    plain=st.binary(max_size=600),
    enc_cuts=st.lists(st.integers(min_value=0), max_size=12),
    dec_cuts=st.lists(st.integers(min_value=0), max_size=12),
)
def test_stream_round_trip_any_chunking(
    key: bytes, iv: bytes, plain: bytes, enc_cuts: list[int], dec_cuts: list[int]
) -> None:
    one_shot = StreamEncryptor(key, iv=iv).encrypt(plain)
    enc = StreamEncryptor(key, iv=iv)
    wire = b"".join(enc.encrypt(chunk) for chunk in _chunks(plain, enc_cuts))
    assert wire == one_shot  # chunking on the sending side is invisible
    assert wire[:IV_LEN] == (iv if plain else b"")
    dec = StreamDecryptor(key)
    assert b"".join(dec.decrypt(chunk) for chunk in _chunks(wire, dec_cuts)) == plain
