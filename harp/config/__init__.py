"""Settings: the one place that reads the environment.

HaRP is configured only by environment variables (docs/configuration.md).  They are
parsed and validated once, at start-up, into a frozen :class:`Settings` that is passed
down to everything else; no other module reads ``os.environ``.  A bad value raises
:class:`ConfigError`, which the twistd plugin turns into one line on stderr and exit
code 2, so an operator sees *which* variable is wrong and what would be accepted,
instead of a traceback or a half-started proxy.

Secrets (the shared key, Redis passwords) never appear in an error message or in
:meth:`Settings.describe`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from harp.client_address import IPNetwork, parse_trusted_proxies
from harp.config.redis_url import RedisURL, parse_redis_url
from harp.config.values import (
    REDACTED,
    Address,
    ConfigError,
    check_shared_key,
    parse_address,
    parse_bool,
    parse_duration,
    parse_float,
    parse_int,
    parse_nc_url,
    strip_quotes,
)
from harp.k8s.settings import K8sSettings, parse_k8s_settings

__all__ = ["Address", "ConfigError", "RedisURL", "Settings", "available_cpus"]

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
#: The most serving processes ``HP_WORKERS`` may ask for.
MAX_WORKERS: Final = 256
#: Where cgroup v2 states this container's CPU quota (``max 100000`` = none).
CGROUP_CPU_MAX: Final = Path("/sys/fs/cgroup/cpu.max")


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may use: its affinity mask, bounded by a cgroup v2 quota.

    ``cpu.max`` holds ``<quota> <period>`` (or ``max <period>``); a quota of 1.5 CPUs
    gives 2 (rounded up: the half CPU is still worth a process).  The default of
    ``HP_WORKERS``.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, min(cpus, MAX_WORKERS))


def _read_shared_key(env: Mapping[str, str]) -> str:
    """``HP_SHARED_KEY`` or the file ``HP_SHARED_KEY_FILE`` names (exactly one of them).

    Here and not in :mod:`harp.config.values` because it reads a file: the value parsers
    stay free of I/O.
    """
    direct = env.get("HP_SHARED_KEY", "")
    path = strip_quotes(env.get("HP_SHARED_KEY_FILE", "").strip())
    if direct and path:
        raise ConfigError(
            "HP_SHARED_KEY", direct, "set only one of HP_SHARED_KEY and HP_SHARED_KEY_FILE",
            secret=True,
        )
    if direct:
        return check_shared_key("HP_SHARED_KEY", direct, None)
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
    return check_shared_key("HP_SHARED_KEY_FILE", text, path)


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
    #: ``HP_REDIS_URL``, parsed; ``None`` = state in memory.
    redis_url: RedisURL | None = field(repr=False)
    #: ``HP_WORKERS``: serving processes; 1 = everything in this one process.
    workers: int = 1
    #: ``HP_HTTP2``: offer HTTP/2 (ALPN ``h2``) on the HTTPS frontend.
    http2: bool = True
    #: Non-fatal remarks made while parsing (e.g. host bits masked in a CIDR).
    warnings: tuple[str, ...] = ()
    #: ``HP_K8S_*``: the Kubernetes backend (docs/kubernetes.md).
    k8s: K8sSettings = field(default_factory=K8sSettings)

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
        nc_url = parse_nc_url(env.get("NC_INSTANCE_URL", ""))

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
            frp_disable_tls=parse_bool("HP_FRP_DISABLE_TLS", get("HP_FRP_DISABLE_TLS", "false")),
            frp_cert_validity_days=parse_int(
                "HP_FRP_CERT_VALIDITY_DAYS", get("HP_FRP_CERT_VALIDITY_DAYS", "5000"), 1, 36500
            ),
            trusted_proxies=tuple(trusted),
            log_level=log_level,
            verbose_start=parse_bool("HP_VERBOSE_START", get("HP_VERBOSE_START", "1")),
            session_lifetime=parse_float(
                "HP_SESSION_LIFETIME", get("HP_SESSION_LIFETIME", "3"), 0, 10
            ),
            blacklist_count=parse_int(
                "HP_BLACKLIST_COUNT", get("HP_BLACKLIST_COUNT", "10"), 1, 1_000_000
            ),
            blacklist_window=parse_int(
                "HP_BLACKLIST_WINDOW", get("HP_BLACKLIST_WINDOW", "300"), 1, 30 * 86400
            ),
            max_connections=parse_int(
                "HP_MAX_CONNECTIONS", get("HP_MAX_CONNECTIONS", "8192"), 1, 1_000_000
            ),
            timeout_connect=connect,
            timeout_client=client,
            timeout_server=server_timeout,
            timeout_tunnel=tunnel_timeout,
            certs_dir=Path(certs_dir),
            docker_socket=Path(docker_socket),
            redis_url=parse_redis_url(env.get("HP_REDIS_URL", "")),
            workers=_workers(get("HP_WORKERS", "")),
            http2=parse_bool("HP_HTTP2", get("HP_HTTP2", "true")),
            warnings=tuple(warnings),
            k8s=parse_k8s_settings(env),
        )

    def describe(self) -> list[tuple[str, str]]:
        """The effective configuration, secrets redacted, for ``HP_VERBOSE_START``."""

        def seconds(value: float | None) -> str:
            return "unlimited" if value is None else f"{value:g}s"

        return [
            ("HP_SHARED_KEY", REDACTED),
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
            ("HP_REDIS_URL", self.redis_url.redacted if self.redis_url else "(in memory)"),
            ("HP_WORKERS", str(self.workers)),
            ("HP_HTTP2", str(self.http2).lower()),
            *self.k8s.describe(),
        ]


def _workers(raw: str) -> int:
    """``HP_WORKERS``; unset or empty = :func:`available_cpus`."""
    if not raw:
        return available_cpus()
    return parse_int("HP_WORKERS", raw, 1, MAX_WORKERS)
