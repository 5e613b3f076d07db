"""A real Docker engine for the tests (``tools/docker-peer``), and clients for it and HaRP.

The engine (Debian's dockerd by default, ``ENGINE=podman`` also works) is started once per
test session by :func:`docker_engine` — or found already running, e.g. started by a previous
run — together with a local registry holding the test image (static busybox, 2 MB).  A
missing engine fails the test under ``HARP_REQUIRE_PEERS=1`` and skips it otherwise.

Requests to HaRP are made the way AppAPI's Guzzle client makes them
(docs/compatibility.md#control-plane): ``harp-shared-key``, ``docker-engine-port`` and the leftover
Basic ``Authorization``.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, HarpProcess, base_env, free_port, peer_missing
from tests.peers.exapp_runner import UnixHTTPConnection

DOCKER_PEER = REPO / "tools" / "docker-peer"
PEER_DIR = Path(os.environ.get("DOCKER_PEER_DIR", "/tmp/harp-docker-peer"))
LOCAL_IMAGE = "localhost/harp-test-exapp:latest"


@dataclass
class Engine:
    socket_path: Path
    registry_port: int
    kind: str

    @property
    def registry_ref(self) -> str:
        return f"127.0.0.1:{self.registry_port}/nextcloud/harp-test-exapp:release"

    def api(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None,
        headers: dict[str, str] | None = None, timeout: float = 60,
    ) -> tuple[int, bytes]:
        """Call the engine directly (test set-up and checks), unversioned paths."""
        conn = UnixHTTPConnection(str(self.socket_path), timeout, host="engine")
        try:
            hdrs = dict(headers or {})
            data = raw
            if body is not None:
                data = json.dumps(body).encode()
                hdrs["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def api_json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, data = self.api(method, path, body)
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, data

    def force_remove(self, container: str, volume: str | None = None) -> None:
        self.api("DELETE", f"/containers/{container}?force=true&v=true")
        if volume:
            self.api("DELETE", f"/volumes/{volume}")


def _recorded_registry_port() -> int | None:
    try:
        return int((PEER_DIR / "registry.port").read_text().strip())
    except (OSError, ValueError):
        return None


def _engine_running() -> bool:
    sock = PEER_DIR / "engine.sock"
    if not sock.exists():
        return False
    try:
        return Engine(sock, 0, "").api("GET", "/_ping", timeout=2)[0] == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Engine]:
    """The session's engine: started by tools/docker-peer unless one is already running."""
    was_running = _engine_running()
    port = _recorded_registry_port() if was_running else None
    env = dict(os.environ)
    env["DOCKER_PEER_DIR"] = str(PEER_DIR)
    env["DOCKER_PEER_REGISTRY_PORT"] = str(port or free_port())
    started = time.monotonic()
    try:
        done = subprocess.run(
            ["bash", str(DOCKER_PEER), "start"], env=env, capture_output=True, text=True,
            timeout=600, check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        peer_missing(f"docker engine: {exc}")
    if done.returncode != 0:
        peer_missing(f"docker engine (tools/docker-peer start):\n{done.stderr[-3000:]}")
    kind = (PEER_DIR / "engine.kind").read_text().strip() if (
        PEER_DIR / "engine.kind").exists() else "dockerd"
    engine = Engine(PEER_DIR / "engine.sock", int(env["DOCKER_PEER_REGISTRY_PORT"]), kind)
    print(f"docker engine ({kind}) ready in {time.monotonic() - started:.1f}s")
    yield engine
    if not was_running:
        subprocess.run(["bash", str(DOCKER_PEER), "stop"], env=env, capture_output=True,
                       timeout=120, check=False)


def harp_env_for(workdir: Path, socket_path: Path | str) -> dict[str, str]:
    return base_env(workdir, HP_DOCKER_SOCKET=str(socket_path))


@contextlib.contextmanager
def running_harp(workdir: Path, env: dict[str, str]) -> Iterator[HarpProcess]:
    workdir.mkdir(parents=True, exist_ok=True)
    proc = HarpProcess(env, workdir).start()
    try:
        yield proc
    finally:
        proc.stop()


class AppApi:
    """Requests as AppAPI's DockerActions Guzzle client sends them to HaRP."""

    def __init__(self, harp: HarpProcess, engine_port: int | str = 24000) -> None:
        self.harp = harp
        self.key = harp.env["HP_SHARED_KEY"]
        self.engine_port = str(engine_port)

    def headers(self, **extra: str) -> dict[str, str]:
        basic = base64.b64encode(f"app_api_haproxy_user:{self.key}".encode()).decode()
        headers = {
            "User-Agent": "GuzzleHttp/7",
            "harp-shared-key": self.key,
            "docker-engine-port": self.engine_port,
            "Authorization": f"Basic {basic}",
        }
        headers.update(extra)
        return headers

    def connection(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.harp.http_port, timeout=timeout)

    def raw(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 60,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = self.connection(timeout)
        try:
            hdrs = self.headers() if headers is None else headers
            conn.request(method, "/exapps/app_api" + path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def exapp(
        self, op: str, payload: dict[str, Any], timeout: float = 180
    ) -> tuple[int, Any]:
        """``POST /docker/exapp/<op>`` with a JSON body; JSON replies are decoded."""
        status, headers, body = self.raw(
            "POST", f"/docker/exapp/{op}", json.dumps(payload).encode(), timeout,
            self.headers(**{"Content-Type": "application/json"}),
        )
        if headers.get("content-type", "").startswith("application/json"):
            return status, json.loads(body)
        return status, body.decode()


def parse_frames(stream: bytes) -> list[tuple[int, bytes]]:
    """Docker's multiplexed log stream: [(stream id, payload)]; asserts it is well formed."""
    frames = []
    pos = 0
    while pos < len(stream):
        header = stream[pos:pos + 8]
        assert len(header) == 8 and header[0] in (1, 2) and header[1:4] == b"\0\0\0", stream
        size = int.from_bytes(header[4:], "big")
        frames.append((header[0], stream[pos + 8:pos + 8 + size]))
        pos += 8 + size
    return frames
