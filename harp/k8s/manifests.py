"""Names, labels and object bodies of an ExApp on Kubernetes (pure: payload in, dict out).

The names follow the Docker ones (``nc_app_[<instance>_]<name>[_<role>]``) made DNS-1123
safe by :func:`sanitize`; every role of an app gets its own Deployment (and Service) but
all roles share one PVC, mounted at the Docker volume's path ``/nc_app_<name>_data`` so the
ExApp's ``APP_PERSISTENT_STORAGE`` is the same on both backends.  Labels say which app a
resource is ``part-of``, so discovery and removal can find them (docs/kubernetes.md#behaviour).
"""

from __future__ import annotations

import re
from typing import Any, Final

from harp.docker.names import ExAppName
from harp.k8s.payloads import CreateSpec, ExposeSpec, NodeChoice
from harp.k8s.settings import HostAliases

MAX_NAME: Final = 63
_NOT_ALLOWED_RE: Final = re.compile(r"[^a-z0-9-]")
_DASHES_RE: Final = re.compile(r"-{2,}")

LABEL_APP: Final = "app"
LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_ROLE: Final = "app.kubernetes.io/role"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY_HARP: Final = "harp"

#: Which ExApp an object belongs to, unchanged (names collide; docs/kubernetes.md#behaviour).
ANNOTATION_EXAPP: Final = "appapi.nextcloud.com/exapp"
ANNOTATION_ROLE: Final = "appapi.nextcloud.com/role"
ANNOTATION_EXPOSE_TYPE: Final = "appapi.nextcloud.com/expose-type"
ANNOTATION_UPSTREAM_HOST: Final = "appapi.nextcloud.com/upstream-host"
ANNOTATION_UPSTREAM_PORT: Final = "appapi.nextcloud.com/upstream-port"
#: How ``expose`` reached the app, recorded on its Service and read back by re-discovery
#: (docs/kubernetes.md#routing): ``upstream-host`` (any type, when given; on a Deployment
#: it is the manual upstream instead) and a NodePort Service's node choice.
ANNOTATION_NODE_ADDRESS_TYPE: Final = "appapi.nextcloud.com/node-address-type"
ANNOTATION_NODE_NAME: Final = "appapi.nextcloud.com/node-name"
ANNOTATION_NODE_LABEL_SELECTOR: Final = "appapi.nextcloud.com/node-label-selector"

CONTAINER_NAME: Final = "app"
GPU_RESOURCES: Final = {"cuda": "nvidia.com/gpu", "rocm": "amd.com/gpu"}
SERVICE_TYPES: Final = {"clusterip": "ClusterIP", "nodeport": "NodePort",
                        "loadbalancer": "LoadBalancer"}
MIB: Final = 1024 * 1024
NANO: Final = 1_000_000_000


def sanitize(raw: str) -> str:
    """A DNS-1123 label from any string: lower case, ``_`` and others → ``-``, collapsed,
    trimmed, at most 63 characters, ``exapp`` if nothing is left."""
    name = _NOT_ALLOWED_RE.sub("-", raw.lower().replace("_", "-"))
    name = _DASHES_RE.sub("-", name).strip("-")
    return name[:MAX_NAME].rstrip("-") or "exapp"


def deployment_name(app: ExAppName) -> str:
    """The Deployment's (and a HaRP-made Service's) name: the container name, sanitized."""
    return sanitize(app.container)


def part_of(app: ExAppName) -> str:
    """The app without its role: what every role's resources are ``part-of``."""
    return sanitize(app.base)


def pvc_name(app: ExAppName) -> str:
    return sanitize(app.volume)


def app_names(app_id: str) -> tuple[str, str]:
    """(Service/Deployment name, ``part-of`` value) of a routed app id (no instance/role)."""
    exapp = ExAppName(app_id)
    return deployment_name(exapp), part_of(exapp)


def part_of_selector(value: str) -> str:
    return f"{LABEL_PART_OF}={value}"


def app_selector(app: ExAppName) -> str:
    """The pods of one Deployment (``wait_for_start``)."""
    return f"{LABEL_APP}={deployment_name(app)}"


def labels(app: ExAppName) -> dict[str, str]:
    """The labels of a Deployment, its pods and a Service."""
    name = deployment_name(app)
    out = {
        LABEL_APP: name,
        LABEL_NAME: name,
        LABEL_PART_OF: part_of(app),
        LABEL_COMPONENT: "exapp",
    }
    if app.instance_id:  # up to 128 characters of A-Za-z0-9_.-: not always a label value
        out[LABEL_INSTANCE] = sanitize(app.instance_id)
    if app.role_suffix:
        out[LABEL_ROLE] = sanitize(app.role_suffix)
    return out


def owner_annotations(app: ExAppName, with_role: bool = True) -> dict[str, str]:
    """The ExApp an object is made for, as given (not sanitized, so not cut or folded):
    what :mod:`harp.k8s.owners` compares.  Without the role for the PVC all roles share."""
    out = {ANNOTATION_EXAPP: app.base}
    if with_role and app.role_suffix:
        out[ANNOTATION_ROLE] = app.role_suffix
    return out


def pvc(app: ExAppName, size: str, storage_class: str) -> dict[str, Any]:
    """The app's one data volume, shared by all its roles (hence no ``app`` label)."""
    base = part_of(app)
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": size}},
    }
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": pvc_name(app),
            "labels": {LABEL_NAME: base, LABEL_PART_OF: base, LABEL_COMPONENT: "exapp-data"},
            "annotations": owner_annotations(app, with_role=False),
        },
        "spec": spec,
    }


def environment(variables: tuple[str, ...]) -> list[dict[str, str]]:
    """``K=V`` strings as container ``env`` entries (no ``=``: the name with "")."""
    out = []
    for item in variables:
        if item:
            name, _, value = item.partition("=")
            out.append({"name": name, "value": value})
    return out


def resources(spec: CreateSpec) -> dict[str, Any]:
    """Requests equal to limits for CPU and memory; a GPU only as a limit."""
    limits: dict[str, str] = {}
    memory, cpu = spec.memory, spec.cpu
    if memory is not None:
        limits["memory"] = f"{-(-memory // MIB)}Mi" if isinstance(memory, int) else memory
    if cpu is not None:
        limits["cpu"] = f"{max(1, -(-cpu * 1000 // NANO))}m" if isinstance(cpu, int) else cpu
    requests = dict(limits)
    gpu = GPU_RESOURCES.get(spec.compute_device)
    if gpu is not None:
        limits[gpu] = "1"
    out: dict[str, Any] = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def deployment(spec: CreateSpec, host_aliases: HostAliases) -> dict[str, Any]:
    """The app's Deployment, created with 0 replicas: ``start`` scales it to 1."""
    app = spec.exapp
    name = deployment_name(app)
    app_labels = labels(app)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "env": environment(spec.environment),
        "volumeMounts": [{"name": "data", "mountPath": f"/{app.volume}"}],
    }
    limits = resources(spec)
    if limits:
        container["resources"] = limits
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": pvc_name(app)}}],
    }
    if host_aliases:
        pod["hostAliases"] = [
            {"ip": ip, "hostnames": list(names)} for ip, names in host_aliases
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": app_labels,
                     "annotations": owner_annotations(app)},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {LABEL_APP: name}},
            "template": {"metadata": {"labels": app_labels}, "spec": pod},
        },
    }


def replicas_patch(count: int) -> dict[str, Any]:
    return {"spec": {"replicas": count}}


def manual_patch(host: str, port: int) -> dict[str, Any]:
    """``expose`` manual: where the app is, kept on its Deployment for re-discovery."""
    return {"metadata": {"annotations": {
        ANNOTATION_EXPOSE_TYPE: "manual",
        ANNOTATION_UPSTREAM_HOST: host,
        ANNOTATION_UPSTREAM_PORT: str(port),
    }}}


def node_choice_annotations(choice: NodeChoice) -> dict[str, str | None]:
    """The node choice as annotations, every key present: None for an unset option, so
    that as a merge patch it also removes what an earlier ``expose`` recorded."""
    return {
        ANNOTATION_NODE_ADDRESS_TYPE: choice.address_type,
        ANNOTATION_NODE_NAME: choice.node_name,
        ANNOTATION_NODE_LABEL_SELECTOR: choice.label_selector,
    }


def reach_annotations(spec: ExposeSpec, kind: str) -> dict[str, str | None]:
    """What ``expose`` records on a Service of type ``kind`` so that re-discovery reaches
    the app as it did: an explicit ``upstream_host`` (it wins over any address the Service
    gives), and for a NodePort Service the node choice.  Every key present, None for unset
    (see :func:`node_choice_annotations`)."""
    out: dict[str, str | None] = {ANNOTATION_UPSTREAM_HOST: spec.upstream_host}
    if kind == "NodePort":
        out.update(node_choice_annotations(spec.node))
    return out


def reach_patch(spec: ExposeSpec, kind: str) -> dict[str, Any]:
    """``expose`` on an existing Service (409): what it records there replaced."""
    return {"metadata": {"annotations": reach_annotations(spec, kind)}}


def service(spec: ExposeSpec) -> dict[str, Any]:
    """The Service ``expose`` creates (``managed-by=harp``: ``remove`` may delete it).

    The caller's ``service_labels`` come first: HaRP's own labels win, since discovery and
    ``remove`` find Services by them (``part-of`` of another app would route that app here,
    docs/kubernetes.md#routing).  The Service carries :func:`reach_annotations` (after
    the operator's own, which cannot override them), so a re-discovery reaches the host
    or node ``expose`` answered with.
    """
    app = spec.exapp
    name = deployment_name(app)
    kind = SERVICE_TYPES[spec.expose_type]
    service_labels = {**spec.service_labels, **labels(app), LABEL_MANAGED_BY: MANAGED_BY_HARP}
    metadata: dict[str, Any] = {"name": name, "labels": service_labels}
    annotations = {k: v for k, v in spec.service_annotations.items()
                   if k not in (ANNOTATION_EXAPP, ANNOTATION_ROLE)}  # HaRP's alone
    recorded = reach_annotations(spec, kind)
    annotations.update({k: v for k, v in recorded.items() if v is not None})
    annotations.update(owner_annotations(app))
    metadata["annotations"] = annotations
    port: dict[str, Any] = {
        "name": "http", "port": spec.service_port or spec.port, "targetPort": spec.port,
    }
    if kind == "NodePort" and spec.node_port:
        port["nodePort"] = spec.node_port
    body: dict[str, Any] = {"type": kind, "selector": {LABEL_APP: name}, "ports": [port]}
    if spec.external_traffic_policy and kind != "ClusterIP":
        body["externalTrafficPolicy"] = spec.external_traffic_policy
    if kind == "LoadBalancer" and spec.load_balancer_ip:
        body["loadBalancerIP"] = spec.load_balancer_ip
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": body}
