"""A private nginx: the fast upstream every scenario measures against.

Started unprivileged-style in a temporary directory with its own configuration (no system
paths are touched), on a free ``127.0.0.1`` port and on a unix socket.  It serves:

- ``/1k``, ``/public/1k``, ``/user/1k`` (1 KiB), ``/1m`` (1 MiB), ``/100m`` (100 MiB, sparse:
  created in no time, read from the page cache as zeros);
- ``/_ping`` and ``/v<version>/_ping`` answering ``OK`` (a Docker engine's ping), on the TCP
  port (the "direct" side, wrk cannot talk to a unix socket) and on ``docker.sock``, which
  HaRP is given as ``HP_DOCKER_SOCKET`` so that the ``docker-engine-port: 24000`` passthrough
  reaches it.

Keep-alive is effectively unlimited, so neither side of a comparison pays for reconnects that
the other does not.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Self

from tests.peers.base import Peer, end_process, free_port, read_log

NGINX = "/usr/sbin/nginx"
KB = 1 << 10
MB = 1 << 20

#: path under the document root -> size in bytes
FILES: dict[str, int] = {
    "1k": KB,
    "public/1k": KB,
    "user/1k": KB,
    "1m": MB,
    "100m": 100 * MB,
}

_CONFIG = """\
daemon off;
master_process on;
worker_processes auto;
{user}
pid {work}/nginx.pid;
error_log stderr warn;
worker_rlimit_nofile 20000;

events {{
    worker_connections 8192;
}}

http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        listen unix:{socket} backlog=4096;
        root {work}/www;

        location = /_ping {{
            default_type text/plain;
            return 200 "OK";
        }}
        location ~ ^/v[0-9.]+/_ping$ {{
            default_type text/plain;
            return 200 "OK";
        }}
    }}
}}
"""


def _check_free(port: int) -> None:
    """Refuse a port something already listens on (an nginx left over by an earlier bench,
    say).  nginx itself would retry its bind for seconds before giving up, and meanwhile the
    other listener answers the readiness check: the bench would then measure the leftover
    for "direct" while HaRP's Docker socket, which belonged to the nginx that gave up, is
    gone (every ``_ping`` an error)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise RuntimeError(f"nginx: port {port} is taken ({exc.strerror})") from None


class Nginx(Peer):
    """nginx serving the bench files on ``port`` and the Docker ping on ``socket_path``."""

    def __init__(self, workdir: Path, binary: str = NGINX, port: int | None = None) -> None:
        self.work = workdir / "nginx"
        self.binary = binary
        self.port = port or free_port()
        self.socket_path = self.work / "docker.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _prepare(self) -> Path:
        www = self.work / "www"
        for sub in ("tmp", "www/public", "www/user"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        for name, size in FILES.items():
            path = www / name
            if size >= 16 * MB:
                with open(path, "wb") as fh:  # sparse: no 100 MB written to disk
                    fh.truncate(size)
            else:
                path.write_bytes((b"harp-bench-" * (size // 11 + 1))[:size])
        user = ""
        if os.geteuid() == 0:
            # A root master would hand its workers to "nobody", who cannot read our 0700 dir.
            user = f"user {pwd.getpwuid(0).pw_name};"
        conf = self.work / "nginx.conf"
        conf.write_text(
            _CONFIG.format(user=user, work=self.work, port=self.port, socket=self.socket_path)
        )
        return conf

    def start(self) -> Self:
        if shutil.which(self.binary) is None:
            raise RuntimeError(f"{self.binary} not found: apt-get install nginx-light (or nginx)")
        _check_free(self.port)
        conf = self._prepare()
        self._log = open(self.work / "error.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.work), "-c", str(conf), "-e", "stderr"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for family, address in (
            (socket.AF_INET, ("127.0.0.1", self.port)),
            (socket.AF_UNIX, str(self.socket_path)),
        ):
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"nginx exited: {read_log(self.work / 'error.log')}")
                try:
                    with socket.socket(family, socket.SOCK_STREAM) as sock:
                        sock.settimeout(0.5)
                        sock.connect(address)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"nginx not listening on {address}: "
                            f"{read_log(self.work / 'error.log')}"
                        ) from None
                    time.sleep(0.05)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        code = end_process(self.proc)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code
