"""What an operator reads at ``HP_LOG_LEVEL=info``, from the real ``twistd harp``.

See docs/operations.md, "Logs":

- exactly one access line per request: plain requests, Nextcloud lookups, a refused
  upstream, a WebSocket (written when its tunnel closes, with the bytes it carried) and
  a refused upgrade;
- none of Twisted's per-connection chatter ("Starting factory", ports opening and
  closing), up to and including the shutdown that closes the client pools;
- forwarding headers from a peer outside ``HP_TRUSTED_PROXY_IPS``: one warning naming the
  peer and the variable, however many requests;
- a reverse proxy that strips ``/exapps``: a 404 whose body names the fix, the generic 404
  for other paths without an app id, and one warning for many requests.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests.interop.conftest import APP, ROUTES, ok, record_for, request, start_harp
from tests.peers.base import free_port
from tests.peers.exapp_runner import ExAppProcess
from tests.peers.fake_nextcloud import FakeNextcloud
from tests.peers.harp import HarpProcess

TRUSTED = "127.0.0.2"
UNTRUSTED = "127.0.0.3"
SESSION = "logs-session-passphrase"
NOISE = re.compile(r"Starting factory|Stopping factory| starting on |Port \d+ Closed")
STRIPPED_WARNING = "requests arrive without the /exapps/ prefix"


@pytest.fixture(scope="module")
def nextcloud(nextcloud: FakeNextcloud, exapp: ExAppProcess) -> FakeNextcloud:
    """The test ExApp with a public WebSocket route (``/nows`` is a route the ExApp does
    not serve as a WebSocket), one whose port refuses connections, and a session."""
    routes = [*ROUTES, {"url": "^/ws$", "access_level": 0}, {"url": "^/nows$", "access_level": 0}]
    nextcloud.apps[APP] = record_for(exapp, routes=routes)
    nextcloud.apps["refused"] = record_for(exapp, port=free_port(), routes=routes)
    nextcloud.add_session(SESSION, "alice", 1)
    return nextcloud


@pytest.fixture(scope="module")
def harp_settings() -> dict[str, str]:
    return {"HP_TRUSTED_PROXY_IPS": TRUSTED}


def wait_for_output(harp: HarpProcess, pattern: str, count: int = 1, timeout: float = 15.0) -> str:
    """HaRP's output once ``pattern`` matched ``count`` times in it.

    A log line follows the event it describes (an access line is written after the
    response went out, a WebSocket's when its tunnel closed), so the test waits for it.
    """
    compiled = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while len(compiled.findall(out := harp.output())) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} x {pattern!r} not logged in {timeout}s:\n{out[-3000:]}")
        time.sleep(0.05)
    return out


def access(path: str, status: str = r"\S+") -> str:
    """A regex for the access line of ``path`` answered with ``status``."""
    return rf"\[harp\.access#info\] \S+ [A-Z]+ {re.escape(path)} {status} app="


def websocket_echo(port: int, messages: int) -> None:
    with ws_connect(f"ws://127.0.0.1:{port}/exapps/{APP}/ws", open_timeout=10) as ws:
        for n in range(messages):
            ws.send(f"message {n}")
            assert ws.recv(timeout=10) == f"Echo: message {n}"


def test_one_access_line_per_request_and_no_twisted_noise(
    tmp_path: Path, key: str, nextcloud: FakeNextcloud
) -> None:
    """Its own HaRP, so that the shutdown (which closes the Nextcloud pool) is read too."""
    harp = start_harp(tmp_path, key, nextcloud)
    try:
        port = harp.http_port
        for _ in range(4):  # the first asks Nextcloud for the record
            assert ok(request(port, f"/exapps/{APP}/public")).status == 200
        cookie = {"Cookie": f"oc_sessionPassphrase={SESSION}"}
        for _ in range(3):  # the first asks Nextcloud who the session is
            assert ok(request(port, f"/exapps/{APP}/user", headers=cookie)).status == 200
        assert ok(request(port, "/exapps/refused/public")).status == 503
        websocket_echo(port, 3)
        out = wait_for_output(harp, access(f"/exapps/{APP}/ws"))
        # The last line to come is the WebSocket's: every other one is in by now.
        assert len(re.findall(access(f"/exapps/{APP}/public", "200"), out)) == 4
        assert len(re.findall(access(f"/exapps/{APP}/user", "200"), out)) == 3
        refused = re.findall(access("/exapps/refused/public", "503") + r".*", out)
        assert len(refused) == 1 and "unreachable" in refused[0], refused
    finally:
        harp.stop()
    out = harp.output()
    assert nextcloud.count("exapp-meta") >= 1 and nextcloud.count("user-info") >= 1
    assert not NOISE.findall(out), out
    per_request = [
        line for line in out.splitlines()
        if "#info]" in line and "[harp.access#" not in line and "/exapps/" in line
    ]
    assert per_request == [], per_request


def test_websocket_access_line_when_the_tunnel_closes(harp: HarpProcess) -> None:
    websocket_echo(harp.http_port, 2)
    out = wait_for_output(harp, access(f"/exapps/{APP}/ws"))
    line = re.search(
        access(f"/exapps/{APP}/ws", "101") + rf"{APP} [\d.]+ms \(tunnel (\d+) B up, (\d+) B down\)",
        out,
    )
    assert line is not None, out[-2000:]
    up, down = int(line.group(1)), int(line.group(2))
    assert up > 0 and down > len("Echo: message 0") * 2
    # A refused upgrade is an ordinary answer: one line, with the ExApp's status.
    with pytest.raises(InvalidStatus):
        with ws_connect(f"ws://127.0.0.1:{harp.http_port}/exapps/{APP}/nows", open_timeout=10):
            pass
    out = wait_for_output(harp, access(f"/exapps/{APP}/nows", r"[1-5]\d\d"))
    assert len(re.findall(access(f"/exapps/{APP}/nows"), out)) == 1
    assert len(re.findall(access(f"/exapps/{APP}/ws"), out)) == 1


def test_forwarding_headers_from_an_untrusted_peer_warned_once(harp: HarpProcess) -> None:
    port, path = harp.http_port, f"/exapps/{APP}/public"
    for n in range(5):  # the trusted proxy: believed, nothing to say
        forwarded = {"X-Forwarded-For": f"198.51.100.{n + 1}"}
        assert ok(request(port, path, headers=forwarded, source=TRUSTED)).status == 200
    for n in range(20):
        headers = {"X-Forwarded-For": f"198.51.100.{n + 1}"} if n % 2 else {"X-Real-IP": "1.2.3.4"}
        assert ok(request(port, path, headers=headers, source=UNTRUSTED)).status == 200
    out = wait_for_output(harp, rf"\] {UNTRUSTED} GET {re.escape(path)} 200", count=20)
    warnings = [line for line in out.splitlines() if "is not in HP_TRUSTED_PROXY_IPS" in line]
    assert len(warnings) == 1, warnings
    assert "#warn]" in warnings[0]
    assert f"set HP_TRUSTED_PROXY_IPS={UNTRUSTED}" in warnings[0]
    assert "one ban bucket" in warnings[0]
    assert TRUSTED not in warnings[0]


def test_stripped_prefix_answered_with_the_fix_and_warned_once(
    harp: HarpProcess, key: str
) -> None:
    port = harp.http_port
    assert ok(request(port, f"/exapps/{APP}/public")).status == 200  # the record is held
    stripped = [
        (f"/{APP}/public", {}),  # a browser behind `proxy_pass http://harp:8780/;`
        ("/app_api/info", {"harp-shared-key": key}),  # Nextcloud's own control call
        ("/another-app/heartbeat", {"EX-APP-ID": "another-app"}),  # AppAPI calling an ExApp
    ]
    for _ in range(5):
        for path, headers in stripped:
            answer = ok(request(port, path, headers=headers))
            assert answer.status == 404, (path, answer.body)
            assert answer.body.startswith(b"404 Not Found\n"), answer.body
            assert b"without the /exapps/ prefix" in answer.body
            assert b"proxy_pass http://harp:8780;" in answer.body
    # Paths that only lack an app id keep the reference's answer.
    for path in ("/", "/not-an-app/x", "/exapps", f"/{APP.upper()}x/public"):
        answer = ok(request(port, path))
        assert (answer.status, answer.body) == (404, b"404 Not Found"), path
    assert ok(request(port, f"/exapps/{APP}/public")).status == 200
    out = wait_for_output(harp, access("/another-app/heartbeat", "404"), count=5)
    warnings = [line for line in out.splitlines() if STRIPPED_WARNING in line]
    assert len(warnings) == 1, warnings
    assert "#warn]" in warnings[0] and "proxy_pass http://harp:8780;" in warnings[0]


def test_nextcloud_outage_warned_once_and_said_in_each_access_line(
    harp: HarpProcess, nextcloud: FakeNextcloud
) -> None:
    nextcloud.mode = "error500"
    try:
        for n in range(6):  # uncached apps: one failing lookup each
            assert ok(request(harp.http_port, f"/exapps/gone-{n}/x")).status == 404
    finally:
        nextcloud.mode = "ok"
    out = wait_for_output(harp, access("/exapps/gone-5/x", "404"))
    failed = re.findall(r"GET /exapps/gone-\d/x 404 app=- .*exapp-meta failed: ", out)
    assert len(failed) == 6, failed
    warnings = [line for line in out.splitlines() if "exapp-meta for gone-" in line]
    assert len(warnings) == 1 and "#warn]" in warnings[0], warnings
