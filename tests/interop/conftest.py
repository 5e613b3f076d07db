"""What the interop modules share: one fake Nextcloud, one nc_py_api ExApp, one HaRP.

Why here: the request-path modules (pipeline, streaming, Redis replicas) each need the same
three peers around the ``twistd harp`` under test, and the same way to send one request
and tell a silent drop from an answer.  A module states only what differs, by overriding
a fixture of the same name:

* ``app_id``: the id the test ExApp runs under (default :data:`APP`);
* ``nextcloud``: request the shared one and add the sessions and records the module needs
  (``def nextcloud(nextcloud, exapp): nextcloud.apps[...] = ...; return nextcloud``);
* ``harp_settings``: HaRP variables on top of :func:`start_harp`'s defaults.

All of them are module-scoped: starting the ExApp and HaRP costs seconds, a test costs
milliseconds, so the tests of one module share the processes (and must not leave state
behind that another test of the module could trip on).
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers.bulk_upstream import BulkUpstream
from tests.peers.exapp_runner import ExAppProcess
from tests.peers.fake_nextcloud import FakeNextcloud
from tests.peers.harp import HarpProcess, base_env, new_key

#: The test ExApp's default id.
APP = "harp-test-exapp"

#: The routes of the test ExApp's record (``tests/peers/exapp.py`` serves these paths).
ROUTES = [
    {"url": "^/public$", "access_level": 0},
    {"url": "^/user$", "access_level": "1"},  # AppAPI may send the level as a string
    {"url": "^/admin$", "access_level": 2},
    {"url": "^/echo-headers", "access_level": 0},
    {"url": "^/guarded$", "access_level": 0, "bruteforce_protection": [401]},
    {"url": "[invalid(", "access_level": 0},
]

#: Routes that make every path of an app public: the data-path tests check no access levels.
ALL_PUBLIC = [{"url": "^/", "access_level": 0}]

#: What :func:`request` returns when HaRP closed the connection without a response.
DROPPED = "dropped"


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET",
    body: bytes | None = None, source: str = "127.0.0.1", timeout: float = 30,
) -> Response | str:
    """One request on a fresh connection; DROPPED if closed without a response.

    ``source`` picks the client address (any 127.0.0.0/8 address works on Linux), which
    is how the ban tests play several clients.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
        return DROPPED
    finally:
        conn.close()


def ok(result: Response | str) -> Response:
    """The response, failing the test if HaRP dropped the connection instead."""
    assert isinstance(result, Response), result
    return result


def record_for(app: ExAppProcess, **changes: Any) -> dict[str, Any]:
    """The ExApp record (docs/compatibility.md#exapp-registry) Nextcloud would hold for ``app``,
    with :data:`ROUTES`."""
    record = {
        "exapp_token": app.secret, "exapp_version": app.version, "host": "127.0.0.1",
        "port": app.port, "routes": ROUTES,
    }
    record.update(changes)
    return record


def public_record(port: int) -> dict[str, Any]:
    """The record of a plain upstream on 127.0.0.1:``port`` that checks no identity
    headers (e.g. :class:`BulkUpstream`), every path public."""
    return {"exapp_token": "t", "exapp_version": "1", "host": "127.0.0.1", "port": port,
            "routes": ALL_PUBLIC}


def poll_until(condition: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll ``condition`` every 50 ms; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_harp(tmp: Path, key: str, nextcloud: FakeNextcloud, **env: str) -> HarpProcess:
    """HaRP in front of ``nextcloud``: FRP without TLS (no PKI to generate) and a ban
    threshold no test reaches by accident; ``env`` overrides both."""
    defaults = {"HP_FRP_DISABLE_TLS": "true", "HP_BLACKLIST_COUNT": "1000"}
    full = base_env(tmp, HP_SHARED_KEY=key, NC_INSTANCE_URL=nextcloud.url, **{**defaults, **env})
    return HarpProcess(full, tmp).start()


@pytest.fixture(scope="module")
def key() -> str:
    """The shared key of this module's HaRP and fake Nextcloud."""
    return new_key()


@pytest.fixture(scope="module")
def app_id() -> str:
    """The id the module's test ExApp runs under."""
    return APP


@pytest.fixture(scope="module")
def exapp(tmp_path_factory: pytest.TempPathFactory, app_id: str) -> Iterator[ExAppProcess]:
    """The real nc_py_api test ExApp, checking the identity headers HaRP sends."""
    log = tmp_path_factory.mktemp("exapp") / "exapp.log"
    with ExAppProcess(app_id=app_id, log_path=log) as app:
        yield app


@pytest.fixture(scope="module")
def bulk() -> Iterator[BulkUpstream]:
    """The bulk upstream (big bodies, SSE, upload digests); a module registers it in
    ``nextcloud`` with :func:`public_record` when it needs it."""
    with BulkUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def nextcloud(key: str) -> Iterator[FakeNextcloud]:
    """A fake Nextcloud that knows no app and no user yet."""
    with FakeNextcloud(key) as fake:
        yield fake


@pytest.fixture(scope="module")
def harp_settings() -> dict[str, str]:
    """HaRP variables the module's ``harp`` adds to :func:`start_harp`'s defaults."""
    return {}


@pytest.fixture(scope="module")
def harp(
    tmp_path_factory: pytest.TempPathFactory, key: str, nextcloud: FakeNextcloud,
    harp_settings: dict[str, str],
) -> Iterator[HarpProcess]:
    """The ``twistd harp`` under test, asking ``nextcloud`` for records and users."""
    proc = start_harp(tmp_path_factory.mktemp("harp"), key, nextcloud, **harp_settings)
    yield proc
    proc.stop()
