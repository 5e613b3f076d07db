"""The stack under test: nginx, a fake Nextcloud and the real ``twistd harp``.

The ExApp ``bench`` is known to the fake Nextcloud (``harp/exapp-meta``) with nginx as its
host and port, so HaRP learns it on first use exactly as in production.  Its routes:
``^/public/`` PUBLIC, ``^/user/`` USER, ``^/1m$`` and ``^/100m$`` PUBLIC (HaRP strips
``/exapps/bench`` before forwarding, so ``/exapps/bench/public/1k`` is nginx's
``/public/1k``).  Nextcloud knows one browser session (cookie ``oc_sessionPassphrase``) and one
app password (Basic), both of the same user; with ``HP_SESSION_LIFETIME=10`` HaRP answers them
from its lookup cache.

A reference HaRP can be pointed at the same fake Nextcloud (fixed ``--nextcloud-port``, same
``--shared-key``): it then learns the same ExApp with the same nginx upstream.
"""

from __future__ import annotations

import base64
import contextlib
import resource
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.nginx import Nginx
from tests.conftest import self_signed_pem
from tests.peers.fake_nextcloud import FakeNextcloud
from tests.peers.harp import HarpProcess, base_env, new_key

APP_ID = "bench"
APP_TOKEN = "bench-exapp-token"  # noqa: S105 - a throwaway ExApp secret
APP_VERSION = "1.0.0"
USER_ID = "bench-user"
SESSION = "bench-session-passphrase"
APP_PASSWORD = "bench-app-password"  # noqa: S105 - known to the fake Nextcloud only


@dataclass
class Stack:
    key: str
    nginx: Nginx
    nextcloud: FakeNextcloud
    harp: HarpProcess
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def harp_url(self) -> str:
        return f"http://127.0.0.1:{self.harp.http_port}"

    @property
    def harp_https_url(self) -> str:
        return f"https://127.0.0.1:{self.harp.https_port}"

    @property
    def pid(self) -> int:
        assert self.harp.proc is not None
        return self.harp.proc.pid

    def basic_auth(self) -> str:
        return "Basic " + base64.b64encode(f"{USER_ID}:{APP_PASSWORD}".encode()).decode()

    def app_api_auth(self) -> str:
        return base64.b64encode(f"{USER_ID}:{APP_TOKEN}".encode()).decode()


def raise_fd_limit() -> int:
    """Soft fd limit up to the hard one (2 000 idle connections, c500), inherited by peers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@contextlib.contextmanager
def stack(
    shared_key: str | None = None,
    nextcloud_port: int = 0,
    nginx_port: int | None = None,
    harp_env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    raise_fd_limit()
    key = shared_key or new_key()
    with tempfile.TemporaryDirectory(prefix="harp-bench-") as tmp:
        work = Path(tmp)
        with Nginx(work, port=nginx_port) as nginx, FakeNextcloud(key, port=nextcloud_port) as nc:
            nc.apps[APP_ID] = {
                "exapp_token": APP_TOKEN,
                "exapp_version": APP_VERSION,
                "host": "127.0.0.1",
                "port": nginx.port,
                "routes": [
                    {"url": "^/public/", "access_level": 0},
                    {"url": "^/user/", "access_level": 1},
                    {"url": "^/1m$", "access_level": 0},
                    {"url": "^/100m$", "access_level": 0},
                ],
            }
            nc.add_session(SESSION, USER_ID, 1)
            nc.add_app_password(USER_ID, APP_PASSWORD, 1)
            certs = work / "certs"
            certs.mkdir()
            self_signed_pem(certs / "cert.pem", "127.0.0.1")
            env = base_env(
                work,
                HP_SHARED_KEY=key,
                NC_INSTANCE_URL=nc.url,
                HP_FRP_DISABLE_TLS="true",
                HP_LOG_LEVEL="warning",
                HP_VERBOSE_START="0",
                HP_SESSION_LIFETIME="10",
                HP_DOCKER_SOCKET=str(nginx.socket_path),
            )
            # The tests pin HP_WORKERS=1; the bench measures HaRP's own default (the CPUs
            # this machine gives it) unless --harp-env says otherwise.
            env.pop("HP_WORKERS", None)
            env.update(harp_env or {})
            harp = HarpProcess(env, work).start()
            try:
                yield Stack(key, nginx, nc, harp, work, env)
            finally:
                harp.stop()
