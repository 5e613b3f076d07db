"""Remote Docker engines over FRP: two real frpc 0.65 clients in front of the engine socket.

Each frpc registers one ``tcp`` proxy in 24001-24099 with the ``unix_domain_socket`` plugin
on the engine socket — exactly the remote-engine setup of
docs/compatibility.md#docker-engine-selection — over mutual TLS with HaRP's generated client
certificate.  HaRP serves the local socket on 24000 at the same time.  The last test kills one frpc
in the middle of a (throttled) image pull: the client must get an error promptly, and the other
engines must keep working.
"""

from __future__ import annotations

import io
import json
import random
import secrets
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import HarpProcess, free_port
from tests.interop.docker_helpers import (
    LOCAL_IMAGE,
    AppApi,
    Engine,
    docker_engine,
    harp_env_for,
    running_harp,
)
from tests.peers.frpc import FrpcProcess, FrpcProxy

pytestmark = pytest.mark.interop
__all__ = ["docker_engine"]

START_OK = r"start proxy success"


def engine_ports(count: int) -> list[int]:
    """Distinct bindable ports in 24001-24099 (other tests may hold some)."""
    candidates = list(range(24001, 24100))
    random.shuffle(candidates)
    chosen = []
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise AssertionError("no free engine ports")


def start_frpc(harp: HarpProcess, engine: Engine, port: int, workdir: Path) -> FrpcProcess:
    certs = Path(harp.env["HP_CERTS_DIR"]) / "frp"
    proc = FrpcProcess(
        server_port=harp.frp_port,
        token=harp.env["HP_SHARED_KEY"],
        tls_enable=True,
        cert_file=str(certs / "client.crt"),
        key_file=str(certs / "client.key"),
        trusted_ca_file=str(certs / "ca.crt"),
        server_name="harp.nc",
        proxies=[FrpcProxy(f"deploy-daemon-{port}", remote_port=port,
                           unix_path=str(engine.socket_path))],
        workdir=workdir,
        log_level="info",
    )
    return proc.start()


class Setup:
    def __init__(self, harp: HarpProcess, ports: list[int], frpcs: list[FrpcProcess]) -> None:
        self.harp = harp
        self.ports = ports
        self.frpcs = frpcs


@pytest.fixture(scope="module")
def remote(
    docker_engine: Engine, frpc_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("harp-docker-frp")
    with running_harp(workdir, harp_env_for(workdir, docker_engine.socket_path)) as harp:
        ports = engine_ports(2)
        frpcs = [start_frpc(harp, docker_engine, port, workdir / f"frpc{port}")
                 for port in ports]
        try:
            for proc in frpcs:
                proc.wait_for_log(START_OK, timeout=60)
            yield Setup(harp, ports, frpcs)
        finally:
            for proc in frpcs:
                proc.stop()


def test_ping_local_and_two_frp_engines_at_once(remote: Setup) -> None:
    ports = [24000, *remote.ports]

    def ping(port: int) -> tuple[int, bytes]:
        status, _, body = AppApi(remote.harp, port).raw("GET", "/v1.41/_ping", timeout=10)
        return status, body

    for _ in range(3):
        with ThreadPoolExecutor(len(ports) * 2) as pool:
            results = list(pool.map(ping, ports * 2))
        assert results == [(200, b"OK")] * len(ports) * 2


def test_lifecycle_over_frp(remote: Setup, docker_engine: Engine) -> None:
    app_id = f"harpfrp{secrets.token_hex(4)}"
    appapi = AppApi(remote.harp, remote.ports[1])
    try:
        assert appapi.exapp("exists", {"name": app_id, "instance_id": ""}) == (
            200, {"exists": False}
        )
        status, created = appapi.exapp("create", {
            "name": app_id, "instance_id": "", "image_id": LOCAL_IMAGE, "network_mode": "host",
            "environment_variables": [f"APP_ID={app_id}", f"APP_PORT={free_port()}"],
            "restart_policy": "unless-stopped", "compute_device": "cpu", "mount_points": [],
        })
        assert status == 201, created
        assert appapi.exapp("install_certificates", {
            "name": app_id, "instance_id": "", "system_certs_bundle": None,
            "install_frp_certs": True,
        })[0] == 204
        assert appapi.exapp("start", {"name": app_id, "instance_id": ""})[0] == 204
        assert appapi.exapp("wait_for_start", {"name": app_id, "instance_id": ""}) == (
            200, {"started": True, "status": "running", "health": None}
        )
        status, _, body = appapi.raw(
            "GET", f"/v1.41/containers/nc_app_{app_id}/logs?stdout=true&stderr=true&tail=all"
        )
        assert status == 200 and b"listening on" in body
        assert appapi.exapp(
            "remove", {"name": app_id, "instance_id": "", "remove_data": True}
        ) == (204, "")
    finally:
        docker_engine.force_remove(f"nc_app_{app_id}", f"nc_app_{app_id}_data")


# --------------------------------------------------------------------------- kill mid-pull


class Throttle:
    """A TCP relay to the registry that sends its answers at about ``rate`` bytes/s."""

    def __init__(self, target_port: int, rate: int = 200_000) -> None:
        self.target_port = target_port
        self.rate = rate
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, 0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.rate),
                             daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, rate: int) -> None:
        try:
            while not self.stopped.is_set():
                data = src.recv(16384)
                if not data:
                    break
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped.set()
        self.server.close()


def _slow_image(engine: Engine) -> str:
    """A 3 MB random-layer image in the registry, absent from the engine: a slow pull."""
    tag = secrets.token_hex(4)
    repo = f"127.0.0.1:{engine.registry_port}/nextcloud/harp-slow"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        data = secrets.token_bytes(3 << 20)
        info = tarfile.TarInfo("blob.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    status, body = engine.api(
        "POST", f"/images/create?fromSrc=-&repo={repo}&tag={tag}", raw=out.getvalue(),
        headers={"Content-Type": "application/x-tar"},
    )
    assert status == 200, body
    status, body = engine.api(
        "POST", f"/images/{repo}/push?tag={tag}", headers={"X-Registry-Auth": "e30="}
    )
    assert status == 200 and b'"error' not in body, body
    status, body = engine.api("DELETE", f"/images/{repo}:{tag}")
    assert status == 200, body
    return f"nextcloud/harp-slow:{tag}"


def test_killing_frpc_mid_pull_fails_that_pull_promptly(
    remote: Setup, docker_engine: Engine, tmp_path: Path
) -> None:
    victim_port, other_port = remote.ports
    image = _slow_image(docker_engine)
    throttle = Throttle(docker_engine.registry_port)
    ref = f"127.0.0.1:{throttle.port}/{image}"
    appapi = AppApi(remote.harp, victim_port)
    conn = appapi.connection(timeout=30)
    try:
        conn.request(
            "POST", "/exapps/app_api/v1.41/images/create?fromImage=" + ref.replace("/", "%2F"),
            headers=appapi.headers(Connection="close"),
        )
        resp = conn.getresponse()
        assert resp.status == 200
        seen: list[str] = []
        while True:
            line = resp.readline()
            assert line, f"pull ended before any download progress: {seen}"
            status = json.loads(line).get("status", "")
            seen.append(status)
            if status == "Downloading":
                break
        victim = next(p for p in remote.frpcs if f"deploy-daemon-{victim_port}" in
                      p.render_config())
        killed_at = time.monotonic()
        victim.kill()
        error: BaseException | None = None
        try:
            while resp.readline():
                pass
        except Exception as exc:
            error = exc
        elapsed = time.monotonic() - killed_at
        assert error is not None, "the broken pull looked complete"
        assert elapsed < 5, elapsed
        print(f"pull broken {elapsed:.2f}s after frpc was killed ({type(error).__name__})")
    finally:
        conn.close()
        throttle.close()

    # HaRP keeps serving the local engine and the other remote engine ...
    for port in (24000, other_port):
        assert AppApi(remote.harp, port).raw("GET", "/v1.41/_ping", timeout=5)[:1] == (200,)
    # ... and reports the dead one as not connected.
    deadline = time.monotonic() + 10
    while True:
        status, _, body = AppApi(remote.harp, victim_port).raw("GET", "/v1.41/_ping", timeout=5)
        if status == 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 503 and str(victim_port) in json.loads(body)["error"]
    # The engine may still finish the pull by itself; do not leave the image behind.
    docker_engine.api("DELETE", f"/images/{ref}?force=true")
