"""``HP_K8S_*``: the Kubernetes backend's variables, parsed and validated once at start.

Same contract as every other variable (:mod:`harp.config.values`): a bad value raises
:class:`~harp.config.values.ConfigError`, which stops start-up with one line naming the
variable (exit code 2).  The reference accepts anything here and fails later, per call;
we check what can be checked without the cluster:

* ``HP_K8S_NAMESPACE`` and ``HP_K8S_STORAGE_CLASS`` are Kubernetes names (DNS-1123);
* ``HP_K8S_API_SERVER`` is an ``http(s)://`` URL (unset: the in-cluster
  ``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT``);
* ``HP_K8S_DEFAULT_STORAGE_SIZE`` is a Kubernetes quantity (``10Gi``);
* ``HP_K8S_HOST_ALIASES`` is ``host:ip[,host:ip…]`` with real IP addresses;
* the booleans accept true/false (1/0, yes/no, on/off), not "anything else is false".

The token is *not* read here: the file is re-read at every API call so that a rotated
service-account token is picked up (docs/kubernetes.md).  No I/O in this module.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from harp.config.values import REDACTED, ConfigError, parse_bool, split_url, strip_quotes

DEFAULT_NAMESPACE: Final = "nextcloud-exapps"
SA_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_TOKEN_FILE: Final = SA_DIR + "/token"
DEFAULT_CA_FILE: Final = SA_DIR + "/ca.crt"
DEFAULT_STORAGE_SIZE: Final = "10Gi"

#: A DNS-1123 label (namespace, Service and Deployment names): at most 63 characters.
_LABEL_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
#: A DNS-1123 subdomain (storage class, host alias names).
_SUBDOMAIN_RE: Final = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*"
)
_QUANTITY_RE: Final = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,6})?(?:Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
#: Bearer tokens are base64url JWTs or opaque tokens: printable, no spaces.
_TOKEN_RE: Final = re.compile(r"[\x21-\x7e]{1,16384}")

HostAliases = tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True, slots=True)
class K8sSettings:
    """What the Kubernetes backend was told; ``enabled=False`` means the endpoints say so."""

    enabled: bool = False
    namespace: str = DEFAULT_NAMESPACE
    #: ``""`` = not configured (the endpoints answer 503, ``/info`` says unreachable).
    api_server: str = ""
    #: ``HP_K8S_BEARER_TOKEN``: a static token, which wins over the file.
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = Path(DEFAULT_TOKEN_FILE)
    ca_file: Path | None = Path(DEFAULT_CA_FILE)
    #: Was ``HP_K8S_CA_FILE`` set explicitly?  Then it must load; the default may be absent.
    ca_file_explicit: bool = False
    verify_ssl: bool = True
    storage_class: str = ""
    storage_size: str = DEFAULT_STORAGE_SIZE
    #: ``(ip, (hostname, …))`` in the order first seen: the pods' ``hostAliases``.
    host_aliases: HostAliases = ()

    @property
    def https(self) -> bool:
        return self.api_server.startswith("https://")

    def describe(self) -> list[tuple[str, str]]:
        """The effective values for ``HP_VERBOSE_START`` (the token redacted)."""
        if not self.enabled:
            return [("HP_K8S_ENABLED", "false")]
        return [
            ("HP_K8S_ENABLED", "true"),
            ("HP_K8S_NAMESPACE", self.namespace),
            ("HP_K8S_API_SERVER", self.api_server or "(not configured)"),
            ("HP_K8S_BEARER_TOKEN", REDACTED if self.token else "(none)"),
            ("HP_K8S_BEARER_TOKEN_FILE", str(self.token_file or "(none)")),
            ("HP_K8S_CA_FILE", str(self.ca_file or "(none)")),
            ("HP_K8S_VERIFY_SSL", str(self.verify_ssl).lower()),
            ("HP_K8S_STORAGE_CLASS", self.storage_class or "(cluster default)"),
            ("HP_K8S_DEFAULT_STORAGE_SIZE", self.storage_size),
            ("HP_K8S_HOST_ALIASES", ",".join(
                f"{name}:{ip}" for ip, names in self.host_aliases for name in names
            ) or "(none)"),
        ]


def parse_k8s_settings(env: Mapping[str, str]) -> K8sSettings:
    """Every ``HP_K8S_*`` variable, validated (also when the backend is off: a typo in
    a variable an operator set is worth knowing about before it is switched on)."""

    def get(name: str, default: str = "") -> str:
        return strip_quotes(env.get(name, default).strip())

    enabled = parse_bool("HP_K8S_ENABLED", get("HP_K8S_ENABLED", "false"))
    namespace = get("HP_K8S_NAMESPACE", DEFAULT_NAMESPACE)
    if not _LABEL_RE.fullmatch(namespace):
        raise ConfigError(
            "HP_K8S_NAMESPACE", env.get("HP_K8S_NAMESPACE"),
            "expected a Kubernetes namespace name (lower-case letters, digits and '-', "
            "at most 63 characters)",
        )
    token = env.get("HP_K8S_BEARER_TOKEN", "").strip()
    if token and not _TOKEN_RE.fullmatch(token):
        raise ConfigError(
            "HP_K8S_BEARER_TOKEN", token, "the token may contain only printable ASCII "
            "characters without spaces", secret=True,
        )
    token_file = get("HP_K8S_BEARER_TOKEN_FILE", DEFAULT_TOKEN_FILE)
    ca_raw = get("HP_K8S_CA_FILE")
    storage_class = get("HP_K8S_STORAGE_CLASS")
    if storage_class and not _SUBDOMAIN_RE.fullmatch(storage_class):
        raise ConfigError(
            "HP_K8S_STORAGE_CLASS", storage_class,
            "expected a StorageClass name (lower-case DNS name) or empty for the default",
        )
    size = get("HP_K8S_DEFAULT_STORAGE_SIZE", DEFAULT_STORAGE_SIZE)
    if not _QUANTITY_RE.fullmatch(size) or not any(ch in "123456789" for ch in size):
        raise ConfigError(
            "HP_K8S_DEFAULT_STORAGE_SIZE", size,
            "expected a Kubernetes quantity greater than 0, e.g. 10Gi or 500Mi",
        )
    return K8sSettings(
        enabled=enabled,
        namespace=namespace,
        api_server=_api_server(env, get("HP_K8S_API_SERVER"), enabled),
        token=token or None,
        token_file=Path(token_file) if token_file else None,
        ca_file=Path(ca_raw or DEFAULT_CA_FILE),
        ca_file_explicit=bool(ca_raw),
        verify_ssl=parse_bool("HP_K8S_VERIFY_SSL", get("HP_K8S_VERIFY_SSL", "true")),
        storage_class=storage_class,
        storage_size=size,
        host_aliases=parse_host_aliases(get("HP_K8S_HOST_ALIASES")),
    )


def _api_server(env: Mapping[str, str], raw: str, enabled: bool) -> str:
    """``HP_K8S_API_SERVER``, else the in-cluster address; ``""`` when neither is set.

    The in-cluster variables are Kubernetes', not the operator's: they are only looked at
    when the backend is on, so a HaRP without it never stops because of them.
    """
    allowed = "expected the API server's URL, e.g. https://kubernetes.default.svc"
    var = "HP_K8S_API_SERVER"
    if not raw:
        host = env.get("KUBERNETES_SERVICE_HOST", "").strip()
        if not host or not enabled:
            return ""
        port = env.get("KUBERNETES_SERVICE_PORT", "").strip() or "443"
        var = "KUBERNETES_SERVICE_HOST"
        raw = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    split = split_url(raw)
    if split is None:
        raise ConfigError(var, raw, allowed + " (not a valid URL)")
    parts, port_number = split
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(var, raw, allowed + " (http:// or https://)")
    if port_number == 0 or parts.query or parts.fragment or parts.username:
        raise ConfigError(var, raw, allowed + " (a port 1-65535, no query or user)")
    return raw.rstrip("/")


def parse_host_aliases(raw: str) -> HostAliases:
    """``HP_K8S_HOST_ALIASES``: ``host:ip,host2:ip2`` → ``((ip, (host, …)), …)``.

    Split at the *first* colon (a hostname has none), so IPv6 addresses work; names for
    the same address are grouped, as ``hostAliases`` wants.
    """
    grouped: dict[str, list[str]] = {}
    for entry in raw.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, ip_text = entry.partition(":")
        name, ip_text = name.strip().lower(), ip_text.strip().strip("[]")
        try:
            ip = str(ipaddress.ip_address(ip_text))
        except ValueError:
            ip = ""
        if not sep or not ip or not _SUBDOMAIN_RE.fullmatch(name):
            raise ConfigError(
                "HP_K8S_HOST_ALIASES", raw,
                f"entry {entry[:80]!r}: expected hostname:ip[,hostname:ip…], "
                "e.g. nextcloud.local:10.0.0.5",
            )
        grouped.setdefault(ip, [])
        if name not in grouped[ip]:
            grouped[ip].append(name)
    return tuple((ip, tuple(names)) for ip, names in grouped.items())
