"""Start and stop the nc_py_api test ExApp (``tests/peers/exapp.py``) as a real subprocess.

Why a subprocess: the ExApp must be what HaRP really talks to, over TCP or over the unix socket
that frpc's ``unix_domain_socket`` plugin dials, with uvicorn doing the HTTP and WebSocket parsing.
Running it in-process would share an event loop and signal handling with the test and hide
exactly the problems these tests are for.

Typical pytest fixture::

    @pytest.fixture
    def exapp(tmp_path):
        with ExAppProcess(app_id="myapp", log_path=tmp_path / "exapp.log") as app:
            yield app          # app.port, app.secret, app.identity_headers(user="alice")

For the FRP layout pass ``unix_socket=True`` (a short private path is chosen) or a path: the app
then gets ``HP_SHARED_KEY`` and ``HP_EXAPP_SOCK`` and listens only on that socket, while
``APP_PORT`` stays what AppAPI would give it (the ``remotePort`` frpc asks frps for).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Self

from tests.peers.base import Peer, end_process, free_port, read_log

EXAPP_SCRIPT = Path(__file__).with_name("exapp.py")
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_UNIX_PATH = 107


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a unix socket, for talking to the ExApp as frpc would."""

    def __init__(self, path: str, timeout: float = 10.0, host: str = "localhost") -> None:
        super().__init__(host, timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class ExAppProcess(Peer):
    """One running test ExApp; see the module docstring."""

    def __init__(
        self,
        *,
        app_id: str = "harp-test-exapp",
        secret: str | None = None,
        version: str = "1.0.0",
        aa_version: str = "33.0.1",
        host: str = "127.0.0.1",
        port: int | None = None,
        nextcloud_url: str = "http://127.0.0.1:9",
        display_name: str = "HaRP test ExApp",
        unix_socket: bool | str | os.PathLike[str] = False,
        shared_key: str | None = None,
        strict_identity: bool = True,
        log_path: str | os.PathLike[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        """Describe the ExApp; nothing starts before ``start()``.

        ``nextcloud_url`` defaults to a closed loopback port: the app does not need Nextcloud, and
        the few background calls it makes (``/init`` progress) must never leave the machine.
        ``shared_key`` is only the value of ``HP_SHARED_KEY`` (nc_py_api uses it as the "listen on
        the unix socket" switch); it is implied by ``unix_socket``.
        """
        self.app_id = app_id
        self.secret = secret if secret is not None else secrets.token_urlsafe(48)
        self.version = version
        self.aa_version = aa_version
        self.host = host
        self.port = port if port is not None else free_port()
        self._own_dir: str | None = None
        self.socket_path: str | None = None
        if unix_socket:
            if unix_socket is True:
                self._own_dir = tempfile.mkdtemp(prefix="exapp-", dir="/tmp")
                self.socket_path = os.path.join(self._own_dir, "exapp.sock")
            else:
                self.socket_path = os.fspath(unix_socket)
            if len(os.fsencode(self.socket_path)) > MAX_UNIX_PATH:
                raise ValueError(f"unix socket path too long for AF_UNIX: {self.socket_path}")
            if shared_key is None:
                shared_key = "test-shared-key"
        elif shared_key:
            # HP_SHARED_KEY without HP_EXAPP_SOCK: nc_py_api's own default path.
            self.socket_path = "/tmp/exapp.sock"
        if log_path is None:
            if self._own_dir is None:
                self._own_dir = tempfile.mkdtemp(prefix="exapp-", dir="/tmp")
            log_path = os.path.join(self._own_dir, "exapp.log")
        self.log_path = Path(log_path)
        self.env: dict[str, str] = {
            "APP_ID": app_id,
            "APP_SECRET": self.secret,
            "APP_VERSION": version,
            "APP_DISPLAY_NAME": display_name,
            "APP_HOST": host,
            "APP_PORT": str(self.port),
            "AA_VERSION": aa_version,
            "NEXTCLOUD_URL": nextcloud_url,
            "EXAPP_STRICT_IDENTITY": "1" if strict_identity else "0",
            "PYTHONUNBUFFERED": "1",
        }
        if shared_key:
            self.env["HP_SHARED_KEY"] = shared_key
        if unix_socket and self.socket_path:
            self.env["HP_EXAPP_SOCK"] = self.socket_path
        if extra_env:
            self.env.update(extra_env)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # ----------------------------------------------------------------- lifecycle

    @property
    def uses_unix_socket(self) -> bool:
        return bool(self.env.get("HP_SHARED_KEY"))

    def start(self, timeout: float = 30.0) -> Self:
        """Launch the app and wait until ``/heartbeat`` answers 200 where it listens."""
        if self.proc is not None:
            raise RuntimeError("ExApp already started")
        if self._own_dir:
            os.makedirs(self._own_dir, exist_ok=True)  # stop() may have removed it
        # A stale socket file needs no cleanup: asyncio's create_unix_server replaces it.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("APP_", "HP_", "AA_"))}
        env.update(self.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAPP_SCRIPT)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our own process group: terminal signals don't hit it
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.stop()
                raise RuntimeError(f"ExApp exited with {rc} during startup:\n{self.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, _, _ = self.request("GET", "/heartbeat", timeout=2.0)
                if status == 200:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"ExApp did not answer /heartbeat in {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (uvicorn's graceful shutdown, capped at 2 s in the app), then SIGKILL."""
        proc, self.proc = self.proc, None
        if proc is not None:
            end_process(proc, timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_dir:
            if self.socket_path and os.path.exists(self.socket_path):
                with contextlib.suppress(OSError):
                    os.unlink(self.socket_path)
            with contextlib.suppress(OSError):  # only succeeds if the log lives elsewhere
                os.rmdir(self._own_dir)

    def cleanup(self) -> None:
        """Stop, then remove the private temp dir (log included) if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---------------------------------------------------------------- inspection

    @property
    def url(self) -> str:
        """``http://host:port`` when listening on TCP (meaningless in unix-socket mode)."""
        return f"http://{self.host}:{self.port}"

    def log_text(self) -> str:
        return read_log(self.log_path)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ------------------------------------------------------------------- helpers

    def identity_headers(
        self,
        user: str = "",
        *,
        secret: str | None = None,
        app_id: str | None = None,
        version: str | None = None,
        aa_version: str = "32",
    ) -> dict[str, str]:
        """The four headers HaRP sets towards an ExApp
        (docs/compatibility.md#forwarding-to-an-exapp), overridable for tests."""
        token = f"{user}:{self.secret if secret is None else secret}"
        return {
            "AA-VERSION": aa_version,
            "EX-APP-ID": self.app_id if app_id is None else app_id,
            "EX-APP-VERSION": self.version if version is None else version,
            "AUTHORIZATION-APP-API": base64.b64encode(token.encode()).decode(),
        }

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """Talk to the ExApp directly, bypassing HaRP: status, lower-cased headers, body."""
        conn: http.client.HTTPConnection
        if self.uses_unix_socket:
            assert self.socket_path is not None, "HP_SHARED_KEY set but no socket path known"
            conn = UnixHTTPConnection(self.socket_path, timeout=timeout)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def get_json(self, path: str, user: str = "", **overrides: Any) -> tuple[int, Any]:
        """GET with correct identity headers (see ``identity_headers``); body parsed if JSON."""
        status, headers, data = self.request("GET", path, self.identity_headers(user, **overrides))
        if headers.get("content-type", "").startswith("application/json"):
            return status, json.loads(data)
        return status, data.decode(errors="replace")
