"""The bodies AppAPI sends to ``/k8s/exapp/*``, validated (pure, no I/O).

Every body names the app as the Docker endpoints do (``{name, instance_id:"",
[role_suffix]}``, :class:`~harp.docker.names.ExAppName`, whose alphabet check keeps
every derived name safe inside API URLs); ``remove`` and ``install_certificates`` take the
Docker payloads unchanged.  ``create`` differs from Docker's: ``image`` (or ``image_id``)
and resource limits that may also be Kubernetes quantity strings.  ``expose`` has its own
options (docs/kubernetes.md#expose).  Errors are :class:`~harp.docker.names.PayloadError`
with the reference's ``Payload validation error: …`` wording (→ 400).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from harp.docker.names import (
    COMPUTE_DEVICES,
    ExAppName,
    _invalid,
    _list,
    _string,
    valid_image_ref,
)

EXPOSE_TYPES: Final = ("clusterip", "nodeport", "loadbalancer", "manual")
NODE_ADDRESS_TYPES: Final = ("InternalIP", "ExternalIP")
TRAFFIC_POLICIES: Final = ("Cluster", "Local")
NODE_PORTS: Final = range(30000, 32768)
#: A Kubernetes quantity for memory/cpu given as a string (``512Mi``, ``500m``).
_QUANTITY_RE: Final = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,6})?(?:[KMGTPE]i|[mkMGTPE])?")
#: An upstream host: a DNS name or an IP literal (a bracketed IPv6 too), nothing else.
_HOST_RE: Final = re.compile(r"\[?[A-Za-z0-9._:-]{1,253}\]?")
#: Label/annotation keys and values and label selectors, as the API will judge them;
#: here only what could not be one at all is refused (control characters, size).
_TEXT_RE: Final = re.compile(r"[^\x00-\x1f\x7f]{0,4096}")


@dataclass(frozen=True, slots=True)
class CreateSpec:
    """``/k8s/exapp/create``: unknown keys (``network_mode``, ``mount_points``…) ignored."""

    exapp: ExAppName
    image: str
    environment: tuple[str, ...]
    compute_device: str
    #: Bytes (int) or a quantity string; None = no limit.
    memory: int | str | None
    #: ``nanoCPUs`` (int) or a ``cpu`` quantity string; None = no limit.
    cpu: int | str | None
    mount_points: int

    @classmethod
    def parse(cls, payload: dict[str, Any]) -> CreateSpec:
        exapp = ExAppName.parse(payload)
        image = payload.get("image", payload.get("image_id"))  # AppAPI sends "image"
        if not (isinstance(image, str) and valid_image_ref(image)):
            raise _invalid("image", "field required: a valid image reference")
        env = _list(payload, "environment_variables")
        if not all(isinstance(item, str) for item in env):
            raise _invalid("environment_variables", "must be a list of strings")
        device = _string(payload, "compute_device", "cpu").lower()
        if device not in COMPUTE_DEVICES:
            raise _invalid("compute_device", "must be cpu, cuda or rocm")
        limits = payload.get("resource_limits") or {}
        if not isinstance(limits, dict):
            raise _invalid("resource_limits", "must be an object")
        cpu = _amount(limits, "nanoCPUs")
        if cpu is None:
            cpu = _amount(limits, "cpu")
        return cls(
            exapp, image, tuple(env), device, _amount(limits, "memory"), cpu,
            len(_list(payload, "mount_points")),
        )


def _amount(limits: dict[str, Any], field: str) -> int | str | None:
    """A limit as a positive int or a quantity string; null, 0 or "" mean unset."""
    value = limits.get(field)
    if value is None or isinstance(value, bool) or value == "":
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str) and _QUANTITY_RE.fullmatch(value.strip()):
        return value.strip()
    raise _invalid(f"resource_limits.{field}", "must be a number or a Kubernetes quantity")


class BadNodeChoice(ValueError):
    """A node choice value that ``expose`` would refuse; ``field`` names it."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field} {why}")
        self.field = field
        self.why = why


@dataclass(frozen=True, slots=True)
class NodeChoice:
    """Which node a NodePort upstream is reached on (docs/kubernetes.md#expose).

    One value for the three ``expose`` options, so that ``expose`` and every later
    re-discovery (which reads it back from the Service's annotations) choose alike.
    The default (Ready nodes, InternalIP, no filter) is what a Service without a
    recorded choice gets.
    """

    address_type: str = "InternalIP"
    node_name: str | None = None
    label_selector: str | None = None

    @classmethod
    def of(cls, address_type: object, node_name: object, label_selector: object) -> NodeChoice:
        """The choice from raw values (None or "" = unset): the one rule for a payload
        and for annotations read back; a value that breaks it raises :class:`BadNodeChoice`."""
        kind = _choice_text("node_address_type", address_type) or "InternalIP"
        if kind not in NODE_ADDRESS_TYPES:
            raise BadNodeChoice("node_address_type", "must be InternalIP or ExternalIP")
        return cls(kind, _choice_text("node_name", node_name),
                   _choice_text("node_label_selector", label_selector))


def valid_upstream_host(value: str) -> bool:
    """The one rule for an ``upstream_host``, in a payload and read back from a Service."""
    return _HOST_RE.fullmatch(value) is not None


def _choice_text(field: str, value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadNodeChoice(field, "must be a string")
    if not _TEXT_RE.fullmatch(value):
        raise BadNodeChoice(field, "must not contain control characters")
    return value


@dataclass(frozen=True, slots=True)
class ExposeSpec:
    """``/k8s/exapp/expose`` (docs/kubernetes.md#expose)."""

    exapp: ExAppName
    port: int
    expose_type: str
    upstream_host: str | None
    upstream_port: int | None
    service_port: int | None
    node_port: int | None
    external_traffic_policy: str | None
    load_balancer_ip: str | None
    service_annotations: dict[str, str]
    service_labels: dict[str, str]
    wait_timeout: float
    wait_interval: float
    node: NodeChoice

    @classmethod
    def parse(cls, payload: dict[str, Any]) -> ExposeSpec:
        exapp = ExAppName.parse(payload)
        port = _port(payload, "port")
        if port is None:
            raise _invalid("port", "field required (1-65535)")
        expose_type = _string(payload, "expose_type", "clusterip").lower()
        if expose_type not in EXPOSE_TYPES:
            raise _invalid("expose_type", "must be " + ", ".join(EXPOSE_TYPES))
        upstream_host = _optional(payload, "upstream_host")
        if upstream_host is not None and not valid_upstream_host(upstream_host):
            raise _invalid("upstream_host", "must be a host name or an IP address")
        if expose_type == "manual" and not upstream_host:
            raise _invalid("upstream_host", "is required when expose_type='manual'")
        node_port = _port(payload, "node_port")
        if node_port is not None and node_port not in NODE_PORTS:
            raise _invalid("node_port", "must be 30000-32767")
        policy = _optional(payload, "external_traffic_policy")
        if policy is not None and policy not in TRAFFIC_POLICIES:
            raise _invalid("external_traffic_policy", "must be Cluster or Local")
        try:
            node = NodeChoice.of(payload.get("node_address_type"), payload.get("node_name"),
                                 payload.get("node_label_selector"))
        except BadNodeChoice as exc:
            raise _invalid(exc.field, exc.why) from None
        return cls(
            exapp, port, expose_type, upstream_host,
            _port(payload, "upstream_port"), _port(payload, "service_port"), node_port,
            policy, _optional(payload, "load_balancer_ip"),
            _string_map(payload, "service_annotations"), _string_map(payload, "service_labels"),
            _seconds(payload, "wait_timeout_seconds", 60.0, 0.0, 600.0),
            _seconds(payload, "wait_interval_seconds", 1.0, 0.1, 10.0),
            node,
        )

    @property
    def app_id(self) -> str:
        return self.exapp.name.lower()


def _optional(payload: dict[str, Any], field: str) -> str | None:
    value = _string(payload, field, "")
    if not _TEXT_RE.fullmatch(value):
        raise _invalid(field, "must not contain control characters")
    return value or None


def _port(payload: dict[str, Any], field: str) -> int | None:
    value = payload.get(field)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _invalid(field, "must be an integer 1-65535")
    return value


def _seconds(payload: dict[str, Any], field: str, default: float, low: float,
             high: float) -> float:
    value = payload.get(field, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _invalid(field, f"must be a number from {low:g} to {high:g}")
    return float(value)


def _string_map(payload: dict[str, Any], field: str) -> dict[str, str]:
    value = payload.get(field) or {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _TEXT_RE.fullmatch(k + v)
        for k, v in value.items()
    ):
        raise _invalid(field, "must be an object of strings")
    return dict(value)

