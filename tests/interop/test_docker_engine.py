"""HaRP's Docker side against a real engine on the local socket (engine port 24000).

One ``twistd harp`` with ``HP_DOCKER_SOCKET`` pointing at the session's engine serves the
module.  The deploy test replays AppAPI's deploy sequence
(docs/compatibility.md#docker-lifecycle-endpoints) with the requests Nextcloud sends; the allow-list
tests prove that nothing but AppAPI's five raw calls reaches the engine, whatever the spelling of
the path.

dockerd 20.10 (the default peer) serves API ≤ 1.41 and answers ``/v1.44/...`` with 400, so the
raw calls use the ``v1.41`` prefix (AppAPI ≤ 32.0.2, or its ``docker_api_version`` setting);
a separate test shows a ``/v1.44`` prefix is forwarded unchanged.
"""

from __future__ import annotations

import http.client
import io
import json
import secrets
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import HarpProcess, free_port
from tests.interop.docker_helpers import (
    LOCAL_IMAGE,
    AppApi,
    Engine,
    docker_engine,
    harp_env_for,
    parse_frames,
    running_harp,
)

pytestmark = pytest.mark.interop
__all__ = ["docker_engine"]  # the session fixture, re-exported for pytest


@pytest.fixture(scope="module")
def harp(docker_engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HarpProcess]:
    workdir = tmp_path_factory.mktemp("harp-docker")
    with running_harp(workdir, harp_env_for(workdir, docker_engine.socket_path)) as proc:
        yield proc


@pytest.fixture
def appapi(harp: HarpProcess) -> AppApi:
    return AppApi(harp, 24000)


@pytest.fixture
def api_version(docker_engine: Engine) -> str:
    return "v1.44" if docker_engine.kind == "podman" else "v1.41"


@pytest.fixture
def app_id(docker_engine: Engine) -> Iterator[str]:
    """A fresh app id; its container and volume are force-removed afterwards."""
    name = f"harptest{secrets.token_hex(4)}"
    yield name
    docker_engine.force_remove(f"nc_app_{name}", f"nc_app_{name}_data")


def _create_payload(app_id: str, image: str, **extra: object) -> dict[str, object]:
    """The create body exactly as AppAPI sends it (captured), with the test image."""
    port = free_port()
    payload: dict[str, object] = {
        "name": app_id,
        "instance_id": "",
        "image_id": image,
        "network_mode": "host",
        "environment_variables": [
            "AA_VERSION=33.0.1", f"APP_SECRET={secrets.token_hex(64)}", f"APP_ID={app_id}",
            "APP_DISPLAY_NAME=Test", "APP_VERSION=1.0.0", "APP_HOST=127.0.0.1",
            f"APP_PORT={port}", f"APP_PERSISTENT_STORAGE=/nc_app_{app_id}_data",
            "NEXTCLOUD_URL=http://127.0.0.1:9", "COMPUTE_DEVICE=CPU",
        ],
        "restart_policy": "unless-stopped",
        "compute_device": "cpu",
        "mount_points": [],
        "start_container": True,
        "resource_limits": {"memory": None, "nanoCPUs": None},
    }
    payload.update(extra)
    return payload


def _archive_file(engine: Engine, container: str, path: str) -> bytes:
    status, data = engine.api("GET", f"/containers/{container}/archive?path={path}")
    assert status == 200, (path, data[:300])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.extractfile(path.rsplit("/", 1)[1])
        assert member is not None
        return member.read()


def _state(engine: Engine, container: str) -> dict[str, object]:
    status, info = engine.api_json("GET", f"/containers/{container}/json")
    assert status == 200
    state = info["State"]
    assert isinstance(state, dict)
    return state


# --------------------------------------------------------------------------- ping


def test_ping_local_socket(appapi: AppApi, api_version: str) -> None:
    status, headers, body = appapi.raw("GET", f"/{api_version}/_ping", timeout=3)
    assert (status, body) == (200, b"OK")
    assert "api-version" in headers
    status, _, body = appapi.raw("HEAD", f"/{api_version}/_ping", timeout=3)
    assert (status, body) == (200, b"")
    status, _, body = appapi.raw("GET", "/_ping", timeout=3)
    assert (status, body) == (200, b"OK")


def test_version_prefix_is_forwarded_unchanged(
    appapi: AppApi, docker_engine: Engine
) -> None:
    status, _, body = appapi.raw("GET", "/v1.44/_ping", timeout=3)
    if docker_engine.kind == "podman":
        assert status == 200
    else:
        # dockerd 20.10 itself rejects the 1.44 prefix: proof that it got it verbatim.
        assert status == 400
        assert b"1.44 is too new" in body


# --------------------------------------------------------------------------- deploy


def test_deploy_sequence(
    appapi: AppApi, docker_engine: Engine, harp: HarpProcess, api_version: str, app_id: str
) -> None:
    """AppAPI's deployExAppHarp + enable + disable + unregister, request by request."""
    engine = docker_engine
    container, volume = f"nc_app_{app_id}", f"nc_app_{app_id}_data"
    base_ref = engine.registry_ref
    # Make the pull real: drop the local tag of the registry image (the layer stays shared).
    engine.api("DELETE", f"/images/{base_ref}")
    timings: dict[str, float] = {}

    # 0→94: pull the extended ref (missing tag → an HTTP error → fall back), then the base.
    t0 = time.monotonic()
    status, _, body = appapi.raw(
        "POST", f"/{api_version}/images/create?fromImage={base_ref}-cpu".replace(":", "%3A"),
        headers=appapi.headers(Connection="close"),
    )
    assert status >= 400, body
    conn = appapi.connection()
    conn.request(
        "POST", f"/exapps/app_api/{api_version}/images/create?fromImage="
        + base_ref.replace(":", "%3A").replace("/", "%2F"),
        headers=appapi.headers(Connection="close"),
    )
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("content-length") is None  # streamed, not buffered
    lines = []
    while True:
        line = resp.readline()
        if not line:
            break
        if line.strip():
            lines.append(json.loads(line))
    conn.close()
    timings["pull"] = time.monotonic() - t0
    statuses = [item.get("status", "") for item in lines]
    assert not any("error" in item for item in lines), lines
    assert len(lines) >= 3, lines
    assert statuses[0].startswith("Pulling from"), statuses
    assert any(s.startswith("Status: Downloaded newer image") for s in statuses), statuses

    # 95: exists → false; (remove only when it exists)
    assert appapi.exapp("exists", {"name": app_id, "instance_id": ""}) == (
        200, {"exists": False}
    )
    # 96→97: create → exactly 201 {"id","name"}
    t0 = time.monotonic()
    status, created = appapi.exapp("create", _create_payload(app_id, base_ref))
    timings["create"] = time.monotonic() - t0
    assert status == 201, created
    assert created["name"] == container and len(created["id"]) >= 12
    assert engine.api("GET", f"/volumes/{volume}")[0] == 200
    status, info = engine.api_json("GET", f"/containers/{container}/json")
    assert info["Config"]["Hostname"] == app_id
    assert info["HostConfig"]["NetworkMode"] == "host"
    assert info["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert any(m["Name"] == volume and m["Destination"] == f"/{volume}" for m in info["Mounts"])
    # a second deploy over a leftover container: exists → true (with image_ref) → remove
    assert appapi.exapp("exists", {"name": app_id, "instance_id": ""}) == (
        200, {"exists": True, "image_ref": base_ref}
    )
    assert appapi.exapp("create", _create_payload(app_id, base_ref))[0] == 409
    assert appapi.exapp(
        "remove", {"name": app_id, "instance_id": "", "remove_data": False}
    ) == (204, "")
    status, created = appapi.exapp("create", _create_payload(app_id, base_ref))
    assert status == 201, created

    # 98: install_certificates (180 s client timeout) → 204, container still stopped
    ca_pem = (Path(harp.env["HP_CERTS_DIR"]) / "frp" / "ca.crt").read_text()
    t0 = time.monotonic()
    status, body = appapi.exapp("install_certificates", {
        "name": app_id, "instance_id": "", "system_certs_bundle": ca_pem + ca_pem,
        "install_frp_certs": True,
    })
    timings["install_certificates"] = time.monotonic() - t0
    assert (status, body) == (204, "")
    assert _state(engine, container)["Running"] is False
    frp_dir = Path(harp.env["HP_CERTS_DIR"]) / "frp"
    for name in ("ca.crt", "client.crt", "client.key"):
        assert _archive_file(engine, container, f"/certs/frp/{name}") == (
            frp_dir / name
        ).read_bytes()
    for i in (0, 1):
        installed = _archive_file(
            engine, container, f"/usr/local/share/ca-certificates/custom_ca_cert_{i}.crt"
        )
        assert installed.strip() == ca_pem.strip().encode()
    # the image's update-ca-certificates stand-in ran and concatenated them
    assert _archive_file(engine, container, "/etc/ca-bundle.pem").count(b"BEGIN") == 2

    # start → 204 (200 would be a deploy error); wait_for_start → started
    assert appapi.exapp("start", {"name": app_id, "instance_id": ""}) == (204, "")
    t0 = time.monotonic()
    status, waited = appapi.exapp("wait_for_start", {"name": app_id, "instance_id": ""})
    timings["wait_for_start"] = time.monotonic() - t0
    assert (status, waited) == (200, {"started": True, "status": "running", "health": None})
    assert timings["wait_for_start"] < 5

    # healthcheckContainer: raw inspect
    status, _, body = appapi.raw("GET", f"/{api_version}/containers/{container}/json")
    assert status == 200
    state = json.loads(body)["State"]
    assert state["Running"] is True and not (state.get("Health") or {}).get("Status")

    # getContainerLogs: the multiplexed stream, raw
    deadline = time.monotonic() + 10
    while True:
        status, _, body = appapi.raw(
            "GET", f"/{api_version}/containers/{container}/logs?stdout=true&stderr=true&tail=all"
        )
        assert status == 200
        frames = parse_frames(body)
        if {1, 2} <= {kind for kind, _ in frames} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert any(kind == 1 and b"listening on" in data for kind, data in frames), frames
    assert any(kind == 2 and b"to stderr" in data for kind, data in frames), frames

    # enable again: start → 200 "already started" (fine for enable)
    assert appapi.exapp("start", {"name": app_id, "instance_id": ""}) == (
        200, "Container already started"
    )
    # disable: stop → 204, again → 200
    assert appapi.exapp("stop", {"name": app_id, "instance_id": ""}) == (204, "")
    assert appapi.exapp("stop", {"name": app_id, "instance_id": ""}) == (
        200, "Container already stopped"
    )
    # unregister: exists → remove (keep data), then daemon removal: remove_data true
    assert appapi.exapp("exists", {"name": app_id, "instance_id": ""})[1]["exists"] is True
    assert appapi.exapp(
        "remove", {"name": app_id, "instance_id": "", "remove_data": False}
    ) == (204, "")
    assert engine.api("GET", f"/containers/{container}/json")[0] == 404
    assert engine.api("GET", f"/volumes/{volume}")[0] == 200
    assert appapi.exapp(
        "remove", {"name": app_id, "instance_id": "", "remove_data": True}
    ) == (204, "")
    assert engine.api("GET", f"/volumes/{volume}")[0] == 404
    assert appapi.exapp("exists", {"name": app_id, "instance_id": ""}) == (
        200, {"exists": False}
    )

    # image cleanup: the registry tag goes (the image stays under its local tag)
    status, removed = appapi.exapp("image_remove", {"image_ref": base_ref})
    assert status == 200 and removed["deleted"] is True, removed
    assert isinstance(removed["bytes_freed"], int) and "reason" not in removed
    assert appapi.exapp("image_remove", {"image_ref": base_ref}) == (
        200, {"deleted": True, "bytes_freed": 0, "reason": "not_found"}
    )
    print("deploy timings:", {k: round(v, 2) for k, v in timings.items()})


def test_install_certificates_keeps_running_container_running(
    appapi: AppApi, docker_engine: Engine, harp: HarpProcess, app_id: str
) -> None:
    assert appapi.exapp("create", _create_payload(app_id, LOCAL_IMAGE))[0] == 201
    assert appapi.exapp("start", {"name": app_id, "instance_id": ""})[0] == 204
    status, body = appapi.exapp("install_certificates", {
        "name": app_id, "instance_id": "", "system_certs_bundle": None,
        "install_frp_certs": True,
    })
    assert (status, body) == (204, "")
    assert _state(docker_engine, f"nc_app_{app_id}")["Running"] is True
    key = (Path(harp.env["HP_CERTS_DIR"]) / "frp" / "client.key").read_bytes()
    assert _archive_file(docker_engine, f"nc_app_{app_id}", "/certs/frp/client.key") == key
    assert appapi.exapp("install_certificates", {"name": "harp-nonexistent"})[0] == 404


def test_wait_for_start_reports_exited_and_missing(
    appapi: AppApi, docker_engine: Engine, app_id: str
) -> None:
    assert appapi.exapp("wait_for_start", {"name": "harp-nonexistent", "instance_id": ""}) == (
        200, {"started": False, "status": "not_found", "reason": "container not found"}
    )
    payload = _create_payload(app_id, LOCAL_IMAGE, restart_policy="no")
    env = payload["environment_variables"]
    assert isinstance(env, list)
    env.append("APP_HOST=no-such-host.invalid")  # httpd cannot bind: the app exits at once
    assert appapi.exapp("create", payload)[0] == 201
    assert appapi.exapp("start", {"name": app_id})[0] == 204
    # The app runs for a moment before httpd fails: a poll in that moment rightly says
    # "running".  Wait until the engine itself reports the exit, then ask.
    deadline = time.monotonic() + 10
    while _state(docker_engine, f"nc_app_{app_id}")["Running"]:
        assert time.monotonic() < deadline, "the test app did not exit"
        time.sleep(0.1)
    t0 = time.monotonic()
    status, waited = appapi.exapp("wait_for_start", {"name": app_id})
    assert time.monotonic() - t0 < 10
    assert status == 200
    assert waited["started"] is False
    assert waited["status"] in ("exited", "dead")
    assert waited["reason"] == f"non-recoverable state: {waited['status']}"
    assert appapi.exapp("start", {"name": "harp-nonexistent"})[0] == 404
    assert appapi.exapp("stop", {"name": "harp-nonexistent"})[0] == 404


# --------------------------------------------------------------------------- allow-list


def _containers(engine: Engine) -> set[str]:
    status, items = engine.api_json("GET", "/containers/json?all=1")
    assert status == 200
    return {name for item in items for name in item["Names"]}


DENIED_RAW = [
    ("POST", "/v1.41/containers/create?name=nc_app_evil"),
    ("POST", "/containers/create?name=nc_app_evil"),
    ("POST", "/V1.41/CONTAINERS/CREATE?name=nc_app_evil"),
    ("GET", "/v1.41/containers/json?all=1"),
    ("GET", "/v1.41/info"),
    ("GET", "/v1.41/containers/other/json"),
    ("DELETE", "/v1.41/images/x"),
    ("POST", "/v1.41/images/create/x"),
    ("GET", "/v1.41//containers/json"),
    ("POST", "/v1.41//containers/create?name=nc_app_evil"),
    ("POST", "/v1.41/containers%2Fcreate?name=nc_app_evil"),
    ("POST", "/v1.41/images%2Fcreate%2F%2Fcontainers%2Fcreate?name=nc_app_evil"),
    ("GET", "/v1.41/images/%252e%252e/containers/json"),
    ("GET", "/v1.41/images/x%2F%2F..json/json"),
    ("GET", "/v1.41/_ping%3F/containers/json"),
]
#: Dot-dot segments: the pipeline drops these before the control plane
#: (docs/compatibility.md#request-pipeline).
DROPPED_RAW = [
    ("POST", "/v1.41/images/create/../../containers/create?name=nc_app_evil"),
    ("POST", "/v1.41/images/create/%2e%2e/%2E%2E/containers/create?name=nc_app_evil"),
    ("GET", "/v1.41/containers/nc_app_x%2F..%2F..%2Fcontainers%2Fjson/json"),
    ("GET", "/v1.41/images/a/..%2f..%2fcontainers%2fjson/json"),
    ("GET", "/v1.41/_ping%3F/../containers/json"),
]


def test_allow_list_denies_everything_else(appapi: AppApi, docker_engine: Engine) -> None:
    before = _containers(docker_engine)
    for method, path in DENIED_RAW:
        status, _, body = appapi.raw(method, path, timeout=5)
        assert (status, body) == (403, b"403 Forbidden"), (method, path, status, body)
    for method, path in DROPPED_RAW:
        try:
            status, _, _ = appapi.raw(method, path, timeout=5)
        except (OSError, http.client.HTTPException):
            continue  # dropped without a response
        assert status in (403, 404), (method, path, status)
    assert _containers(docker_engine) == before
    assert not any("evil" in name for name in _containers(docker_engine))


def test_image_json_passthrough(appapi: AppApi, api_version: str) -> None:
    status, _, body = appapi.raw("GET", f"/{api_version}/images/{LOCAL_IMAGE}/json")
    assert status == 200 and json.loads(body)["RepoTags"]
    encoded = LOCAL_IMAGE.replace("/", "%2F")
    assert appapi.raw("GET", f"/{api_version}/images/{encoded}/json")[0] == 200
    assert appapi.raw("GET", f"/{api_version}/images/no/such:image/json")[0] == 404


# --------------------------------------------------------------------------- errors


def test_engine_selection_errors(harp: HarpProcess) -> None:
    for value, status in (("abc", 400), ("2375", 400), ("8780", 400), ("24100", 400),
                          ("24007", 503)):
        appapi = AppApi(harp, value)
        got, headers, body = appapi.raw("GET", "/v1.41/_ping", timeout=5)
        assert got == status, (value, got, body)
        assert headers["content-type"] == "application/json"
        if status == 503:
            assert "24007" in json.loads(body)["error"]
        got, body2 = appapi.exapp("exists", {"name": "x"})
        assert got == status, (value, body2)
    # wrappers without the header: the reference's 400
    appapi = AppApi(harp)
    headers = appapi.headers(**{"Content-Type": "application/json"})
    del headers["docker-engine-port"]
    status, _, body = appapi.raw("POST", "/docker/exapp/exists", b'{"name":"x"}', headers=headers)
    assert (status, body) == (400, b"Missing 'docker-engine-port' header.")


def test_payload_errors(appapi: AppApi, docker_engine: Engine) -> None:
    status, _, body = appapi.raw("POST", "/docker/exapp/exists", b"{nope")
    assert (status, body) == (400, b"Invalid JSON body")
    before = _containers(docker_engine)
    for name in ("../x", "x/../../containers/create", "a?force=true", "a%2f..", ""):
        status, body = appapi.exapp("remove", {"name": name, "remove_data": True})
        assert status == 400 and body.startswith("Payload validation error"), (name, body)
    status, body = appapi.exapp("image_remove", {"image_ref": "a/../../containers/x"})
    assert status == 400
    assert _containers(docker_engine) == before


def test_local_socket_missing_is_503(tmp_path: Path, docker_engine: Engine) -> None:
    with running_harp(tmp_path, harp_env_for(tmp_path, tmp_path / "no-docker.sock")) as proc:
        appapi = AppApi(proc, 24000)
        status, _, body = appapi.raw("GET", "/v1.41/_ping", timeout=5)
        assert status == 503
        assert "24000" in json.loads(body)["error"]
        assert appapi.exapp("exists", {"name": "x"})[0] == 503
        # the shared key must be right first
        bad = appapi.headers()
        bad["harp-shared-key"] = "wrong"
        assert appapi.raw("GET", "/v1.41/_ping", headers=bad, timeout=5)[0] == 401
