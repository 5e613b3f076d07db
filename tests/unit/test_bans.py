"""Unit tests for harp.client_address (normalisation, HP_TRUSTED_PROXY_IPS, client IP) and
harp.bans (ban keys, the failure table)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harp.bans import FailureTable, ban_key
from harp.client_address import (
    MAX_FORWARDED_HOPS,
    ClientAddressResolver,
    normalize_ip,
    parse_trusted_proxies,
)
from tests.unit.conftest import FakeClock

# ------------------------------------------------------------------------------------------
# normalize_ip
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("::FFFF:1.2.3.4", "1.2.3.4"),
        ("0:0:0:0:0:ffff:0102:0304", "1.2.3.4"),
        ("::ffff:0102:0304", "1.2.3.4"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
        ("2001:db8:0:0::1", "2001:db8::1"),
        ("::1", "::1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("::", "::"),
        ("fe80::1%eth0", "fe80::1%eth0"),
        ("::1.2.3.4", "::102:304"),  # IPv4-compatible (deprecated) is not mapped
    ],
)
def test_normalize_ip_canonical(raw: str, expected: str) -> None:
    assert normalize_ip(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        " 1.2.3.4",
        "1.2.3.4 ",
        "1.2.3",
        "256.1.1.1",
        "01.2.3.4",
        "1.2.3.4:80",
        "[::1]",
        "::1::2",
        "example.com",
        "unknown",
        "10.0.0.0/8",
        "1" * 200,
        "\u0661.2.3.4",
    ],
)
def test_normalize_ip_rejects(raw: str) -> None:
    assert normalize_ip(raw) is None


# ------------------------------------------------------------------------------------------
# parse_trusted_proxies
# ------------------------------------------------------------------------------------------


def _nets(*specs: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(s) for s in specs]


@pytest.mark.parametrize("value", ["", "   ", ",", " , ,, ", '""', "''", "\u201c\u201d"])
def test_trusted_empty(value: str) -> None:
    assert parse_trusted_proxies(value) == ([], [])


def test_trusted_single_ip_becomes_host_network() -> None:
    nets, warnings = parse_trusted_proxies("10.0.0.1")
    assert nets == _nets("10.0.0.1/32")
    assert warnings == []


def test_trusted_list_with_whitespace_and_empty_entries() -> None:
    nets, warnings = parse_trusted_proxies(" 10.0.0.1 ,, 172.16.0.0/12 ,\t192.168.0.0/16,")
    assert nets == _nets("10.0.0.1/32", "172.16.0.0/12", "192.168.0.0/16")
    assert warnings == []


@pytest.mark.parametrize(
    "value",
    [
        '"10.0.0.1"',
        "'10.0.0.1'",
        "\u201c10.0.0.1\u201d",
        "\u201810.0.0.1\u2019",
        " \"'10.0.0.1'\" ",
        "\u201d10.0.0.1\u201c",
        '" 10.0.0.1 "',
    ],
)
def test_trusted_quotes_stripped(value: str) -> None:
    assert parse_trusted_proxies(value) == (_nets("10.0.0.1/32"), [])


def test_trusted_whole_value_quoted() -> None:
    nets, _ = parse_trusted_proxies('"10.0.0.1, 10.0.0.2/31 , fd00::/8"')
    assert nets == _nets("10.0.0.1/32", "10.0.0.2/31", "fd00::/8")


def test_trusted_host_bits_masked_with_warning() -> None:
    nets, warnings = parse_trusted_proxies("192.168.100.20/24")
    assert nets == _nets("192.168.100.0/24")
    assert len(warnings) == 1
    assert "192.168.100.20/24" in warnings[0]
    assert "192.168.100.0/24" in warnings[0]


def test_trusted_ipv6() -> None:
    nets, warnings = parse_trusted_proxies("2001:db8::/32, ::1")
    assert nets == _nets("2001:db8::/32", "::1/128")
    assert warnings == []
    nets, warnings = parse_trusted_proxies("2001:db8::1/64")
    assert nets == _nets("2001:db8::/64")
    assert len(warnings) == 1
    assert "2001:db8::1/64" in warnings[0]


def test_trusted_duplicates_dropped() -> None:
    nets, _ = parse_trusted_proxies("10.0.0.0/8, 10.0.0.0/8, 10.1.2.3/8")
    assert nets == _nets("10.0.0.0/8")


def test_trusted_catch_all_warns() -> None:
    nets, warnings = parse_trusted_proxies("0.0.0.0/0")
    assert nets == _nets("0.0.0.0/0")
    assert any("every address" in w for w in warnings)


@pytest.mark.parametrize(
    ("value", "bad"),
    [
        ("foo", "foo"),
        ("10.0.0.1, foo", "foo"),
        ("10.0.0.0/33", "10.0.0.0/33"),
        ("300.1.1.1", "300.1.1.1"),
        ("10.0.0.1/abc", "10.0.0.1/abc"),
        ("2001:db8::/129", "2001:db8::/129"),
        ("10.0.0.1 10.0.0.2", "10.0.0.1 10.0.0.2"),
        ("10.0.0.1;10.0.0.2", "10.0.0.1;10.0.0.2"),
        ("[::1]", "[::1]"),
        ("localhost", "localhost"),
    ],
)
def test_trusted_invalid_entry_raises_naming_it(value: str, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid entry") as excinfo:
        parse_trusted_proxies(value)
    assert repr(bad) in str(excinfo.value)


# ------------------------------------------------------------------------------------------
# ClientAddressResolver
# ------------------------------------------------------------------------------------------


def _resolver(value: str) -> ClientAddressResolver:
    return ClientAddressResolver(parse_trusted_proxies(value)[0])


def _xff(*lines: bytes) -> list[bytes]:
    return list(lines)


def test_resolver_without_trusted_ignores_headers() -> None:
    r = ClientAddressResolver([])
    assert r.resolve("10.0.0.1", _xff(b"1.2.3.4"), b"5.6.7.8") == "10.0.0.1"
    assert r.resolve("::ffff:10.0.0.1", _xff(b"1.2.3.4"), None) == "10.0.0.1"
    assert r.resolve("2001:DB8::1", None, None) == "2001:db8::1"
    assert r.resolve("not-an-ip", _xff(b"1.2.3.4"), None) == "not-an-ip"
    assert r.trusted == ()


def test_resolver_untrusted_peer_headers_ignored() -> None:
    r = _resolver("10.0.0.0/8")
    assert r.resolve("192.0.2.7", _xff(b"1.2.3.4"), b"5.6.7.8") == "192.0.2.7"
    assert r.resolve("::ffff:192.0.2.7", _xff(b"1.2.3.4"), None) == "192.0.2.7"
    assert r.resolve("2001:db8::7", _xff(b"1.2.3.4"), None) == "2001:db8::7"


def test_resolver_trusted_peer_single_element() -> None:
    r = _resolver("10.0.0.0/8")
    assert r.resolve("10.1.2.3", _xff(b"1.2.3.4"), None) == "1.2.3.4"
    assert r.resolve("10.1.2.3", _xff(b"\t2001:DB8::1 "), None) == "2001:db8::1"
    assert r.resolve("10.1.2.3", _xff(b"::ffff:1.2.3.4"), None) == "1.2.3.4"


def test_resolver_walks_from_the_right_past_trusted_hops() -> None:
    """docs/differences.md#11: the client writes the left part; the right-most untrusted hop is the
    client."""
    r = _resolver("10.0.0.0/8")
    # nginx $proxy_add_x_forwarded_for: "<what the client sent>, <client's real address>"
    assert r.resolve("10.1.2.3", _xff(b"6.6.6.6, 1.2.3.4"), None) == "1.2.3.4"
    assert r.resolve("10.1.2.3", _xff(b" 1.2.3.4 , 10.9.9.9, 10.1.2.3"), b"5.6.7.8") == "1.2.3.4"
    assert r.resolve("10.1.2.3", _xff(b"9.9.9.9, 1.2.3.4, 10.0.0.7"), None) == "1.2.3.4"
    # every hop trusted: the left-most is the client
    assert r.resolve("10.1.2.3", _xff(b"10.0.0.9, 10.0.0.8"), None) == "10.0.0.9"


def test_resolver_joins_all_header_lines_in_order() -> None:
    r = _resolver("10.0.0.0/8")
    # The client's own line first, then the line its proxy appended.
    assert r.resolve("10.1.2.3", _xff(b"6.6.6.6", b"1.2.3.4"), None) == "1.2.3.4"
    assert r.resolve("10.1.2.3", _xff(b"6.6.6.6", b"1.2.3.4, 10.0.0.2"), None) == "1.2.3.4"
    assert r.resolve("10.1.2.3", _xff(b"1.2.3.4", b"10.0.0.2", b"10.0.0.3"), None) == "1.2.3.4"
    # blank lines are no elements
    assert r.resolve("10.1.2.3", _xff(b"1.2.3.4", b"  "), None) == "1.2.3.4"


@pytest.mark.parametrize(
    ("xff", "expected"),
    [
        (b"[2001:db8::1]", "2001:db8::1"),
        (b"[2001:db8::1]:4711", "2001:db8::1"),
        (b"1.2.3.4:4711", "1.2.3.4"),
        (b" 9.9.9.9 , 1.2.3.4:80", "1.2.3.4"),
    ],
)
def test_resolver_xff_bracket_and_port_forms(xff: bytes, expected: str) -> None:
    assert _resolver("10.0.0.0/8").resolve("10.0.0.1", _xff(xff), None) == expected


def test_resolver_x_real_ip_only_without_xff() -> None:
    r = _resolver("10.0.0.0/8")
    assert r.resolve("10.1.2.3", None, b"5.6.7.8") == "5.6.7.8"
    assert r.resolve("10.1.2.3", [], b"5.6.7.8") == "5.6.7.8"
    assert r.resolve("10.1.2.3", _xff(b""), b" 5.6.7.8 ") == "5.6.7.8"
    assert r.resolve("10.1.2.3", _xff(b"1.2.3.4"), b"5.6.7.8") == "1.2.3.4"
    # a present but bad X-Forwarded-For is not "no X-Forwarded-For"
    assert r.resolve("10.1.2.3", _xff(b"garbage"), b"5.6.7.8") == "10.1.2.3"
    assert r.resolve("10.1.2.3", None, b"garbage") == "10.1.2.3"
    assert r.resolve("10.1.2.3", None, None) == "10.1.2.3"
    assert r.resolve("::ffff:10.1.2.3", _xff(b"unknown"), b"") == "10.1.2.3"


def test_resolver_bad_element_charges_the_nearest_trusted_hop() -> None:
    r = _resolver("10.0.0.0/8")
    assert r.resolve("10.1.2.3", _xff(b"1.2.3.4, unknown"), None) == "10.1.2.3"
    assert r.resolve("10.1.2.3", _xff(b"1.2.3.4, unknown, 10.0.0.5"), None) == "10.0.0.5"
    assert r.resolve("10.1.2.3", _xff(b"1.2.3.4,, 10.0.0.5"), None) == "10.0.0.5"
    # a bad element left of the client does not matter: the walk stopped before it
    assert r.resolve("10.1.2.3", _xff(b"garbage, 1.2.3.4"), None) == "1.2.3.4"


def test_resolver_hop_count_is_bounded() -> None:
    r = _resolver("10.0.0.0/8")
    many = b",".join([b"1.2.3.4"] + [b"10.0.0.9"] * (MAX_FORWARDED_HOPS + 5))
    assert r.resolve("10.1.2.3", _xff(many), None) == "10.0.0.9"
    assert r.resolve("10.1.2.3", _xff(b"," * 100_000 + b"1.2.3.4"), None) == "1.2.3.4"
    lines = [b"1.2.3.4"] + [b"10.0.0.9"] * (MAX_FORWARDED_HOPS + 5)
    assert r.resolve("10.1.2.3", lines, None) == "10.0.0.9"


@pytest.mark.parametrize(
    "header",
    [
        b"unknown",
        b"_hidden",
        b"example.com",
        b"1.2.3.4.5",
        b"1.2.3.4:",
        b"1.2.3.4:99999",
        b"1.2.3.4:8o",
        b"1.2.3.4:\xb2",
        b"[1.2.3.4]",
        b"[2001:db8::1",
        b"[2001:db8::1]x",
        b"[2001:db8::1]:",
        b"2001:db8::1:80:extra:x",
        b"\xff\xfe",
        b"1.2.3.4\x00",
        b"\xd9\xa1.2.3.4",
        b"1.2.3.4" + b" " * 200,
        b"1" * 10_000,
        b'"1.2.3.4"',
        b"for=1.2.3.4",
    ],
)
def test_resolver_garbage_headers_fall_back(header: bytes) -> None:
    r = _resolver("10.0.0.0/8")
    assert r.resolve("10.1.2.3", _xff(header), None) == "10.1.2.3"
    assert r.resolve("10.1.2.3", None, header) == "10.1.2.3"
    assert r.resolve("10.1.2.3", _xff(header), b"5.6.7.8") == "10.1.2.3"
    assert r.resolve("10.1.2.3", None, header) == "10.1.2.3"


def test_resolver_ipv6_peer_and_network() -> None:
    r = _resolver("2001:db8:1::/48, 10.0.0.1")
    assert r.resolve("2001:db8:1:2::3", _xff(b"1.2.3.4"), None) == "1.2.3.4"
    assert r.resolve("2001:DB8:1:0:0:0:0:9", _xff(b"2001:db8:ffff::1"), None) == "2001:db8:ffff::1"
    assert r.resolve("2001:db8:2::3", _xff(b"1.2.3.4"), None) == "2001:db8:2::3"
    assert r.resolve("10.0.0.1", _xff(b"2001:db8::5"), None) == "2001:db8::5"
    assert r.resolve("10.0.0.2", _xff(b"2001:db8::5"), None) == "10.0.0.2"
    assert r.resolve("10.0.0.1", _xff(b"6.6.6.6, 2001:db8:ffff::1, 2001:db8:1::7"), None) == (
        "2001:db8:ffff::1"
    )


def test_resolver_v4_mapped_peer_matches_v4_network() -> None:
    r = _resolver("172.16.0.0/12")
    assert r.resolve("::ffff:172.20.0.5", _xff(b"1.2.3.4"), None) == "1.2.3.4"
    assert r.is_trusted("::ffff:172.20.0.5")
    assert r.is_trusted("172.20.0.5")
    assert not r.is_trusted("172.32.0.1")
    assert not r.is_trusted("nonsense")


def test_resolver_v4_mapped_network_matches_v4_peer() -> None:
    r = _resolver("::ffff:10.0.0.0/104")
    assert r.resolve("10.9.8.7", _xff(b"1.2.3.4"), None) == "1.2.3.4"
    assert r.resolve("::ffff:10.9.8.7", _xff(b"1.2.3.4"), None) == "1.2.3.4"
    assert r.resolve("11.0.0.1", _xff(b"1.2.3.4"), None) == "11.0.0.1"
    assert r.resolve("10.9.8.7", _xff(b"1.2.3.4, ::ffff:10.1.1.1"), None) == "1.2.3.4"


def test_resolver_v4_network_does_not_match_unrelated_v6() -> None:
    r = _resolver("0.0.0.0/0")
    assert r.resolve("::1", _xff(b"1.2.3.4"), None) == "::1"
    assert r.resolve("127.0.0.1", _xff(b"1.2.3.4"), None) == "1.2.3.4"


def test_resolver_non_ip_peer_never_trusted() -> None:
    r = _resolver("0.0.0.0/0, ::/0")
    assert r.resolve("/run/harp.sock", _xff(b"1.2.3.4"), b"5.6.7.8") == "/run/harp.sock"
    assert r.resolve("x" * 500, _xff(b"1.2.3.4"), None) == "x" * 500


def test_resolver_accepts_any_iterable() -> None:
    r = ClientAddressResolver(n for n in _nets("10.0.0.0/8"))
    assert r.trusted == tuple(_nets("10.0.0.0/8"))
    assert r.resolve("10.0.0.1", (b"1.2.3.4",), None) == "1.2.3.4"


_header_lines = st.one_of(
    st.none(),
    st.lists(
        st.one_of(
            st.binary(max_size=60),
            # plausible chains: addresses (trusted or not), junk and separators mixed
            st.lists(
                st.one_of(
                    st.ip_addresses().map(lambda a: str(a).encode()),
                    st.sampled_from([b"10.0.0.1", b"10.255.0.9", b"unknown", b"", b" ",
                                     b"[::1]:80", b"1.2.3.4:8080", b"::ffff:10.0.0.2"]),
                    st.binary(max_size=12),
                ),
                max_size=8,
            ).map(b",".join),
        ),
        max_size=4,
    ),
)


@settings(max_examples=500, deadline=None)
@given(xff=_header_lines, xri=st.one_of(st.none(), st.binary()))
def test_resolver_never_raises_and_returns_ip(xff: list[bytes] | None, xri: bytes | None) -> None:
    r = _resolver("10.0.0.0/8")
    out = r.resolve("10.0.0.1", xff, xri)
    assert normalize_ip(out) == out
    # The answer is the peer or an address that appears in one of the headers.
    if out != "10.0.0.1":
        seen = b",".join(xff or []) + b"," + (xri or b"")
        assert any(
            normalize_ip(e.strip().decode("latin-1").strip("[]").split("]")[0]) == out
            or e.strip().decode("latin-1").rsplit(":", 1)[0] == out
            for e in seen.split(b",")
        )


@settings(max_examples=300, deadline=None)
@given(
    client=st.ip_addresses(),
    spoofed=st.lists(st.ip_addresses(), max_size=4),
    proxies=st.lists(st.integers(0, 255), max_size=4),
)
def test_resolver_client_cannot_choose_its_address(
    client: ipaddress.IPv4Address | ipaddress.IPv6Address,
    spoofed: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    proxies: list[int],
) -> None:
    """Whatever a client writes in front, appending trusted proxies charge the client."""
    r = _resolver("10.0.0.0/8")
    if r.is_trusted(str(client)):
        return
    chain = [str(a).encode() for a in spoofed] + [str(client).encode()]
    chain += [f"10.0.0.{p}".encode() for p in proxies]
    assert r.resolve("10.0.0.1", [b", ".join(chain)], None) == normalize_ip(str(client))


@settings(max_examples=200, deadline=None)
@given(addr=st.ip_addresses())
def test_resolver_xff_roundtrip_any_ip(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    r = _resolver("10.0.0.0/8")
    out = r.resolve("10.0.0.1", [f" {addr.exploded} , 10.0.0.1".encode()], None)
    mapped = addr.ipv4_mapped if isinstance(addr, ipaddress.IPv6Address) else None
    if r.is_trusted(str(mapped or addr)):
        assert out == normalize_ip(str(addr))  # all trusted: the left-most
        return
    assert out == normalize_ip(str(addr))
    assert ipaddress.ip_address(out) == (mapped or addr)


# ------------------------------------------------------------------------------------------
# FailureTable
# ------------------------------------------------------------------------------------------


def test_exactly_count_boundary(clock: FakeClock) -> None:
    table = FailureTable(count=3, window=300, clock=clock)
    assert not table.is_banned("1.2.3.4")  # 1st request
    assert table.record("1.2.3.4") is False
    assert not table.is_banned("1.2.3.4")  # 2nd request
    assert table.record("1.2.3.4") is False
    assert not table.is_banned("1.2.3.4")  # 3rd request
    assert table.record("1.2.3.4") is True  # 3rd failure bans
    assert table.is_banned("1.2.3.4")  # 4th request is dropped
    assert not table.is_banned("1.2.3.5")


def test_count_one_bans_on_first_failure(clock: FakeClock) -> None:
    table = FailureTable(count=1, window=10, clock=clock)
    assert table.record("1.2.3.4") is True
    assert table.is_banned("1.2.3.4")
    clock.advance(10)
    assert not table.is_banned("1.2.3.4")
    assert table.record("1.2.3.4") is True


def test_ban_expires_after_window(clock: FakeClock) -> None:
    table = FailureTable(count=3, window=300, clock=clock)
    for _ in range(3):
        table.record("1.2.3.4")
    clock.advance(299.999)
    assert table.is_banned("1.2.3.4")
    clock.advance(0.001)  # exactly `window` after the failures: no longer counted
    assert not table.is_banned("1.2.3.4")


def test_sliding_window(clock: FakeClock) -> None:
    table = FailureTable(count=3, window=300, clock=clock)
    assert table.record("a") is False  # t=0
    clock.advance(100)
    assert table.record("a") is False  # t=100
    clock.advance(100)
    assert table.record("a") is True  # t=200: 3 in window
    clock.advance(99)
    assert table.is_banned("a")  # t=299
    clock.advance(1)
    assert not table.is_banned("a")  # t=300: the t=0 failure left the window
    assert table.failures("a") == 2
    assert table.record("a") is True  # t=300: 100, 200, 300
    clock.advance(250)
    assert not table.is_banned("a")  # t=550: only 300 remains (100 and 200 expired)
    assert table.failures("a") == 1
    assert table.record("a") is False  # expired ones do not count again
    assert table.failures("a") == 2


def test_failures_in_slow_trickle_never_ban(clock: FakeClock) -> None:
    table = FailureTable(count=3, window=10, clock=clock)
    for _ in range(100):
        assert table.record("a") is False
        clock.advance(5.0)
    # one failure every 5 s with a 10 s window: never more than 2 live at once
    assert not table.is_banned("a")


def test_success_never_resets(clock: FakeClock) -> None:
    table = FailureTable(count=2, window=60, clock=clock)
    table.record("a")
    for _ in range(50):  # lots of checks (successful requests) in between
        assert not table.is_banned("a")
        clock.advance(0.5)
    assert table.record("a") is True


def test_per_address_memory_bounded_by_count(clock: FakeClock) -> None:
    table = FailureTable(count=5, window=1e9, clock=clock)
    for _ in range(10_000):
        table.record("a")
        clock.advance(0.001)
    assert table.failures("a") == 5
    assert len(table._banned["a"]) == 5  # the memory bound itself
    assert table.is_banned("a")


def test_expired_timestamps_dropped_on_record(clock: FakeClock) -> None:
    table = FailureTable(count=100, window=10, clock=clock)
    for _ in range(50):
        table.record("a")
    clock.advance(10)
    table.record("a")
    assert table._data["a"] == [clock.now]


def test_address_bound_evicts_least_recently_failed(clock: FakeClock) -> None:
    table = FailureTable(count=2, window=300, max_addresses=3, clock=clock)
    table.record("10.0.0.1")
    clock.advance(1)
    table.record("10.0.0.2")
    clock.advance(1)
    table.record("10.0.0.3")
    clock.advance(1)
    table.record("10.0.0.1")  # 10.0.0.1 now failed most recently (and is banned)
    clock.advance(1)
    table.record("10.0.0.4")  # evicts 10.0.0.2, the least recently failed
    assert len(table) == 3
    assert table.failures("10.0.0.2") == 0
    assert table.failures("10.0.0.3") == 1
    assert table.is_banned("10.0.0.1")
    assert table.failures("10.0.0.4") == 1


def test_address_flood_stays_bounded(clock: FakeClock) -> None:
    table = FailureTable(count=3, window=300, max_addresses=1000, clock=clock)
    for i in range(20_000):
        table.record(str(ipaddress.IPv6Address(0x20010DB8 << 96 | i << 64)))
    assert len(table) == 1000


@pytest.mark.parametrize(
    ("addr", "key"),
    [
        ("1.2.3.4", "1.2.3.4"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("::FFFF:102:304", "1.2.3.4"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::", "2001:db8:1:2::/64"),
        ("::1", "::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("2001:db8:1:2::/64", "2001:db8:1:2::/64"),  # idempotent
        ("unix:/run/harp.sock", "unix:/run/harp.sock"),
        ("x" * 500, "x" * 500),
    ],
)
def test_ban_key(addr: str, key: str) -> None:
    assert ban_key(addr) == key
    assert ban_key(ban_key(addr)) == key


def test_ipv6_failures_count_per_64(clock: FakeClock) -> None:
    """docs/differences.md#21: rotating through one /64 does not reset the count."""
    table = FailureTable(count=3, window=300, clock=clock)
    assert table.record("2001:db8:1:2::1") is False
    assert table.record("2001:db8:1:2::2") is False
    assert table.record("2001:db8:1:2:ffff:ffff:ffff:ffff") is True
    assert table.is_banned("2001:db8:1:2::abcd")
    assert table.is_banned("2001:DB8:1:2:0:0:0:9")
    assert not table.is_banned("2001:db8:1:3::1")  # the neighbouring /64
    assert table.failures("2001:db8:1:2::77") == 3
    assert len(table) == 1


def test_ipv4_mapped_counts_as_ipv4_not_as_a_64(clock: FakeClock) -> None:
    table = FailureTable(count=2, window=300, clock=clock)
    table.record("::ffff:1.2.3.4")
    assert table.record("1.2.3.4") is True
    assert not table.is_banned("::ffff:1.2.3.5")  # same /64 as text, different IPv4


def test_flood_of_fresh_addresses_never_evicts_a_ban(clock: FakeClock) -> None:
    """docs/differences.md#21: the attacker's ban survives a flood of single failures from
    elsewhere."""
    table = FailureTable(count=3, window=300, max_addresses=10, clock=clock)
    for _ in range(3):
        table.record("192.0.2.66")
    assert table.is_banned("192.0.2.66")
    for i in range(1000):
        clock.advance(0.01)
        table.record(f"10.0.{i // 256}.{i % 256}")
    assert table.is_banned("192.0.2.66")
    assert len(table) == 10


def test_table_full_of_bans_refuses_new_records_until_bans_lapse(clock: FakeClock) -> None:
    calls: list[int] = []
    table = FailureTable(count=1, window=100, max_addresses=3, clock=clock,
                         on_full=lambda: calls.append(1))
    for i in range(3):
        assert table.record(f"10.0.0.{i}") is True
        clock.advance(10)
    # t=30: full of active bans
    assert table.record("10.0.0.9") is False
    assert table.record("10.0.0.8") is False
    assert calls == [1]  # logged once per episode
    assert not table.is_banned("10.0.0.9")
    assert all(table.is_banned(f"10.0.0.{i}") for i in range(3))
    assert len(table) == 3
    # A banned key still counts its failures.
    assert table.record("10.0.0.2") is True
    clock.advance(70)  # t=100: the first ban lapsed (count=1: its failure expired)
    assert not table.is_banned("10.0.0.0")
    assert table.record("10.0.0.9") is True
    assert table.is_banned("10.0.0.1") and table.is_banned("10.0.0.2")
    assert len(table) == 3
    # A new episode logs again.
    assert table.record("10.0.0.7") is False
    assert calls == [1, 1]


def test_lapsed_ban_keeps_its_live_failures(clock: FakeClock) -> None:
    table = FailureTable(count=3, window=100, max_addresses=2, clock=clock)
    table.record("a")
    clock.advance(10)
    table.record("a")
    clock.advance(10)
    assert table.record("a") is True  # t=20, failures 0 10 20
    clock.advance(85)  # t=105: the t=0 failure left; 10 and 20 live
    assert not table.is_banned("a")
    assert table.failures("a") == 2
    assert table.record("a") is True  # 10 20 105: banned again at once
    clock.advance(200)
    assert table.sweep() == 1
    assert len(table) == 0


def test_heap_stays_bounded_when_a_banned_key_keeps_failing(clock: FakeClock) -> None:
    table = FailureTable(count=2, window=100, clock=clock)
    for _ in range(10_000):
        table.record("a")
        clock.advance(0.001)
    assert len(table._due) <= 2 * len(table._banned) + 65


def test_sweep_removes_only_expired_addresses(clock: FakeClock) -> None:
    table = FailureTable(count=3, window=100, clock=clock)
    table.record("a")
    table.record("b")
    clock.advance(50)
    table.record("c")
    table.record("a")  # a's last failure is now t=50
    assert table.sweep() == 0
    clock.advance(50)  # t=100: b expired (t=0); a and c live (t=50)
    assert table.sweep() == 1
    assert len(table) == 2
    assert table.failures("a") == 1
    clock.advance(50)
    assert table.sweep() == 2
    assert len(table) == 0
    assert table.sweep() == 0


def test_sweep_keeps_banned(clock: FakeClock) -> None:
    table = FailureTable(count=2, window=100, clock=clock)
    table.record("a")
    table.record("a")
    clock.advance(99)
    assert table.sweep() == 0
    assert table.is_banned("a")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("1.2.3.4", "::FFFF:1.2.3.4"),
        ("2001:db8::1", "2001:0DB8:0:0:0:0:0:1"),
        ("2001:DB8:0::1", "2001:db8::0:1"),
    ],
)
def test_spellings_share_one_entry(clock: FakeClock, first: str, second: str) -> None:
    table = FailureTable(count=2, window=300, clock=clock)
    table.record(first)
    assert table.record(second) is True
    assert table.is_banned(first)
    assert table.is_banned(second)
    assert len(table) == 1


def test_non_ip_keys_used_verbatim(clock: FakeClock) -> None:
    table = FailureTable(count=1, window=300, clock=clock)
    assert table.record("unix:/run/harp.sock") is True
    assert table.is_banned("unix:/run/harp.sock")
    assert not table.is_banned("unix:/run/other.sock")


def test_clear_and_repr(clock: FakeClock) -> None:
    table = FailureTable(count=1, window=300, max_addresses=7, clock=clock)
    table.record("1.2.3.4")
    assert "max_addresses=7" in repr(table)
    assert (table.count, table.window, table.max_addresses) == (1, 300.0, 7)
    table.clear()
    assert len(table) == 0
    assert not table.is_banned("1.2.3.4")


@pytest.mark.parametrize(
    ("count", "window", "max_addresses"),
    [(0, 300, 10), (-1, 300, 10), (1, 0, 10), (1, -5, 10), (1, float("nan"), 10), (1, 300, 0)],
)
def test_invalid_construction(count: int, window: float, max_addresses: int) -> None:
    with pytest.raises(ValueError):
        FailureTable(count, window, max_addresses)


def test_default_clock() -> None:
    table = FailureTable(count=2, window=300)
    table.record("1.2.3.4")
    assert table.record("1.2.3.4") is True
    assert table.is_banned("1.2.3.4")


# A naive model of docs/compatibility.md#brute-force-protection: every failure kept forever in a
# list, the ban decided by counting `now - t < window` over all of them; plus the address bound
# (evict the oldest key that is not held for a ban, never a ban; a key banned once stays held until
# it fails again unbanned or its last failure expires) and sweep.
_ADDRS = [
    ("1.2.3.4", "1.2.3.4"),
    ("::ffff:1.2.3.4", "1.2.3.4"),
    ("2001:db8::1", "2001:db8::/64"),
    ("2001:DB8:0:0:0:0:0:1", "2001:db8::/64"),
    ("2001:db8::ffff:2", "2001:db8::/64"),
    ("10.0.0.1", "10.0.0.1"),
    ("fe80::1", "fe80::/64"),
    ("2001:db8:0:1::1", "2001:db8:0:1::/64"),
    ("192.0.2.9", "192.0.2.9"),
]

_table_ops = st.lists(
    st.tuples(
        st.sampled_from(["record", "record", "is_banned", "failures", "sweep", "tick"]),
        st.integers(0, len(_ADDRS) - 1),
        st.floats(0.0, 40.0, allow_nan=False),
    ),
    max_size=150,
)


@settings(max_examples=500, deadline=None)
@given(
    count=st.integers(1, 5),
    window=st.sampled_from([1.0, 10.0, 30.5]),
    max_addresses=st.integers(1, 6),
    ops=_table_ops,
)
def test_failure_table_matches_naive_model(
    count: int, window: float, max_addresses: int, ops: list[tuple[str, int, float]]
) -> None:
    clock = FakeClock(0.0)
    table = FailureTable(count, window, max_addresses, clock=clock)
    model: dict[str, list[float]] = {}  # insertion order == order of last failure
    held: set[str] = set()

    def model_live(key: str, now: float) -> int:
        return sum(1 for t in model.get(key, []) if now - t < window)

    for op, idx, dt in ops:
        spelling, key = _ADDRS[idx]
        now = clock.now
        if op == "tick":
            clock.advance(dt)
        elif op == "record":
            for k in [k for k in held if model_live(k, now) == 0]:
                held.discard(k)
                del model[k]
            stamps = model.pop(key, None)
            if stamps is None:
                if len(model) >= max_addresses:
                    free = [k for k in model if k not in held]
                    if not free:  # full of bans: not stored
                        assert table.record(spelling) is False
                        assert len(table) == len(model)
                        continue
                    del model[free[0]]
                stamps = []
            stamps.append(now)
            model[key] = stamps
            banned = model_live(key, now) >= count
            if banned:
                held.add(key)
            else:
                held.discard(key)
            assert table.record(spelling) is banned
        elif op == "is_banned":
            assert table.is_banned(spelling) is (model_live(key, now) >= count)
        elif op == "failures":
            assert table.failures(spelling) == min(count, model_live(key, now))
        else:
            dead = [k for k in model if model_live(k, now) == 0]
            for k in dead:
                del model[k]
                held.discard(k)
            assert table.sweep() == len(dead)
        assert len(table) == len(model) <= max_addresses
