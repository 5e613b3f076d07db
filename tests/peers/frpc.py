"""Run the upstream FRP client (frpc 0.65) against HaRP's FRP server in tests.

Why the real frpc: HaRP reimplements frps, and the only convincing evidence that it speaks FRP is
a real frpc logging in and carrying traffic through it, with the exact options an ExApp
container's ``start.sh`` uses (token in ``metadatas.token``, optional mutual TLS with
``serverName = "harp.nc"``, a ``unix_domain_socket`` plugin towards ``/tmp/exapp.sock``) and the
variants frps must also accept (custom TLS first byte, ``tcpMux = false``, pools, encryption).

The binary comes from ``$FRPC`` or, failing that, from ``tools/get-frpc`` (run on first use; it
is idempotent and caches under ``~/.cache/harp-test-peers/frpc``). On x86_64 it runs under qemu,
so allow a few seconds for start-up.

Typical pytest fixture::

    @pytest.fixture
    def frpc(tmp_path, harp):
        proc = FrpcProcess(
            server_port=harp.frp_port, token="the-key",
            proxies=[FrpcProxy("myapp", remote_port=23000, unix_path=exapp.socket_path)],
            workdir=tmp_path / "frpc",
        )
        proc.start()
        proc.wait_for_log(r"start proxy success", timeout=30)
        yield proc
        proc.stop()

Log lines worth waiting for (frpc 0.65): ``login to server success``, ``[<name>] start proxy
success``, and on failure ``login to the server failed`` / ``start error``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Self

from tests.peers.base import REPO, Peer, end_process, read_log

GET_FRPC = REPO / "tools" / "get-frpc"


class FrpcUnavailable(RuntimeError):
    """No runnable frpc: ``$FRPC`` is wrong or ``tools/get-frpc`` failed."""


@functools.cache
def find_frpc() -> str:
    """Path of a runnable frpc: ``$FRPC`` if set, else whatever ``tools/get-frpc`` installs."""
    env = os.environ.get("FRPC")
    if env:
        if not os.access(env, os.X_OK):
            raise FrpcUnavailable(f"$FRPC={env} is not executable")
        return env
    try:
        out = subprocess.run(
            [str(GET_FRPC)], check=True, capture_output=True, text=True, timeout=900
        )
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        raise FrpcUnavailable(f"{GET_FRPC} failed: {exc}\n{detail}") from exc
    path = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if not path or not os.access(path, os.X_OK):
        raise FrpcUnavailable(f"{GET_FRPC} printed no runnable path: {out.stdout!r}")
    return path


def _toml_value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    # A JSON string is a valid TOML basic string for everything we write (paths, names, keys).
    return json.dumps(value)


@dataclass
class FrpcProxy:
    """One ``[[proxies]]`` entry.

    Give either ``unix_path`` (the ``unix_domain_socket`` plugin, as ExApps use) or ``local_port``
    (plus ``local_ip``) for a plain TCP backend such as a Docker engine.
    """

    name: str
    remote_port: int
    local_port: int | None = None
    local_ip: str = "127.0.0.1"
    unix_path: str | None = None
    use_encryption: bool = False
    use_compression: bool = False
    type: str = "tcp"

    def render(self) -> list[str]:
        if (self.unix_path is None) == (self.local_port is None):
            raise ValueError(f"proxy {self.name}: give exactly one of unix_path or local_port")
        lines = [
            "[[proxies]]",
            f"name = {_toml_value(self.name)}",
            f"type = {_toml_value(self.type)}",
            f"remotePort = {_toml_value(self.remote_port)}",
        ]
        if self.local_port is not None:
            lines.append(f"localIP = {_toml_value(self.local_ip)}")
            lines.append(f"localPort = {_toml_value(self.local_port)}")
        if self.use_encryption:
            lines.append("transport.useEncryption = true")
        if self.use_compression:
            lines.append("transport.useCompression = true")
        if self.unix_path is not None:
            lines += [
                "[proxies.plugin]",
                'type = "unix_domain_socket"',
                f"unixPath = {_toml_value(self.unix_path)}",
            ]
        return lines


@dataclass
class FrpcProcess(Peer):
    """A configured frpc; ``start()`` runs it as a subprocess, logging to ``log_path``.

    Options left as ``None`` are omitted from the config, so frpc's own defaults apply
    (TLS on, ``disableCustomTLSFirstByte = true``, ``tcpMux = true``, ``poolCount = 1``).
    ``tls_enable`` defaults to ``False`` rather than ``None``: that is what an ExApp's
    ``start.sh`` writes when no certificates were installed, and it needs no PKI in a test.
    ``login_fail_exit`` defaults to frpc's ``True`` so a broken login ends the process at once;
    ExApps use ``False`` (retry for ever).
    """

    server_port: int
    server_addr: str = "127.0.0.1"
    token: str | None = None
    login_fail_exit: bool = True
    tls_enable: bool | None = False
    cert_file: str | None = None
    key_file: str | None = None
    trusted_ca_file: str | None = None
    server_name: str | None = None
    disable_custom_tls_first_byte: bool | None = None
    tcp_mux: bool | None = None
    pool_count: int | None = None
    heartbeat_interval: int | None = None
    heartbeat_timeout: int | None = None
    proxies: list[FrpcProxy] = field(default_factory=list)
    log_level: str = "debug"
    extra_lines: list[str] = field(default_factory=list)
    workdir: str | os.PathLike[str] | None = None
    binary: str | None = None

    def __post_init__(self) -> None:
        self._own_dir = self.workdir is None
        if self.workdir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="frpc-"))
        else:
            self.dir = Path(self.workdir)
        self.config_path = self.dir / "frpc.toml"
        self.log_path = self.dir / "frpc.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0

    # ------------------------------------------------------------------- config

    def render_config(self) -> str:
        """The frpc TOML text (frpc 0.52+ key names)."""
        top: list[tuple[str, str | int | bool | None]] = [
            ("serverAddr", self.server_addr),
            ("serverPort", self.server_port),
            ("loginFailExit", self.login_fail_exit),
            ("metadatas.token", self.token),
            ("transport.tls.enable", self.tls_enable),
            ("transport.tls.certFile", self.cert_file),
            ("transport.tls.keyFile", self.key_file),
            ("transport.tls.trustedCaFile", self.trusted_ca_file),
            ("transport.tls.serverName", self.server_name),
            ("transport.tls.disableCustomTLSFirstByte", self.disable_custom_tls_first_byte),
            ("transport.tcpMux", self.tcp_mux),
            ("transport.poolCount", self.pool_count),
            ("transport.heartbeatInterval", self.heartbeat_interval),
            ("transport.heartbeatTimeout", self.heartbeat_timeout),
            ("log.to", "console"),
            ("log.level", self.log_level),
            ("log.disablePrintColor", True),
        ]
        lines = [f"{key} = {_toml_value(value)}" for key, value in top if value is not None]
        lines += self.extra_lines
        for proxy in self.proxies:
            lines.append("")
            lines += proxy.render()
        return "\n".join(lines) + "\n"

    def write_config(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render_config())
        return self.config_path

    def verify(self) -> subprocess.CompletedProcess[str]:
        """Run ``frpc verify -c <config>`` (strict parsing: unknown keys are errors)."""
        self.write_config()
        return subprocess.run(
            [self._binary(), "verify", "-c", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    # ---------------------------------------------------------------- lifecycle

    def _binary(self) -> str:
        return self.binary or find_frpc()

    def start(self) -> Self:
        """Write the config and launch frpc; it logs to ``log_path`` (see ``wait_for_log``)."""
        if self.proc is not None:
            raise RuntimeError("frpc already started")
        self.write_config()
        self._log = open(self.log_path, "ab")  # closed in stop()/kill()
        self._log_start = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            [self._binary(), "-c", str(self.config_path)],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code (None if never started)."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """SIGKILL at once: the tunnel vanishes without a goodbye, as when a container dies."""
        return self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: signal.Signals, timeout: float) -> int | None:
        proc, self.proc = self.proc, None
        rc = None if proc is None else end_process(proc, sig, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        return rc

    def cleanup(self) -> None:
        """Stop, and remove the working directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------ logs

    def log_text(self) -> str:
        return read_log(self.log_path)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_size(self) -> int:
        """Current log length, to pass as ``since`` to wait for a *new* occurrence of a line."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_for_log(
        self, pattern: str | re.Pattern[str], timeout: float = 30.0, since: int | None = None
    ) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in the log written since ``since``.

        ``since`` defaults to where the log stood when this run started, so a restarted frpc
        is not satisfied by an old line. Raises ``TimeoutError`` (with the log tail) on timeout,
        or ``RuntimeError`` at once if frpc exits without printing it.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        start = self._log_start if since is None else since
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc is None or self.proc.poll() is not None
            try:
                with open(self.log_path, "rb") as fh:
                    fh.seek(start)
                    text = fh.read().decode(errors="replace")
            except FileNotFoundError:
                text = ""
            match = regex.search(text)
            if match:
                return match
            if exited:
                raise RuntimeError(
                    f"frpc is not running and never logged {regex.pattern!r}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"frpc did not log {regex.pattern!r} within {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.1)
