"""``python -m harp frpc-config`` output, fed to the real frpc 0.65 and the real ``twistd harp``.

The unit tests pin what the generated TOML says; only the real frpc can prove that it is
what frpc accepts (``frpc verify`` is strict: an unknown or misspelt key is an error) and
that the file, as written by the command with ``--out``, logs in to HaRP and carries
traffic.  The shared key used here contains single braces and a quote-like ``'`` on
purpose (HaRP refuses ``{{``/``}}`` in keys: frpc runs config files through Go's
text/template; the generator still escapes braces defensively).
"""

from __future__ import annotations

import http.client
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.conftest import REPO, HarpProcess, base_env, new_key
from tests.peers.bulk_upstream import BulkUpstream, pattern
from tests.peers.frpc import FrpcProcess

pytestmark = pytest.mark.interop

#: Tunnel ports away from the ones other interop modules pick first (24001, 24002, ...),
#: since the suites may run in parallel against the same loopback.
ENGINE_PORT_TLS = 24077
ENGINE_PORT_PLAIN = 24078


def harp_env(workdir: Path, **extra: str) -> dict[str, str]:
    return base_env(workdir, HP_SHARED_KEY=f"{new_key()}-{{x}}'}}", **extra)


def run_command(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m harp frpc-config ...`` as an operator runs it, with HaRP's environment."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HP_", "NC_"))}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "harp", "frpc-config", *args],
        env=full, cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )


class GeneratedFrpc(FrpcProcess):
    """frpc run on the file the command wrote, instead of a config rendered by the test."""

    def write_config(self) -> Path:
        return self.config_path


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # A short path: pytest's tmp_path can exceed the 107-byte unix socket limit.
    path = Path(tempfile.mkdtemp(prefix="frpccfg-", dir="/tmp"))
    yield path
    for name in os.listdir(path):
        os.unlink(path / name)
    path.rmdir()


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- frpc verify


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
@pytest.mark.parametrize(
    "args",
    [
        ["engine", "--server-addr", "harp.example.com"],
        ["engine", "--server-addr", "[::1]", "--remote-port", "24099", "--name", "gpu.box_2",
         "--socket", "/run/user 1000/docker.sock"],
        ["exapp", "--server-addr", "192.0.2.7", "--app-id", "llm2", "--app-port", "23999"],
    ],
    ids=["engine-defaults", "engine-options", "exapp"],
)
def test_printed_config_passes_frpc_verify(
    frpc_binary: str, tmp_path: Path, args: list[str], tls: bool
) -> None:
    env = harp_env(tmp_path, HP_FRP_DISABLE_TLS="false" if tls else "true")
    done = run_command(env, *args)
    assert done.returncode == 0, done.stderr
    assert "contains HaRP's shared key" in done.stderr
    assert env["HP_SHARED_KEY"] not in done.stderr
    config = tmp_path / "frpc.toml"
    config.write_text(done.stdout)
    verify = subprocess.run(
        [frpc_binary, "verify", "-c", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr + done.stdout
    assert "syntax is ok" in verify.stdout + verify.stderr


# --------------------------------------------------------------------------- login + traffic


@pytest.mark.parametrize(
    ("tls", "port"), [(True, ENGINE_PORT_TLS), (False, ENGINE_PORT_PLAIN)], ids=["tls", "plain"]
)
def test_engine_bundle_logs_in_and_carries_traffic(
    frpc_binary: str, tmp_path: Path, socket_dir: Path, tls: bool, port: int
) -> None:
    """The one-command setup: HaRP's env -> ``--out DIR`` -> ``frpc -c DIR/frpc.toml``."""
    workdir = tmp_path / "harp"
    workdir.mkdir()
    env = harp_env(workdir, HP_FRP_DISABLE_TLS="false" if tls else "true")
    harp = HarpProcess(env, workdir).start()  # generates the FRP PKI when TLS is on
    upstream = BulkUpstream(unix_path=str(socket_dir / "docker.sock")).start()
    bundle = tmp_path / "bundle"
    frpc = GeneratedFrpc(server_port=0, workdir=bundle, binary=frpc_binary)
    try:
        done = run_command(
            env, "engine", "--server-addr", "127.0.0.1", "--remote-port", str(port),
            "--name", f"cfg-engine-{port}", "--socket", upstream.unix_path or "",
            "--out", str(bundle),
        )
        assert done.returncode == 0, done.stderr
        expected = {"frpc.toml"} | ({"ca.crt", "client.crt", "client.key"} if tls else set())
        assert set(os.listdir(bundle)) == expected
        assert stat.S_IMODE((bundle / "frpc.toml").stat().st_mode) == 0o600
        if tls:
            assert stat.S_IMODE((bundle / "client.key").stat().st_mode) == 0o600

        frpc.start()
        frpc.wait_for_log(r"login to server success", timeout=60)
        frpc.wait_for_log(rf"\[cfg-engine-{port}\] start proxy success", timeout=30)
        size = 300_000
        status, body = http_get(port, f"/bytes/{size}")
        assert status == 200, harp.output()[-2000:]
        assert body == pattern(size)
        assert env["HP_SHARED_KEY"] not in harp.output()
    finally:
        frpc.stop()
        upstream.stop()
        harp.stop()
