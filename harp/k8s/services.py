"""Where an exposed app is reached, read from Service, Node and Deployment objects (pure).

* ClusterIP → ``spec.clusterIP`` (``<svc>.<ns>.svc`` for a headless Service) : port;
* NodePort → a node's address : ``nodePort``, nodes Ready first, the wanted address type
  (InternalIP by default), then the other IP type, then Hostname; the node choice
  ``expose`` recorded on the Service (:func:`node_choice`) narrows and orders them;
* LoadBalancer → the first ingress ``ip`` or ``hostname`` : port;
* manual → the ``appapi.nextcloud.com/upstream-*`` annotations on the Deployment.

A Service that cannot give an upstream raises :class:`NoUpstream` with the message the
endpoint answers (503).
"""

from __future__ import annotations

from typing import Any

from harp.k8s.manifests import (
    ANNOTATION_EXPOSE_TYPE,
    ANNOTATION_NODE_ADDRESS_TYPE,
    ANNOTATION_NODE_LABEL_SELECTOR,
    ANNOTATION_NODE_NAME,
    ANNOTATION_UPSTREAM_HOST,
    ANNOTATION_UPSTREAM_PORT,
)
from harp.k8s.payloads import BadNodeChoice, NodeChoice, valid_upstream_host

Upstream = tuple[str, int]


class NoUpstream(Exception):
    """The objects do not say where the app is (yet)."""


class BadRecordedChoice(Exception):
    """A Service's recorded upstream host or node choice holds a value ``expose`` would
    refuse (edited by hand): the message names the annotation, for the log."""


def _first_port(service: dict[str, Any], key: str) -> int:
    ports = (service.get("spec") or {}).get("ports") or []
    value = ports[0].get(key) if ports and isinstance(ports[0], dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        what = "nodePort assigned" if key == "nodePort" else "port defined"
        raise NoUpstream(f"Service has no {what}.")
    return value


def service_port(service: dict[str, Any]) -> int:
    return _first_port(service, "port")


def node_port(service: dict[str, Any]) -> int:
    return _first_port(service, "nodePort")


def service_type(service: dict[str, Any]) -> str:
    return str((service.get("spec") or {}).get("type") or "ClusterIP")


def service_name(service: dict[str, Any]) -> str:
    return str((service.get("metadata") or {}).get("name") or "")


def cluster_address(service: dict[str, Any], namespace: str) -> str:
    """The ClusterIP (routable wherever kube-proxy is), else the in-cluster DNS name."""
    ip = (service.get("spec") or {}).get("clusterIP")
    if isinstance(ip, str) and ip and ip != "None":
        return ip
    return f"{service_name(service)}.{namespace}.svc"


def load_balancer_address(service: dict[str, Any]) -> str | None:
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    first = ingress[0] if ingress and isinstance(ingress[0], dict) else {}
    address = first.get("ip") or first.get("hostname")
    return str(address) if address else None


def _ready(node: dict[str, Any]) -> bool:
    return any(
        isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in (node.get("status") or {}).get("conditions") or []
    )


def node_address(nodes: list[Any], preferred: str = "InternalIP",
                 node_name: str | None = None) -> str:
    """The address of the node to reach a NodePort on (see the module docstring)."""
    items = [n for n in nodes if isinstance(n, dict)]
    if node_name:
        items = [n for n in items if (n.get("metadata") or {}).get("name") == node_name]
    if not items:
        raise NoUpstream("No Kubernetes nodes found (after filtering).")
    other = "ExternalIP" if preferred == "InternalIP" else "InternalIP"
    for node in [n for n in items if _ready(n)] or items:
        addresses = [a for a in (node.get("status") or {}).get("addresses") or []
                     if isinstance(a, dict) and a.get("address")]
        for kind in (preferred, other, "Hostname"):
            for address in addresses:
                if address.get("type") == kind:
                    return str(address["address"])
    raise NoUpstream("Could not determine a node address (no InternalIP/ExternalIP/Hostname).")


_CHOICE_ANNOTATIONS = {
    "node_address_type": ANNOTATION_NODE_ADDRESS_TYPE,
    "node_name": ANNOTATION_NODE_NAME,
    "node_label_selector": ANNOTATION_NODE_LABEL_SELECTOR,
}


def _annotations(service: dict[str, Any]) -> dict[str, Any]:
    annotations = (service.get("metadata") or {}).get("annotations") or {}
    if not isinstance(annotations, dict):
        raise BadRecordedChoice("metadata.annotations is not an object")
    return annotations


def recorded_host(service: dict[str, Any]) -> str | None:
    """The ``upstream_host`` an ``expose`` gave, recorded on its Service (None: none
    given, or a Service made before HaRP recorded it); checked by the payload's rule, a
    bad value raises :class:`BadRecordedChoice`."""
    value = _annotations(service).get(ANNOTATION_UPSTREAM_HOST)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not valid_upstream_host(value):
        raise BadRecordedChoice(f"{ANNOTATION_UPSTREAM_HOST} must be a host name or an "
                                "IP address")
    return value


def node_choice(service: dict[str, Any]) -> NodeChoice:
    """The node choice ``expose`` recorded on a Service; the default for one without
    (made by an older HaRP, or not by HaRP).  Checked by the payload's own rule
    (:meth:`NodeChoice.of`): a bad value raises :class:`BadRecordedChoice`."""
    annotations = _annotations(service)
    try:
        return NodeChoice.of(*(annotations.get(key) for key in _CHOICE_ANNOTATIONS.values()))
    except BadNodeChoice as exc:
        raise BadRecordedChoice(f"{_CHOICE_ANNOTATIONS[exc.field]} {exc.why}") from None


def manual_upstream(deployment: dict[str, Any]) -> Upstream | None:
    """The upstream a manual ``expose`` left on a Deployment, if any (and valid)."""
    annotations = (deployment.get("metadata") or {}).get("annotations") or {}
    if annotations.get(ANNOTATION_EXPOSE_TYPE) != "manual":
        return None
    host = annotations.get(ANNOTATION_UPSTREAM_HOST)
    port = str(annotations.get(ANNOTATION_UPSTREAM_PORT) or "")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return str(host), int(port)
