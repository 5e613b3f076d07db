"""The process under test: a real ``twistd -n harp`` configured only by environment variables.

Why a subprocess, like the other peers: start-up checks, signal handling (SIGHUP reloads,
SIGTERM stops), listeners and logging are HaRP's behaviour too, and only the real process
shows them.  :func:`base_env` is the one valid environment every test starts from, stating
only what it changes.

Typical use::

    harp = HarpProcess(base_env(tmp_path, HP_FRP_DISABLE_TLS="true"), tmp_path).start()
    ...  # harp.http_port, harp.frp_port, harp.output()
    harp.stop()
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from tests.peers.base import REPO, ChildProcess, free_port, port_accepts


def new_key() -> str:
    """A fresh shared key (``HP_SHARED_KEY``): each test's HaRP gets its own."""
    return secrets.token_urlsafe(24)


def base_env(workdir: Path, **overrides: str) -> dict[str, str]:
    """A valid HaRP environment: a fresh key, free loopback ports, certs under ``workdir``.

    Every test module starts HaRP from this and states only what it changes.
    """
    env = {
        "HP_SHARED_KEY": new_key(),
        "NC_INSTANCE_URL": "http://127.0.0.1:9",
        "HP_EXAPPS_ADDRESS": f"127.0.0.1:{free_port()}",
        "HP_EXAPPS_HTTPS_ADDRESS": f"127.0.0.1:{free_port()}",
        "HP_FRP_ADDRESS": f"127.0.0.1:{free_port()}",
        "HP_CERTS_DIR": str(workdir / "certs"),
        "HP_VERBOSE_START": "0",
        "HP_LOG_LEVEL": "info",
        # One process unless a test says otherwise: the suites test single-process
        # behaviour (e.g. one user-lookup cache); tests/interop/test_workers.py sets 2.
        "HP_WORKERS": "1",
    }
    env.update(overrides)
    return env


def _twistd_command() -> tuple[list[str], dict[str, str]]:
    """How to start twistd with the harp plugin, installed or from this checkout."""
    twistd = Path(sys.executable).parent / "twistd"
    extra: dict[str, str] = {}
    import twisted.plugins

    ours = (REPO / "twisted" / "plugins").resolve()
    installed = any(
        (Path(p) / "harp_plugin.py").exists()
        for p in twisted.plugins.__path__
        if Path(p).resolve() != ours
    )
    if not installed:
        # An editable/dev install: let twistd's plugin scan see ./twisted/plugins.
        extra["PYTHONPATH"] = str(REPO)
    return [str(twistd), "-n", "--pidfile=", "harp"], extra


def _command_and_env(env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The twistd command line, and this process's environment without any HP_/NC_
    variable with ``env`` on top: a variable exported in the developer's shell must not
    leak into the process under test."""
    command, extra = _twistd_command()
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HP_", "NC_"))}
    full.update(extra)
    full.update(env)
    return command, full


class HarpPorts:
    """HaRP's ports, read from its environment (a process here, a container in tests/image)."""

    env: dict[str, str]

    @property
    def http_port(self) -> int:
        return int(self.env["HP_EXAPPS_ADDRESS"].rsplit(":", 1)[1])

    @property
    def https_port(self) -> int:
        return int(self.env["HP_EXAPPS_HTTPS_ADDRESS"].rsplit(":", 1)[1])

    @property
    def frp_port(self) -> int:
        return int(self.env["HP_FRP_ADDRESS"].rsplit(":", 1)[1])


class HarpProcess(ChildProcess, HarpPorts):
    """A real ``twistd -n harp`` child process configured by environment variables."""

    def __init__(self, env: Mapping[str, str], workdir: Path) -> None:
        super().__init__(workdir / f"harp-{int(time.time() * 1000)}.log")
        self.workdir = workdir
        self.env = dict(env)

    def start(self, wait: bool = True) -> Self:
        command, env = _command_and_env(self.env)
        self.spawn(command, env, self.workdir)
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 20.0) -> None:
        """Wait until the HTTP and FRP listeners accept (all are bound before serving)."""
        deadline = time.monotonic() + timeout
        targets = [("127.0.0.1", self.http_port)]
        frp_host = self.env.get("HP_FRP_ADDRESS", "").rsplit(":", 1)[0].strip("[]")
        if frp_host:
            targets.append(("::1" if ":" in frp_host else "127.0.0.1", self.frp_port))
        for target in targets:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"harp exited with {self.proc.returncode}:\n{self.output()}"
                    )
                if port_accepts(target[1], target[0], timeout=0.5):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"harp did not listen on {target} within {timeout}s:\n{self.output()}"
                    )
                time.sleep(0.05)

    def stop(self) -> int:
        """SIGTERM (HaRP's orderly shutdown), SIGKILL after 10 s; the exit code."""
        return super().stop()


def run_harp_once(env: Mapping[str, str], workdir: Path, timeout: float = 30) -> tuple[int, str]:
    """Start harp expecting it to exit by itself (bad configuration): (code, output)."""
    command, full = _command_and_env(env)
    done = subprocess.run(
        command, env=full, cwd=workdir, capture_output=True, timeout=timeout, check=False
    )
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")
