"""Pure parsers of single configuration values: text in, typed value or :class:`ConfigError` out.

No I/O and no environment here (:mod:`harp.config` reads the environment and assembles
:class:`~harp.config.Settings`): each parser gets the variable's name only to say, in its
error, *which* variable is wrong and what would be accepted.  Every parser either returns a
value or raises :class:`ConfigError`, never another exception, so a bad value is one line
and exit code 2 rather than a traceback (tests/unit/test_config_fuzz.py holds them to it).
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import SplitResult, urlsplit

#: HAProxy time units, in seconds.  A bare number is milliseconds, as in HAProxy,
#: so that values copied from a reference deployment mean the same thing here.
_TIME_UNITS: Final = {
    "us": 1e-6,
    "ms": 1e-3,
    "": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
#: ASCII digits only, and at most 18 of them: ``int()`` of a longer digit string is slow
#: or refused by Python, and no real timeout needs more.
_TIME_RE: Final = re.compile(r"([0-9]{1,18})(us|ms|s|m|h|d)?", re.ASCII)
_PORT_RE: Final = re.compile(r"[0-9]{1,5}", re.ASCII)
_INT_RE: Final = re.compile(r"[+-]?[0-9]{1,18}", re.ASCII)
#: Whitespace and control characters never belong in a URL; ``urlsplit`` would silently
#: drop some of them (tab, newline), so the URL HaRP uses would differ from the one checked.
_URL_UNSAFE_RE: Final = re.compile(r"[\x00-\x20\x7f]")
_BRACKET_HOST_RE: Final = re.compile(r"\[[^\[\]]+\](?::[0-9]*)?", re.ASCII)
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})
#: What a secret is shown as, in errors and in :meth:`~harp.config.Settings.describe`.
REDACTED: Final = "<redacted>"
#: The user-info part of a URL authority (``//user:password@``), for redaction.
_USERINFO_RE: Final = re.compile(r"(//)[^/?#]*@")


class ConfigError(Exception):
    """A configuration value that HaRP cannot start with.

    ``str(error)`` is the single line printed before exiting with code 2: the
    variable, the offending value (or ``<redacted>`` for secrets) and what is allowed.
    """

    def __init__(self, var: str, value: str | None, allowed: str, *, secret: bool = False):
        self.var = var
        self.value = value
        self.allowed = allowed
        self.secret = secret
        super().__init__(self.line())

    def line(self) -> str:
        if self.value is None:
            shown = " is not set"
        elif self.secret:
            shown = f"={REDACTED}"
        else:
            text = self.value if len(self.value) <= 200 else self.value[:200] + "…"
            shown = "=" + repr(text)
        return f"{self.var}{shown}: {self.allowed}"


def strip_quotes(value: str) -> str:
    """Remove one leading and one trailing ``"``, then one leading and one trailing ``'``.

    This is exactly what the reference ``start.sh`` does, so values written for it
    (e.g. ``HP_SHARED_KEY="abc"`` in a compose file) keep working (#78).
    """
    value = value.removeprefix('"').removesuffix('"')
    return value.removeprefix("'").removesuffix("'")


@dataclass(frozen=True, slots=True)
class Address:
    """A listening address; ``host`` is an IP literal (``::`` / ``0.0.0.0`` for all)."""

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def loopback_host(self) -> str:
        """Where a local client reaches this listener (wildcards mean loopback)."""
        if self.host == "0.0.0.0":
            return "127.0.0.1"
        if self.host == "::":
            return "::1"
        return self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


def parse_address(var: str, raw: str) -> Address:
    """Parse ``host:port``, ``[v6]:port`` or ``v6:port`` (split at the last colon)."""
    allowed = "expected host:port with an IP address (use [addr]:port for IPv6) and a port 1-65535"
    text = raw.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ConfigError(var, raw, allowed)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in ("", "*"):
        host = "0.0.0.0"
    elif host == "localhost":
        host = "127.0.0.1"
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError(var, raw, allowed) from None
    # ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
    if not _PORT_RE.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(var, raw, allowed)
    return Address(host, int(port_text))


def parse_duration(var: str, raw: str, *, allow_zero: bool = False) -> float | None:
    """Parse an HAProxy time (``30s``, ``1800s``, ``500ms``, ``2m``; bare = ms).

    Returns seconds; ``None`` means unlimited (only when ``allow_zero`` and the value
    is zero in any unit, which HAProxy turns into its 24-day maximum).
    """
    match = _TIME_RE.fullmatch(raw.strip())
    allowed = "expected a duration like 30s, 500ms, 2m, 1h (a bare number is milliseconds)"
    if allow_zero:
        allowed += "; 0 means unlimited"
    if match is None:
        raise ConfigError(var, raw, allowed)
    seconds = int(match.group(1)) * _TIME_UNITS[match.group(2) or ""]
    if seconds == 0:
        if allow_zero:
            return None
        raise ConfigError(var, raw, allowed + "; it must be greater than 0")
    return seconds


def parse_bool(var: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(var, raw, "expected true or false")


def parse_int(var: str, raw: str, low: int, high: int) -> int:
    text = raw.strip()
    if not _INT_RE.fullmatch(text) or not low <= int(text) <= high:
        raise ConfigError(var, raw, f"expected a whole number from {low} to {high}")
    return int(text)


def parse_float(var: str, raw: str, low: float, high: float) -> float:
    allowed = f"expected a number of seconds from {low:g} to {high:g}"
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(var, raw, allowed) from None
    if not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(var, raw, allowed)
    return value



def check_shared_key(var: str, raw: str, shown: str | None) -> str:
    """Validate a shared key as the reference does, plus a clearer message.

    Printability is checked before quote stripping (reference order); ``"`` and ``\\``
    are refused after it because the key is also written into frpc TOML files.
    """
    if any(not 0x20 <= ord(ch) <= 0x7E for ch in raw):
        raise ConfigError(
            var, shown, "the key may contain only printable ASCII characters (no tabs, newlines)",
            secret=shown is None,
        )
    key = strip_quotes(raw)
    if not key:
        raise ConfigError(var, shown, "the key is empty", secret=shown is None)
    if '"' in key or "\\" in key:
        raise ConfigError(
            var, shown, 'the key must not contain " or \\ (they break frpc configuration files)',
            secret=shown is None,
        )
    if "{{" in key or "}}" in key:
        # frpc renders its configuration file as a Go template before parsing it, so
        # an ExApp's generated frpc.toml with such a key would not even load.
        raise ConfigError(
            var, shown, "the key must not contain {{ or }} (frpc reads its config as a template)",
            secret=shown is None,
        )
    return key


def split_url(url: str) -> tuple[SplitResult, int | None] | None:
    """``urlsplit(url)`` and its port, or None when the URL cannot be parsed at all.

    ``urlsplit`` raises ``ValueError`` for a malformed IPv6 literal (``http://[::1``), and
    ``.port``/``.hostname`` raise it for a bad port or bracket; a start-up check must turn
    all of that into a :class:`ConfigError`, never a traceback.
    """
    if _URL_UNSAFE_RE.search(url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
        parts.hostname  # noqa: B018 -- raises ValueError for a malformed host
    except ValueError:
        return None
    host_port = parts.netloc.rpartition("@")[2]
    if host_port.startswith("[") and not _BRACKET_HOST_RE.fullmatch(host_port):
        return None  # "[::1]x": urlsplit keeps the host and drops the tail
    return parts, port


def parse_nc_url(raw: str) -> str:
    url = strip_quotes(raw.strip())
    allowed = "set it to Nextcloud's base URL, e.g. https://cloud.example.com"
    if not url:
        raise ConfigError("NC_INSTANCE_URL", raw if raw else None, allowed)
    split = split_url(url)
    if split is None:
        raise ConfigError(
            "NC_INSTANCE_URL", raw,
            allowed + " (not a valid URL: check the [IPv6] brackets, the port 1-65535 "
            "and that there are no spaces)",
        )
    parts, port = split
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("NC_INSTANCE_URL", raw, allowed + " (http:// or https://)")
    if port == 0:
        raise ConfigError("NC_INSTANCE_URL", raw, allowed + " (the port must be 1-65535)")
    url = url.rstrip("/").removesuffix("/index.php").rstrip("/")
    return url


def redact_url(url: str) -> str:
    """``url`` with its password replaced; also for URLs ``urlsplit`` cannot parse.

    The one redactor of URLs: errors and the start-up summary both show its output.
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        password = None
        parts = None
    if parts is None or _URL_UNSAFE_RE.search(url):
        # Unparseable: hide everything between "//" and the last "@" of the authority.
        return _USERINFO_RE.sub(r"\1" + REDACTED + "@", url)
    if password is None:
        return url
    netloc = parts.netloc.replace(f":{password}@", f":{REDACTED}@", 1)
    return parts._replace(netloc=netloc).geturl()
