"""Fixtures of the image tests: the engine, the image built from this checkout, the peers.

The engine is tools/docker-peer's (shared with tests/interop); the ExApp and the fake
Nextcloud are tests/interop's module fixtures, re-exported here for pytest to find.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from tests.conftest import peer_missing
from tests.image.container import BUILD_IMAGE, REPORT, Docker
from tests.interop.conftest import app_id, exapp, key, nextcloud
from tests.interop.docker_helpers import Engine, docker_engine

__all__ = ["app_id", "docker_engine", "exapp", "key", "nextcloud"]


@pytest.fixture(scope="session")
def docker(docker_engine: Engine) -> Docker:
    """The docker CLI (Debian's docker.io) talking to the test engine."""
    binary = shutil.which("docker", path="/usr/bin:/bin") or shutil.which("docker")
    if binary is None:
        peer_missing("the docker CLI (Debian package docker.io)")
        raise AssertionError("unreachable")
    return Docker(binary, docker_engine.socket_path)


@pytest.fixture(scope="session")
def harp_image(docker: Docker) -> str:
    """tools/build-image on the test engine: the tag of the image of this checkout."""
    tag = "localhost/harp:test"
    env = {**os.environ, "DOCKER_HOST": docker.env["DOCKER_HOST"], "DOCKER": docker.binary,
           "HARP_IMAGE": tag}
    started = time.monotonic()
    done = subprocess.run(["bash", str(BUILD_IMAGE)], env=env, capture_output=True,
                          text=True, timeout=1200, check=False)
    if done.returncode != 0:
        pytest.fail(f"tools/build-image failed ({done.returncode}):\n{done.stderr[-4000:]}")
    print(f"image {tag} built in {time.monotonic() - started:.1f}s")
    return tag


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The image's size and build times (build/image-report.txt) at the end of the run."""
    if REPORT.exists():
        terminalreporter.write_sep("-", "container image (build/image-report.txt)")
        terminalreporter.write(REPORT.read_text())
