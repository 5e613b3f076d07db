"""The README's reverse-proxy snippets, run: real nginx and real Caddy in front of HaRP.

Each server is configured with the snippet text taken from README.md (only HaRP's address
is substituted, see :mod:`tests.peers.web_server`), wrapped in a stand-in for the site that
serves Nextcloud: nginx gets a regex location for static files like Nextcloud's own
(which a plain ``location /exapps/`` would lose ExApp URLs to), Caddy a catch-all answer.
Through each server the tests check what operators report broken behind a proxy: ExApp
pages (GET with a query, POST with a body), a WebSocket (``Upgrade``/``Connection``), an SSE
stream arriving event by event, a download held back while its reader pauses, a 50 MB
upload reaching the ExApp intact and while it is still being sent (with
``Content-Length``, and chunked), and bans charged to the client behind the proxy through
``HP_TRUSTED_PROXY_IPS`` and the proxy's ``X-Forwarded-For``.  nginx runs twice: as the
README has it, and reaching HaRP's HTTPS frontend as docs/deployment.md's separate-host
recipe has it (the guide's ``proxy_pass`` replacement lines, certificate verified).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import peer_missing, self_signed_pem
from tests.interop.conftest import APP, ROUTES, ok, public_record, record_for, request
from tests.peers.bulk_upstream import BulkUpstream, pattern_sha256
from tests.peers.exapp_runner import ExAppProcess
from tests.peers.fake_nextcloud import FakeNextcloud
from tests.peers.harp import HarpProcess
from tests.peers.web_server import (
    HARP_PLACEHOLDER,
    CaddyProcess,
    NginxProcess,
    ProxyUnavailable,
    fill,
    readme_snippet,
    snippets,
)

pytestmark = pytest.mark.interop

MB = 1 << 20
#: Where the web server connects from, as HaRP sees it: the one trusted proxy.
PROXY_ADDRESS = "127.0.0.1"
#: The web servers under test: nginx and Caddy as in the README, and nginx reaching HaRP's
#: HTTPS frontend as in the guide's separate-host recipe.
FRONTS = ["nginx", "caddy", "nginx-https"]
#: Client addresses of the ban test, one pair per server so the bans never meet.
CLIENTS = {name: (f"127.0.0.{61 + i}", f"127.0.0.{71 + i}") for i, name in enumerate(FRONTS)}
#: The name in HaRP's certificate, and the guide's placeholders of the HTTPS variant.
HARP_TLS_NAME = "harp.internal.example"
HTTPS_UPSTREAM = f"{HARP_TLS_NAME}:8781"
CA_PLACEHOLDER = "/etc/nginx/harp-ca.pem"

#: What stands for Nextcloud's own site around the snippets: its answer marks a request the
#: web server kept instead of passing to HaRP.
NEXTCLOUD_NGINX = """
    location / { return 200 "nextcloud\\n"; }
    location ~ \\.(?:css|js|svg|png)$ { return 418 "nextcloud static\\n"; }
"""
NEXTCLOUD_CADDY = """
    respond "nextcloud" 200
"""
NEXTCLOUD_BODIES = (b"nextcloud\n", b"nextcloud static\n", b"nextcloud")


@pytest.fixture(scope="module")
def nextcloud(nextcloud: FakeNextcloud, exapp: ExAppProcess,
              bulk: BulkUpstream) -> FakeNextcloud:
    """The nc_py_api ExApp (its WebSocket and SSE routes public) and the bulk upstream."""
    extra = [{"url": "^/ws$", "access_level": 0}, {"url": "^/sse$", "access_level": 0}]
    nextcloud.apps[APP] = record_for(exapp, routes=ROUTES + extra)
    nextcloud.apps["bulk"] = public_record(bulk.port)
    return nextcloud


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HaRP's certificate directory: ``cert.pem`` (chain and key) turns HTTPS on."""
    certs = tmp_path_factory.mktemp("certs")
    self_signed_pem(certs / "cert.pem", HARP_TLS_NAME)
    return certs


@pytest.fixture(scope="module")
def harp_settings(certs: Path) -> dict[str, str]:
    return {"HP_TRUSTED_PROXY_IPS": PROXY_ADDRESS, "HP_BLACKLIST_COUNT": "3",
            "HP_BLACKLIST_WINDOW": "600", "HP_CERTS_DIR": str(certs)}


def https_server_part(harp: HarpProcess, certs: Path, workdir: Path) -> str:
    """The README's server part with its ``proxy_pass`` line replaced by the guide's HTTPS
    upstream lines, as the separate-host recipe says; the CA file is HaRP's certificate."""
    pem = (certs / "cert.pem").read_text()
    ca = workdir / "harp-ca.pem"
    ca.write_text(pem[: pem.index("-----BEGIN PRIVATE KEY-----")])
    upstream = fill(readme_snippet("nginx-https-upstream", "docs/deployment.md"),
                    {HTTPS_UPSTREAM: f"127.0.0.1:{harp.https_port}", CA_PLACEHOLDER: str(ca)})
    lines = readme_snippet("nginx-server").splitlines(keepends=True)
    plain = [n for n, line in enumerate(lines) if f"proxy_pass http://{HARP_PLACEHOLDER};" in line]
    assert len(plain) == 1, "the README's nginx snippet has no single plain proxy_pass line"
    return "".join(lines[: plain[0]]) + upstream + "".join(lines[plain[0] + 1:])


def start_front(kind: str, workdir: Path, harp: HarpProcess,
                certs: Path) -> NginxProcess | CaddyProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    address = {HARP_PLACEHOLDER: f"127.0.0.1:{harp.http_port}"}
    try:
        if kind == "caddy":
            return CaddyProcess(workdir, fill(readme_snippet("caddy"), address)
                                + NEXTCLOUD_CADDY).start()
        if kind == "nginx":
            server = fill(readme_snippet("nginx-server"), address)
        else:
            server = https_server_part(harp, certs, workdir)
        return NginxProcess(workdir, readme_snippet("nginx-http"),
                            server + NEXTCLOUD_NGINX).start()
    except ProxyUnavailable as exc:
        peer_missing(str(exc))
        raise AssertionError("unreachable") from exc


@pytest.fixture(scope="module", params=FRONTS)
def front(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          harp: HarpProcess, certs: Path) -> Iterator[NginxProcess | CaddyProcess]:
    """The web server under test, configured from the README, in front of ``harp``."""
    kind = str(request.param)
    server = start_front(kind, tmp_path_factory.mktemp(kind), harp, certs)
    server.kind = kind
    yield server
    server.stop()


def test_guide_shows_the_readme_snippets() -> None:
    """docs/deployment.md repeats the README's snippets word for word; its only snippet of
    its own is the HTTPS upstream variant, which :func:`https_server_part` runs."""
    readme = snippets(Path("README.md"))
    assert {"nginx-http", "nginx-server", "caddy"} <= set(readme)
    guide = snippets(Path("docs/deployment.md"))
    assert set(guide) == set(readme) | {"nginx-https-upstream"}
    for name, text in readme.items():
        assert guide[name] == text, f"docs/deployment.md snippet {name!r} drifted"


def test_pages_get_and_post(front: NginxProcess | CaddyProcess, exapp: ExAppProcess) -> None:
    resp = ok(request(front.port, f"/exapps/{APP}/public?a=1&b=%20x"))
    assert resp.status == 200, resp.body
    assert resp.json() == {"route": "public", "user": "", "query": "a=1&b=%20x"}
    body = b'{"hello": "world"}' * 100
    seen = ok(request(front.port, f"/exapps/{APP}/echo-headers", method="POST", body=body,
                      headers={"Content-Type": "application/json"})).json()
    assert seen["content-length"] == str(len(body))
    assert seen["ex-app-id"] == APP  # HaRP, not the web server, answered
    assert seen["x-forwarded-for"].split(",")[-1].strip() == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    # Everything outside /exapps/ stays with Nextcloud; ExApp URLs that look like
    # Nextcloud's static files still reach HaRP (here the bulk upstream's own 404).
    assert ok(request(front.port, "/index.php/apps/files")).body in NEXTCLOUD_BODIES
    static = ok(request(front.port, "/exapps/bulk/app.js"))
    assert (static.status, static.body) == (404, b'{"error":"not found"}')


def test_websocket(front: NginxProcess | CaddyProcess) -> None:
    url = f"ws://127.0.0.1:{front.port}/exapps/{APP}/ws"
    with ws_connect(url, open_timeout=10, max_size=4 * MB) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "Echo: hello"
        message = "x" * MB
        ws.send(message)
        assert ws.recv(timeout=30) == "Echo: " + message


def test_sse_arrives_event_by_event(front: NginxProcess | CaddyProcess) -> None:
    # The bulk upstream, not the ExApp: the ExApp answers "X-Accel-Buffering: no", which
    # would switch nginx's buffering off even if the snippet forgot proxy_buffering.
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
    try:
        conn.request("GET", "/exapps/bulk/sse?n=3&interval=0.5")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("content-type", "").startswith("text/event-stream")
        first = resp.readline()
        first_at = time.monotonic()
        rest = resp.read()
        ended_at = time.monotonic()
    finally:
        conn.close()
    assert first == b"data: event 0\n"
    assert (first + rest).count(b"data:") == 3
    # Three events 0.5 s apart: a buffering proxy hands over the first only when the
    # stream ends, a streaming one about a second before.
    assert ended_at - first_at >= 0.5, ended_at - first_at


def settled(read: Callable[[], int], quiet: float = 0.5, limit: float = 15) -> int:
    """``read()`` once it has stopped changing for ``quiet`` seconds (or after ``limit``)."""
    value, since, deadline = read(), time.monotonic(), time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return value


def test_download_waits_for_its_reader(front: NginxProcess | CaddyProcess,
                                       bulk: BulkUpstream) -> None:
    """A client that stops reading holds the upstream back, all the way through HaRP,
    instead of the web server soaking the response up (nginx without ``proxy_buffering
    off`` spools it into temporary files and lets the ExApp finish)."""
    size = 128 * MB
    before = bulk.downloaded
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=60)
    try:
        conn.request("GET", f"/exapps/bulk/bytes/{size}")
        resp = conn.getresponse()
        assert resp.status == 200
        digest = hashlib.sha256(resp.read(MB))
        held = settled(lambda: bulk.downloaded) - before
        while block := resp.read(1 << 16):
            digest.update(block)
    finally:
        conn.close()
    assert held < size, "the whole response left the upstream while the client read nothing"
    assert digest.hexdigest() == pattern_sha256(size)


def upload(port: int, size: int, chunked: bool, bulk: BulkUpstream) -> dict[str, object]:
    """POST ``size`` random bytes in 1 MiB pieces as they are produced; the upstream's
    ``{"length", "sha256"}``, ours, and whether the upload streamed.

    Streamed means the upstream saw body bytes before the last piece was sent: a proxy that
    buffers the whole body first (nginx without ``proxy_request_buffering off``) shows
    nothing to the upstream until then, and the last piece waits in vain.
    """
    digest = hashlib.sha256()
    before = bulk.uploaded
    streamed = False

    def pieces() -> Iterator[bytes]:
        nonlocal streamed
        for n in range(size // MB):
            if n == size // MB - 1:
                deadline = time.monotonic() + 10
                while not (streamed := bulk.uploaded > before) and time.monotonic() < deadline:
                    time.sleep(0.02)
            piece = os.urandom(MB)
            digest.update(piece)
            yield piece

    headers = {"Content-Type": "application/octet-stream"}
    if not chunked:
        headers["Content-Length"] = str(size)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/exapps/bulk/upload", body=pieces(), headers=headers,
                     encode_chunked=chunked)
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        answer: dict[str, object] = json.loads(resp.read())
    finally:
        conn.close()
    return {**answer, "sent": digest.hexdigest(), "streamed": streamed}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_large_upload_streams_intact(front: NginxProcess | CaddyProcess, bulk: BulkUpstream,
                                     chunked: bool) -> None:
    size = (10 if chunked else 50) * MB
    answer = upload(front.port, size, chunked, bulk)
    assert answer["length"] == size
    assert answer["sha256"] == answer["sent"]
    assert answer["streamed"], "the upstream saw nothing before the client finished"


def test_bans_charge_the_client_behind_the_proxy(front: NginxProcess | CaddyProcess) -> None:
    attacker, neighbour = CLIENTS[front.kind]
    good = f"/exapps/{APP}/public"
    for i in range(3):
        # A forged X-Forwarded-For, new each time, must not let the client dodge its ban:
        # nginx appends the real address, Caddy replaces the header.
        spoof = {"X-Forwarded-For": f"192.0.2.{i + 1}"}
        resp = ok(request(front.port, f"/exapps/{APP}/admin", spoof, source=attacker))
        assert resp.status == 403, resp.body
    # Banned: HaRP drops the connection, which the web server reports as a bad gateway.
    forged = {"X-Forwarded-For": "192.0.2.99"}
    assert ok(request(front.port, good, forged, source=attacker)).status == 502
    # Another client behind the same proxy, and the proxy itself, are not banned.
    assert ok(request(front.port, good, source=neighbour)).status == 200
    assert ok(request(front.port, good, source=PROXY_ADDRESS)).status == 200

