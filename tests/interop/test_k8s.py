"""The Kubernetes backend against an emulated API server, driven as AppAPI drives it.

Peers: a real ``twistd harp`` with ``HP_K8S_*`` set, kmock's Kubernetes emulator over
HTTPS with its own CA (tests/peers/kube.py; the tests play controller and kubelet), the
fake Nextcloud, and a real nc_py_api ExApp listening on 127.0.0.1 at a port inside the
NodePort range — so every expose type (the Service's clusterIP, a node's address, a
LoadBalancer ingress, a manual upstream) can point at it, and a request through HaRP must
reach it.  Bodies are the ones AppAPI sends (docs/kubernetes.md).
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.interop.conftest import ok, record_for, request, start_harp
from tests.peers.exapp_runner import ExAppProcess
from tests.peers.fake_nextcloud import FakeNextcloud
from tests.peers.harp import HarpProcess, base_env, new_key, run_harp_once
from tests.peers.kube import RUNNING_READY, KubeAPI, free_node_port, image_error, write_tls

pytestmark = pytest.mark.interop

APP = "k8s-test-exapp"
DEPLOY = "nc-app-k8s-test-exapp"
NS = "nextcloud-exapps"
IMAGE = "ghcr.io/nextcloud/app-skeleton-python:latest"
#: What HaRP records on every object it makes for the app (docs/kubernetes.md#behaviour).
OWNER = {"appapi.nextcloud.com/exapp": "nc_app_" + APP}


@pytest.fixture(scope="module")
def app_id() -> str:
    return APP


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return write_tls(tmp_path_factory.mktemp("kube-tls"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sa") / "token"
    path.write_text("first-token-" + new_key() + "\n")
    return path


@pytest.fixture(scope="module")
def kube(tls: tuple[Path, Path, Path], token_file: Path) -> Iterator[KubeAPI]:
    with KubeAPI(token_file.read_text().strip(), tls=(tls[1], tls[2])) as api:
        yield api


@pytest.fixture(scope="module")
def exapp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExAppProcess]:
    log = tmp_path_factory.mktemp("exapp") / "exapp.log"
    with ExAppProcess(app_id=APP, port=free_node_port(), log_path=log) as app:
        yield app


@pytest.fixture(scope="module")
def nextcloud(nextcloud: FakeNextcloud, exapp: ExAppProcess) -> FakeNextcloud:
    # What AppAPI stores for a Kubernetes app: direct mode, the app id as the host.
    nextcloud.apps[APP] = record_for(exapp, host=APP)
    return nextcloud


@pytest.fixture(scope="module")
def harp_settings(kube: KubeAPI, token_file: Path, tls: tuple[Path, Path, Path]) -> dict[
        str, str]:
    return {
        "HP_K8S_ENABLED": "true", "HP_K8S_API_SERVER": kube.url,
        "HP_K8S_BEARER_TOKEN_FILE": str(token_file), "HP_K8S_CA_FILE": str(tls[0]),
        "HP_K8S_STORAGE_CLASS": "fast", "HP_K8S_DEFAULT_STORAGE_SIZE": "2Gi",
        "HP_K8S_HOST_ALIASES": "cloud.local:10.0.0.5,files.local:10.0.0.5",
    }


def call(harp: HarpProcess, key: str, endpoint: str, body: Any, method: str = "POST") -> Any:
    """One AppAPI call: its Guzzle client's headers (key, Basic auth, no engine port)."""
    basic = base64.b64encode(f"app_api_haproxy_user:{key}".encode()).decode()
    headers = {"harp-shared-key": key, "Authorization": f"Basic {basic}",
               "Content-Type": "application/json"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return ok(request(harp.http_port, f"/exapps/app_api{endpoint}", headers, method,
                      None if body is None else data))


def k8s(harp: HarpProcess, key: str, op: str, **fields: Any) -> Any:
    return call(harp, key, f"/k8s/exapp/{op}", {"name": APP, "instance_id": "", **fields})


def info(harp: HarpProcess, key: str) -> dict[str, Any]:
    response = call(harp, key, "/info", None, "GET")
    assert response.status == 200
    kubernetes: dict[str, Any] = response.json()["kubernetes"]
    return kubernetes


def wait_for(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def public(harp: HarpProcess) -> Any:
    return request(harp.http_port, f"/exapps/{APP}/public")


EXPOSE_DEFAULTS = {"upstream_host": None, "node_port": None, "external_traffic_policy": None,
                   "load_balancer_ip": None, "node_address_type": "InternalIP"}


def expose(harp: HarpProcess, key: str, port: int, expose_type: str, **fields: Any) -> Any:
    return k8s(harp, key, "expose", port=port, expose_type=expose_type,
               **{**EXPOSE_DEFAULTS, **fields})


# --- /info and the lifecycle


def test_info_reports_the_cluster(harp: HarpProcess, key: str, kube: KubeAPI) -> None:
    assert info(harp, key) == {"enabled": True, "api_server": kube.url, "reachable": True}


def test_lifecycle_with_appapi_payloads(harp: HarpProcess, key: str, kube: KubeAPI) -> None:
    assert k8s(harp, key, "exists").json() == {"exists": False}
    created = k8s(
        harp, key, "create", image=IMAGE, compute_device="cuda",
        environment_variables=["APP_ID=" + APP, "APP_PORT=23000", "NO_VALUE"],
        resource_limits={"memory": 536870913, "nanoCPUs": 1500000000},
    )
    assert (created.status, created.json()) == (201, {"name": DEPLOY})
    pvc = kube.get("v1/persistentvolumeclaims", "nc-app-k8s-test-exapp-data")
    assert pvc is not None
    assert pvc["metadata"]["labels"] == {
        "app.kubernetes.io/name": DEPLOY, "app.kubernetes.io/part-of": DEPLOY,
        "app.kubernetes.io/component": "exapp-data"}
    assert pvc["spec"] == {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                           "resources": {"requests": {"storage": "2Gi"}}}
    deployment = kube.get("apps/v1/deployments", DEPLOY)
    assert deployment is not None
    assert deployment["spec"]["replicas"] == 0
    assert deployment["metadata"]["labels"]["app.kubernetes.io/part-of"] == DEPLOY
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == IMAGE and container["imagePullPolicy"] == "IfNotPresent"
    assert container["env"] == [{"name": "APP_ID", "value": APP},
                                {"name": "APP_PORT", "value": "23000"},
                                {"name": "NO_VALUE", "value": ""}]
    assert container["resources"] == {
        "limits": {"memory": "513Mi", "cpu": "1500m", "nvidia.com/gpu": "1"},
        "requests": {"memory": "513Mi", "cpu": "1500m"}}
    assert container["volumeMounts"] == [{"name": "data",
                                          "mountPath": "/nc_app_k8s-test-exapp_data"}]
    assert pod["hostAliases"] == [{"ip": "10.0.0.5", "hostnames": ["cloud.local",
                                                                   "files.local"]}]
    again = k8s(harp, key, "create", image=IMAGE, compute_device="cpu")
    assert again.status == 409
    assert k8s(harp, key, "exists").json() == {"exists": True}

    for _ in range(2):  # idempotent: no Docker-style 200 "already started"
        assert k8s(harp, key, "start").status == 204
    assert kube.get("apps/v1/deployments", DEPLOY)["spec"]["replicas"] == 1  # type: ignore[index]
    patches = [h for m, p, h in kube.requests() if m == "PATCH"]
    assert patches and all(
        h["Content-Type"] == "application/strategic-merge-patch+json" for h in patches)

    # Another app's broken pod is not ours (label selector app=<deployment>).
    kube.add_pod("nc-app-other", "other-app-pod", image_error())
    kube.add_pod(DEPLOY, "app-pod", RUNNING_READY)
    waited = k8s(harp, key, "wait_for_start")
    assert waited.json() == {"started": True, "status": "running", "health": "ready",
                             "reason": None, "message": None}
    assert k8s(harp, key, "install_certificates", system_certs_bundle=None,
               install_frp_certs=False).status == 204
    for _ in range(2):
        assert k8s(harp, key, "stop").status == 204
    assert kube.get("apps/v1/deployments", DEPLOY)["spec"]["replicas"] == 0  # type: ignore[index]

    assert k8s(harp, key, "remove", remove_data=False).status == 204
    assert kube.get("apps/v1/deployments", DEPLOY) is None
    assert kube.get("v1/persistentvolumeclaims", "nc-app-k8s-test-exapp-data") is not None
    assert k8s(harp, key, "remove", remove_data=True).status == 204
    assert kube.get("v1/persistentvolumeclaims", "nc-app-k8s-test-exapp-data") is None
    assert k8s(harp, key, "start").status == 404


def test_wait_for_start_reports_an_image_error(harp: HarpProcess, key: str,
                                               kube: KubeAPI) -> None:
    kube.add_pod("nc-app-broken", "broken-pod", image_error("ImagePullBackOff", "back-off"))
    waited = call(harp, key, "/k8s/exapp/wait_for_start", {"name": "broken", "instance_id": ""})
    assert waited.json() == {"started": False, "status": "ImagePullBackOff",
                             "health": "image_error", "reason": "ImagePullBackOff",
                             "message": "back-off"}
    kube.add_pod("nc-app-done", "done-pod", {"phase": "Failed", "reason": "Error"})
    failed = call(harp, key, "/k8s/exapp/wait_for_start", {"name": "done", "instance_id": ""})
    assert failed.json() == {"started": False, "status": "Failed", "health": "not_ready",
                             "reason": "Error", "message": None}


def test_wait_for_start_without_a_deployment_answers_at_once(
        harp: HarpProcess, key: str, kube: KubeAPI) -> None:
    """No pod and no Deployment: nothing will ever start, so the answer comes now (the
    reference polls for an hour) in the usual shape; a pod without a Deployment is still
    judged as before."""
    waited = call(harp, key, "/k8s/exapp/wait_for_start", {"name": "never-created",
                                                            "instance_id": ""})
    assert waited.status == 200
    assert waited.json() == {"started": False, "status": "NotFound", "health": "not_ready",
                             "reason": "NotFound",
                             "message": "Deployment 'nc-app-never-created' not found."}
    calls = [(m, p) for m, p, _ in kube.requests() if "never-created" in p]
    assert calls[-1] == ("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/"
                                "nc-app-never-created")


def test_colliding_names_are_refused_and_leave_the_owner_alone(
        harp: HarpProcess, key: str, kube: KubeAPI) -> None:
    """Two app ids that share their first 60 characters get one Kubernetes name (cut to
    63, as the reference does): the second app's operations are refused with 409 before
    they change anything, and its requests are never routed to the first app's Service."""
    first, second = "c" * 60 + "-first", "c" * 60 + "-second"
    name = ("nc-app-" + "c" * 60)[:63]

    def op(app: str, endpoint: str, **fields: Any) -> Any:
        return call(harp, key, f"/k8s/exapp/{endpoint}",
                    {"name": app, "instance_id": "", **fields})

    assert op(first, "create", image=IMAGE).status == 201
    assert op(first, "expose", port=8080, expose_type="clusterip").status in (200, 404)
    before = (kube.get("apps/v1/deployments", name), kube.get("v1/services", name),
              kube.get("v1/persistentvolumeclaims", name))
    assert all(before)
    try:
        for endpoint, fields in (("exists", {}), ("create", {"image": IMAGE}),
                                 ("start", {}), ("stop", {}), ("wait_for_start", {}),
                                 ("expose", {"port": 8080, "expose_type": "clusterip"}),
                                 ("expose", {"port": 8080, "expose_type": "manual",
                                             "upstream_host": "127.0.0.1"}),
                                 ("remove", {"remove_data": True})):
            refused = op(second, endpoint, **fields)
            assert refused.status == 409, (endpoint, refused.status, refused.body)
            assert f"belongs to ExApp 'nc_app_{first}'".encode() in refused.body
        after = (kube.get("apps/v1/deployments", name), kube.get("v1/services", name),
                 kube.get("v1/persistentvolumeclaims", name))
        assert after == before
        assert op(first, "exists").json() == {"exists": True}
    finally:
        assert op(first, "remove", remove_data=True).status == 204
    assert kube.get("apps/v1/deployments", name) is None


def test_bad_payloads_are_400(harp: HarpProcess, key: str) -> None:
    assert call(harp, key, "/k8s/exapp/exists", b"{nope").body == b"Invalid JSON body"
    missing = call(harp, key, "/k8s/exapp/create", {"name": APP})
    assert missing.status == 400 and missing.body.startswith(b"Payload validation error")
    manual = k8s(harp, key, "expose", port=80, expose_type="manual")
    assert manual.status == 400 and b"upstream_host" in manual.body


# --- expose and routing


@pytest.fixture
def deployed(harp: HarpProcess, key: str, kube: KubeAPI) -> Iterator[None]:
    """The app created and started, its pod Ready; removed (Service too) afterwards."""
    assert k8s(harp, key, "create", image=IMAGE, compute_device="cpu").status == 201
    assert k8s(harp, key, "start").status == 204
    kube.add_pod(DEPLOY, "app-pod", RUNNING_READY)
    yield
    assert k8s(harp, key, "remove", remove_data=True).status == 204
    call(harp, key, f"/exapp_storage/{APP}", None, "DELETE")


def test_clusterip_expose_routes_and_survives_a_push(
    harp: HarpProcess, key: str, kube: KubeAPI, exapp: ExAppProcess, nextcloud: FakeNextcloud,
    deployed: None,
) -> None:
    exposed = expose(harp, key, exapp.port, "clusterip")
    assert exposed.json() == {"appId": APP, "host": "127.0.0.1", "port": exapp.port,
                              "exposeType": "clusterip", "serviceName": DEPLOY,
                              "namespace": NS}
    service = kube.get("v1/services", DEPLOY)
    assert service is not None
    assert service["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "harp"
    assert service["spec"]["ports"] == [{"name": "http", "port": exapp.port,
                                         "targetPort": exapp.port}]
    assert ok(public(harp)).json()["route"] == "public"
    # AppAPI's push on enable names the app id as the host (reference #101): HaRP keeps
    # the Kubernetes upstream.
    pushed = call(harp, key, f"/exapp_storage/{APP}", record_for(exapp, host=APP))
    assert pushed.status == 204
    assert ok(public(harp)).status == 200
    # A cache miss (the record dropped) re-discovers the Service.
    assert call(harp, key, f"/exapp_storage/{APP}", None, "DELETE").status == 204
    assert ok(public(harp)).status == 200
    assert nextcloud.count("exapp-meta") >= 2


def test_nodeport_expose_routes_through_a_node(
    harp: HarpProcess, key: str, kube: KubeAPI, exapp: ExAppProcess, deployed: None,
) -> None:
    kube.add_node("not-ready", [("InternalIP", "192.0.2.1")], ready=False)
    kube.add_node("worker-1", [("Hostname", "worker-1"), ("ExternalIP", "127.0.0.1")])
    exposed = expose(harp, key, 8080, "nodeport", node_port=exapp.port,
                     external_traffic_policy="Local")
    assert exposed.json()["host"] == "127.0.0.1" and exposed.json()["port"] == exapp.port
    spec = kube.get("v1/services", DEPLOY)["spec"]  # type: ignore[index]
    assert spec["type"] == "NodePort" and spec["externalTrafficPolicy"] == "Local"
    assert ok(public(harp)).status == 200
    assert call(harp, key, f"/exapp_storage/{APP}", None, "DELETE").status == 204
    assert ok(public(harp)).status == 200


def _reached_after_cache_miss_and_restart(
    tmp_path: Path, harp: HarpProcess, key: str, nextcloud: FakeNextcloud,
    harp_settings: dict[str, str],
) -> None:
    """Rediscovery: after a cache miss in this HaRP, and in a fresh HaRP, the app answers."""
    assert call(harp, key, f"/exapp_storage/{APP}", None, "DELETE").status == 204
    assert ok(public(harp)).status == 200
    fresh = start_harp(tmp_path, key, nextcloud, HP_WORKERS="1", **harp_settings)
    try:
        assert ok(public(fresh)).status == 200
    finally:
        fresh.stop()


def test_nodeport_rediscovery_keeps_the_chosen_node(
    tmp_path: Path, harp: HarpProcess, key: str, kube: KubeAPI, exapp: ExAppProcess,
    nextcloud: FakeNextcloud, harp_settings: dict[str, str], deployed: None,
) -> None:
    """``expose`` on the second of two nodes; after a cache miss, and in a fresh HaRP,
    requests still go to that node, not to the first one (the default choice).

    The ExApp listens on 127.0.0.1 only, so the first node's address (127.0.0.2, also
    loopback on Linux) refuses the NodePort: a request reaches the app only through the
    node ``expose`` chose."""
    kube.remove_nodes()
    kube.add_node("node-a", [("InternalIP", "127.0.0.2")])
    kube.add_node("node-b", [("InternalIP", "127.0.0.1")])
    try:
        exposed = expose(harp, key, 8080, "nodeport", node_port=exapp.port,
                         node_name="node-b")
        assert (exposed.json()["host"], exposed.json()["port"]) == ("127.0.0.1", exapp.port)
        service = kube.get("v1/services", DEPLOY)
        assert service is not None
        assert service["metadata"]["annotations"] == {
            **OWNER, "appapi.nextcloud.com/node-address-type": "InternalIP",
            "appapi.nextcloud.com/node-name": "node-b"}
        assert ok(public(harp)).status == 200
        _reached_after_cache_miss_and_restart(tmp_path, harp, key, nextcloud, harp_settings)

        # Control: the Service as an older HaRP made it (nothing recorded) gets the
        # default node, which has nothing at the NodePort: connect refused is 503 (an
        # upstream that could not be found would be 404).
        kube.patch("v1/services", DEPLOY, {"metadata": {"annotations": {
            "appapi.nextcloud.com/node-address-type": None,
            "appapi.nextcloud.com/node-name": None}}})
        assert call(harp, key, f"/exapp_storage/{APP}", None, "DELETE").status == 204
        assert ok(public(harp)).status == 503
        # Exposing again on the existing Service (409) records the new choice on it, once
        # the choice gives a node (a failed expose leaves the Service as it was).
        failed = expose(harp, key, 8080, "nodeport", node_label_selector="pool=b")
        assert failed.status == 503  # no node carries that label
        assert kube.get("v1/services", DEPLOY)["metadata"]["annotations"] == OWNER  # type: ignore[index]
        again = expose(harp, key, 8080, "nodeport", node_name="node-b")
        assert again.json()["host"] == "127.0.0.1"
        assert kube.get("v1/services", DEPLOY)["metadata"]["annotations"] == {  # type: ignore[index]
            **OWNER, "appapi.nextcloud.com/node-address-type": "InternalIP",
            "appapi.nextcloud.com/node-name": "node-b"}
        assert call(harp, key, f"/exapp_storage/{APP}", None, "DELETE").status == 204
        assert ok(public(harp)).status == 200
    finally:
        kube.remove_nodes()


def test_nodeport_rediscovery_keeps_the_given_upstream_host(
    tmp_path: Path, harp: HarpProcess, key: str, kube: KubeAPI, exapp: ExAppProcess,
    nextcloud: FakeNextcloud, harp_settings: dict[str, str], deployed: None,
) -> None:
    """``expose`` nodeport with an ``upstream_host`` (an edge address in front of the
    nodes); after a cache miss, and in a fresh HaRP, requests still go to that host, not to
    the default node.

    The only node's address (127.0.0.2) refuses the NodePort, as in the node-choice test
    above: a request reaches the app only through the host ``expose`` was given."""
    kube.remove_nodes()
    kube.add_node("node-a", [("InternalIP", "127.0.0.2")])
    host_key = "appapi.nextcloud.com/upstream-host"
    try:
        exposed = expose(harp, key, 8080, "nodeport", node_port=exapp.port,
                         upstream_host="127.0.0.1",
                         service_annotations={host_key: "203.0.113.7"})
        assert (exposed.json()["host"], exposed.json()["port"]) == ("127.0.0.1", exapp.port)
        service = kube.get("v1/services", DEPLOY)
        assert service is not None  # HaRP's value wins over the operator's annotation
        assert service["metadata"]["annotations"] == {
            **OWNER, host_key: "127.0.0.1", "appapi.nextcloud.com/node-address-type": "InternalIP"}
        _reached_after_cache_miss_and_restart(tmp_path, harp, key, nextcloud, harp_settings)

        # Edited into something expose would refuse: the default node (refused, 503),
        # with a warning (throttled, so said once here).
        kube.patch("v1/services", DEPLOY, {"metadata": {"annotations": {
            host_key: "not a host/x"}}})
        for _ in range(2):
            assert call(harp, key, f"/exapp_storage/{APP}", None, "DELETE").status == 204
            assert ok(public(harp)).status == 503
        assert harp.output().count("recorded upstream host is not usable") == 1
        # Exposing again on the existing Service (409) records the host again; without
        # one, the record is removed and the node is used.
        assert expose(harp, key, 8080, "nodeport", upstream_host="127.0.0.1").json()[
            "host"] == "127.0.0.1"
        assert kube.get("v1/services", DEPLOY)["metadata"]["annotations"][  # type: ignore[index]
            host_key] == "127.0.0.1"
        assert call(harp, key, f"/exapp_storage/{APP}", None, "DELETE").status == 204
        assert ok(public(harp)).status == 200
        assert expose(harp, key, 8080, "nodeport").json()["host"] == "127.0.0.2"
        assert host_key not in kube.get("v1/services", DEPLOY)["metadata"][  # type: ignore[index]
            "annotations"]
    finally:
        kube.remove_nodes()


def test_loadbalancer_expose_waits_for_the_address(
    harp: HarpProcess, key: str, kube: KubeAPI, exapp: ExAppProcess, deployed: None,
) -> None:
    def cloud_controller() -> None:
        wait_for(lambda: kube.get("v1/services", DEPLOY), 10)
        time.sleep(1.5)
        kube.patch("v1/services", DEPLOY,
                   {"status": {"loadBalancer": {"ingress": [{"ip": "127.0.0.1"}]}}})

    controller = threading.Thread(target=cloud_controller)
    controller.start()
    exposed = expose(harp, key, exapp.port, "loadbalancer", load_balancer_ip="203.0.113.9",
                     wait_interval_seconds=0.5)
    controller.join()
    assert exposed.json()["host"] == "127.0.0.1" and exposed.json()["exposeType"] == (
        "loadbalancer")
    assert kube.get("v1/services", DEPLOY)["spec"]["loadBalancerIP"] == "203.0.113.9"  # type: ignore[index]
    assert ok(public(harp)).status == 200


def test_manual_expose_is_kept_on_the_deployment(
    harp: HarpProcess, key: str, kube: KubeAPI, exapp: ExAppProcess, deployed: None,
) -> None:
    exposed = expose(harp, key, 80, "manual", upstream_host="127.0.0.1",
                     upstream_port=exapp.port)
    assert exposed.json()["port"] == exapp.port
    annotations = kube.get("apps/v1/deployments", DEPLOY)["metadata"]["annotations"]  # type: ignore[index]
    assert annotations == {**OWNER, "appapi.nextcloud.com/expose-type": "manual",
                           "appapi.nextcloud.com/upstream-host": "127.0.0.1",
                           "appapi.nextcloud.com/upstream-port": str(exapp.port)}
    assert ok(public(harp)).status == 200
    # No Service: a cache miss finds the annotations.
    assert kube.get("v1/services", DEPLOY) is None
    assert call(harp, key, f"/exapp_storage/{APP}", None, "DELETE").status == 204
    assert ok(public(harp)).status == 200


def test_remove_keeps_a_service_harp_did_not_make(
    harp: HarpProcess, key: str, kube: KubeAPI, exapp: ExAppProcess,
) -> None:
    assert k8s(harp, key, "create", image=IMAGE).status == 201
    kube.put("v1/services", DEPLOY, {"spec": {"type": "ClusterIP", "clusterIP": "127.0.0.1",
                                               "ports": [{"port": exapp.port}]}})
    assert k8s(harp, key, "remove", remove_data=True).status == 204
    assert kube.get("v1/services", DEPLOY) is not None
    # Found by its part-of label too (a multi-role app's Service has the role's name).
    kube.delete("v1/services", DEPLOY)
    kube.put("v1/services", DEPLOY + "-ui", {
        "metadata": {"labels": {"app.kubernetes.io/part-of": DEPLOY}},
        "spec": {"type": "ClusterIP", "clusterIP": "127.0.0.1", "ports": [{"port": exapp.port}]},
    })
    assert ok(public(harp)).status == 200
    kube.delete("v1/services", DEPLOY + "-ui")
    call(harp, key, f"/exapp_storage/{APP}", None, "DELETE")


# --- failures and recovery


def test_api_down_gives_503_then_recovers(
    harp: HarpProcess, key: str, kube: KubeAPI, exapp: ExAppProcess,
) -> None:
    kube.down()
    try:
        down = k8s(harp, key, "exists")
        assert (down.status, down.body) == (503, b"Error communicating with Kubernetes API")
        pushed = call(harp, key, f"/exapp_storage/{APP}", record_for(exapp, host=APP))
        assert pushed.status == 503
        # Nothing was stored, and a routed request whose upstream cannot be found is 404.
        assert ok(public(harp)).status == 404
        assert wait_for(lambda: info(harp, key)["reachable"] is False, 15)
    finally:
        kube.up()
    assert k8s(harp, key, "exists").json() == {"exists": False}
    assert wait_for(lambda: info(harp, key)["reachable"], 10)


def test_rotated_token_is_used_and_never_logged(
    harp: HarpProcess, key: str, kube: KubeAPI, token_file: Path,
) -> None:
    old = token_file.read_text().strip()
    new = "rotated-token-" + new_key()
    kube.tokens.clear()
    kube.tokens.add(new)
    token_file.write_text(new)
    assert k8s(harp, key, "exists").json() == {"exists": False}
    seen = {h.get("Authorization") for _, _, h in kube.requests()}
    assert f"Bearer {new}" in seen and f"Bearer {old}" in seen
    output = harp.output()
    assert old not in output and new not in output


# --- other configurations


def test_disabled_backend(tmp_path: Path, key: str, nextcloud: FakeNextcloud,
                          exapp: ExAppProcess) -> None:
    harp = start_harp(tmp_path, key, nextcloud)
    try:
        assert info(harp, key) == {"enabled": False}
        refused = k8s(harp, key, "exists")
        assert (refused.status, refused.body) == (503, b"Kubernetes backend is disabled in HaRP.")
        assert k8s(harp, key, "install_certificates", system_certs_bundle=None,
                   install_frp_certs=False).status == 204
        exposed = expose(harp, key, 80, "manual", upstream_host="127.0.0.1",
                         upstream_port=exapp.port)
        assert exposed.status == 200
        assert ok(public(harp)).status == 200
    finally:
        harp.stop()


@pytest.mark.parametrize(("env", "api_server", "message"), [
    ({}, "", b"Kubernetes API server is not configured."),
    ({"HP_K8S_API_SERVER": "https://127.0.0.1:9"}, "https://127.0.0.1:9",
     b"Kubernetes token is not configured."),
])
def test_unconfigured_backend(tmp_path: Path, key: str, nextcloud: FakeNextcloud,
                              env: dict[str, str], api_server: str, message: bytes) -> None:
    harp = start_harp(tmp_path, key, nextcloud, HP_K8S_ENABLED="true",
                      HP_K8S_BEARER_TOKEN_FILE=str(tmp_path / "no-token"), **env)
    try:
        assert info(harp, key) == {"enabled": True, "api_server": api_server,
                                   "reachable": False}
        refused = k8s(harp, key, "create", image=IMAGE)
        assert (refused.status, refused.body) == (503, message)
    finally:
        harp.stop()


@pytest.mark.parametrize(("verify", "reachable"), [("true", False), ("false", True)])
def test_api_server_certificate_is_verified(
    tmp_path: Path, key: str, nextcloud: FakeNextcloud, kube: KubeAPI, token_file: Path,
    verify: str, reachable: bool,
) -> None:
    other_ca = write_tls(tmp_path)[0]
    harp = start_harp(tmp_path, key, nextcloud, HP_K8S_ENABLED="true",
                      HP_K8S_API_SERVER=kube.url, HP_K8S_BEARER_TOKEN_FILE=str(token_file),
                      HP_K8S_CA_FILE=str(other_ca), HP_K8S_VERIFY_SSL=verify)
    try:
        assert info(harp, key)["reachable"] is reachable
        assert k8s(harp, key, "exists").status == (200 if reachable else 503)
    finally:
        harp.stop()


@pytest.mark.parametrize(("variable", "value"), [
    ("HP_K8S_ENABLED", "maybe"),
    ("HP_K8S_NAMESPACE", "Not_A_Namespace"),
    ("HP_K8S_API_SERVER", "ftp://cluster"),
    ("HP_K8S_VERIFY_SSL", "sometimes"),
    ("HP_K8S_DEFAULT_STORAGE_SIZE", "ten gigs"),
    ("HP_K8S_STORAGE_CLASS", "Fast SSD"),
    ("HP_K8S_HOST_ALIASES", "cloud.local:not-an-ip"),
    ("HP_K8S_CA_FILE", "/nonexistent/ca.crt"),
])
def test_bad_k8s_variables_stop_start_up(tmp_path: Path, variable: str, value: str) -> None:
    defaults = {"HP_K8S_ENABLED": "true", "HP_K8S_API_SERVER": "https://127.0.0.1:6443"}
    env = base_env(tmp_path, **{**defaults, variable: value})
    code, output = run_harp_once(env, tmp_path)
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith(f"harp: configuration error: {variable}")


def test_workers_share_the_k8s_upstream(
    tmp_path: Path, key: str, nextcloud: FakeNextcloud, kube: KubeAPI, token_file: Path,
    tls: tuple[Path, Path, Path], exapp: ExAppProcess, harp_settings: dict[str, str],
) -> None:
    """HP_WORKERS=2: expose in one worker, a push through the primary, requests in both."""
    harp = start_harp(tmp_path, key, nextcloud, HP_WORKERS="2", **harp_settings)
    try:
        assert wait_for(lambda: info(harp, key)["reachable"], 20)
        assert expose(harp, key, exapp.port, "clusterip").status == 200
        assert call(harp, key, f"/exapp_storage/{APP}", record_for(exapp, host=APP)).status == (
            204)
        # Concurrent, so that both workers serve some (sequential ones may stay on one).
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: public(harp), range(16)))
        assert all(ok(answer).status == 200 for answer in answers)
    finally:
        harp.stop()
        kube.delete("v1/services", DEPLOY)


def test_info_does_not_wait_for_a_hanging_api(tmp_path: Path, key: str,
                                              nextcloud: FakeNextcloud) -> None:
    """An API server that accepts and never answers: /info still answers, unreachable
    (the reference waited up to 60 s; AppAPI gives /info 5 s)."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        harp = start_harp(tmp_path, key, nextcloud, HP_K8S_ENABLED="true",
                          HP_K8S_API_SERVER=f"http://127.0.0.1:{silent.getsockname()[1]}",
                          HP_K8S_BEARER_TOKEN="static-token")
        try:
            response = ok(request(harp.http_port, "/exapps/app_api/info",
                                  {"harp-shared-key": key}, timeout=5))
            assert response.json()["kubernetes"]["reachable"] is False
        finally:
            harp.stop()


def test_harp_check_kubernetes(kube: KubeAPI, token_file: Path, tls: tuple[Path, Path, Path],
                               tmp_path: Path) -> None:
    """``python -m harp check``'s kubernetes line, against the same API server."""
    from harp.check.kubernetes import kubernetes
    from harp.check.result import Status
    from harp.k8s.settings import K8sSettings

    good = K8sSettings(enabled=True, api_server=kube.url, token_file=token_file,
                       ca_file=tls[0], ca_file_explicit=True)
    result = kubernetes(good)
    assert result.status is Status.PASS, result
    assert kubernetes(K8sSettings()).status is Status.SKIP
    other_ca = write_tls(tmp_path)[0]
    untrusted = kubernetes(K8sSettings(enabled=True, api_server=kube.url, token="x",
                                       ca_file=other_ca, ca_file_explicit=True))
    assert untrusted.status is Status.FAIL and "not trusted" in untrusted.detail
    refused = kubernetes(K8sSettings(enabled=True, api_server=kube.url, token="wrong",
                                     ca_file=tls[0]))
    assert refused.status is Status.FAIL and "401" in refused.detail
    kube.server.powerless.add("no-role")
    forbidden = kubernetes(K8sSettings(enabled=True, api_server=kube.url, token="no-role",
                                       ca_file=tls[0]))
    assert forbidden.status is Status.FAIL and "docs/kubernetes.md#rbac" in forbidden.fix
    missing = kubernetes(K8sSettings(enabled=True, api_server=kube.url,
                                     token_file=tmp_path / "none"))
    assert missing.status is Status.FAIL and "token" in missing.detail
    for found in (result, untrusted, refused, forbidden):
        assert token_file.read_text().strip() not in found.detail + found.fix
