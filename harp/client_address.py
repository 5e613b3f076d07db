"""Which address a request is charged to: IP normalisation, ``HP_TRUSTED_PROXY_IPS`` and the
X-Forwarded-For / X-Real-IP walk (docs/compatibility.md#brute-force-protection,
docs/differences.md#11).

Pure and synchronous (no reactor, no I/O):

* :func:`normalize_ip` gives every spelling of one address the same text, so a client cannot
  dodge a ban by writing ``::ffff:1.2.3.4`` instead of ``1.2.3.4`` or ``2001:DB8:0::1``
  instead of ``2001:db8::1``; :func:`parse_ip` is the memoised parse under it, which
  :mod:`harp.bans` also uses to compute ban keys.
* :func:`parse_trusted_proxies` parses ``HP_TRUSTED_PROXY_IPS`` and
  :class:`ClientAddressResolver` decides, per request, which address a request is charged to.

The resolver runs on every request, so it avoids per-call parsing: address parsing is
memoised in small bounded caches and trusted networks are pre-compiled to integer
``(network, mask)`` pairs.  What a charged address then costs (the failure table, ban keys)
is :mod:`harp.bans`' concern.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import TypeAlias

__all__ = [
    "MAX_ADDR_LEN",
    "MAX_FORWARDED_HOPS",
    "ClientAddressResolver",
    "IPNetwork",
    "normalize_ip",
    "parse_ip",
    "parse_trusted_proxies",
]

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Longer strings are not IP addresses we accept (the longest IPv6 text form is 45 chars; this
#: leaves room for a zone id, brackets and a port). The bound also keeps attacker-chosen
#: header values out of the memoisation caches below.
MAX_ADDR_LEN = 100
_PARSE_CACHE_SIZE = 4096

# Characters stripped from each HP_TRUSTED_PROXY_IPS entry, as the reference does.
_QUOTES = "'\"\u201c\u201d\u2018\u2019"

_V4_MAPPED_NET = ipaddress.IPv6Network("::ffff:0:0/96")

#: At most this many X-Forwarded-For elements are looked at, from the right. Real chains of
#: trusted proxies are a handful long; the bound keeps a huge header from costing more.
MAX_FORWARDED_HOPS = 64


# --------------------------------------------------------------------------------------------
# Address normalisation
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=_PARSE_CACHE_SIZE)
def parse_ip(text: str) -> tuple[str, int, int] | None:
    """``text`` -> (canonical text, IP version, integer value), or None if not an IP.

    Memoised; callers bound ``text`` by :data:`MAX_ADDR_LEN` first, so attacker-sized header
    values never fill the cache.
    """
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
    if len(s) > MAX_ADDR_LEN:
        return None
    parsed = parse_ip(s)
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
    return parse_ip(text)


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
    """Decides which address a request is charged to (docs/differences.md#11).

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
        if len(peer) > MAX_ADDR_LEN:
            return False
        parsed = parse_ip(peer)
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
        parsed = parse_ip(peer) if len(peer) <= MAX_ADDR_LEN else None
        if parsed is None:
            return peer
        if not self._contains(parsed[1], parsed[2]):
            return parsed[0]
        hops = _forwarded_hops(x_forwarded_for)
        if hops is None:
            if x_real_ip:
                addr = _parse_header_addr(x_real_ip) if len(x_real_ip) <= MAX_ADDR_LEN else None
                if addr is not None:
                    return addr[0]
            return parsed[0]
        nearest = parsed[0]
        for raw in hops:
            hop = _parse_header_addr(raw) if len(raw) <= MAX_ADDR_LEN else None
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
