"""HaRP's container image under test: built by ``tools/build-image``, run by the docker CLI.

Why the CLI and the README's own command: the image is only as good as the way operators are
told to start it, so :func:`readme_run_command` takes the ``docker run`` line from README.md's
Container section and :func:`adapt` changes only what a shared test machine must change (the
container and volume names, the engine's socket, free loopback ports, a short health interval).
A README edit that drops the volume, the socket or host networking fails these tests.

Networking: the test engine (tools/docker-peer) runs without a bridge or iptables, so the
container shares the host's network (``--network host``, as the README recommends): HaRP's
ports are bound on 127.0.0.1 and it reaches Nextcloud and the ExApps on the host's loopback.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.interop.conftest import ok, request
from tests.peers.base import REPO
from tests.peers.harp import HarpPorts

README = REPO / "README.md"
BUILD_IMAGE = REPO / "tools" / "build-image"
REPORT = REPO / "build" / "image-report.txt"
CERTS = "/certs"
SOCKET = "/var/run/docker.sock"

#: What the README's command must say for the tests to mean anything.
REQUIRED = {
    ("--network", "host"), ("-v", f"harp-certs:{CERTS}"), ("-v", f"{SOCKET}:{SOCKET}"),
}
REQUIRED_ENV = {"HP_SHARED_KEY", "NC_INSTANCE_URL"}


def readme_run_command(text: str | None = None) -> list[str]:
    """The ``docker run`` command of README.md's Container section, as argv."""
    text = README.read_text() if text is None else text
    section = text.split("## Container", 1)[1].split("\n## ", 1)[0]
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        joined = block.replace("\\\n", " ")
        if joined.lstrip().startswith("docker run"):
            return shlex.split(joined)
    raise AssertionError("README.md's Container section has no ```sh docker run block")


def _options(argv: list[str]) -> list[tuple[str, str]]:
    """(option, value) pairs of ``docker run OPTIONS IMAGE``; flags alone get ''."""
    pairs = []
    i = 2
    while i < len(argv) - 1:
        opt = argv[i]
        if opt in ("-d", "--detach", "--rm", "-i", "-t"):
            pairs.append((opt, ""))
            i += 1
        else:
            pairs.append((opt, argv[i + 1]))
            i += 2
    return pairs


def adapt(
    argv: list[str], *, name: str, volume: str, socket_path: str, image: str,
    env: Mapping[str, str], extra: list[str],
) -> list[str]:
    """The README command with this test's names, engine socket, values and ``extra`` options."""
    assert argv[:2] == ["docker", "run"], argv
    pairs = _options(argv)
    missing = REQUIRED - set(pairs)
    assert not missing, f"README's docker run lacks {missing}"
    names = {value.split("=", 1)[0] for opt, value in pairs if opt == "-e"}
    assert REQUIRED_ENV <= names, f"README's docker run lacks -e {REQUIRED_ENV - names}"
    out = ["docker", "run"]
    for opt, value in pairs:
        if opt == "--name":
            value = name
        elif opt == "-e" and value.split("=", 1)[0] in env:
            key = value.split("=", 1)[0]
            value = f"{key}={env[key]}"
        elif (opt, value) == ("-v", f"harp-certs:{CERTS}"):
            value = f"{volume}:{CERTS}"
        elif (opt, value) == ("-v", f"{SOCKET}:{SOCKET}"):
            value = f"{socket_path}:{SOCKET}"
        out += [opt, value] if value else [opt]
    return [*out, *extra, image]


class Docker:
    """The docker CLI pointed at the test engine."""

    def __init__(self, binary: str, socket_path: Path) -> None:
        self.binary = binary
        self.socket_path = socket_path
        self.env = {"DOCKER_HOST": f"unix://{socket_path}", "PATH": "/usr/bin:/bin",
                    "HOME": os.environ.get("HOME", "/root")}

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        done = subprocess.run(
            [self.binary, *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"docker {shlex.join(args)}: {done.returncode}\n{done.stderr}")
        return done.stdout

    def inspect(self, what: str) -> Any:
        return json.loads(self.run("inspect", what))[0]


@dataclass
class HarpContainer(HarpPorts):
    """One container of the image, started with the README's command."""

    docker: Docker
    image: str
    env: dict[str, str]
    name: str = field(default_factory=lambda: f"harp-test-{uuid.uuid4().hex[:8]}")
    volume: str = field(default_factory=lambda: f"harp-certs-{uuid.uuid4().hex[:8]}")

    def command(self) -> list[str]:
        """README's command; the variables it does not name are added as ``-e``."""
        readme = readme_run_command()
        named = {v.split("=", 1)[0] for o, v in _options(readme) if o == "-e"}
        extra = [arg for key, value in self.env.items() if key not in named
                 for arg in ("-e", f"{key}={value}")]
        # The image's HEALTHCHECK waits 10 s before its first probe; the test needs less.
        extra += ["--health-interval", "1s"]
        return adapt(
            readme, name=self.name, volume=self.volume,
            socket_path=str(self.docker.socket_path), image=self.image, env=self.env,
            extra=extra,
        )

    def start(self) -> HarpContainer:
        self.docker.run(*self.command()[1:])
        self.wait_info()
        return self

    def remove(self) -> None:
        self.docker.run("rm", "-f", "-v", self.name, check=False)
        self.docker.run("volume", "rm", "-f", self.volume, check=False)

    def state(self) -> dict[str, Any]:
        result: dict[str, Any] = self.docker.inspect(self.name)["State"]
        return result

    def logs(self) -> str:
        done = subprocess.run(
            [self.docker.binary, "logs", self.name], env=self.docker.env,
            capture_output=True, text=True, timeout=60, check=False,
        )
        return done.stdout + done.stderr

    def certs_dir(self) -> Path:
        """The named volume's folder on the engine's host (the tests run as root)."""
        return Path(self.docker.run("volume", "inspect", "-f", "{{.Mountpoint}}",
                                    self.volume).strip())

    def control(self, path: str, **headers: str) -> tuple[int, bytes]:
        """A request to ``/exapps/app_api/<path>`` with the shared key."""
        resp = ok(request(self.http_port, f"/exapps/app_api/{path}",
                          {"harp-shared-key": self.env["HP_SHARED_KEY"], **headers}, timeout=10))
        return resp.status, resp.body

    def wait_info(self, timeout: float = 60) -> dict[str, Any]:
        """``/info`` through the container's port; fails with the logs if it never answers."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                status, body = self.control("info")
                if status == 200:
                    info: dict[str, Any] = json.loads(body)
                    return info
            except OSError:
                pass
            state = self.state()
            if not state["Running"] or time.monotonic() > deadline:
                raise AssertionError(f"no /info from the container ({state['Status']}):\n"
                                     f"{self.logs()[-3000:]}")
            time.sleep(0.2)
