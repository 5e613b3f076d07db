"""Shared fixtures: free ports, and the real ``twistd harp`` process under test."""

from __future__ import annotations

import datetime
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parent.parent
REQUIRE_PEERS = os.environ.get("HARP_REQUIRE_PEERS") == "1"


def peer_missing(what: str) -> None:
    """A peer program is not available: fail in CI (HARP_REQUIRE_PEERS=1), else skip."""
    if REQUIRE_PEERS:
        pytest.fail(f"required test peer missing: {what}")
    pytest.skip(f"test peer missing: {what}")


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def new_key() -> str:
    return secrets.token_urlsafe(24)


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


class HarpProcess:
    """A real ``twistd -n harp`` child process configured by environment variables."""

    def __init__(self, env: Mapping[str, str], workdir: Path) -> None:
        self.workdir = workdir
        self.env = dict(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"harp-{int(time.time() * 1000)}.log"

    @property
    def http_port(self) -> int:
        return int(self.env["HP_EXAPPS_ADDRESS"].rsplit(":", 1)[1])

    @property
    def https_port(self) -> int:
        return int(self.env["HP_EXAPPS_HTTPS_ADDRESS"].rsplit(":", 1)[1])

    @property
    def frp_port(self) -> int:
        return int(self.env["HP_FRP_ADDRESS"].rsplit(":", 1)[1])

    def start(self, wait: bool = True) -> HarpProcess:
        command, extra = _twistd_command()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HP_", "NC_"))}
        env.update(extra)
        env.update(self.env)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            command, env=env, cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT
        )
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
                try:
                    with socket.create_connection(target, timeout=0.5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"harp did not listen on {target} within {timeout}s:\n"
                            f"{self.output()}"
                        ) from None
                    time.sleep(0.05)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def run_harp_once(env: Mapping[str, str], workdir: Path, timeout: float = 30) -> tuple[int, str]:
    """Start harp expecting it to exit by itself (bad configuration): (code, output)."""
    command, extra = _twistd_command()
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HP_", "NC_"))}
    full.update(extra)
    full.update(env)
    done = subprocess.run(
        command, env=full, cwd=workdir, capture_output=True, timeout=timeout, check=False
    )
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


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
    }
    env.update(overrides)
    return env


@pytest.fixture
def harp_env(tmp_path: Path) -> dict[str, str]:
    """A minimal valid environment on free loopback ports, certs under tmp_path."""
    return base_env(tmp_path)


@pytest.fixture(scope="session")
def frpc_binary() -> str:
    """The real frpc 0.65 (tools/get-frpc); missing -> skip locally, fail in CI."""
    from tests.peers.frpc import FrpcUnavailable, find_frpc

    try:
        return find_frpc()
    except FrpcUnavailable as exc:
        peer_missing(f"frpc: {exc}")
        raise AssertionError("unreachable") from exc


@pytest.fixture
def harp_factory(tmp_path: Path) -> Iterator[type[HarpProcess]]:
    """Start HaRP processes; all are stopped at the end of the test."""
    started: list[HarpProcess] = []

    class Factory(HarpProcess):
        def __init__(self, env: Mapping[str, str]) -> None:
            super().__init__(env, tmp_path)
            started.append(self)

    yield Factory
    for proc in started:
        proc.stop()


def self_signed_pem(path: Path, common_name: str) -> int:
    """Write a self-signed cert + key PEM (like an operator's cert.pem); its serial."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return serial
