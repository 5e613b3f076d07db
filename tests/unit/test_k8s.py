"""The Kubernetes backend's pure parts: settings, payloads, manifests, pod and Service
reading, the token and TLS choices, and the cached ``/info`` probe (on a fake clock).

The process-level behaviour (real HaRP, emulated API server, routed ExApp) is in
tests/interop/test_k8s.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent

from harp.config import ConfigError, Settings
from harp.docker.names import ExAppName, PayloadError, parse_json_object
from harp.k8s import manifests, owners, pods, services
from harp.k8s.client import K8sReply, K8sUnavailable, _NoVerification, tls_policy
from harp.k8s.discovery import Discovery
from harp.k8s.payloads import CreateSpec, ExposeSpec, NodeChoice
from harp.k8s.probe import TTL_REACHABLE, TTL_UNREACHABLE, ReachabilityProbe
from harp.k8s.settings import K8sSettings, parse_host_aliases, parse_k8s_settings
from harp.k8s.token import read_token

APP = ExAppName("my_App")

# --- settings


def test_defaults_and_in_cluster_fallback() -> None:
    off = parse_k8s_settings({})
    assert (off.enabled, off.namespace, off.api_server, off.storage_size) == (
        False, "nextcloud-exapps", "", "10Gi")
    cluster = parse_k8s_settings({"HP_K8S_ENABLED": "yes", "KUBERNETES_SERVICE_HOST": "fd00::1",
                                  "KUBERNETES_SERVICE_PORT": "6443"})
    assert cluster.enabled and cluster.api_server == "https://[fd00::1]:6443"
    assert parse_k8s_settings({"HP_K8S_ENABLED": "on", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
                              ).api_server == "https://10.0.0.1:443"
    # Kubernetes' own variables are not looked at while the backend is off.
    assert parse_k8s_settings({"KUBERNETES_SERVICE_HOST": "bad host"}).api_server == ""
    named = parse_k8s_settings({"HP_K8S_API_SERVER": "'https://k8s.example:6443/'",
                                "KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert named.api_server == "https://k8s.example:6443"


def test_host_aliases_are_grouped_by_address() -> None:
    raw = " cloud.local:10.0.0.5, files.local:10.0.0.5,,v6.local:[fd00::5]"
    assert parse_host_aliases(raw) == (
        ("10.0.0.5", ("cloud.local", "files.local")), ("fd00::5", ("v6.local",)))


@pytest.mark.parametrize(("variable", "value"), [
    ("HP_K8S_ENABLED", "maybe"), ("HP_K8S_VERIFY_SSL", "2"),
    ("HP_K8S_NAMESPACE", "-bad"), ("HP_K8S_NAMESPACE", "x" * 64),
    ("HP_K8S_API_SERVER", "kubernetes.default.svc"), ("HP_K8S_API_SERVER", "https://h:0"),
    ("HP_K8S_API_SERVER", "https://user:pw@h"), ("HP_K8S_DEFAULT_STORAGE_SIZE", "0"),
    ("HP_K8S_DEFAULT_STORAGE_SIZE", "10GB"), ("HP_K8S_STORAGE_CLASS", "UPPER"),
    ("HP_K8S_HOST_ALIASES", "no-address"), ("HP_K8S_HOST_ALIASES", "bad_name:10.0.0.1"),
    ("HP_K8S_BEARER_TOKEN", "two words"),
])
def test_bad_values_are_config_errors(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_k8s_settings({variable: value})
    assert caught.value.var == variable


def test_the_token_is_never_shown() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_k8s_settings({"HP_K8S_BEARER_TOKEN": "sekrit token"})
    assert "sekrit" not in caught.value.line()
    parsed = Settings.from_env({"HP_SHARED_KEY": "k", "NC_INSTANCE_URL": "http://nc",
                                "HP_K8S_ENABLED": "1", "HP_K8S_BEARER_TOKEN": "sekrit"})
    assert parsed.k8s.token == "sekrit"
    shown = dict(parsed.describe())
    assert shown["HP_K8S_BEARER_TOKEN"] == "<redacted>"
    assert "sekrit" not in repr(parsed) and "sekrit" not in repr(parsed.k8s)


K8S_VARIABLES = (
    "HP_K8S_ENABLED", "HP_K8S_NAMESPACE", "HP_K8S_API_SERVER", "HP_K8S_BEARER_TOKEN",
    "HP_K8S_BEARER_TOKEN_FILE", "HP_K8S_CA_FILE", "HP_K8S_VERIFY_SSL", "HP_K8S_STORAGE_CLASS",
    "HP_K8S_DEFAULT_STORAGE_SIZE", "HP_K8S_HOST_ALIASES", "KUBERNETES_SERVICE_HOST",
    "KUBERNETES_SERVICE_PORT",
)


@pytest.mark.parametrize("var", K8S_VARIABLES)
@settings(max_examples=150, deadline=None)
@given(raw=st.one_of(st.text(max_size=40), st.sampled_from(
    ["https://", "[::1", "h:ip", "a:1.2.3.4,b", "10Gi", "1e3", "\n", ":99999"])))
def test_any_value_is_accepted_or_a_config_error(var: str, raw: str) -> None:
    try:
        parse_k8s_settings({"HP_K8S_ENABLED": "true", var: raw}).describe()
    except ConfigError as exc:
        assert "\n" not in exc.allowed


# --- token and TLS


def test_token_file_is_reread_and_static_token_wins(tmp_path: Path) -> None:
    path = tmp_path / "token"
    from_file = K8sSettings(enabled=True, token_file=path)
    assert read_token(from_file) is None
    path.write_text("one\n")
    assert read_token(from_file) == "one"
    path.write_text("two")
    assert read_token(from_file) == "two"
    assert read_token(K8sSettings(token="static", token_file=path)) == "static"


def test_tls_policy_choices(tmp_path: Path) -> None:
    assert isinstance(tls_policy(K8sSettings(verify_ssl=False)), _NoVerification)
    # The default service-account CA may be absent: the system trust store is used.
    tls_policy(K8sSettings(ca_file=tmp_path / "absent.crt"))
    bad = tmp_path / "bad.crt"
    bad.write_text("not a certificate")
    for ca in (bad, tmp_path / "absent.crt"):
        with pytest.raises(ConfigError) as caught:
            tls_policy(K8sSettings(ca_file=ca, ca_file_explicit=True))
        assert caught.value.var == "HP_K8S_CA_FILE"


# --- payloads


def test_create_payload_accepts_appapi_and_quantities() -> None:
    spec = CreateSpec.parse({"name": "app", "instance_id": "", "image_id": "img:1",
                             "resource_limits": {"memory": "512Mi", "cpu": "250m",
                                                 "nanoCPUs": None},
                             "network_mode": "host", "mount_points": [{"source": "/a"}]})
    assert (spec.image, spec.memory, spec.cpu, spec.mount_points) == ("img:1", "512Mi",
                                                                      "250m", 1)
    for bad in ({"name": "app"}, {"name": "app", "image": "../x"},
                {"name": "app", "image": "i", "resource_limits": {"memory": "lots"}},
                {"name": "app", "image": "i", "compute_device": "tpu"}):
        with pytest.raises(PayloadError):
            CreateSpec.parse(bad)


def test_expose_payload_defaults_and_checks() -> None:
    spec = ExposeSpec.parse({"name": "App", "port": "8080", "upstream_host": None,
                             "node_port": None, "external_traffic_policy": None})
    assert (spec.expose_type, spec.port, spec.wait_timeout, spec.wait_interval,
            spec.node, spec.app_id) == ("clusterip", 8080, 60.0, 1.0,
                                         NodeChoice(), "app")
    for bad in ({"port": 0}, {"port": 80, "expose_type": "ingress"},
                {"port": 80, "expose_type": "manual"},
                {"port": 80, "node_port": 80}, {"port": 80, "external_traffic_policy": "x"},
                {"port": 80, "node_address_type": "Hostname"},
                {"port": 80, "node_name": "a\nb"}, {"port": 80, "node_label_selector": 1},
                {"port": 80, "wait_interval_seconds": 0},
                {"port": 80, "service_labels": {"a": 1}},
                {"port": 80, "upstream_host": "a b"}):
        with pytest.raises(PayloadError):
            ExposeSpec.parse({"name": "app", **bad})


# --- names and manifests


@pytest.mark.parametrize(("raw", "name"), [
    ("nc_app_My_App", "nc-app-my-app"), ("__x..y__", "x-y"), ("___", "exapp"),
    ("a" * 62 + "_b", "a" * 62), ("Ünïcode!", "n-code"),
])
def test_sanitize(raw: str, name: str) -> None:
    assert manifests.sanitize(raw) == name


def test_names_and_labels_with_instance_and_role() -> None:
    app = ExAppName("my_app", "inst1", "ui")
    assert manifests.deployment_name(app) == "nc-app-inst1-my-app-ui"
    assert manifests.pvc_name(app) == "nc-app-inst1-my-app-data"
    assert manifests.labels(app) == {
        "app": "nc-app-inst1-my-app-ui", "app.kubernetes.io/name": "nc-app-inst1-my-app-ui",
        "app.kubernetes.io/part-of": "nc-app-inst1-my-app",
        "app.kubernetes.io/component": "exapp", "app.kubernetes.io/instance": "inst1",
        "app.kubernetes.io/role": "ui"}
    assert manifests.app_names("My_App") == ("nc-app-my-app", "nc-app-my-app")
    # Any instance id AppAPI may send is a valid label value (≤ 63, alphanumeric ends).
    odd = manifests.labels(ExAppName("a", "Inst.ance_" + "i" * 100 + "."))
    assert odd["app.kubernetes.io/instance"] == "inst-ance-" + "i" * 53


def test_service_labels_cannot_replace_harps_own() -> None:
    """A caller's ``service_labels`` must not make the Service another app's (discovery
    lists by ``part-of``) nor an operator's (``remove`` deletes only ``managed-by=harp``)."""
    spec = ExposeSpec.parse({"name": "mine", "port": 80, "role_suffix": "ui", "service_labels": {
        "app": "nc-app-victim", "app.kubernetes.io/part-of": "nc-app-victim",
        "app.kubernetes.io/managed-by": "operator", "app.kubernetes.io/role": "x",
        "team": "x"}})
    body = manifests.service(spec)
    assert body["metadata"]["labels"] == {
        **manifests.labels(spec.exapp), "app.kubernetes.io/managed-by": "harp", "team": "x"}
    assert body["metadata"]["labels"]["app.kubernetes.io/part-of"] == "nc-app-mine"
    assert body["spec"]["selector"] == {"app": "nc-app-mine-ui"}


def test_deeply_nested_body_is_invalid_json() -> None:
    """Nesting past the parser's recursion limit is a 400, not an internal error."""
    deep = b'{"name": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(PayloadError, match=r"^Invalid JSON body$"):
        parse_json_object(deep)


def _create(**limits: Any) -> CreateSpec:
    device = limits.pop("device", "cpu")
    return CreateSpec.parse({"name": "my_App", "image": "img", "compute_device": device,
                             "resource_limits": limits})


def test_resources_round_up_and_put_gpus_in_limits_only() -> None:
    assert manifests.resources(_create()) == {}
    assert manifests.resources(_create(memory=1, nanoCPUs=1)) == {
        "limits": {"memory": "1Mi", "cpu": "1m"}, "requests": {"memory": "1Mi", "cpu": "1m"}}
    assert manifests.resources(_create(device="rocm")) == {"limits": {"amd.com/gpu": "1"}}
    cuda = manifests.resources(_create(device="cuda", memory="2Gi"))
    assert cuda == {"limits": {"memory": "2Gi", "nvidia.com/gpu": "1"},
                    "requests": {"memory": "2Gi"}}


def test_deployment_pvc_and_service_bodies() -> None:
    body = manifests.deployment(_create(), (("10.0.0.1", ("a.local",)),))
    pod = body["spec"]["template"]["spec"]
    assert body["spec"]["replicas"] == 0
    assert body["spec"]["selector"] == {"matchLabels": {"app": "nc-app-my-app"}}
    assert pod["volumes"] == [{"name": "data",
                               "persistentVolumeClaim": {"claimName": "nc-app-my-app-data"}}]
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/nc_app_my_App_data"
    assert pod["hostAliases"] == [{"ip": "10.0.0.1", "hostnames": ["a.local"]}]
    assert "storageClassName" not in manifests.pvc(APP, "1Gi", "")["spec"]
    lb = manifests.service(ExposeSpec.parse({
        "name": "my_App", "port": 80, "service_port": 8080, "expose_type": "loadbalancer",
        "node_port": 30001, "external_traffic_policy": "Local", "load_balancer_ip": "1.2.3.4",
        "service_annotations": {"a": "b"}, "service_labels": {"team": "x"}}))
    assert lb["metadata"]["annotations"] == {"a": "b", OWNER: "nc_app_my_App"}
    assert lb["metadata"]["labels"]["team"] == "x"
    assert lb["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "harp"
    assert lb["spec"] == {"type": "LoadBalancer", "selector": {"app": "nc-app-my-app"},
                          "ports": [{"name": "http", "port": 8080, "targetPort": 80}],
                          "externalTrafficPolicy": "Local", "loadBalancerIP": "1.2.3.4"}
    cluster = manifests.service(ExposeSpec.parse({"name": "a", "port": 80,
                                                  "external_traffic_policy": "Local"}))
    assert "externalTrafficPolicy" not in cluster["spec"]


OWNER = "appapi.nextcloud.com/exapp"
NODE_ANNOTATIONS = ("appapi.nextcloud.com/node-address-type", "appapi.nextcloud.com/node-name",
                    "appapi.nextcloud.com/node-label-selector")


def test_nodeport_service_records_the_node_choice() -> None:
    spec = ExposeSpec.parse({
        "name": "my_App", "port": 80, "expose_type": "nodeport", "node_name": "worker-2",
        "node_address_type": "ExternalIP", "service_annotations": {
            "team": "x", "appapi.nextcloud.com/node-name": "operator's own"}})
    assert spec.node == NodeChoice("ExternalIP", "worker-2", None)
    body = manifests.service(spec)
    assert body["metadata"]["annotations"] == {
        OWNER: "nc_app_my_App", "team": "x", NODE_ANNOTATIONS[0]: "ExternalIP",
        NODE_ANNOTATIONS[1]: "worker-2"}
    # Read back from the Service, the same choice (what re-discovery uses).
    assert services.node_choice(body) == spec.node
    # The default is recorded too (its address type), and no other type records one.
    default = manifests.service(ExposeSpec.parse({"name": "a", "port": 80,
                                                  "expose_type": "nodeport"}))
    assert default["metadata"]["annotations"] == {OWNER: "nc_app_a",
                                                  NODE_ANNOTATIONS[0]: "InternalIP"}
    for kind in ("clusterip", "loadbalancer"):
        other = manifests.service(ExposeSpec.parse({"name": "a", "port": 80, "node_name": "n",
                                                    "expose_type": kind}))
        assert other["metadata"]["annotations"] == {OWNER: "nc_app_a"}
    # Re-exposing an existing Service: every key, None removing an earlier choice.
    again = ExposeSpec.parse({"name": "a", "port": 80, "expose_type": "nodeport",
                              "node_label_selector": "pool=edge"})
    assert manifests.reach_patch(again, "NodePort") == {
        "metadata": {"annotations": {HOST_ANNOTATION: None,
                                     NODE_ANNOTATIONS[0]: "InternalIP",
                                     NODE_ANNOTATIONS[1]: None,
                                     NODE_ANNOTATIONS[2]: "pool=edge"}}}


HOST_ANNOTATION = "appapi.nextcloud.com/upstream-host"


def test_every_service_records_an_explicit_upstream_host() -> None:
    for kind in ("clusterip", "nodeport", "loadbalancer"):
        spec = ExposeSpec.parse({"name": "a", "port": 80, "expose_type": kind,
                                 "upstream_host": "edge.example",
                                 "service_annotations": {HOST_ANNOTATION: "operator's"}})
        body = manifests.service(spec)
        assert body["metadata"]["annotations"][HOST_ANNOTATION] == "edge.example"
        assert services.recorded_host(body) == "edge.example"
    assert manifests.reach_patch(spec, "LoadBalancer") == {
        "metadata": {"annotations": {HOST_ANNOTATION: "edge.example"}}}
    assert services.recorded_host({"metadata": {}}) is None  # older HaRP, or by hand
    for bad in ("not a host/x", 7, "x" * 300):
        with pytest.raises(services.BadRecordedChoice, match=HOST_ANNOTATION):
            services.recorded_host(_annotated({HOST_ANNOTATION: bad}))


def _annotated(annotations: Any) -> dict[str, Any]:
    return {"metadata": {"name": "svc", "annotations": annotations},
            "spec": {"type": "NodePort"}}


def test_recorded_node_choice_is_read_back_or_the_default() -> None:
    assert services.node_choice({"spec": {"type": "NodePort"}}) == NodeChoice()  # older HaRP
    assert services.node_choice(_annotated({"other": "x"})) == NodeChoice()
    assert services.node_choice(_annotated({
        NODE_ANNOTATIONS[1]: "w2", NODE_ANNOTATIONS[2]: "pool=edge",
    })) == NodeChoice("InternalIP", "w2", "pool=edge")
    assert services.node_choice(_annotated({NODE_ANNOTATIONS[0]: ""})) == NodeChoice()


@pytest.mark.parametrize("recorded", [
    {NODE_ANNOTATIONS[0]: "Hostname"},
    {NODE_ANNOTATIONS[0]: "internalip"},
    {NODE_ANNOTATIONS[1]: "w\x002"},
    {NODE_ANNOTATIONS[1]: 7},
    {NODE_ANNOTATIONS[2]: ["pool=edge"]},
    {NODE_ANNOTATIONS[2]: "x" * 5000},
    "not an object",
])
def test_bad_recorded_node_choice_is_refused(recorded: Any) -> None:
    with pytest.raises(services.BadRecordedChoice) as caught:
        services.node_choice(_annotated(recorded))
    if isinstance(recorded, dict):
        assert next(iter(recorded)) in str(caught.value)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(NODE_ANNOTATIONS),
                       st.one_of(st.none(), st.text(max_size=20), st.integers())))
def test_any_recorded_node_choice_is_a_choice_or_refused(annotations: dict[str, Any]) -> None:
    try:
        choice = services.node_choice(_annotated(annotations))
    except services.BadRecordedChoice:
        return
    assert choice.address_type in ("InternalIP", "ExternalIP")


class _Cluster:
    """A K8sClient answering from one Service and a node list (``labelSelector`` as
    ``k=v`` only, 400 for anything else, as the API server refuses a bad selector)."""

    namespace = "ns"

    def __init__(self, service: dict[str, Any], nodes: list[dict[str, Any]]) -> None:
        self.reactor = Clock()
        self.service = service
        self.nodes = nodes

    def unusable(self) -> str | None:
        return None

    async def call(self, method: bytes, path: str, **kwargs: Any) -> K8sReply:
        if path.endswith("/services/nc-app-app"):
            return K8sReply(200, self.service)
        assert path == "/api/v1/nodes", path
        selector = (kwargs.get("query") or {}).get("labelSelector")
        if selector is None:
            return K8sReply(200, {"items": self.nodes})
        if "=" not in selector:
            return K8sReply(400, {"message": "unable to parse requirement"})
        key, value = selector.split("=", 1)
        return K8sReply(200, {"items": [
            n for n in self.nodes if n["metadata"].get("labels", {}).get(key) == value]})


def _rediscover(cluster: _Cluster) -> Any:
    found: list[Any] = []
    Deferred.fromCoroutine(Discovery(cluster).upstream("app")).addBoth(found.append)  # type: ignore[arg-type]
    return found[0]


def test_rediscovery_honours_the_recorded_node_and_falls_back(
        events: list[LogEvent]) -> None:
    nodes = [_node("first", True, ("InternalIP", "10.0.0.1")),
             {**_node("second", True, ("InternalIP", "10.0.0.2"), ("ExternalIP", "1.2.3.4")),
              "metadata": {"name": "second", "labels": {"pool": "edge"}}}]
    service = _annotated({})
    service["spec"]["ports"] = [{"port": 80, "nodePort": 30080}]
    cluster = _Cluster(service, nodes)
    assert _rediscover(cluster) == ("10.0.0.1", 30080)  # nothing recorded: the default
    service["metadata"]["annotations"] = {NODE_ANNOTATIONS[1]: "second"}
    assert _rediscover(cluster) == ("10.0.0.2", 30080)
    service["metadata"]["annotations"] = {NODE_ANNOTATIONS[0]: "ExternalIP",
                                          NODE_ANNOTATIONS[2]: "pool=edge"}
    assert _rediscover(cluster) == ("1.2.3.4", 30080)
    assert not _warnings(events)
    # Edited into nonsense, pointing at a node that is gone, or a selector the API
    # refuses: the default node, said once per minute per Discovery.
    discovery = Discovery(cluster)  # type: ignore[arg-type]
    for recorded in ({NODE_ANNOTATIONS[0]: "Hostname"}, {NODE_ANNOTATIONS[1]: "gone"},
                     {NODE_ANNOTATIONS[2]: "not a selector"}):
        service["metadata"]["annotations"] = recorded
        found: list[Any] = []
        Deferred.fromCoroutine(discovery.upstream("app")).addBoth(found.append)
        assert found == [("10.0.0.1", 30080)]
    assert len(_warnings(events)) == 1
    cluster.reactor.advance(60)
    assert _rediscover(cluster) == ("10.0.0.1", 30080)
    Deferred.fromCoroutine(discovery.upstream("app"))
    assert len(_warnings(events)) == 3  # a fresh Discovery, and the minute is up


def test_rediscovery_honours_the_recorded_upstream_host_and_falls_back(
        events: list[LogEvent]) -> None:
    nodes = [_node("first", True, ("InternalIP", "10.0.0.1"))]
    service = _annotated({HOST_ANNOTATION: "edge.example", NODE_ANNOTATIONS[1]: "gone"})
    service["spec"]["ports"] = [{"port": 80, "nodePort": 30080}]
    cluster = _Cluster(service, nodes)
    assert _rediscover(cluster) == ("edge.example", 30080)  # no node asked for
    service["spec"] = {"type": "ClusterIP", "clusterIP": "10.96.0.9", "ports": [{"port": 80}]}
    assert _rediscover(cluster) == ("edge.example", 80)
    assert not _warnings(events, "upstream host")
    service["metadata"]["annotations"] = {HOST_ANNOTATION: "bad host"}
    assert _rediscover(cluster) == ("10.96.0.9", 80)  # the Service's own address
    assert len(_warnings(events, "upstream host")) == 1


def test_ownership_is_recorded_checked_and_honoured_by_discovery() -> None:
    """Names collide (cut to 63, case folded); the record on the object does not."""
    long_a, long_b = ExAppName("x" * 60 + "a"), ExAppName("x" * 60 + "b")
    assert manifests.deployment_name(long_a) == manifests.deployment_name(long_b)
    deployment = manifests.deployment(CreateSpec.parse({"name": long_a.name, "image": "i"}),
                                      ())
    owners.check(deployment, long_a, "Deployment", "d")
    with pytest.raises(owners.NameTaken, match=f"belongs to ExApp 'nc_app_{long_a.name}'"):
        owners.check(deployment, long_b, "Deployment", "d")
    assert owners.NameTaken.status == 409
    with pytest.raises(owners.NameTaken):  # a case-only twin, or another role
        owners.check(deployment, ExAppName(long_a.name.upper()), "Deployment", "d")
    role = manifests.deployment(CreateSpec.parse({"name": "app", "role_suffix": "rp",
                                                  "image": "i"}), ())
    with pytest.raises(owners.NameTaken, match="'nc_app_app_rp', not 'nc_app_app'"):
        owners.check(role, ExAppName("app"), "Deployment", "d")
    claim = manifests.pvc(ExAppName("app", role_suffix="rp"), "1Gi", "")
    owners.check(claim, ExAppName("app"), "PVC", "p", roles_share=True)  # shared by roles
    with pytest.raises(owners.NameTaken):
        owners.check(claim, ExAppName("app2"), "PVC", "p", roles_share=True)
    # Made by the reference, an older HaRP or by hand: no record, taken as the caller's.
    owners.check({"metadata": {"name": "d"}}, long_b, "Deployment", "d")
    # The operator cannot record another owner through service_annotations.
    spec = ExposeSpec.parse({"name": "app", "port": 80, "service_annotations": {
        "appapi.nextcloud.com/exapp": "nc_app_victim", "appapi.nextcloud.com/role": "x"}})
    assert owners.recorded_owner(manifests.service(spec)) == ("nc_app_app", "")
    # Routing: another app's Service is not this app's upstream (routed ids are lower case).
    assert owners.belongs_to(deployment, long_a.name.upper())
    assert not owners.belongs_to(deployment, long_b.name)
    assert owners.belongs_to({}, "anything")


class _Objects:
    """A K8sClient whose named Service and Deployment are another app's."""

    namespace = "ns"

    def __init__(self, other: str) -> None:
        self.reactor = Clock()
        self.annotations = {"appapi.nextcloud.com/exapp": f"nc_app_{other}"}

    def unusable(self) -> str | None:
        return None

    async def call(self, method: bytes, path: str, **kwargs: Any) -> K8sReply:
        found = self._object("/deployments" in path)
        return K8sReply(200, {"items": [found]} if kwargs.get("query") else found)

    def _object(self, deployment: bool) -> dict[str, Any]:
        if deployment:
            return {"metadata": {"annotations": {
                **self.annotations, "appapi.nextcloud.com/expose-type": "manual",
                "appapi.nextcloud.com/upstream-host": "10.0.0.9",
                "appapi.nextcloud.com/upstream-port": "80"}}}
        return {"metadata": {"annotations": self.annotations},
                "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}


def test_discovery_skips_objects_of_a_colliding_app() -> None:
    found: list[Any] = []
    discovery = Discovery(_Objects("other"))  # type: ignore[arg-type]
    Deferred.fromCoroutine(discovery.upstream("app")).addBoth(found.append)
    assert found == [None]  # neither the Service nor the manual annotations
    Deferred.fromCoroutine(Discovery(_Objects("app")).upstream(  # type: ignore[arg-type]
        "app")).addBoth(found.append)
    assert found[1] == ("10.96.0.1", 80)


def _warnings(events: list[LogEvent], what: str = "node choice") -> list[str]:
    return [formatEvent(e) for e in events if f"recorded {what}" in formatEvent(e)]


# --- reading the cluster


def _pod(phase: str, waiting: str | None = None, ready: bool = False,
         running: bool = False) -> dict[str, Any]:
    state: dict[str, Any] = {"running": {}} if running else {}
    if waiting:
        state["waiting"] = {"reason": waiting, "message": "m"}
    return {"status": {"phase": phase, "containerStatuses": [{"state": state}],
                       "conditions": [{"type": "Ready", "status": str(ready)}]}}


def test_pod_watch_verdicts() -> None:
    watch = pods.PodWatch(0)
    assert watch.see([], 1) is None and watch.phase == "Pending"
    assert watch.see([{"metadata": {"name": "new"}}], 1) is None  # no status yet: wait
    assert watch.see([_pod("Pending", "ContainerCreating")], 2) is None
    assert watch.pulled_at is None
    assert not watch.expired(3000) and watch.expired(3601)
    assert watch.see([_pod("Running", running=True)], 10) is None
    assert watch.pulled_at == 10  # running but not Ready: the image is there
    assert not watch.expired(100) and watch.expired(101)
    assert watch.timeout() == {"started": False, "status": "Running", "health": "timeout",
                               "reason": None, "message": None}
    assert watch.see([_pod("Running", ready=True)], 12) == {
        "started": True, "status": "running", "health": "ready", "reason": None,
        "message": None}
    assert watch.see([_pod("Succeeded")], 13)["started"] is True  # type: ignore[index]
    assert watch.see([_pod("Unknown")], 13)["health"] == "not_ready"  # type: ignore[index]
    assert watch.see([_pod("Pending", "InvalidImageName")], 14) == {
        "started": False, "status": "InvalidImageName", "health": "image_error",
        "reason": "InvalidImageName", "message": "m"}
    crash = pods.PodWatch(0)
    crash.see([_pod("Running", "CrashLoopBackOff")], 5)
    assert crash.pulled_at == 5


def test_pod_watch_never_waits_past_its_cap() -> None:
    """An image pulled late does not restart the clock: the whole wait stays within
    MAX_WAIT, inside AppAPI's own 3700 s timeout."""
    late = pods.PodWatch(0)
    assert late.see([_pod("Running", running=True)], pods.MAX_WAIT - 10) is None
    assert not late.expired(pods.MAX_WAIT)
    assert late.expired(pods.MAX_WAIT + 1)  # 11 s after the pull, not 90
    assert pods.not_found("nc-app-x") == {
        "started": False, "status": "NotFound", "health": "not_ready", "reason": "NotFound",
        "message": "Deployment 'nc-app-x' not found."}


def _node(name: str, ready: bool, *addresses: tuple[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "addresses": [{"type": t, "address": a} for t, a in addresses]}}


def test_node_address_prefers_ready_nodes_and_the_asked_type() -> None:
    nodes = [_node("down", False, ("InternalIP", "10.0.0.9")),
             _node("up", True, ("Hostname", "up"), ("ExternalIP", "1.2.3.4"),
                   ("InternalIP", "10.0.0.1"))]
    assert services.node_address(nodes) == "10.0.0.1"
    assert services.node_address(nodes, "ExternalIP") == "1.2.3.4"
    assert services.node_address(nodes, node_name="down") == "10.0.0.9"
    assert services.node_address([_node("h", True, ("Hostname", "h"))]) == "h"
    for bad in ([], [_node("none", True)]):
        with pytest.raises(services.NoUpstream):
            services.node_address(bad)


def test_service_and_deployment_readers() -> None:
    headless = {"metadata": {"name": "svc"}, "spec": {"clusterIP": "None", "ports": [{}]}}
    assert services.cluster_address(headless, "ns") == "svc.ns.svc"
    with pytest.raises(services.NoUpstream):
        services.service_port(headless)
    with pytest.raises(services.NoUpstream):
        services.node_port({"spec": {"ports": [{"port": 80}]}})
    lb = {"status": {"loadBalancer": {"ingress": [{"hostname": "lb.example"}]}}}
    assert services.load_balancer_address(lb) == "lb.example"
    assert services.load_balancer_address({}) is None
    manual = {"metadata": {"annotations": {
        "appapi.nextcloud.com/expose-type": "manual",
        "appapi.nextcloud.com/upstream-host": "h", "appapi.nextcloud.com/upstream-port": "81"}}}
    assert services.manual_upstream(manual) == ("h", 81)
    manual["metadata"]["annotations"]["appapi.nextcloud.com/upstream-port"] = "x"
    assert services.manual_upstream(manual) is None
    assert services.manual_upstream({}) is None


# --- /info's probe


class _FakeClient:
    """Counts probes; answers what ``status`` says, or fails when it is None."""

    def __init__(self) -> None:
        self.status: int | None = 200
        self.why: str | None = None
        self.calls = 0
        self.pending: list[Any] = []

    def unusable(self) -> str | None:
        return self.why

    async def call(self, method: bytes, path: str, **kwargs: Any) -> K8sReply:
        self.calls += 1
        if self.status is None:
            raise K8sUnavailable("down")
        return K8sReply(self.status, None)


def test_probe_is_cached_shared_and_skipped_when_unusable() -> None:
    clock, client = Clock(), _FakeClient()
    probe = ReachabilityProbe(clock, client)  # type: ignore[arg-type]
    results: list[bool] = []
    probe.reachable().addCallback(results.append)
    probe.reachable().addCallback(results.append)
    assert results == [True, True] and client.calls == 1
    client.status = None
    assert probe.cached() is True
    clock.advance(TTL_REACHABLE + 0.1)
    probe.reachable().addCallback(results.append)
    assert results[-1] is False and client.calls == 2
    client.status = 200
    clock.advance(TTL_UNREACHABLE + 0.1)
    probe.reachable().addCallback(results.append)
    assert results[-1] is True
    client.why = "Kubernetes token is not configured."
    assert probe.cached() is False
    probe.reachable().addCallback(results.append)
    assert results[-1] is False and client.calls == 3


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from(["manual", "nodeport", "512Mi", "cuda", "img:1", "0", "30001"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8,
)
FIELDS = st.sampled_from([
    "name", "instance_id", "role_suffix", "image", "image_id", "environment_variables",
    "compute_device", "resource_limits", "mount_points", "port", "expose_type",
    "upstream_host", "upstream_port", "service_port", "node_port", "external_traffic_policy",
    "load_balancer_ip", "service_annotations", "service_labels", "wait_timeout_seconds",
    "wait_interval_seconds", "node_address_type", "node_name", "node_label_selector",
])


@pytest.mark.parametrize("parse", [CreateSpec.parse, ExposeSpec.parse])
@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(FIELDS, JSON_VALUES, max_size=8))
def test_any_body_is_a_spec_or_a_payload_error(parse: Any, body: dict[str, Any]) -> None:
    """A hostile body is a 400, never a 500: only PayloadError may come out."""
    try:
        spec = parse({"name": "app", "port": 80, "image": "img", **body})
    except PayloadError:
        return
    if isinstance(spec, CreateSpec):
        assert manifests.deployment(spec, ())["spec"]["replicas"] == 0
    elif spec.expose_type != "manual":
        assert manifests.service(spec)["kind"] == "Service"
