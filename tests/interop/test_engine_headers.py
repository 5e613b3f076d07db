"""What a Docker engine receives of AppAPI's headers through the passthrough.

Why: the passthrough keeps HaRP's secrets from the engine (the shared key, AppAPI's
Basic auth that carries it, the engine selector, cookies), and since the forwarded
header lines are remembered by the header bytes as received (harp/web/proxy.py), the
second identical request must be as clean as the first.  The engine here is a small
HTTP server on a unix socket (``HP_DOCKER_SOCKET``) that answers ``_ping`` with the
headers it received.
"""

from __future__ import annotations

import base64
import http.client
import json
from pathlib import Path

import pytest

from tests.peers.bulk_upstream import BulkUpstream
from tests.peers.harp import HarpProcess, base_env

pytestmark = pytest.mark.interop


def test_engine_never_receives_harps_secrets(tmp_path: Path) -> None:
    sock = str(tmp_path / "engine.sock")
    with BulkUpstream(unix_path=sock) as engine:
        assert engine is not None
        env = base_env(tmp_path, HP_DOCKER_SOCKET=sock)
        key = env["HP_SHARED_KEY"]
        harp = HarpProcess(env, tmp_path).start()
        try:
            basic = base64.b64encode(f"app_api_haproxy_user:{key}".encode()).decode()
            headers = {
                "harp-shared-key": key, "docker-engine-port": "24000",
                "Authorization": f"Basic {basic}", "Cookie": "oc_sessionPassphrase=x",
                "User-Agent": "GuzzleHttp/7", "X-Keep": "1",
            }
            for _ in range(3):  # the first works the lines out, the others remember them
                c = http.client.HTTPConnection("127.0.0.1", harp.http_port, timeout=30)
                c.request("GET", "/exapps/app_api/v1.44/_ping", headers=headers)
                resp = c.getresponse()
                assert resp.status == 200
                received = json.loads(resp.read())
                c.close()
                assert received.get("x-keep") == "1" and received.get("user-agent")
                for secret in ("harp-shared-key", "docker-engine-port", "authorization",
                               "cookie"):
                    assert secret not in received, (secret, received)
                assert key not in json.dumps(received)
        finally:
            harp.stop()
