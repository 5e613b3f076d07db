"""HaRP's container image, run the way README.md says, against real peers.

One container for the module (starting it costs seconds): the tests follow its life, from
the first ``/info`` to ``docker stop``, so they run in file order.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.image.container import REPORT, Docker, HarpContainer, adapt, readme_run_command
from tests.interop.conftest import APP, ok, record_for, request
from tests.interop.docker_helpers import Engine
from tests.interop.frp_helpers import DataServer, hello, hello_body, port_bindable
from tests.peers.base import free_port
from tests.peers.exapp_runner import ExAppProcess
from tests.peers.fake_nextcloud import FakeNextcloud
from tests.peers.frpc import FrpcProcess, FrpcProxy

pytestmark = pytest.mark.interop

CERT_FILES = ("ca.crt", "server.crt", "client.crt")


@pytest.fixture(scope="module")
def nextcloud(nextcloud: FakeNextcloud, exapp: ExAppProcess) -> FakeNextcloud:
    nextcloud.apps[APP] = record_for(exapp)
    return nextcloud


@pytest.fixture(scope="module")
def container(
    docker: Docker, harp_image: str, key: str, nextcloud: FakeNextcloud
) -> Iterator[HarpContainer]:
    env = {
        "HP_SHARED_KEY": key,
        "NC_INSTANCE_URL": nextcloud.url,
        "HP_EXAPPS_ADDRESS": f"127.0.0.1:{free_port()}",
        "HP_EXAPPS_HTTPS_ADDRESS": f"127.0.0.1:{free_port()}",
        "HP_FRP_ADDRESS": f"127.0.0.1:{free_port()}",
    }
    box = HarpContainer(docker, harp_image, env)
    try:
        yield box.start()
    finally:
        box.remove()


def fingerprints(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in CERT_FILES}


def test_readme_command_is_adapted_not_replaced() -> None:
    """What the tests change in the README's command, and nothing else."""
    argv = readme_run_command()
    out = adapt(argv, name="n", volume="vol", socket_path="/s.sock", image="img",
                env={"HP_SHARED_KEY": "k"}, extra=["--x", "y"])
    assert out[-3:] == ["--x", "y", "img"]
    assert "vol:/certs" in out and "/s.sock:/var/run/docker.sock" in out
    assert "HP_SHARED_KEY=k" in out and len(out) == len(argv) + 2


def test_info_answers(container: HarpContainer) -> None:
    status, body = container.control("info")
    assert status == 200
    info = json.loads(body)
    assert info["docker"] is True and info["version"]


def test_healthcheck_turns_healthy(container: HarpContainer, docker_engine: Engine) -> None:
    deadline = time.monotonic() + 60
    while (health := container.state().get("Health", {})).get("Status") != "healthy":
        assert time.monotonic() < deadline, (health, container.logs()[-2000:])
        if docker_engine.kind == "podman":
            # Podman schedules health checks with systemd timers, which the test engine has
            # not: run the image's HEALTHCHECK command through podman's own API instead.
            docker_engine.api("GET", f"/v4.0.0/libpod/containers/{container.name}/healthcheck")
        time.sleep(0.5)
    assert health["Log"][-1]["ExitCode"] == 0


def test_mounted_docker_socket(container: HarpContainer) -> None:
    """AppAPI's engine calls reach the engine through the socket mounted into the container."""
    status, body = container.control("v1.41/_ping", **{"docker-engine-port": "24000"})
    assert (status, body) == (200, b"OK")


def test_request_reaches_exapp(container: HarpContainer, exapp: ExAppProcess) -> None:
    resp = ok(request(container.http_port, f"/exapps/{APP}/public"))
    assert resp.status == 200, resp.body
    assert resp.json() == {"route": "public", "user": "", "query": ""}


def test_frp_certificates_in_volume(container: HarpContainer) -> None:
    folder = container.certs_dir() / "frp"
    names = {p.name for p in folder.iterdir()}
    assert {*CERT_FILES, "ca.key", "server.key", "client.key"} <= names, names


def test_frpc_logs_in_and_tunnels(
    container: HarpContainer, frpc_binary: str, tmp_path: Path
) -> None:
    """A real frpc with the client certificate from the volume, through the FRP port."""
    certs = container.certs_dir() / "frp"
    port = next(p for p in range(24050, 24100) if port_bindable(p))
    with DataServer() as backend:
        frpc = FrpcProcess(
            server_port=container.frp_port, token=container.env["HP_SHARED_KEY"],
            tls_enable=True, server_name="harp.nc", cert_file=str(certs / "client.crt"),
            key_file=str(certs / "client.key"), trusted_ca_file=str(certs / "ca.crt"),
            proxies=[FrpcProxy("image-engine", remote_port=port, unix_path=backend.path)],
            workdir=tmp_path / "frpc", binary=frpc_binary,
        ).start()
        try:
            frpc.wait_for_log(r"login to server success", timeout=30)
            frpc.wait_for_log(r"\[image-engine\] start proxy success", timeout=30)
            assert hello(port, "image") == hello_body("image")
        finally:
            frpc.stop()


def test_operator_commands_by_exec(container: HarpContainer, docker: Docker) -> None:
    """``docker exec harp python -m harp …`` (the README's form) finds HaRP and its settings."""
    assert docker.run("exec", container.name, "python", "-m", "harp", "healthcheck") == ""


def test_harp_check_in_container(
    container: HarpContainer, docker: Docker, docker_engine: Engine
) -> None:
    """``docker exec harp python -m harp check`` (README): the self-test sees the container's
    environment, its certificates volume, Nextcloud, the ExApp and the mounted Docker socket."""
    api = docker_engine.api_json("GET", "/version")[1]["ApiVersion"]
    done = subprocess.run(
        [docker.binary, "exec", container.name, "python", "-m", "harp", "check",
         "--app-id", APP, "--docker-api-version", api],
        env=docker.env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    passed = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("PASS")}
    # "build": the image runs the compiled per-request modules (harp/compiled.py).
    assert {"config", "build", "frp-certs", "harp-http", "harp-frp", "nextcloud",
            "shared-key", "docker"} <= passed, done.stdout


def test_certificates_survive_restart(container: HarpContainer, docker: Docker) -> None:
    before = fingerprints(container.certs_dir() / "frp")
    docker.run("restart", "-t", "30", container.name)
    container.wait_info()
    assert fingerprints(container.certs_dir() / "frp") == before
    logs = container.logs()
    assert logs.count("starting up") == 2 and logs.count("generated FRP certificates") == 1


def test_docker_stop_is_quick_and_clean(container: HarpContainer, docker: Docker) -> None:
    """SIGTERM to twistd as PID 1: the reactor stops and the exit code is 0, well before
    docker's grace period would end in SIGKILL (exit code 137)."""
    started = time.monotonic()
    docker.run("stop", "-t", "30", container.name)
    took = time.monotonic() - started
    state = container.state()
    assert (state["Status"], state["ExitCode"], state["OOMKilled"]) == ("exited", 0, False)
    assert took < 10, f"docker stop took {took:.1f}s"
    assert "Traceback" not in container.logs()


CONTENT_CHECK = r"""
command -v ls >/dev/null || echo "the check cannot see /usr/bin: PATH=$PATH"
for tool in gcc cc c++ g++ make ld pip pip3 apt-get apt; do
  command -v "$tool" >/dev/null && echo "tool $tool"
done
python3 -c 'import pip' 2>/dev/null && echo "pip module"
python3 -c 'import setuptools' 2>/dev/null && echo "setuptools module"
for d in "$HOME/.cache" /src /wheels; do [ -e "$d" ] && echo "path $d"; done
[ -n "$(ls -A /var/lib/apt/lists 2>/dev/null)" ] && echo "apt lists"
[ -n "$(ls -A /var/cache/apt 2>/dev/null)" ] && echo "apt cache"
find / -xdev \( -name '*.whl' -o -name '*.deb' \) -print | sed 's/^/file /'
python3 -c 'import harp, twisted.plugins.harp_plugin' || echo "harp not importable"
exit 0
"""


def test_image_content(docker: Docker, harp_image: str) -> None:
    """No compiler, installer, caches or build inputs in the image; its size is reported."""
    found = docker.run("run", "--rm", "--network", "none", "--entrypoint", "/bin/sh",
                       harp_image, "-c", CONTENT_CHECK)
    assert found.strip() == "", found
    size = int(docker.run("image", "inspect", "-f", "{{.Size}}", harp_image))
    print(f"image {harp_image}: {size / 2**20:.1f} MiB\n{REPORT.read_text()}")
    assert REPORT.read_text().startswith(f"image        {harp_image}")
