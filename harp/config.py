"""Settings: the one place that reads the environment.

HaRP is configured only by environment variables (reference-behaviour §2).  They are
parsed and validated once, at start-up, into a frozen :class:`Settings` that is passed
down to everything else; no other module reads ``os.environ``.  A bad value raises
:class:`ConfigError`, which the twistd plugin turns into one line on stderr and exit
code 2, so an operator sees *which* variable is wrong and what would be accepted,
instead of a traceback or a half-started proxy.

Secrets (the shared key, Redis passwords) never appear in an error message or in
:meth:`Settings.describe`.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import SplitResult, urlsplit

from harp.client_address import IPNetwork, parse_trusted_proxies

LOG_LEVELS: Final = ("debug", "info", "warning", "error")

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
_REDACTED: Final = "<redacted>"
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
            shown = "is not set"
        elif self.secret:
            shown = f"={_REDACTED}"
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


def _parse_bool(var: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(var, raw, "expected true or false")


def _parse_int(var: str, raw: str, low: int, high: int) -> int:
    text = raw.strip()
    if not _INT_RE.fullmatch(text) or not low <= int(text) <= high:
        raise ConfigError(var, raw, f"expected a whole number from {low} to {high}")
    return int(text)


def _parse_float(var: str, raw: str, low: float, high: float) -> float:
    allowed = f"expected a number of seconds from {low:g} to {high:g}"
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(var, raw, allowed) from None
    if not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(var, raw, allowed)
    return value


def _check_key(var: str, raw: str, shown: str | None) -> str:
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


def _read_shared_key(env: Mapping[str, str]) -> str:
    direct = env.get("HP_SHARED_KEY", "")
    path = strip_quotes(env.get("HP_SHARED_KEY_FILE", "").strip())
    if direct and path:
        raise ConfigError(
            "HP_SHARED_KEY", direct, "set only one of HP_SHARED_KEY and HP_SHARED_KEY_FILE",
            secret=True,
        )
    if direct:
        return _check_key("HP_SHARED_KEY", direct, None)
    if not path:
        raise ConfigError(
            "HP_SHARED_KEY", None, "set HP_SHARED_KEY or HP_SHARED_KEY_FILE to the daemon's key"
        )
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError("HP_SHARED_KEY_FILE", path, "the file does not exist") from None
    except OSError as exc:
        raise ConfigError(
            "HP_SHARED_KEY_FILE", path, f"the file cannot be read ({exc.strerror})"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            "HP_SHARED_KEY_FILE", path, "the key may contain only printable ASCII characters"
        ) from None
    # Like the shell's $(cat file): trailing newlines are not part of the key.
    text = text.rstrip("\n")
    if not text:
        raise ConfigError("HP_SHARED_KEY_FILE", path, "the file is empty")
    return _check_key("HP_SHARED_KEY_FILE", text, path)


def _split_url(url: str) -> tuple[SplitResult, int | None] | None:
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


def _parse_nc_url(raw: str) -> str:
    url = strip_quotes(raw.strip())
    allowed = "set it to Nextcloud's base URL, e.g. https://cloud.example.com"
    if not url:
        raise ConfigError("NC_INSTANCE_URL", raw if raw else None, allowed)
    split = _split_url(url)
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


def _parse_redis_url(raw: str) -> str | None:
    url = strip_quotes(raw.strip())
    if not url:
        return None
    allowed = "expected redis://[:password@]host:port[/db] or unix:///path/to/redis.sock"
    split = _split_url(url)
    if split is None:
        raise ConfigError(
            "HP_REDIS_URL", _redact_url(url),
            allowed + " (not a valid URL: check the [IPv6] brackets, the port 1-65535 "
            "and that there are no spaces)",
        )
    parts, port = split
    if parts.scheme in ("redis", "rediss") and parts.hostname and port != 0:
        return url
    if parts.scheme == "unix" and parts.path:
        return url
    raise ConfigError("HP_REDIS_URL", _redact_url(url), allowed)


def _redact_url(url: str) -> str:
    """``url`` with its password replaced; also for URLs ``urlsplit`` cannot parse."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        password = None
        parts = None
    if parts is None or _URL_UNSAFE_RE.search(url):
        # Unparseable: hide everything between "//" and the last "@" of the authority.
        return _USERINFO_RE.sub(r"\1" + _REDACTED + "@", url)
    if password is None:
        return url
    netloc = parts.netloc.replace(f":{password}@", f":{_REDACTED}@", 1)
    return parts._replace(netloc=netloc).geturl()


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything HaRP was told by its environment, validated and typed."""

    shared_key: str = field(repr=False)
    nc_instance_url: str
    exapps_address: Address
    exapps_https_address: Address
    frp_address: Address
    frp_disable_tls: bool
    frp_cert_validity_days: int
    trusted_proxies: tuple[IPNetwork, ...]
    log_level: str
    verbose_start: bool
    session_lifetime: float
    blacklist_count: int
    blacklist_window: int
    #: Open client connections on the HTTP(S) frontends before accepting pauses.
    max_connections: int
    timeout_connect: float
    timeout_client: float
    timeout_server: float
    #: ``None`` = upgraded connections (WebSockets) are never cut for idleness.
    timeout_tunnel: float | None
    certs_dir: Path
    docker_socket: Path
    redis_url: str | None = field(repr=False)
    #: Non-fatal remarks made while parsing (e.g. host bits masked in a CIDR).
    warnings: tuple[str, ...] = ()

    @property
    def frp_certs_dir(self) -> Path:
        return self.certs_dir / "frp"

    @property
    def https_cert_path(self) -> Path:
        return self.certs_dir / "cert.pem"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from an environment mapping, or raise :class:`ConfigError`."""

        def get(name: str, default: str) -> str:
            return strip_quotes(env.get(name, default).strip())

        shared_key = _read_shared_key(env)
        nc_url = _parse_nc_url(env.get("NC_INSTANCE_URL", ""))

        frp_raw = get("HP_FRP_ADDRESS", "0.0.0.0:8782")
        if not frp_raw:
            raise ConfigError("HP_FRP_ADDRESS", "", "expected host:port, e.g. 0.0.0.0:8782")

        log_level = get("HP_LOG_LEVEL", "warning").lower()
        if log_level not in LOG_LEVELS:
            raise ConfigError(
                "HP_LOG_LEVEL", env.get("HP_LOG_LEVEL"), "expected one of " + "|".join(LOG_LEVELS)
            )

        try:
            trusted, warnings = parse_trusted_proxies(env.get("HP_TRUSTED_PROXY_IPS", ""))
        except ValueError as exc:
            raise ConfigError(
                "HP_TRUSTED_PROXY_IPS", env.get("HP_TRUSTED_PROXY_IPS"),
                f"{exc}; expected comma-separated IP addresses or CIDR networks",
            ) from None

        server_timeout = parse_duration("HP_TIMEOUT_SERVER", get("HP_TIMEOUT_SERVER", "1800s"))
        assert server_timeout is not None
        tunnel_raw = get("HP_TIMEOUT_TUNNEL", "")
        tunnel_timeout = (
            parse_duration("HP_TIMEOUT_TUNNEL", tunnel_raw, allow_zero=True)
            if tunnel_raw
            else server_timeout
        )

        certs_dir = get("HP_CERTS_DIR", "/certs")
        if not certs_dir:
            raise ConfigError("HP_CERTS_DIR", "", "expected a directory path, e.g. /certs")
        docker_socket = get("HP_DOCKER_SOCKET", "/var/run/docker.sock")
        if not docker_socket:
            raise ConfigError("HP_DOCKER_SOCKET", "", "expected a unix socket path")

        connect = parse_duration("HP_TIMEOUT_CONNECT", get("HP_TIMEOUT_CONNECT", "30s"))
        client = parse_duration("HP_TIMEOUT_CLIENT", get("HP_TIMEOUT_CLIENT", "30s"))
        assert connect is not None and client is not None

        return cls(
            shared_key=shared_key,
            nc_instance_url=nc_url,
            exapps_address=parse_address(
                "HP_EXAPPS_ADDRESS", get("HP_EXAPPS_ADDRESS", "0.0.0.0:8780")
            ),
            exapps_https_address=parse_address(
                "HP_EXAPPS_HTTPS_ADDRESS", get("HP_EXAPPS_HTTPS_ADDRESS", "0.0.0.0:8781")
            ),
            frp_address=parse_address("HP_FRP_ADDRESS", frp_raw),
            frp_disable_tls=_parse_bool("HP_FRP_DISABLE_TLS", get("HP_FRP_DISABLE_TLS", "false")),
            frp_cert_validity_days=_parse_int(
                "HP_FRP_CERT_VALIDITY_DAYS", get("HP_FRP_CERT_VALIDITY_DAYS", "5000"), 1, 36500
            ),
            trusted_proxies=tuple(trusted),
            log_level=log_level,
            verbose_start=_parse_bool("HP_VERBOSE_START", get("HP_VERBOSE_START", "1")),
            session_lifetime=_parse_float(
                "HP_SESSION_LIFETIME", get("HP_SESSION_LIFETIME", "3"), 0, 10
            ),
            blacklist_count=_parse_int(
                "HP_BLACKLIST_COUNT", get("HP_BLACKLIST_COUNT", "10"), 1, 1_000_000
            ),
            blacklist_window=_parse_int(
                "HP_BLACKLIST_WINDOW", get("HP_BLACKLIST_WINDOW", "300"), 1, 30 * 86400
            ),
            max_connections=_parse_int(
                "HP_MAX_CONNECTIONS", get("HP_MAX_CONNECTIONS", "8192"), 1, 1_000_000
            ),
            timeout_connect=connect,
            timeout_client=client,
            timeout_server=server_timeout,
            timeout_tunnel=tunnel_timeout,
            certs_dir=Path(certs_dir),
            docker_socket=Path(docker_socket),
            redis_url=_parse_redis_url(env.get("HP_REDIS_URL", "")),
            warnings=tuple(warnings),
        )

    def describe(self) -> list[tuple[str, str]]:
        """The effective configuration, secrets redacted, for ``HP_VERBOSE_START``."""

        def seconds(value: float | None) -> str:
            return "unlimited" if value is None else f"{value:g}s"

        return [
            ("HP_SHARED_KEY", _REDACTED),
            ("NC_INSTANCE_URL", self.nc_instance_url),
            ("HP_EXAPPS_ADDRESS", str(self.exapps_address)),
            ("HP_EXAPPS_HTTPS_ADDRESS", str(self.exapps_https_address)),
            ("HP_FRP_ADDRESS", str(self.frp_address)),
            ("HP_FRP_DISABLE_TLS", str(self.frp_disable_tls).lower()),
            ("HP_FRP_CERT_VALIDITY_DAYS", str(self.frp_cert_validity_days)),
            ("HP_TRUSTED_PROXY_IPS", ",".join(map(str, self.trusted_proxies)) or "(none)"),
            ("HP_LOG_LEVEL", self.log_level),
            ("HP_SESSION_LIFETIME", f"{self.session_lifetime:g}s"),
            ("HP_BLACKLIST_COUNT", str(self.blacklist_count)),
            ("HP_BLACKLIST_WINDOW", f"{self.blacklist_window}s"),
            ("HP_MAX_CONNECTIONS", str(self.max_connections)),
            ("HP_TIMEOUT_CONNECT", seconds(self.timeout_connect)),
            ("HP_TIMEOUT_CLIENT", seconds(self.timeout_client)),
            ("HP_TIMEOUT_SERVER", seconds(self.timeout_server)),
            ("HP_TIMEOUT_TUNNEL", seconds(self.timeout_tunnel)),
            ("HP_CERTS_DIR", str(self.certs_dir)),
            ("HP_DOCKER_SOCKET", str(self.docker_socket)),
            ("HP_REDIS_URL", _redact_url(self.redis_url) if self.redis_url else "(in memory)"),
        ]
