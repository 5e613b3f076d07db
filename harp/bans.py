"""Brute-force protection: client address resolution and the failure table (spec §7).

Three pieces, all pure and synchronous (no reactor, no I/O, time from an injected clock):

* :func:`normalize_ip` gives every spelling of one address the same key, so a client cannot
  dodge a ban by writing ``::ffff:1.2.3.4`` instead of ``1.2.3.4`` or ``2001:DB8:0::1``
  instead of ``2001:db8::1``.
* :func:`parse_trusted_proxies` parses ``HP_TRUSTED_PROXY_IPS`` and
  :class:`ClientAddressResolver` decides, per request, which address a request is charged to.
* :func:`ban_key` names what a failure is charged to: the IPv4 address, or the /64 network
  of an IPv6 address (one subscriber usually holds a whole /64, so counting per /128 would let
  one client rotate through 2**64 fresh addresses).
* :class:`FailureTable` counts failures per ban key in a sliding window and answers "is this
  address banned?". It is bounded in memory (deliberate difference 6): at most ``count``
  timestamps per key and at most ``max_addresses`` keys, so a flood of failures from many
  distinct addresses cannot grow memory without limit -- and an active ban is never evicted
  to make room for a newcomer.

The resolver and :meth:`FailureTable.is_banned` run on every request, so they avoid per-call
parsing: address parsing is memoised in small bounded caches and trusted networks are
pre-compiled to integer ``(network, mask)`` pairs.
"""

from __future__ import annotations

import heapq
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import TypeAlias

__all__ = [
    "ClientAddressResolver",
    "FailureTable",
    "IPNetwork",
    "ban_key",
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

#: IPv6 failures are counted per network of this prefix length (see :func:`ban_key`).
IPV6_BAN_PREFIX = 64
_V6_BAN_MASK = ((1 << IPV6_BAN_PREFIX) - 1) << (128 - IPV6_BAN_PREFIX)

#: At most this many X-Forwarded-For elements are looked at, from the right. Real chains of
#: trusted proxies are a handful long; the bound keeps a huge header from costing more.
MAX_FORWARDED_HOPS = 64


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
def _ban_key(text: str) -> str:
    parsed = _parse_ip(text)
    if parsed is None:
        return text
    canonical, version, value = parsed
    if version == 4:
        return canonical
    network = ipaddress.IPv6Address(value & _V6_BAN_MASK)
    return f"{network}/{IPV6_BAN_PREFIX}"


def ban_key(addr: str) -> str:
    """The key failures of ``addr`` are counted under and bans are kept by.

    * IPv4 (also written IPv4-mapped, ``::ffff:1.2.3.4``): the canonical address.
    * IPv6: its /64 network, e.g. ``2001:db8:1:2::/64``. A single end site gets at least a
      /64 (RFC 6177), so an attacker on one line can pick a fresh /128 for every request;
      charging the /64 makes that rotation useless. The price: hosts sharing one /64 (a
      NAT64-less office LAN) share a ban, as IPv4 clients behind one NAT always have.
    * Anything else (a UNIX socket peer, an already computed key such as a network string
      received from another replica) is returned unchanged, so the function is idempotent.
    """
    if len(addr) > _MAX_ADDR_LEN:
        return addr
    return _ban_key(addr)


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
    """Decides which address a request is charged to (spec §7 and deliberate difference 11).

    Only when the TCP peer lies inside a trusted network are headers believed. Then all
    ``X-Forwarded-For`` header lines, in order, form one comma-separated list of hops, and
    the list is walked from the **right** (the hop nearest to us): the client is the first
    address that is not inside a trusted network. Each trusted proxy appends the address it
    received the request from, so the right-most untrusted element is the last one written
    by someone we trust; everything to its left was written by the client and is ignored.
    If every element is trusted, the left-most one is the client. ``X-Real-IP`` is used only
    when there is no ``X-Forwarded-For`` at all (no line, or only blank lines).

    An element that is not an address (``unknown``, an empty element, a host name) stops the
    walk and the request is charged to the last hop that *was* good, i.e. the nearest
    trusted proxy seen so far (the peer when the right-most element is already bad). We
    cannot know who is behind a hop that wrote garbage, and skipping over it would let a
    client place an address of its choice beyond it; charging the proxy is the conservative
    choice (at worst the proxy's users share failures, as they would without
    ``HP_TRUSTED_PROXY_IPS``). At most :data:`MAX_FORWARDED_HOPS` elements are examined;
    past that the same rule applies.

    Without trusted networks the headers are never looked at (fast path). The result is
    always normalised (see :func:`normalize_ip`). A peer that is not an IP address at all
    (for example a UNIX socket) is returned unchanged and never trusted.
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
        x_forwarded_for: Sequence[bytes] | None,
        x_real_ip: bytes | None,
    ) -> str:
        """The normalised client address for a request from ``peer``.

        ``x_forwarded_for`` is every ``X-Forwarded-For`` header line in the order received
        (None or empty when there is none); ``x_real_ip`` the ``X-Real-IP`` value to use.
        """
        if not self._networks:
            return normalize_ip(peer) or peer
        parsed = _parse_ip(peer) if len(peer) <= _MAX_ADDR_LEN else None
        if parsed is None:
            return peer
        if not self._contains(parsed[1], parsed[2]):
            return parsed[0]
        hops = _forwarded_hops(x_forwarded_for)
        if hops is None:
            if x_real_ip:
                addr = _parse_header_addr(x_real_ip) if len(x_real_ip) <= _MAX_ADDR_LEN else None
                if addr is not None:
                    return addr[0]
            return parsed[0]
        nearest = parsed[0]
        for raw in hops:
            hop = _parse_header_addr(raw) if len(raw) <= _MAX_ADDR_LEN else None
            if hop is None:
                return nearest  # garbage: charge the last hop we could trust
            if not self._contains(hop[1], hop[2]):
                return hop[0]
            nearest = hop[0]
        return nearest


def _forwarded_hops(lines: Sequence[bytes] | None) -> list[bytes] | None:
    """The X-Forwarded-For elements, right-most first, at most :data:`MAX_FORWARDED_HOPS`.

    None when there is no X-Forwarded-For: no line, or only blank ones. Elements are not
    trimmed or parsed here; an empty element between commas stays in the list (it is bad).
    """
    if not lines:
        return None
    hops: list[bytes] = []
    seen_content = False
    for line in reversed(lines):
        if not line.strip():
            continue
        seen_content = True
        # rsplit with a bound: a header of 10,000 commas costs no more than 64 elements.
        budget = MAX_FORWARDED_HOPS - len(hops)
        parts = line.rsplit(b",", budget)
        if len(parts) > budget:
            parts = parts[1:]
        hops.extend(reversed(parts))
        if len(hops) >= MAX_FORWARDED_HOPS:
            break
    return hops if seen_content else None


# --------------------------------------------------------------------------------------------
# Failure table
# --------------------------------------------------------------------------------------------


class FailureTable:
    """Failure timestamps per ban key in a sliding window; the ban decision of spec §7.

    A key (see :func:`ban_key`: an IPv4 address or an IPv6 /64) is banned while at least
    ``count`` of its failures are younger than ``window`` seconds (a failure at ``t`` counts
    while ``now - t < window``, as in the reference). With ``count=3`` the third failure bans
    the key, so its fourth request is dropped. A success never resets the count; a ban
    simply lapses ``window`` seconds after the ``count``-th most recent failure.

    Memory is bounded (deliberate difference 6) without giving attackers a way to lift bans:

    * per key at most ``count`` timestamps are kept (older ones cannot matter), and expired
      ones are dropped whenever the key fails again;
    * at most ``max_addresses`` keys are tracked. When full, room is made by evicting the
      *not banned* key whose last failure is the oldest. An active ban is never evicted:
      otherwise a flood of failures from fresh addresses would push the attacker's own ban
      out. If every slot holds an active ban, a new key's failure is not stored (and
      ``on_full`` is called, once per such episode, for a log line); the bans still lapse
      on time and their slots are then reused;
    * :meth:`sweep`, called periodically, drops keys with no live failure.

    Internally, keys that are not banned live in ``_data`` (ordered by last failure, so the
    eviction candidate is the first) and banned ones in ``_banned``, with a heap of
    ``(time the entry needs another look, key)`` so lapsed bans are found in O(log n). A key
    whose ban lapsed stays in ``_banned`` until its last failure expires or it fails again.

    The clock must be non-decreasing (the default is :func:`time.monotonic`).
    """

    __slots__ = (
        "_banned", "_clock", "_count", "_data", "_due", "_full", "_max_addresses",
        "_on_full", "_window",
    )

    def __init__(
        self,
        count: int,
        window: float,
        max_addresses: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        on_full: Callable[[], object] | None = None,
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
        self._on_full = on_full
        self._full = False  # inside a "full of bans" episode (on_full already called)
        # key -> ascending failure timestamps (at most `count`), keys not banned, oldest
        # last failure first: record() moves a key to the end.
        self._data: OrderedDict[str, list[float]] = OrderedDict()
        # key -> timestamps, keys banned (or whose ban lapsed but whose failures live on).
        self._banned: dict[str, list[float]] = {}
        # min-heap of (when to look at the key again, key); stale entries are skipped.
        self._due: list[tuple[float, str]] = []

    @property
    def count(self) -> int:
        return self._count

    @property
    def window(self) -> float:
        return self._window

    @property
    def max_addresses(self) -> int:
        return self._max_addresses

    def _stamps(self, key: str) -> list[float] | None:
        stamps = self._data.get(key)
        return self._banned.get(key) if stamps is None else stamps

    def record(self, addr: str) -> bool:
        """Record one failure for ``addr``; return True if its ban key is now banned."""
        key = ban_key(addr)
        now = self._clock()
        self._expire(now)
        stamps = self._data.get(key)
        in_banned = False
        if stamps is None:
            stamps = self._banned.get(key)
            in_banned = stamps is not None
        if stamps is None:
            if not self._make_room():
                return False
            stamps = []
            self._data[key] = stamps
            self._full = False
        else:
            window = self._window
            if now - stamps[0] >= window:  # drop expired failures (the list is ascending)
                i = 1
                while i < len(stamps) and now - stamps[i] >= window:
                    i += 1
                del stamps[:i]
            if not in_banned:
                self._data.move_to_end(key)
        stamps.append(now)
        if len(stamps) > self._count:
            del stamps[0]
        banned = len(stamps) >= self._count
        if banned:
            if not in_banned:
                del self._data[key]
                self._banned[key] = stamps
            heapq.heappush(self._due, (stamps[0] + self._window, key))
            self._compact()
        elif in_banned:  # a lapsed ban failing again: an ordinary record once more
            del self._banned[key]
            self._data[key] = stamps
        return banned

    def _make_room(self) -> bool:
        """Free one slot if the table is full: False if only active bans are left."""
        if len(self._data) + len(self._banned) < self._max_addresses:
            return True
        if self._data:
            self._data.popitem(last=False)
            return True
        if not self._full:
            self._full = True
            if self._on_full is not None:
                self._on_full()
        return False

    def _expire(self, now: float) -> None:
        """Handle every banned key whose heap entry is due: lapsed bans and dead keys."""
        due = self._due
        window = self._window
        while due and due[0][0] <= now:
            _, key = heapq.heappop(due)
            stamps = self._banned.get(key)
            if stamps is None:
                continue
            if now - stamps[-1] >= window:  # no live failure left
                del self._banned[key]
            elif len(stamps) < self._count or now - stamps[0] >= window:
                # The ban lapsed; look again when the last failure expires.
                heapq.heappush(due, (stamps[-1] + window, key))
            # else: still banned; a newer heap entry (pushed by record) covers it

    def _compact(self) -> None:
        """Rebuild the heap when stale entries outnumber live ones (bounded memory)."""
        if len(self._due) > 2 * len(self._banned) + 64:
            window = self._window
            self._due = [(s[0] + window, k) for k, s in self._banned.items()]
            heapq.heapify(self._due)

    def is_banned(self, addr: str) -> bool:
        """True while the ban key of ``addr`` has ``count`` failures in the window. O(1)."""
        stamps = self._banned.get(ban_key(addr))
        if stamps is None or len(stamps) < self._count:
            return False
        # stamps holds at most `count` entries, so stamps[0] is the count-th most recent.
        return self._clock() - stamps[0] < self._window

    def failures(self, addr: str) -> int:
        """Number of failures of ``addr``'s ban key inside the window (capped at ``count``)."""
        stamps = self._stamps(ban_key(addr))
        if not stamps:
            return 0
        now = self._clock()
        window = self._window
        return sum(1 for t in stamps if now - t < window)

    def sweep(self) -> int:
        """Drop every key without a failure inside the window; return how many."""
        now = self._clock()
        before = len(self)
        self._expire(now)
        window = self._window
        data = self._data
        expired: list[str] = []
        for key, stamps in data.items():
            if now - stamps[-1] < window:
                break  # ordered by last failure: everything after this is live too
            expired.append(key)
        for key in expired:
            del data[key]
        if len(self) < self._max_addresses:
            self._full = False
        return before - len(self)

    def clear(self) -> None:
        self._data.clear()
        self._banned.clear()
        self._due.clear()
        self._full = False

    def __len__(self) -> int:
        """Number of tracked keys (including expired ones not yet swept)."""
        return len(self._data) + len(self._banned)

    def __repr__(self) -> str:
        return (
            f"FailureTable(count={self._count}, window={self._window}, "
            f"max_addresses={self._max_addresses}, len={len(self)}, "
            f"banned={len(self._banned)})"
        )
