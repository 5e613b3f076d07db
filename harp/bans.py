"""Brute-force protection: client address resolution and the failure table (spec §7).

Three pieces, all pure and synchronous (no reactor, no I/O, time from an injected clock):

* :func:`normalize_ip` gives every spelling of one address the same key, so a client cannot
  dodge a ban by writing ``::ffff:1.2.3.4`` instead of ``1.2.3.4`` or ``2001:DB8:0::1``
  instead of ``2001:db8::1``.
* :func:`parse_trusted_proxies` parses ``HP_TRUSTED_PROXY_IPS`` and
  :class:`ClientAddressResolver` decides, per request, which address a request is charged to.
* :class:`FailureTable` counts failures per address in a sliding window and answers "is this
  address banned?". It is bounded in memory (deliberate difference 6): at most ``count``
  timestamps per address and at most ``max_addresses`` addresses, so a flood of failures from
  many distinct addresses cannot grow memory without limit.

The resolver and :meth:`FailureTable.is_banned` run on every request, so they avoid per-call
parsing: address parsing is memoised in small bounded caches and trusted networks are
pre-compiled to integer ``(network, mask)`` pairs.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import TypeAlias

__all__ = [
    "ClientAddressResolver",
    "FailureTable",
    "IPNetwork",
    "normalize_ip",
    "parse_trusted_proxies",
]

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

# Longer strings are not IP addresses we accept (the longest IPv6 text form is 45 chars; this
# leaves room for a zone id, brackets and a port). The bound also keeps attacker-chosen
# header values out of the memoisation caches below.
_MAX_ADDR_LEN = 100
_PARSE_CACHE_SIZE = 4096

# Characters stripped from each HP_TRUSTED_PROXY_IPS entry, as the reference does.
_QUOTES = "'\"\u201c\u201d\u2018\u2019"

_V4_MAPPED_NET = ipaddress.IPv6Network("::ffff:0:0/96")


# --------------------------------------------------------------------------------------------
# Address normalisation
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=_PARSE_CACHE_SIZE)
def _parse_ip(text: str) -> tuple[str, int, int] | None:
    """``text`` -> (canonical text, IP version, integer value), or None if not an IP."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return str(mapped), 4, int(mapped)
    return str(addr), addr.version, int(addr)


def normalize_ip(s: str) -> str | None:
    """Canonical text form of the IP address ``s``, or None if ``s`` is not an IP address.

    IPv4-mapped IPv6 addresses become plain IPv4 (``::ffff:1.2.3.4`` -> ``1.2.3.4``), IPv6 is
    compressed and lower-cased (``2001:DB8:0:0::1`` -> ``2001:db8::1``). A zone id
    (``fe80::1%eth0``) is kept. No trimming, brackets or ports: ``s`` must be a bare address.
    """
    if len(s) > _MAX_ADDR_LEN:
        return None
    parsed = _parse_ip(s)
    return None if parsed is None else parsed[0]


@lru_cache(maxsize=_PARSE_CACHE_SIZE)
def _parse_header_addr(raw: bytes) -> tuple[str, int, int] | None:
    """Parse one address taken from X-Forwarded-For / X-Real-IP.

    Accepted forms, after trimming ASCII whitespace: a bare IPv4 or IPv6 address,
    ``[v6]``, ``[v6]:port`` and ``v4:port`` (some proxies append the client port). Anything
    else (``unknown``, obfuscated RFC 7239 identifiers, host names, non-ASCII) is None.
    """
    raw = raw.strip()
    if not raw or not raw.isascii():
        return None
    text = raw.decode("ascii")
    if text[0] == "[":
        close = text.find("]")
        if close < 0:
            return None
        rest = text[close + 1 :]
        if rest and not (rest[0] == ":" and _is_port(rest[1:])):
            return None
        text = text[1:close]
        if ":" not in text:  # brackets are for IPv6 only
            return None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not _is_port(port) or "." not in host:
            return None
        text = host
    return _parse_ip(text)


def _is_port(s: str) -> bool:
    return 0 < len(s) <= 5 and s.isdigit() and int(s) <= 65535


def _header_addr(raw: bytes) -> str | None:
    if len(raw) > _MAX_ADDR_LEN:
        return None
    parsed = _parse_header_addr(raw)
    return None if parsed is None else parsed[0]


# --------------------------------------------------------------------------------------------
# HP_TRUSTED_PROXY_IPS and client address resolution
# --------------------------------------------------------------------------------------------


def parse_trusted_proxies(value: str) -> tuple[list[IPNetwork], list[str]]:
    """Parse ``HP_TRUSTED_PROXY_IPS``: comma-separated IP addresses and/or CIDR networks.

    Each entry is trimmed, stripped of the quote characters ``'`` ``"`` and the typographic
    quotes U+201C/U+201D/U+2018/U+2019 (values pasted from documents or quoted in compose
    files) and trimmed again; empty entries are ignored.
    A bare address becomes a /32 (IPv4) or /128 (IPv6) network. Host bits are masked
    (``192.168.100.20/24`` -> ``192.168.100.0/24``) with a warning. Duplicates are dropped.

    Returns ``(networks, warnings)``; the caller logs the warnings. An entry that is not an
    IP or CIDR raises :class:`ValueError` naming it (our decision: a start-up error, where the
    reference only logs and skips it). Messages do not name the variable; the caller
    prefixes ``HP_TRUSTED_PROXY_IPS``.
    """
    networks: list[IPNetwork] = []
    warnings: list[str] = []
    for item in value.split(","):
        entry = item.strip().strip(_QUOTES).strip()
        if not entry:
            continue
        try:
            net: IPNetwork = ipaddress.ip_network(entry)
        except ValueError:
            try:
                net = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"invalid entry {entry!r} (not an IP address or CIDR network)"
                ) from None
            warnings.append(f"entry {entry!r} has host bits set; using {net}")
        if net.prefixlen == 0:
            warnings.append(
                f"entry {entry!r} trusts every address: any client can choose the address "
                "it is banned under via X-Forwarded-For"
            )
        if net not in networks:
            networks.append(net)
    return networks, warnings


def _compile_networks(
    networks: Iterable[IPNetwork],
) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    """Networks -> ((net, mask) pairs for IPv4, (net, mask) pairs for IPv6).

    An IPv6 network inside ``::ffff:0:0/96`` is also entered as the IPv4 network it maps,
    because peers are normalised to IPv4 before matching.
    """
    v4: list[tuple[int, int]] = []
    v6: list[tuple[int, int]] = []
    for net in networks:
        if isinstance(net, ipaddress.IPv6Network):
            v6.append((int(net.network_address), int(net.netmask)))
            if net.prefixlen >= 96 and net.subnet_of(_V4_MAPPED_NET):
                mask4 = int(net.netmask) & 0xFFFFFFFF
                v4.append((int(net.network_address) & mask4, mask4))
        else:
            v4.append((int(net.network_address), int(net.netmask)))
    return tuple(dict.fromkeys(v4)), tuple(dict.fromkeys(v6))


class ClientAddressResolver:
    """Decides which address a request is charged to (spec §7, "Client IP").

    Only when the TCP peer lies inside a trusted network are headers believed: the first
    comma-separated element of ``X-Forwarded-For``, else ``X-Real-IP``, else the peer. A header
    that is missing, empty or unparseable falls through to the next option. Without trusted
    networks the headers are never looked at (fast path).

    Pass the *first* ``X-Forwarded-For`` header line (or all lines joined with ``,``), not the
    last one. Note that, like the reference, the left-most element is taken: it is whatever
    the trusted proxy received from the client unless that proxy overwrites the header.

    The result is always normalised (see :func:`normalize_ip`). A peer that is not an IP
    address at all (for example a UNIX socket) is returned unchanged and never trusted.
    """

    __slots__ = ("_networks", "_v4", "_v6")

    def __init__(self, trusted: Iterable[IPNetwork]) -> None:
        self._networks: tuple[IPNetwork, ...] = tuple(trusted)
        self._v4, self._v6 = _compile_networks(self._networks)

    @property
    def trusted(self) -> tuple[IPNetwork, ...]:
        return self._networks

    def is_trusted(self, peer: str) -> bool:
        """True if ``peer`` (any spelling) lies inside one of the trusted networks."""
        if len(peer) > _MAX_ADDR_LEN:
            return False
        parsed = _parse_ip(peer)
        return parsed is not None and self._contains(parsed[1], parsed[2])

    def _contains(self, version: int, value: int) -> bool:
        for net, mask in self._v4 if version == 4 else self._v6:
            if value & mask == net:
                return True
        return False

    def resolve(
        self,
        peer: str,
        x_forwarded_for: bytes | None,
        x_real_ip: bytes | None,
    ) -> str:
        """The normalised client address for a request from ``peer`` with these headers."""
        if not self._networks:
            return normalize_ip(peer) or peer
        parsed = _parse_ip(peer) if len(peer) <= _MAX_ADDR_LEN else None
        if parsed is None:
            return peer
        if not self._contains(parsed[1], parsed[2]):
            return parsed[0]
        if x_forwarded_for:
            cut = x_forwarded_for.find(b",")
            first = x_forwarded_for if cut < 0 else x_forwarded_for[:cut]
            addr = _header_addr(first)
            if addr is not None:
                return addr
        if x_real_ip:
            addr = _header_addr(x_real_ip)
            if addr is not None:
                return addr
        return parsed[0]


# --------------------------------------------------------------------------------------------
# Failure table
# --------------------------------------------------------------------------------------------


class FailureTable:
    """Per-address failure timestamps in a sliding window; the ban decision of spec §7.

    An address is banned while at least ``count`` of its failures are younger than
    ``window`` seconds (a failure at ``t`` counts while ``now - t < window``, as in the
    reference). With ``count=3`` the third failure bans the address, so its fourth request
    is dropped. A success never resets the count; a ban simply lapses ``window`` seconds
    after the ``count``-th most recent failure.

    Memory is bounded (deliberate difference 6):

    * per address at most ``count`` timestamps are kept (older ones cannot matter), and
      expired ones are dropped whenever the address fails again;
    * at most ``max_addresses`` addresses are tracked; when full, the address whose last
      failure is the oldest is evicted first (possibly lifting its ban early: the price of
      the bound, paid by the least active offender);
    * :meth:`sweep`, called periodically, drops addresses with no live failure, in time
      proportional to the number removed.

    Keys are normalised with :func:`normalize_ip`; a string that is not an IP address is
    used as is. The clock must be non-decreasing (the default is :func:`time.monotonic`).
    """

    __slots__ = ("_clock", "_count", "_data", "_max_addresses", "_window")

    def __init__(
        self,
        count: int,
        window: float,
        max_addresses: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count!r}")
        if not window > 0:  # also rejects NaN
            raise ValueError(f"window must be > 0, got {window!r}")
        if max_addresses < 1:
            raise ValueError(f"max_addresses must be >= 1, got {max_addresses!r}")
        self._count = count
        self._window = float(window)
        self._max_addresses = max_addresses
        self._clock = clock
        # address -> ascending failure timestamps (at most `count`). Ordered by the time of
        # the last failure, oldest first: record() moves an address to the end.
        self._data: OrderedDict[str, list[float]] = OrderedDict()

    @property
    def count(self) -> int:
        return self._count

    @property
    def window(self) -> float:
        return self._window

    @property
    def max_addresses(self) -> int:
        return self._max_addresses

    def record(self, addr: str) -> bool:
        """Record one failure for ``addr``; return True if the address is now banned."""
        key = normalize_ip(addr) or addr
        now = self._clock()
        data = self._data
        stamps = data.get(key)
        if stamps is None:
            if len(data) >= self._max_addresses:
                data.popitem(last=False)
            data[key] = [now]
            return self._count == 1
        data.move_to_end(key)
        window = self._window
        if now - stamps[0] >= window:  # drop expired failures (the list is ascending)
            i = 1
            while i < len(stamps) and now - stamps[i] >= window:
                i += 1
            del stamps[:i]
        stamps.append(now)
        if len(stamps) > self._count:
            del stamps[0]
        return len(stamps) >= self._count

    def is_banned(self, addr: str) -> bool:
        """True while ``addr`` has at least ``count`` failures inside the window. O(1)."""
        stamps = self._data.get(normalize_ip(addr) or addr)
        if stamps is None or len(stamps) < self._count:
            return False
        # stamps holds at most `count` entries, so stamps[0] is the count-th most recent.
        return self._clock() - stamps[0] < self._window

    def failures(self, addr: str) -> int:
        """Number of failures of ``addr`` inside the window (capped at ``count``)."""
        stamps = self._data.get(normalize_ip(addr) or addr)
        if not stamps:
            return 0
        now = self._clock()
        window = self._window
        return sum(1 for t in stamps if now - t < window)

    def sweep(self) -> int:
        """Drop every address without a failure inside the window; return how many."""
        now = self._clock()
        window = self._window
        data = self._data
        expired: list[str] = []
        for key, stamps in data.items():
            if now - stamps[-1] < window:
                break  # ordered by last failure: everything after this is live too
            expired.append(key)
        for key in expired:
            del data[key]
        return len(expired)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        """Number of tracked addresses (including expired ones not yet swept)."""
        return len(self._data)

    def __repr__(self) -> str:
        return (
            f"FailureTable(count={self._count}, window={self._window}, "
            f"max_addresses={self._max_addresses}, len={len(self._data)})"
        )
