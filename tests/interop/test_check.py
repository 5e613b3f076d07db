"""``python -m harp check`` against real peers: each misconfiguration gives its failing line.

The module runs one real HaRP (FRP with TLS, an HTTPS ``cert.pem``, the real Docker engine
on ``HP_DOCKER_SOCKET``), the fake Nextcloud knowing one ExApp, and one real frpc 0.65
serving the engine as an FRP engine.  The check runs as the operator runs it: a subprocess
with an environment.  Each test changes one thing in that environment (or in a peer) and
asserts the line that names it and a non-zero exit; the first test shows all green.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HarpProcess, free_port, self_signed_pem
from tests.interop.docker_helpers import Engine, docker_engine, harp_env_for, running_harp
from tests.interop.test_docker_frp import START_OK, engine_ports, start_frpc
from tests.interop.test_redis_state import PASSWORD, RedisServer, redis
from tests.peers.fake_nextcloud import FakeNextcloud

pytestmark = pytest.mark.interop
__all__ = ["docker_engine", "redis"]

APP = "checkapp"
#: The test engine is Debian's Docker 20.10 (API 1.41), what AppAPI before 32.0.3 calls.
API = ("--docker-api-version", "1.41")
RECORD = {"exapp_token": "t", "exapp_version": "1.0.0", "host": "127.0.0.1", "port": 23000,
          "routes": []}


class Outcome:
    """The check's exit code and its lines by check name."""

    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.text, self.stderr = code, stdout, stderr
        self.lines: dict[str, str] = {}
        for line in stdout.splitlines():
            parts = line.split(None, 2)
            if len(parts) >= 2 and parts[0] in ("PASS", "SKIP", "WARN", "FAIL"):
                self.lines[parts[1]] = line

    def status(self, name: str) -> str:
        return self.lines[name].split()[0]

    def not_ok(self) -> list[str]:
        """The checks that warned or failed."""
        return [name for name in self.lines if self.status(name) in ("WARN", "FAIL")]

    def only(self, *names: str) -> None:
        """Assert exit 1 with exactly ``names`` warning or failing."""
        assert (self.code, self.not_ok()) == (1, list(names)), self

    def __repr__(self) -> str:
        return f"exit {self.code}\n{self.text}{self.stderr}"


class Setup:
    def __init__(self, harp: HarpProcess, engine_port: int, nextcloud: FakeNextcloud) -> None:
        self.harp, self.engine_port, self.nextcloud = harp, engine_port, nextcloud

    def check(self, *args: str, **changes: str) -> Outcome:
        """``python -m harp check`` with HaRP's environment, ``changes`` on top (and the
        test engine's API version unless ``args`` names another)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HP_", "NC_"))}
        env.update(self.harp.env)
        env.update(changes)
        done = subprocess.run(
            [sys.executable, "-m", "harp", "check", *API, *args], env=env, capture_output=True,
            text=True, timeout=120, check=False, cwd=self.harp.workdir,
        )
        return Outcome(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def setup(
    docker_engine: Engine, frpc_binary: str, tmp_path_factory: pytest.TempPathFactory,
    key: str, nextcloud: FakeNextcloud,
) -> Iterator[Setup]:
    nextcloud.apps[APP] = RECORD
    workdir = tmp_path_factory.mktemp("harp-check")
    env = harp_env_for(workdir, docker_engine.socket_path)
    env.update(HP_SHARED_KEY=key, NC_INSTANCE_URL=nextcloud.url, HP_BLACKLIST_COUNT="1000")
    Path(env["HP_CERTS_DIR"]).mkdir(parents=True)
    self_signed_pem(Path(env["HP_CERTS_DIR"]) / "cert.pem", "harp.example", days=365)
    with running_harp(workdir, env) as harp:
        port = engine_ports(1)[0]
        frpc = start_frpc(harp, docker_engine, port, workdir / "frpc")
        try:
            frpc.wait_for_log(START_OK, timeout=60)
            yield Setup(harp, port, nextcloud)
        finally:
            frpc.stop()


def test_all_green(setup: Setup) -> None:
    out = setup.check("--app-id", APP)
    assert out.code == 0, out
    expected = ["config", "build", "https-cert", "frp-certs", "harp-http", "harp-https",
                "harp-frp", "nextcloud", "shared-key", "clock", "redis", "kubernetes", "docker",
                "frp-engines"]
    assert list(out.lines) == expected, out
    skipped = ("redis", "kubernetes")  # state in memory; no Kubernetes backend
    assert all(out.status(name) == "PASS" for name in expected if name not in skipped), out
    assert all(out.status(name) == "SKIP" for name in skipped), out
    assert f"{setup.engine_port} (" in out.lines["frp-engines"], out
    assert "API 1." in out.lines["docker"], out


def test_engine_too_old_for_the_api_appapi_calls(setup: Setup) -> None:
    out = setup.check("--app-id", APP, "--docker-api-version", "9.99")
    out.only("docker", "frp-engines")
    assert "too old for API 9.99" in out.lines["docker"], out
    assert f"refusing API 9.99 (too old): {setup.engine_port}" in out.lines["frp-engines"], out
    assert setup.harp.env["HP_SHARED_KEY"] not in out.text + out.stderr


def test_without_app_id_the_key_is_not_confirmed_but_passes(setup: Setup) -> None:
    out = setup.check()
    assert out.code == 0, out
    assert out.status("shared-key") == "SKIP" and "--app-id" in out.lines["shared-key"], out


def test_wrong_key(setup: Setup) -> None:
    out = setup.check("--app-id", APP, HP_SHARED_KEY="not-the-right-key-at-all")
    out.only("harp-http", "harp-https", "shared-key")
    assert out.status("nextcloud") == "PASS", out  # reachable and AppAPI: only the key is wrong
    assert out.status("shared-key") == "FAIL", out
    assert "Nextcloud refuses HP_SHARED_KEY" in out.lines["shared-key"], out
    assert "fix:" in out.lines["shared-key"]
    # The running HaRP has the right key, so it refuses this one too.
    assert "runs with another key" in out.lines["harp-http"], out
    assert "not-the-right-key-at-all" not in out.text + out.stderr


def test_nextcloud_unreachable(setup: Setup) -> None:
    out = setup.check("--app-id", APP, NC_INSTANCE_URL=f"http://127.0.0.1:{free_port()}")
    out.only("nextcloud")
    assert out.status("nextcloud") == "FAIL", out
    assert "cannot reach" in out.lines["nextcloud"] and "refused" in out.lines["nextcloud"]
    assert out.status("shared-key") == "SKIP" and out.status("clock") == "SKIP", out


@pytest.fixture
def other_server(tmp_path: Path) -> Iterator[str]:
    """Some web server that is not Nextcloud (serves an empty directory)."""

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_not_a_nextcloud(setup: Setup, other_server: str) -> None:
    out = setup.check("--app-id", APP, NC_INSTANCE_URL=other_server)
    out.only("nextcloud")
    assert "not a Nextcloud with AppAPI" in out.lines["nextcloud"], out
    assert "HTTP 404" in out.lines["nextcloud"], out
    assert out.status("shared-key") == "SKIP", out


def _drop_client_key(certs: Path, tmp_path: Path) -> None:
    (certs / "frp" / "client.key").unlink()


def _key_of_another_certificate(certs: Path, tmp_path: Path) -> None:
    self_signed_pem(tmp_path / "other.pem", "other", days=365)
    cert_part = (certs / "cert.pem").read_bytes().split(b"-----BEGIN PRIVATE KEY-----")[0]
    key_part = (tmp_path / "other.pem").read_bytes().split(b"-----END CERTIFICATE-----\n")[1]
    (certs / "cert.pem").write_bytes(cert_part + key_part)


def _five_days_left(certs: Path, tmp_path: Path) -> None:
    self_signed_pem(certs / "cert.pem", "harp.example", days=5)


@pytest.mark.parametrize(("spoil", "name", "status", "words"), [
    (_drop_client_key, "frp-certs", "FAIL", "missing: client.key"),
    (_key_of_another_certificate, "https-cert", "FAIL", "does not belong to the certificate"),
    (_five_days_left, "https-cert", "WARN", "expires in 4 days"),
], ids=["missing", "mismatched", "near-expiry"])
def test_certificate_problems(
    setup: Setup, tmp_path: Path, spoil: Callable[[Path, Path], None], name: str,
    status: str, words: str,
) -> None:
    """A copy of HaRP's certificate directory, spoiled one way, named by one line."""
    certs = tmp_path / "certs"
    shutil.copytree(setup.harp.env["HP_CERTS_DIR"], certs)
    spoil(certs, tmp_path)
    out = setup.check(HP_CERTS_DIR=str(certs))
    out.only(name)
    assert out.status(name) == status and words in out.lines[name], out
    assert "-- fix: " in out.lines[name], out


def test_docker_engine_unreachable(setup: Setup, tmp_path: Path) -> None:
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(dead))  # the file stays, nothing listens: an engine that is down
    out = setup.check(HP_DOCKER_SOCKET=str(dead))
    out.only("docker")
    assert out.status("docker") == "FAIL", out
    assert "connection refused" in out.lines["docker"] and str(dead) in out.lines["docker"]


def test_harp_not_running(setup: Setup) -> None:
    out = setup.check(
        HP_EXAPPS_ADDRESS=f"127.0.0.1:{free_port()}", HP_FRP_ADDRESS=f"127.0.0.1:{free_port()}",
        HP_EXAPPS_HTTPS_ADDRESS=f"127.0.0.1:{free_port()}",
    )
    out.only("harp-http", "harp-https", "harp-frp")
    for name in ("harp-http", "harp-https"):
        assert out.status(name) == "FAIL" and "HaRP is not running" in out.lines[name], out
    assert "FRP port is not bound" in out.lines["harp-frp"], out
    assert out.status("frp-engines") == "SKIP", out


def test_clock_skew(setup: Setup) -> None:
    setup.nextcloud.clock_offset = 120
    try:
        out = setup.check("--app-id", APP)
    finally:
        setup.nextcloud.clock_offset = 0
    out.only("clock")
    assert out.status("clock") == "WARN", out
    assert "behind Nextcloud's" in out.lines["clock"], out


def test_bad_configuration_is_one_line_and_exit_2(setup: Setup) -> None:
    out = setup.check(HP_EXAPPS_ADDRESS="nonsense")
    assert out.code == 2, out
    assert list(out.lines) == ["config"] and "HP_EXAPPS_ADDRESS" in out.lines["config"], out


def test_redis_answers(setup: Setup, redis: RedisServer) -> None:
    out = setup.check("--app-id", APP, HP_REDIS_URL=redis.url)
    assert out.code == 0, out
    assert out.status("redis") == "PASS" and f"127.0.0.1:{redis.port}/0" in out.lines["redis"]
    assert PASSWORD not in out.text + out.stderr


def test_redis_wrong_password(setup: Setup, redis: RedisServer) -> None:
    out = setup.check(HP_REDIS_URL=redis.url.replace(PASSWORD, "wrong-password"))
    out.only("redis")
    assert "refuses the login" in out.lines["redis"], out
    assert "wrong-password" not in out.text + out.stderr


def test_redis_unreachable(setup: Setup) -> None:
    out = setup.check(HP_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    out.only("redis")
    assert "cannot reach" in out.lines["redis"] and "refused" in out.lines["redis"], out
