"""Pure parts of harp.docker: allow-list, engine port parsing, names, payloads, helpers."""

from __future__ import annotations

import io
import socket
import struct
import tarfile
from pathlib import Path

import pytest

from harp.docker.allowlist import allowed_target
from harp.docker.archive import tar_of
from harp.docker.certificates import ca_target
from harp.docker.engines import (
    SOCKET_RECHECK,
    EngineEndpoints,
    EngineSelectionError,
    parse_port,
)
from harp.docker.names import (
    CertificatesPayload,
    CreatePayload,
    ExAppName,
    PayloadError,
    RemovePayload,
    parse_image_ref,
    parse_json_object,
    valid_image_ref,
)
from harp.docker.wire import container_config, demux

# --------------------------------------------------------------------------- allow-list

ALLOWED = [
    (b"GET", b"/v1.44/_ping"),
    (b"HEAD", b"/v1.44/_ping"),
    (b"GET", b"/_ping"),
    (b"GET", b"/v1.41/_ping"),
    (b"GET", b"/v2/_ping"),
    (b"GET", b"/V1.44/_PING"),
    (b"POST", b"/v1.44/images/create"),
    (b"POST", b"/images/create"),
    (b"GET", b"/v1.44/images/ghcr.io/nextcloud/test-deploy:release/json"),
    (b"GET", b"/v1.44/images/127.0.0.1:5000/nextcloud/x:release-cpu/json"),
    (b"HEAD", b"/v1.44/images/alpine/json"),
    (b"GET", b"/v1.44/containers/nc_app_test-deploy/json"),
    (b"GET", b"/v1.44/containers/nc_app_test_deploy/logs"),
    (b"GET", b"/containers/nc_app_Some.App-1/json"),
]


@pytest.mark.parametrize(("method", "path"), ALLOWED)
def test_allowed(method: bytes, path: bytes) -> None:
    assert allowed_target(method, path) == path


def test_encoded_image_ref_is_decoded_for_the_engine() -> None:
    assert (
        allowed_target(b"GET", b"/v1.44/images/ghcr.io%2Fnextcloud%2Fx%3Arelease/json")
        == b"/v1.44/images/ghcr.io/nextcloud/x:release/json"
    )


DENIED = [
    (b"POST", b"/v1.44/containers/create"),
    (b"POST", b"/containers/create"),
    (b"GET", b"/v1.44/containers/json"),
    (b"GET", b"/v1.44/containers/other/json"),
    (b"GET", b"/v1.44/containers/nc_app_x/archive"),
    (b"POST", b"/v1.44/containers/nc_app_x/start"),
    (b"DELETE", b"/v1.44/containers/nc_app_x"),
    (b"DELETE", b"/v1.44/images/x/json"),
    (b"POST", b"/v1.44/_ping"),
    (b"PUT", b"/v1.44/images/create"),
    (b"GET", b"/v1.44/images/create"),
    (b"POST", b"/v1.44/images/x/push"),
    (b"GET", b"/v1.44/info"),
    (b"GET", b"/v1.44/_ping/"),
    (b"GET", b""),
    (b"GET", b"/"),
    (b"GET", b"_ping"),
    (b"GET", b"/vx/_ping"),
    # path tricks
    (b"GET", b"/v1.44//_ping"),
    (b"GET", b"//v1.44/_ping"),
    (b"GET", b"/v1.44/images/../containers/json/json"),
    (b"GET", b"/v1.44/images/%2e%2e/containers/create/json"),
    (b"GET", b"/v1.44/images/%2E%2e%2Fcontainers%2Fcreate/json"),
    (b"GET", b"/v1.44/images/./json"),
    (b"GET", b"/v1.44/images//json"),
    (b"GET", b"/v1.44/images/x%2F%2Fy/json"),
    (b"GET", b"/v1.44/containers/nc_app_x%2F..%2F..%2Fcontainers%2Fcreate/json"),
    (b"GET", b"/v1.44/containers/nc_app_x%2Fjson%3F/logs"),
    (b"POST", b"/v1.44/images/create%3FfromImage=x"),
    (b"POST", b"/v1.44/images/create/..%2F..%2Fcontainers%2Fcreate"),
    (b"POST", b"/v1.44/images/create%00"),
    (b"GET", b"/v1.44/images/%252e%252e/json"),
    (b"GET", b"/v1.44/images/a%5C..%5Cb/json"),
    (b"GET", b"/v1.44/images/a b/json"),
    (b"GET", b"/v1.44/images/a#/json"),
    (b"GET", b"/v1.44/_ping%0d%0aX-Injected:%201"),
]


@pytest.mark.parametrize(("method", "path"), DENIED)
def test_denied(method: bytes, path: bytes) -> None:
    assert allowed_target(method, path) is None


# --------------------------------------------------------------------------- engine port


@pytest.mark.parametrize("raw", [b"24000", b" 24000 ", b"24001", b"24099"])
def test_port_ok(raw: bytes) -> None:
    assert parse_port(raw) == int(raw)


@pytest.mark.parametrize(
    "raw", [None, b"", b"abc", b"-1", b"24000.0", b"0x5dc0", b"23000", b"24100", b"2375",
            b"65536", b"99999999999", b"80", b"+24000"],
)
def test_port_rejected_400(raw: bytes | None) -> None:
    with pytest.raises(EngineSelectionError) as err:
        parse_port(raw)
    assert err.value.status == 400


def test_local_engine_missing_is_503_naming_port(tmp_path: Path) -> None:
    endpoints = EngineEndpoints(None, tmp_path / "absent.sock", None, 5)
    with pytest.raises(EngineSelectionError) as err:
        endpoints.require(24000)
    assert err.value.status == 503
    assert "24000" in err.value.message
    with pytest.raises(EngineSelectionError) as err:
        endpoints.require(24017)
    assert err.value.status == 503
    assert "24017" in err.value.payload()["error"]


def test_a_found_engine_socket_is_remembered_for_a_second(tmp_path: Path) -> None:
    """One stat per SOCKET_RECHECK, not per request; a missing socket is never remembered."""
    path = tmp_path / "docker.sock"
    now = [100.0]
    endpoints = EngineEndpoints(None, path, None, 5)
    endpoints.clock = lambda: now[0]
    assert not endpoints.local_socket()  # absent: not remembered
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        assert endpoints.local_socket()  # appeared: seen at once
    path.unlink()
    now[0] += SOCKET_RECHECK / 2
    assert endpoints.local_socket()  # believed without a stat
    now[0] += SOCKET_RECHECK
    assert not endpoints.local_socket()  # asked again: gone
    with pytest.raises(EngineSelectionError):
        endpoints.require(24000)


def test_regular_file_is_not_an_engine_socket(tmp_path: Path) -> None:
    path = tmp_path / "docker.sock"
    path.write_text("")
    assert not EngineEndpoints(None, path, None, 5).local_socket()


# --------------------------------------------------------------------------- names


def test_names() -> None:
    app = ExAppName.parse({"name": "test-deploy", "instance_id": ""})
    assert (app.container, app.volume) == ("nc_app_test-deploy", "nc_app_test-deploy_data")
    app = ExAppName.parse({"name": "x", "instance_id": "inst", "role_suffix": "worker"})
    assert (app.container, app.volume) == ("nc_app_inst_x_worker", "nc_app_inst_x_data")
    app = ExAppName.parse({"name": "x", "role_suffix": "worker"})
    assert (app.container, app.volume) == ("nc_app_x_worker", "nc_app_x_data")


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"name": ""},
        {"name": 5},
        {"name": "../x"},
        {"name": "a/b"},
        {"name": "a?force=true"},
        {"name": "a%2fb"},
        {"name": "a b"},
        {"name": "-a"},
        {"name": "x" * 200},
        {"name": "ok", "instance_id": "a/b"},
        {"name": "ok", "role_suffix": "x#y"},
    ],
)
def test_bad_names(payload: dict[str, object]) -> None:
    with pytest.raises(PayloadError, match="Payload validation error"):
        ExAppName.parse(payload)


def test_json_body() -> None:
    with pytest.raises(PayloadError, match=r"^Invalid JSON body$"):
        parse_json_object(b"{nope")
    with pytest.raises(PayloadError, match="Payload validation error"):
        parse_json_object(b"[1]")
    assert parse_json_object(b'{"a":1}') == {"a": 1}


def test_image_refs() -> None:
    assert valid_image_ref("ghcr.io/nextcloud/test-deploy:release-cpu")
    assert valid_image_ref("127.0.0.1:5000/a/b@sha256:" + "a" * 64)
    for bad in ("", "a/../b", "a//b", "/a", "a?x", "a b", "a%2f", "../../containers/x"):
        assert not valid_image_ref(bad), bad
    with pytest.raises(PayloadError):
        parse_image_ref({"image_ref": "x/../../containers/create"})


CAPTURED_CREATE = {
    "name": "test-deploy", "instance_id": "",
    "image_id": "ghcr.io/nextcloud/test-deploy:release-cpu", "network_mode": "host",
    "environment_variables": ["APP_ID=test-deploy", "APP_PORT=23000"],
    "restart_policy": "unless-stopped", "compute_device": "cpu",
    "mount_points": [{"source": "/srv/x", "target": "/x", "mode": "ro"}],
    "start_container": True,
    "resource_limits": {"memory": None, "nanoCPUs": 0},
    "unknown_key": {"ignored": True},
}


def test_create_config_host() -> None:
    config = container_config(CreatePayload.parse(CAPTURED_CREATE))
    assert config == {
        "Image": "ghcr.io/nextcloud/test-deploy:release-cpu",
        "Hostname": "test-deploy",
        "Env": ["APP_ID=test-deploy", "APP_PORT=23000"],
        "HostConfig": {
            "NetworkMode": "host",
            "Mounts": [
                {"Type": "volume", "Source": "nc_app_test-deploy_data",
                 "Target": "/nc_app_test-deploy_data", "ReadOnly": False},
                {"Type": "bind", "Source": "/srv/x", "Target": "/x", "ReadOnly": True},
            ],
            "RestartPolicy": {"Name": "unless-stopped"},
        },
    }


def test_create_config_cuda_custom_network_limits() -> None:
    payload = dict(CAPTURED_CREATE, network_mode="nextcloud-aio", compute_device="cuda",
                   resource_limits={"memory": 1 << 30, "nanoCPUs": 2_000_000_000})
    payload.pop("image_id")
    payload["image"] = "x/y:z"  # alias accepted
    config = container_config(CreatePayload.parse(payload))
    assert config["Image"] == "x/y:z"
    assert config["NetworkingConfig"] == {
        "EndpointsConfig": {"nextcloud-aio": {"Aliases": ["test-deploy"]}}
    }
    host = config["HostConfig"]
    assert host["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": -1, "Capabilities": [["compute", "utility"]]}
    ]
    assert (host["Memory"], host["NanoCPUs"]) == (1 << 30, 2_000_000_000)
    rocm = container_config(CreatePayload.parse(dict(CAPTURED_CREATE, compute_device="rocm")))
    assert [d["PathOnHost"] for d in rocm["HostConfig"]["Devices"]] == ["/dev/kfd", "/dev/dri"]


@pytest.mark.parametrize(
    "change",
    [
        {"image_id": None},
        {"image_id": "a?b"},
        {"environment_variables": "A=B"},
        {"environment_variables": [1]},
        {"compute_device": "tpu"},
        {"mount_points": [{"source": "/a"}]},
        {"mount_points": [{"source": "/a", "target": "/b", "mode": "rx"}]},
        {"network_mode": "a/b"},
        {"restart_policy": "sometimes"},
        {"resource_limits": {"memory": "lots"}},
    ],
)
def test_create_rejects(change: dict[str, object]) -> None:
    with pytest.raises(PayloadError, match="Payload validation error"):
        CreatePayload.parse(dict(CAPTURED_CREATE, **change))


def test_remove_and_certs_payloads() -> None:
    assert RemovePayload.parse({"name": "a"}).remove_data is False
    assert RemovePayload.parse({"name": "a", "remove_data": True}).remove_data is True
    with pytest.raises(PayloadError):
        RemovePayload.parse({"name": "a", "remove_data": "yes"})
    certs = CertificatesPayload.parse({"name": "a", "system_certs_bundle": None})
    assert certs.system_certs_bundle is None and certs.install_frp_certs is True
    certs = CertificatesPayload.parse(
        {"name": "a", "system_certs_bundle": "PEM", "install_frp_certs": False}
    )
    assert certs.system_certs_bundle == "PEM" and certs.install_frp_certs is False


# --------------------------------------------------------------------------- helpers


def test_ca_target_by_os_release() -> None:
    assert ca_target('ID=debian\n')[0] == "/usr/local/share/ca-certificates"
    assert ca_target('ID=alpine\n')[1] == ["update-ca-certificates"]
    assert ca_target('NAME="Ubuntu"\nID=ubuntu\n')[0] == "/usr/local/share/ca-certificates"
    assert ca_target('ID="rhel"\n') == (
        "/etc/pki/ca-trust/source/anchors", ["update-ca-trust", "extract"]
    )
    assert ca_target('ID=fedora\n')[0] == "/etc/pki/ca-trust/source/anchors"
    assert ca_target('ID="almalinux"\n')[0] == "/etc/pki/ca-trust/source/anchors"
    assert ca_target("ID=arch\n") == (None, [])


def test_demux() -> None:
    frames = (
        b"\x01\0\0\0" + struct.pack(">I", 3) + b"out"
        + b"\x02\0\0\0" + struct.pack(">I", 4) + b"err\n"
    )
    assert demux(frames) == b"outerr\n"
    assert demux(b"plain tty output") == b"plain tty output"
    assert demux(b"") == b""


def test_tar_of() -> None:
    data = tar_of({"certs/frp/ca.crt": b"CA", "certs/frp/client.key": b"KEY"})
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"certs/frp/ca.crt", "certs/frp/client.key"}
        assert members["certs/frp/client.key"].mode == 0o644
        extracted = tar.extractfile("certs/frp/client.key")
        assert extracted is not None and extracted.read() == b"KEY"


def test_a_local_engine_socket_is_required_and_found(tmp_path: Path) -> None:
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        endpoints = EngineEndpoints(None, path, None, 5)
        endpoints.require(24000)  # a live socket: no error
        assert endpoints.local_socket()
        with pytest.raises(EngineSelectionError):
            endpoints.require(24001)  # another port: no FRP client serves it
