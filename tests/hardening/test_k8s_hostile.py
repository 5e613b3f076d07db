"""Hostile calls to the Kubernetes control plane ``/exapps/app_api/k8s/exapp/*``.

Peers: a real ``twistd harp`` with ``HP_K8S_*`` pointing at kmock's Kubernetes emulator
(tests/peers/kube.py, plain HTTP: TLS is covered by tests/interop/test_k8s.py), the fake
Nextcloud, and a second HaRP without the backend.  What every case checks besides HaRP's
answer is what reached the API server, from the emulator's own request log and objects:

* a refused call (wrong key → 401, docs/security.md#what-is-exposed-where; a bad body →
  400, too big → 413, docs/kubernetes.md#behaviour) makes no API call at all;
* an accepted one touches only paths inside the configured namespace (plus the
  cluster-scoped node list), with DNS-1123 names and label values the real API accepts;
* nothing HaRP did not create (objects without ``managed-by=harp``, other namespaces)
  is deleted, and no label HaRP relies on for discovery can be set by the caller.

Where the exact status is not documented the safe property is asserted instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.hardening.conftest import RecordCase
from tests.interop.conftest import Response, ok, request, start_harp
from tests.peers.fake_nextcloud import FakeNextcloud
from tests.peers.harp import HarpProcess, new_key
from tests.peers.kube import KubeAPI

pytestmark = pytest.mark.interop

NS = "nextcloud-exapps"
OTHER_NS = "someone-else"
IMAGE = "ghcr.io/nextcloud/app-skeleton-python:latest"
ENDPOINTS = ("exists", "create", "start", "stop", "wait_for_start", "remove",
             "install_certificates", "expose")
#: A valid body per endpoint (what AppAPI sends), so only the hostile part differs.
VALID: dict[str, dict[str, Any]] = {
    "exists": {}, "start": {}, "stop": {}, "wait_for_start": {}, "remove": {},
    "install_certificates": {}, "create": {"image": IMAGE}, "expose": {"port": 23000},
}
CONTROL_BODY_LIMIT = 1 << 20  # harp/web/root.py
DISABLED = b"Kubernetes backend is disabled in HaRP."
#: What the API server may be asked: the namespace's objects, and the node list.
ALLOWED_PATH = re.compile(
    rf"^(/apis/apps/v1|/api/v1)/namespaces/{NS}/"
    r"(deployments|services|persistentvolumeclaims|pods)(/[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)?$"
    r"|^/api/v1/nodes$"
)
DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?")


@pytest.fixture(scope="module")
def token() -> str:
    return "tok-" + new_key()


@pytest.fixture(scope="module")
def kube(token: str) -> Iterator[KubeAPI]:
    with KubeAPI(token, namespace=NS) as api:
        yield api


@pytest.fixture(scope="module")
def nextcloud(key: str) -> Iterator[FakeNextcloud]:
    with FakeNextcloud(key) as fake:
        yield fake


@pytest.fixture(scope="module")
def harp(tmp_path_factory: pytest.TempPathFactory, key: str, nextcloud: FakeNextcloud,
         kube: KubeAPI, token: str) -> Iterator[HarpProcess]:
    proc = start_harp(tmp_path_factory.mktemp("harp"), key, nextcloud, HP_LOG_LEVEL="info",
                      HP_K8S_ENABLED="true", HP_K8S_API_SERVER=kube.url,
                      HP_K8S_BEARER_TOKEN=token, HP_K8S_NAMESPACE=NS)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def harp_off(tmp_path_factory: pytest.TempPathFactory, key: str,
             nextcloud: FakeNextcloud) -> Iterator[HarpProcess]:
    proc = start_harp(tmp_path_factory.mktemp("harp-off"), key, nextcloud,
                      HP_LOG_LEVEL="info")
    yield proc
    proc.stop()


def post(harp: HarpProcess, op: str, body: bytes, key: str | None) -> Response:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["harp-shared-key"] = key
    return ok(request(harp.http_port, f"/exapps/app_api/k8s/exapp/{op}", headers, "POST",
                      body))


def body_of(op: str, name: str = "hostile-app", **fields: Any) -> bytes:
    return json.dumps({"name": name, "instance_id": "", **VALID[op], **fields}).encode()


def api_calls(kube: KubeAPI) -> list[tuple[str, str]]:
    return [(method, path) for method, path, _ in kube.requests()]


def objects(kube: KubeAPI) -> set[tuple[str, str | None, str]]:
    """(plural, namespace, name) of every live object in the emulator."""
    def read() -> set[tuple[str, str | None, str]]:
        return {(key[0].plural, key[1], key[2]) for key, obj in kube.server.objects.items()
                if not obj.deleted}
    return kube.call(read)


def outside(calls: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Calls to a path other than the namespace's objects and the node list."""
    return [(m, p) for m, p in calls if not ALLOWED_PATH.match(p.split("?")[0])]


def tracebacks(harp: HarpProcess) -> int:
    """Tracebacks in the log so far (the module's HaRP is shared: compare before/after)."""
    return harp.output().count("Traceback")


class Watch:
    """What a case made HaRP do: calls to the Kubernetes API and tracebacks in its log,
    counted from the moment the watch was made (the module's HaRP and peer are shared)."""

    def __init__(self, kube: KubeAPI, harp: HarpProcess) -> None:
        self.kube, self.harp = kube, harp
        #: Index of the first API request made after the watch began.
        self.start = len(api_calls(kube))
        self._tracebacks = tracebacks(harp)

    @property
    def calls(self) -> list[tuple[str, str]]:
        return api_calls(self.kube)[self.start:]

    def new_tracebacks(self) -> int:
        return tracebacks(self.harp) - self._tracebacks


def still_serving(harp: HarpProcess, key: str) -> bool:
    answer = post(harp, "exists", body_of("exists", "after-hostile"), key)
    return answer.status == 200 and answer.json() == {"exists": False}


# --- the shared key


def test_k8s_wrong_or_missing_key_is_refused_before_the_api(
    harp: HarpProcess, key: str, kube: KubeAPI, record_case: RecordCase,
    measure: Callable[[Any], Any],
) -> None:
    watch, before_objects = Watch(kube, harp), objects(kube)
    seen = []
    with measure(harp) as m:
        for op in ENDPOINTS:
            for wrong in (None, "", key + "x", key.upper() if key != key.upper() else "K"):
                seen.append((op, wrong is None, post(harp, op, body_of(op), wrong).status))
    calls = watch.calls
    statuses = sorted({s for _, _, s in seen})
    record_case(case="k8s/bad-key", input=f"{len(seen)} calls, 8 endpoints",
                expected="401, no API call", observed=f"{statuses}, {len(calls)} API calls",
                measured=m)
    assert statuses == [401], seen
    assert calls == []
    assert objects(kube) == before_objects
    assert watch.new_tracebacks() == 0


# --- bodies


MALFORMED: list[tuple[str, str, bytes]] = [
    ("truncated", "exists", b'{"name": "a"'),
    ("empty", "create", b""),
    ("array", "exists", b'["name", "a"]'),
    ("string", "start", b'"a"'),
    ("null", "stop", b"null"),
    ("not-utf8", "remove", b'{"name": "\xff\xfe"}'),
    ("name-int", "exists", b'{"name": 5, "instance_id": ""}'),
    ("name-object", "create", b'{"name": {"x": 1}, "image": "a/b"}'),
    ("instance-list", "start", b'{"name": "a", "instance_id": []}'),
    ("no-name", "wait_for_start", b'{"instance_id": ""}'),
    ("image-int", "create", body_of("create", image=7)),
    ("image-dotdot", "create", body_of("create", image="a/../b")),
    ("env-string", "create", body_of("create", environment_variables="A=1")),
    ("env-ints", "create", body_of("create", environment_variables=[1, 2])),
    ("limits-list", "create", body_of("create", resource_limits=[1])),
    ("limits-bad-quantity", "create", body_of("create", resource_limits={"memory": "1Gi;x"})),
    ("device", "create", body_of("create", compute_device="tpu")),
    ("remove-data-str", "remove", body_of("remove", remove_data="yes")),
    ("certs-bundle-int", "install_certificates",
     body_of("install_certificates", system_certs_bundle=5)),
    ("port-str", "expose", body_of("expose", port="80x")),
    ("annotations-list", "expose", body_of("expose", service_annotations=["a"])),
    ("labels-int-value", "expose", body_of("expose", service_labels={"a": 1})),
    ("selector-newline", "expose", body_of("expose", node_label_selector="a=b\nc")),
    ("deep-nesting", "exists", b'{"name": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
]


def refused_as_bad_body(
    record_case: RecordCase, watch: Watch, case: str, raw: bytes, answer: Response,
    **measured: Any,
) -> None:
    """Record, then check, a body HaRP must refuse with 400 before any API call."""
    calls = watch.calls
    record_case(case=case, input=raw, expected="400, no API call",
                observed=f"{answer.status} {answer.body[:40]!r}, {len(calls)} API calls",
                **measured)
    assert answer.status == 400
    assert calls == []
    assert watch.new_tracebacks() == 0


@pytest.mark.parametrize(("case", "op", "raw"), MALFORMED, ids=[c for c, _, _ in MALFORMED])
def test_k8s_malformed_body_is_400_without_an_api_call(
    harp: HarpProcess, key: str, kube: KubeAPI, record_case: RecordCase,
    measure: Callable[[Any], Any], case: str, op: str, raw: bytes,
) -> None:
    watch = Watch(kube, harp)
    with measure(harp) as m:
        answer = post(harp, op, raw, key)
    refused_as_bad_body(record_case, watch, f"k8s/body/{case}", raw, answer, measured=m)


def test_k8s_storage_push_nested_too_deep_is_400(
    harp: HarpProcess, key: str, kube: KubeAPI, record_case: RecordCase,
) -> None:
    """``/exapp_storage`` in Kubernetes mode (K8sStorage) reads its body with its own
    parser: nesting past the recursion limit is a bad body there too, not a crash."""
    raw = b'{"exapp_token": "t", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    watch = Watch(kube, harp)
    answer = ok(request(harp.http_port, "/exapps/app_api/exapp_storage/deep", {
        "harp-shared-key": key, "Content-Type": "application/json"}, "POST", raw))
    refused_as_bad_body(record_case, watch, "k8s/storage/deep-nesting", raw, answer, proc=harp)


def test_k8s_oversized_body_is_413_and_harp_keeps_serving(
    harp: HarpProcess, key: str, kube: KubeAPI, record_case: RecordCase,
    measure: Callable[[Any], Any],
) -> None:
    padding = "x" * (CONTROL_BODY_LIMIT + 1)
    raw = body_of("create", environment_variables=[f"PAD={padding}"])
    watch = Watch(kube, harp)
    with measure(harp) as m:
        answers = [post(harp, "create", raw, key).status for _ in range(5)]
        calls = watch.calls
        serving = still_serving(harp, key)
    record_case(case="k8s/body/oversized", input=f"5 x {len(raw)} bytes to create",
                expected="413, no API call, then serving",
                observed=f"{sorted(set(answers))}, {len(calls)} API calls, serving={serving}",
                measured=m)
    assert set(answers) == {413}
    assert calls == []
    assert serving
    assert m.fds_after is None or m.fds_before is None or m.fds_after <= m.fds_before + 5
    assert watch.new_tracebacks() == 0


# --- names


HOSTILE_NAMES = ["../etc", "a/b", "a/../../x", "x?watch=1", "x#y", "%2e%2e", "-lead",
                 ".hidden", "a b", "x,app=other", "app=x", "名前", "ab\u200bc", "a" * 129,
                 "a\x00b", "", "a\\b"]


@pytest.mark.parametrize("field", ["name", "instance_id", "role_suffix"])
def test_k8s_hostile_name_parts_are_refused(
    harp: HarpProcess, key: str, kube: KubeAPI, record_case: RecordCase,
    measure: Callable[[Any], Any], field: str,
) -> None:
    watch, before_objects = Watch(kube, harp), objects(kube)
    seen = {}
    with measure(harp) as m:
        for value in HOSTILE_NAMES:
            if value == "" and field != "name":
                continue  # an empty instance or role is the normal case
            for op in ("create", "remove", "expose"):
                fields = {field: value} if field != "name" else {}
                raw = body_of(op, value if field == "name" else "hostile-app", **fields)
                seen[value, op] = post(harp, op, raw, key).status
    calls = watch.calls
    record_case(case=f"k8s/name/{field}", input=f"{len(HOSTILE_NAMES)} names x 3 endpoints",
                expected="400, no API call",
                observed=f"{sorted(set(seen.values()))}, {len(calls)} API calls", measured=m)
    assert set(seen.values()) == {400}, {k: v for k, v in seen.items() if v != 400}
    assert calls == []
    assert objects(kube) == before_objects


def test_k8s_odd_but_valid_names_become_dns_labels_inside_the_namespace(
    harp: HarpProcess, key: str, kube: KubeAPI, record_case: RecordCase,
) -> None:
    """Upper case, dots, underscores, 128 characters: accepted (Docker's alphabet) and
    sanitised (docs/kubernetes.md#behaviour), every label value one the API accepts."""
    parts = [("UPPER.Case_app", "", ""), ("a" * 128, "", ""),
             ("app", "Inst.ance_" + "i" * 100 + ".", ""),
             ("app2", "", "Role.X_" + "r" * 120), ("x.-_y", "ID.", "r-")]
    watch = Watch(kube, harp)
    statuses = []
    for name, instance, role in parts:
        raw = json.dumps({"name": name, "instance_id": instance, "role_suffix": role,
                          "image": IMAGE}).encode()
        statuses.append(post(harp, "create", raw, key).status)
    calls = watch.calls
    created = [o for o in objects(kube) if o[0] in ("deployments", "persistentvolumeclaims")]
    bad_names = [o for o in created if not DNS_LABEL.fullmatch(o[2])]
    bad_labels = []
    for plural, ns, name in created:
        obj = kube.get(("apps/v1/" if plural == "deployments" else "v1/") + plural, name, ns)
        assert obj is not None
        for label, value in (obj.get("metadata") or {}).get("labels", {}).items():
            if not LABEL_VALUE.fullmatch(value):
                bad_labels.append((name, label, value))
    record_case(case="k8s/name/sanitised", input=repr([p[0][:20] for p in parts]),
                expected="201, DNS-1123 names, valid label values, paths in namespace",
                observed=f"{sorted(set(statuses))}, bad names {len(bad_names)}, "
                         f"bad labels {len(bad_labels)}, outside {len(outside(calls))}")
    assert set(statuses) == {201}
    assert outside(calls) == []
    assert bad_names == []
    assert bad_labels == []
    for name, instance, role in parts:  # clean up: remove with data
        raw = json.dumps({"name": name, "instance_id": instance, "role_suffix": role,
                          "remove_data": True}).encode()
        assert post(harp, "remove", raw, key).status == 204


# --- expose options


def test_k8s_expose_out_of_range_options_are_400_without_an_api_call(
    harp: HarpProcess, key: str, kube: KubeAPI, record_case: RecordCase,
) -> None:
    options: list[dict[str, Any]] = [
        {"expose_type": "headless"}, {"expose_type": "ExternalName"}, {"expose_type": 1},
        {"port": 0}, {"port": 65536}, {"port": -1}, {"port": True}, {"port": 1.5},
        {"port": None}, {"node_port": 80, "expose_type": "nodeport"},
        {"node_port": 32768, "expose_type": "nodeport"},
        {"service_port": 70000}, {"upstream_port": 0},
        {"external_traffic_policy": "Everywhere"}, {"node_address_type": "Hostname"},
        {"wait_timeout_seconds": 601}, {"wait_timeout_seconds": -1},
        {"wait_interval_seconds": 0}, {"wait_interval_seconds": "1"},
        {"expose_type": "manual"}, {"expose_type": "manual", "upstream_host": "evil/../x"},
        {"upstream_host": "host name"}, {"upstream_host": "a@b"},
    ]
    watch = Watch(kube, harp)
    seen = [post(harp, "expose", body_of("expose", **option), key).status for option in options]
    calls = watch.calls
    refused = [o for o, s in zip(options, seen, strict=True) if s != 400]
    record_case(case="k8s/expose/out-of-range", input=f"{len(options)} option sets",
                expected="400, no API call",
                observed=f"{sorted(set(seen))}, {len(calls)} API calls")
    assert refused == []
    assert calls == []


def test_k8s_expose_labels_cannot_retarget_discovery(
    harp: HarpProcess, key: str, kube: KubeAPI, nextcloud: FakeNextcloud,
    record_case: RecordCase,
) -> None:
    """``service_labels`` cannot overwrite the labels HaRP finds and removes Services by
    (``app``, ``part-of``, ``managed-by``): else one app's Service would answer for
    another app's discovery (docs/kubernetes.md#routing)."""
    nextcloud.apps["labeller"] = {"exapp_token": "t", "exapp_version": "1", "host": "labeller",
                                  "port": 23000, "routes": []}
    hostile = {"app": "nc-app-victim", "app.kubernetes.io/part-of": "nc-app-victim",
               "app.kubernetes.io/managed-by": "operator", "app.kubernetes.io/name": "x",
               "team": "x,app=other"}
    answer = post(harp, "expose", body_of("expose", "labeller", service_labels=hostile,
                                          service_annotations={"a": "x,app=other"}), key)
    service = kube.get("v1/services", "nc-app-labeller") or {}
    labels = (service.get("metadata") or {}).get("labels") or {}
    selector = (service.get("spec") or {}).get("selector")
    victim = [s for s in kube.call(lambda: list(kube.server.objects.items()))
              if s[0][0].plural == "services" and not s[1].deleted
              and (s[1].raw.get("metadata") or {}).get("labels", {}).get(
                  "app.kubernetes.io/part-of") == "nc-app-victim"]
    record_case(case="k8s/expose/label-override", input=json.dumps(hostile),
                expected="HaRP's labels win (or 400)",
                observed=f"{answer.status}, part-of={labels.get('app.kubernetes.io/part-of')}, "
                         f"managed-by={labels.get('app.kubernetes.io/managed-by')}")
    assert answer.status in (200, 400)
    if answer.status == 200:
        assert labels.get("app") == "nc-app-labeller"
        assert labels.get("app.kubernetes.io/part-of") == "nc-app-labeller"
        assert labels.get("app.kubernetes.io/managed-by") == "harp"
        assert labels.get("app.kubernetes.io/name") == "nc-app-labeller"
        assert selector == {"app": "nc-app-labeller"}
    assert victim == []
    assert post(harp, "remove", body_of("remove", "labeller"), key).status == 204
    assert kube.get("v1/services", "nc-app-labeller") is None  # managed-by stayed harp


def test_k8s_expose_node_selector_and_name_stay_query_values(
    harp: HarpProcess, key: str, kube: KubeAPI, nextcloud: FakeNextcloud,
    record_case: RecordCase,
) -> None:
    """Odd ``node_label_selector`` / ``node_name``: the selector travels as one encoded
    query value of the node list, the node name only filters; no other path is asked."""
    nextcloud.apps["noder"] = {"exapp_token": "t", "exapp_version": "1", "host": "noder",
                               "port": 23000, "routes": []}
    kube.add_node("node-a", [("InternalIP", "10.1.2.3")])
    selector = "x,app=other&fieldSelector=metadata.name=node-a#frag /../../api/v1/secrets"
    watch = Watch(kube, harp)
    seen = []
    for fields in ({"node_label_selector": selector},
                   {"node_name": "../../namespaces/kube-system/secrets/token"},
                   {"node_name": "node-a/../../x", "node_label_selector": "!"}):
        seen.append(post(harp, "expose", body_of("expose", "noder", expose_type="nodeport",
                                                 **fields), key).status)
    calls = watch.calls
    parsed = kube.call(lambda: [{k: list(r.url.query.getall(k)) for k in r.url.query}
                                for r in list(kube.server)[watch.start:]
                                if r.url.path == "/api/v1/nodes"])
    record_case(case="k8s/expose/node-selector", input=selector,
                expected="200/503, one labelSelector value, no other path",
                observed=f"{seen}, outside {len(outside(calls))}, "
                         f"node queries {[sorted(q) for q in parsed]}")
    assert set(seen) <= {200, 503}
    assert outside(calls) == []
    assert all(set(q) <= {"labelSelector"} for q in parsed)
    assert {"labelSelector": [selector]} in parsed
    assert post(harp, "remove", body_of("remove", "noder"), key).status == 204
    assert watch.new_tracebacks() == 0


# --- remove


def test_k8s_remove_deletes_nothing_harp_did_not_create(
    harp: HarpProcess, key: str, kube: KubeAPI, record_case: RecordCase,
) -> None:
    kube.put("v1/services", "nc-app-operated", {"metadata": {"labels": {"app": "x"}},
                                                 "spec": {"type": "ClusterIP"}})
    kube.put("v1/services", "nc-app-ghost", {"spec": {"type": "ClusterIP"}},
             namespace=OTHER_NS)
    kube.put("apps/v1/deployments", "nc-app-ghost", {"spec": {"replicas": 1}},
             namespace=OTHER_NS)
    kube.put("v1/persistentvolumeclaims", "nc-app-ghost-data", {"spec": {}},
             namespace=OTHER_NS)
    kube.put("apps/v1/deployments", "unrelated", {"metadata": {"labels": {"app": "other"}}})
    before = objects(kube)
    watch = Watch(kube, harp)
    seen = [post(harp, "remove", body_of("remove", name, remove_data=True), key).status
            for name in ("ghost", "operated", "unrelated", "GHOST", "nc_app_ghost")]
    calls = watch.calls
    deletes = [(m, p) for m, p in calls if m == "DELETE"]
    gone = before - objects(kube)
    record_case(case="k8s/remove/foreign", input="remove of absent apps and a foreign Service",
                expected="204, foreign objects survive, nothing outside namespace",
                observed=f"{sorted(set(seen))}, gone {sorted(gone)}, outside "
                         f"{len(outside(calls))}")
    assert set(seen) == {204}
    assert gone == set()
    assert outside(calls) == []
    assert all(p.split("/")[-1] in ("nc-app-ghost", "nc-app-ghost-data", "nc-app-operated",
                                    "nc-app-operated-data", "nc-app-unrelated",
                                    "nc-app-unrelated-data", "nc-app-nc-app-ghost",
                                    "nc-app-nc-app-ghost-data") for _, p in deletes)


# --- backend disabled


def test_k8s_disabled_backend_answers_503_everywhere(
    harp_off: HarpProcess, key: str, record_case: RecordCase,
    measure: Callable[[Any], Any],
) -> None:
    seen, crashes = {}, tracebacks(harp_off)
    with measure(harp_off) as m:
        for op in ENDPOINTS:
            answer = post(harp_off, op, body_of(op), key)
            seen[op] = (answer.status, answer.body)
        bad_body = post(harp_off, "create", b"{", key).status
        bad_key = post(harp_off, "create", body_of("create"), "wrong").status
    record_case(case="k8s/disabled", input="every endpoint, valid bodies",
                expected="503 'disabled' (certs 204), bad body 400, bad key 401",
                observed=f"{sorted({s for s, _ in seen.values()})}, {bad_body}, {bad_key}",
                measured=m)
    for op, (status, body) in seen.items():
        if op == "install_certificates":
            assert status == 204
        else:
            assert (status, body) == (503, DISABLED), op
    assert bad_body == 400
    assert bad_key == 401
    assert tracebacks(harp_off) == crashes
