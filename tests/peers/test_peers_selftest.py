"""Self-tests of the test peers, so a failing HaRP test can be trusted to be HaRP's fault.

Each peer is exercised on its own, over real loopback sockets: the fake Nextcloud answers the
exapp-meta/user-info matrix of docs/compatibility.md#nextcloud-lookups, the nc_py_api ExApp accepts
correct identity headers and rejects wrong ones, and FrpcProcess renders configs that the real frpc
accepts.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from .exapp_runner import ExAppProcess
from .fake_nextcloud import BAD_KEY_BODY, FakeNextcloud
from .frpc import FrpcProcess, FrpcProxy

KEY = "some-very-secret-shared-key"
RECORD = {
    "exapp_token": "app-secret",
    "exapp_version": "1.0.0",
    "host": "127.0.0.1",
    "port": 23000,
    "routes": [{"url": "^/public$", "access_level": 0, "bruteforce_protection": [401]}],
}

# ------------------------------------------------------------------ fake Nextcloud


def _get(
    url: str, path: str, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, str, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _who(user_id: str, level: int) -> dict[str, Any]:
    return {"user_id": user_id, "access_level": level}


@pytest.fixture
def nc() -> Iterator[FakeNextcloud]:
    with FakeNextcloud(KEY) as fake:
        fake.apps["myapp"] = RECORD
        fake.add_session("pass-alice", "alice", 1)
        fake.add_session("pass-admin", "admin", 2)
        fake.add_session("pass-bob", "bob", 0)  # a disabled user
        fake.add_app_password("carol", "app-pw", 1)
        fake.add_bearer("tok", "dave", 2)
        yield fake


META = "/index.php/apps/app_api/harp/exapp-meta?appId="
USER = "/index.php/apps/app_api/harp/user-info?appId="


def test_exapp_meta_matrix(nc: FakeNextcloud) -> None:
    status, ctype, body = _get(nc.url, META + "myapp", {"harp-shared-key": KEY})
    assert (status, json.loads(body)) == (200, RECORD)
    assert ctype.startswith("application/json")
    for path, key in [
        (META + "myapp", "wrong"),
        (META + "myapp", None),
        (META + "MyApp", KEY),  # app ids are compared case-sensitively
        (META + "unknown", KEY),
    ]:
        status, _, body = _get(nc.url, path, {"harp-shared-key": key} if key else {})
        assert (status, json.loads(body)) == (401, BAD_KEY_BODY), path
    assert nc.count("exapp-meta") == 5
    assert nc.calls[0].query == {"appId": "myapp"}
    assert nc.calls[0].headers["harp-shared-key"] == KEY


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, (200, _who("", 0))),
        ({"Cookie": "ocabc=x; oc_sessionPassphrase=pass-alice"}, (200, _who("alice", 1))),
        ({"Cookie": "oc_sessionPassphrase=pass-admin"}, (200, _who("admin", 2))),
        ({"Cookie": "oc_sessionPassphrase=pass-bob"}, (200, _who("bob", 0))),  # disabled
        ({"Cookie": "oc_sessionPassphrase=unknown"}, (200, _who("", 0))),
        ({"Authorization": _basic("carol", "app-pw")}, (200, _who("carol", 1))),
        ({"Authorization": "Bearer tok"}, (200, _who("dave", 2))),
        ({"Authorization": "Bearer nope"}, (200, _who("", 0))),
        ({"Authorization": _basic("carol", "wrong")}, (401, None)),
        ({"Authorization": _basic("nobody", "x")}, (401, None)),
    ],
)
def test_user_info_matrix(
    nc: FakeNextcloud, headers: dict[str, str], expected: tuple[int, Any]
) -> None:
    status, ctype, body = _get(nc.url, USER + "myapp", {"harp-shared-key": KEY, **headers})
    if expected[1] is None:  # bad Basic credentials: Nextcloud's HTML error page
        assert status == 401 and ctype.startswith("text/html")
    else:
        assert (status, json.loads(body)) == expected
    assert nc.count("user-info") == 1


def test_user_info_rejects_key_and_app(nc: FakeNextcloud) -> None:
    cookie = {"Cookie": "oc_sessionPassphrase=pass-alice"}
    for path, key in [(USER + "myapp", "wrong"), (USER + "other", KEY)]:
        status, _, body = _get(nc.url, path, {"harp-shared-key": key, **cookie})
        assert (status, json.loads(body)) == (401, BAD_KEY_BODY)


def test_modes(nc: FakeNextcloud) -> None:
    hdr = {"harp-shared-key": KEY}
    nc.mode = "error500"
    assert _get(nc.url, META + "myapp", hdr)[0] == 500
    nc.mode = "badjson"
    status, _, body = _get(nc.url, META + "myapp", hdr)
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(body)

    nc.mode = "hang"
    with pytest.raises(TimeoutError):
        _get(nc.url, META + "myapp", hdr, timeout=0.5)
    # A hung request is answered once the mode changes.
    result: list[int] = []
    waiter = threading.Thread(target=lambda: result.append(_get(nc.url, META + "myapp", hdr)[0]))
    waiter.start()
    assert nc.wait_for_calls("exapp-meta", 4, timeout=5)
    nc.mode = "ok"
    waiter.join(5)
    assert result == [200]


def test_stop_does_not_block_on_hanging_handler() -> None:
    fake = FakeNextcloud(KEY).start()
    fake.apps["myapp"] = RECORD
    fake.mode = "hang"
    url = fake.url
    errors: list[BaseException] = []

    def call() -> None:
        try:
            _get(url, META + "myapp", {"harp-shared-key": KEY}, timeout=10)
        except (OSError, http.client.HTTPException) as exc:
            errors.append(exc)

    client = threading.Thread(target=call)
    client.start()
    assert fake.wait_for_calls("exapp-meta", 1)
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 2
    client.join(5)
    assert errors, "the hung request must end without a response"


# --------------------------------------------------------------------------- ExApp


@pytest.fixture(scope="module")
def exapp_nc() -> Iterator[FakeNextcloud]:
    """The ``NEXTCLOUD_URL`` of the ExApp: only its ``/init`` progress reports go there."""
    with FakeNextcloud(KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def exapp(
    tmp_path_factory: pytest.TempPathFactory, exapp_nc: FakeNextcloud
) -> Iterator[ExAppProcess]:
    log = tmp_path_factory.mktemp("exapp") / "exapp.log"
    with ExAppProcess(
        app_id="probe", secret="S3CRET", nextcloud_url=exapp_nc.url, log_path=log
    ) as app:
        yield app


@pytest.mark.interop
def test_exapp_accepts_correct_identity(exapp: ExAppProcess) -> None:
    assert exapp.get_json("/user?a=1&b=%20x", user="alice") == (
        200,
        {"route": "user", "user": "alice", "query": "a=1&b=%20x"},
    )
    assert exapp.get_json("/public") == (200, {"route": "public", "user": "", "query": ""})
    status, headers = exapp.get_json("/echo-headers", user="bob")
    assert status == 200 and headers["ex-app-id"] == "probe" and headers["aa-version"] == "32"


@pytest.mark.interop
@pytest.mark.parametrize(
    ("override", "body"),
    [
        ({"secret": "wrong"}, "Unauthorized"),  # nc_py_api's sign_check
        ({"app_id": "other"}, "Unauthorized"),  # nc_py_api's sign_check
        ({"version": "9.9.9"}, "Invalid EX-APP-VERSION:9.9.9 != 1.0.0"),  # our strict layer
        ({"aa_version": ""}, "Missing AA-VERSION"),  # our strict layer
    ],
)
def test_exapp_rejects_wrong_identity(
    exapp: ExAppProcess, override: dict[str, str], body: str
) -> None:
    assert exapp.get_json("/user", user="alice", **override) == (401, body)


@pytest.mark.interop
def test_exapp_standard_handlers(exapp: ExAppProcess, exapp_nc: FakeNextcloud) -> None:
    status, _, body = exapp.request("GET", "/heartbeat")  # exempt from the identity check
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert exapp.request("PUT", "/enabled?enabled=1")[0] == 401
    status, _, body = exapp.request("PUT", "/enabled?enabled=1", exapp.identity_headers())
    assert (status, json.loads(body)) == (200, {"error": ""})
    status, _, body = exapp.request("POST", "/init", exapp.identity_headers())
    assert (status, json.loads(body)) == (200, {})
    # nc_py_api then reports init progress straight to Nextcloud, never through HaRP.
    status_path = "/ocs/v1.php/apps/app_api/ex-app/status"
    assert exapp_nc.wait_for_calls(status_path, 1, timeout=10), exapp.log_tail()
    report = exapp_nc.calls_to(status_path)[0]
    assert report.headers["ex-app-id"] == "probe"
    assert base64.b64decode(report.headers["authorization-app-api"]) == b":S3CRET"


@pytest.mark.interop
def test_exapp_websocket_and_sse(exapp: ExAppProcess) -> None:
    url = f"ws://127.0.0.1:{exapp.port}/ws"
    with ws_connect(url, additional_headers=exapp.identity_headers("alice")) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "Echo: hello"
    with pytest.raises(InvalidStatus) as info:
        ws_connect(url, additional_headers=exapp.identity_headers(secret="wrong"))
    assert info.value.response.status_code == 401

    # SSE must arrive event by event, not buffered into one response.
    conn = http.client.HTTPConnection("127.0.0.1", exapp.port, timeout=5)
    conn.request("GET", "/sse", headers=exapp.identity_headers())
    resp = conn.getresponse()
    assert resp.getheader("Content-Type", "").startswith("text/event-stream")
    started = time.monotonic()
    first = resp.readline()  # de-chunked by http.client
    assert first == b"id: 0\n" and time.monotonic() - started < 0.4
    rest = resp.read()
    assert time.monotonic() - started >= 0.9
    assert rest.count(b"data: ") == 3  # data: 0 (rest of event 0), 1 and 2
    conn.close()


@pytest.mark.interop
def test_exapp_on_unix_socket(tmp_path: Path) -> None:
    with ExAppProcess(
        app_id="probe", unix_socket=True, strict_identity=False, log_path=tmp_path / "exapp.log"
    ) as app:
        assert app.socket_path is not None and Path(app.socket_path).is_socket()
        assert app.get_json("/admin", user="root") == (
            200,
            {"route": "admin", "user": "root", "query": ""},
        )
        # nc_py_api itself does not compare EX-APP-VERSION (only our strict layer does).
        assert app.get_json("/admin", version="0.0.1")[0] == 200
        with socket.socket() as sock:  # nothing listens on TCP APP_PORT in this mode
            assert sock.connect_ex(("127.0.0.1", app.port)) != 0


# ---------------------------------------------------------------------------- frpc


@pytest.mark.interop
def test_frpc_config_verifies(tmp_path: Path, frpc_binary: str) -> None:
    proc = FrpcProcess(
        server_port=8782,
        token=KEY,
        login_fail_exit=False,
        tls_enable=True,
        cert_file="/certs/frp/client.crt",
        key_file="/certs/frp/client.key",
        trusted_ca_file="/certs/frp/ca.crt",
        server_name="harp.nc",
        disable_custom_tls_first_byte=False,
        tcp_mux=False,
        pool_count=2,
        proxies=[
            FrpcProxy("myapp", 23000, unix_path="/tmp/exapp.sock"),
            FrpcProxy("docker", 24000, local_port=2375, use_encryption=True, use_compression=True),
        ],
        workdir=tmp_path,
    )
    result = proc.verify()
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'metadatas.token = "some-very-secret-shared-key"' in proc.render_config()

    proc.extra_lines = ["transport.noSuchOption = true"]
    assert proc.verify().returncode != 0  # frpc parses strictly, so typos cannot slip through


@pytest.mark.interop
@pytest.mark.parametrize(
    ("tls", "first_byte_disabled", "expected"),
    [(False, None, b"\x00\x01"), (True, False, b"\x17\x16")],
)
def test_frpc_connects_with_configured_transport(
    tmp_path: Path, frpc_binary: str, tls: bool, first_byte_disabled: bool | None, expected: bytes
) -> None:
    """frpc really dials the server: plain yamux (00 01 = SYN) or the custom TLS first byte 0x17."""
    received = bytearray()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(20)

        proc = FrpcProcess(
            server_port=server.getsockname()[1],
            token=KEY,
            tls_enable=tls,
            disable_custom_tls_first_byte=first_byte_disabled,
            proxies=[FrpcProxy("myapp", 23000, unix_path="/tmp/exapp.sock")],
            workdir=tmp_path,
        )
        proc.start()
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                while len(received) < 2:
                    chunk = conn.recv(2 - len(received))
                    if not chunk:
                        break
                    received += chunk
            # loginFailExit = true: frpc gives up after the failed login and says so.
            assert proc.wait_for_log(r"login to the server failed", timeout=20)
        finally:
            rc = proc.stop()
    assert bytes(received) == expected
    assert rc is not None
