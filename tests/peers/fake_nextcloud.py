"""A small fake Nextcloud that answers the two requests HaRP makes to Nextcloud.

Why a fake and not the real thing: a real Nextcloud needs PHP, a database and an installed app_api,
which the test machines do not have. HaRP, however, only ever calls two endpoints of app_api's
``HarpController`` (see docs/compatibility.md#nextcloud-lookups), so a faithful imitation of exactly
those two is enough to test HaRP's registry, user resolution, caching and error handling over real
sockets:

* ``GET /index.php/apps/app_api/harp/exapp-meta?appId=<id>``: the ExApp record
  (docs/compatibility.md#exapp-registry);
* ``GET /index.php/apps/app_api/harp/user-info?appId=<id>``: who the forwarded cookies or
  ``Authorization`` header belong to, and their access level.

Both check the ``harp-shared-key`` header; a wrong key and an unknown app id both get
``401 {"message":"Harp shared key is not valid"}``, as app_api does so that installed apps cannot be
guessed. App ids are compared case-sensitively, like the database lookup app_api does (HaRP is the
one that lower-cases them).

Deliberate simplifications, each documented where it matters:

* A browser session is recognised by the ``oc_sessionPassphrase`` cookie alone. Real Nextcloud also
  needs the instance cookie ``oc<instanceid>``; it is accepted but not required here, which keeps
  tests short while still exercising HaRP's cookie forwarding and its passphrase-keyed cache.
* Basic credentials that are present but wrong get 401 with an HTML body, as Nextcloud's
  ``Session::tryBasicAuthLogin`` does ("if credentials were provided, they need to be valid").
  An unknown session passphrase or Bearer token is simply anonymous, as in Nextcloud.
* Brute-force throttling is not modelled; ``calls`` shows what HaRP asked instead.
* Any other path is recorded and answered 404, except ``/ocs/...`` which gets an empty OCS success
  so that an nc_py_api ExApp pointed here (``/init`` reports progress to ``ex-app/status``) does
  not log errors.

Usage::

    with FakeNextcloud("the-key") as nc:
        nc.apps["myapp"] = {"exapp_token": "s3cret", "exapp_version": "1.0.0",
                             "host": "127.0.0.1", "port": 23000, "routes": []}
        nc.add_session("pass1", "alice", 1)
        ...  # point HaRP's NC_INSTANCE_URL at nc.url
        assert nc.count("user-info") == 1
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple, Self
from urllib.parse import parse_qs, urlsplit

from tests.peers.base import Peer

EXAPP_META_PATH = "/index.php/apps/app_api/harp/exapp-meta"
USER_INFO_PATH = "/index.php/apps/app_api/harp/user-info"
BAD_KEY_BODY = {"message": "Harp shared key is not valid"}
MODES = ("ok", "hang", "error500", "badjson")

_ENDPOINT_NAMES = {"exapp-meta": EXAPP_META_PATH, "user-info": USER_INFO_PATH}


class Call(NamedTuple):
    """One request the fake received.

    ``query`` maps each parameter to its last value; ``headers`` has lower-cased names (HTTP header
    names are case-insensitive, and HaRP may send them in any case).
    """

    path: str
    query: dict[str, str]
    headers: dict[str, str]


class _Identity(NamedTuple):
    user_id: str
    level: int


class _Server(ThreadingHTTPServer):
    """The HTTP server, holding a back-reference to its ``FakeNextcloud``."""

    daemon_threads = True
    # stop() must never wait for handler threads (a "hang" handler may be blocked).
    block_on_close = False

    def __init__(self, owner: FakeNextcloud, address: tuple[str, int]) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients (HaRP) dropping connections is normal here; report only real bugs."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Request handler; the logic lives in ``FakeNextcloud`` so it reads in one place."""

    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, like a real Nextcloud behind a web server
    server_version = "FakeNextcloud/1"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, add=True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.owner._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: pytest shows ``calls`` on failure, stderr noise helps nobody."""

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header, off by ``clock_offset`` (a Nextcloud with a wrong clock)."""
        now = time.time() if timestamp is None else timestamp
        return super().date_time_string(now + self.server.owner.clock_offset)

    def _drain_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(length)

    def do_GET(self) -> None:
        self.server.owner._handle(self)

    def do_POST(self) -> None:
        self._drain_body()
        self.server.owner._handle(self)

    def do_PUT(self) -> None:
        self._drain_body()
        self.server.owner._handle(self)

    def do_DELETE(self) -> None:
        self.server.owner._handle(self)

    def send_body(self, status: int, body: bytes, content_type: str) -> None:
        """Send a complete response with an exact Content-Length (the connection stays usable)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


class FakeNextcloud(Peer):
    """The fake Nextcloud server; see the module docstring for the behaviour it imitates.

    All public attributes may be changed while the server runs; handlers read them per request.
    """

    def __init__(self, shared_key: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.shared_key = shared_key
        #: app id (case-sensitive) -> ExApp record, returned verbatim by exapp-meta.
        self.apps: dict[str, dict[str, Any]] = {}
        #: extra latency in seconds before each answer, e.g. to make concurrent misses overlap.
        self.delay: float = 0.0
        #: True: user-info answers an unknown ``oc_sessionPassphrase`` with ``302`` to the same
        #: URL, as a real Nextcloud does after dropping a session it cannot restore (a client
        #: that follows it loops until it gives up).
        self.redirect_unknown_sessions: bool = False
        #: seconds added to the ``Date`` of every answer (``harp check``'s clock test).
        self.clock_offset: float = 0.0
        self._host = host
        self._port = port
        self._sessions: dict[str, _Identity] = {}
        self._app_passwords: dict[str, tuple[str, _Identity]] = {}
        self._bearers: dict[str, _Identity] = {}
        self._calls: list[Call] = []
        self._cond = threading.Condition()
        self._mode = "ok"
        self._stopping = False
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Self:
        """Bind a free port on 127.0.0.1 and serve from a daemon thread."""
        if self._server is not None:
            raise RuntimeError("FakeNextcloud already started")
        self._stopping = False
        self._server = _Server(self, (self._host, self._port))
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"FakeNextcloud:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving without waiting for hung handlers; idle keep-alive sockets are closed."""
        server, self._server = self._server, None
        if server is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        server.shutdown()
        server.server_close()
        with self._cond:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeNextcloud is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. ``http://127.0.0.1:40123``."""
        return f"http://{self._host}:{self.port}"

    # ------------------------------------------------------------- configuration

    @property
    def mode(self) -> str:
        """``ok``, ``hang`` (no answer until the mode changes or stop), ``error500``, ``badjson``.

        Applies to exapp-meta and user-info. Hung requests are answered according to the new mode
        when it changes, or dropped without a response on ``stop()``.
        """
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {value!r}")
        with self._cond:
            self._mode = value
            self._cond.notify_all()

    def add_session(self, passphrase: str, user_id: str, level: int) -> None:
        """A logged-in browser session, sent by the client as cookie ``oc_sessionPassphrase``.

        ``level`` is 0 (disabled user when ``user_id`` is non-empty), 1 (user) or 2 (admin).
        """
        self._sessions[passphrase] = _Identity(user_id, level)

    def add_app_password(self, user: str, password: str, level: int) -> None:
        """Credentials for ``Authorization: Basic base64(user:password)``; wrong ones get 401."""
        self._app_passwords[user] = (password, _Identity(user, level))

    def add_bearer(self, token: str, user_id: str, level: int) -> None:
        """A token for ``Authorization: Bearer <token>`` (user_oidc); unknown ones are anonymous."""
        self._bearers[token] = _Identity(user_id, level)

    # ------------------------------------------------------------------ inspection

    @property
    def calls(self) -> list[Call]:
        """A snapshot of every request received so far, in arrival order."""
        with self._cond:
            return list(self._calls)

    def clear_calls(self) -> None:
        with self._cond:
            self._calls.clear()

    def count(self, endpoint: str) -> int:
        """How many requests hit ``endpoint``: ``"exapp-meta"``, ``"user-info"`` or a full path."""
        path = _ENDPOINT_NAMES.get(endpoint, endpoint)
        with self._cond:
            return sum(1 for call in self._calls if call.path == path)

    def calls_to(self, endpoint: str) -> list[Call]:
        """The recorded requests to one endpoint (same names as ``count``)."""
        path = _ENDPOINT_NAMES.get(endpoint, endpoint)
        return [call for call in self.calls if call.path == path]

    def wait_for_calls(self, endpoint: str, n: int, timeout: float = 5.0) -> bool:
        """Wait until ``count(endpoint) >= n``; useful when HaRP calls in the background."""
        path = _ENDPOINT_NAMES.get(endpoint, endpoint)
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(1 for call in self._calls if call.path == path) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    # ------------------------------------------------------------------ internals

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._cond:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _handle(self, req: _Handler) -> None:
        split = urlsplit(req.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        headers = _lower_headers(req.headers.items())
        with self._cond:
            self._calls.append(Call(split.path, query, headers))
            self._cond.notify_all()

        if split.path not in (EXAPP_META_PATH, USER_INFO_PATH):
            if split.path.startswith("/ocs/"):
                ocs = {
                    "ocs": {
                        "meta": {"status": "ok", "statuscode": 100, "message": "OK"},
                        "data": [],
                    }
                }
                req.send_body(200, json.dumps(ocs).encode(), "application/json; charset=utf-8")
            else:
                req.send_body(404, b'{"message":"Page not found"}', "application/json")
            return

        if self.delay > 0:
            time.sleep(self.delay)
        mode = self._wait_while_hanging()
        if mode is None:  # stopping: drop the connection without an answer
            req.close_connection = True
            with contextlib.suppress(OSError):
                req.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == "error500":
            req.send_body(500, b'{"message":"Internal Server Error"}', "application/json")
            return
        if mode == "badjson":
            req.send_body(200, b'{"user_id": "broken', "application/json; charset=utf-8")
            return

        if split.path == USER_INFO_PATH and self._redirects(headers):
            req.send_response(302)
            req.send_header("Location", self.url + req.path)
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        if split.path == EXAPP_META_PATH:
            status, body = self._exapp_meta(query, headers)
        else:
            status, body = self._user_info(query, headers)
        if isinstance(body, bytes):
            req.send_body(status, body, "text/html; charset=UTF-8")
        else:
            req.send_body(status, json.dumps(body).encode(), "application/json; charset=utf-8")

    def _wait_while_hanging(self) -> str | None:
        with self._cond:
            while self._mode == "hang" and not self._stopping:
                self._cond.wait()
            return None if self._stopping else self._mode

    def _redirects(self, headers: dict[str, str]) -> bool:
        if not self.redirect_unknown_sessions:
            return False
        passphrase = _cookie(headers.get("cookie", ""), "oc_sessionPassphrase")
        return bool(passphrase) and passphrase not in self._sessions

    def _key_and_app_ok(self, query: dict[str, str], headers: dict[str, str]) -> bool:
        key_ok = headers.get("harp-shared-key") == self.shared_key
        return key_ok and query.get("appId", "") in self.apps

    def _exapp_meta(self, query: dict[str, str], headers: dict[str, str]) -> tuple[int, Any]:
        if not self._key_and_app_ok(query, headers):
            return 401, BAD_KEY_BODY
        return 200, self.apps[query["appId"]]

    def _user_info(self, query: dict[str, str], headers: dict[str, str]) -> tuple[int, Any]:
        if not self._key_and_app_ok(query, headers):
            return 401, BAD_KEY_BODY
        identity = self._authenticate(headers)
        if identity is None:
            # Nextcloud's LoginException page for bad Basic credentials (not JSON).
            return 401, b"<!DOCTYPE html><html><body><h2>Login failed</h2></body></html>"
        return 200, {"user_id": identity.user_id, "access_level": identity.level}

    def _authenticate(self, headers: dict[str, str]) -> _Identity | None:
        """Resolve the user; ``None`` means "Basic credentials given but wrong" (401)."""
        anonymous = _Identity("", 0)
        basic: _Identity | None = anonymous
        bearer = anonymous
        scheme, _, value = headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() == "basic":
            basic = self._check_basic(value.strip())
            if basic is None:
                return None
        elif scheme.lower() == "bearer":
            bearer = self._bearers.get(value.strip(), anonymous)
        passphrase = _cookie(headers.get("cookie", ""), "oc_sessionPassphrase")
        if passphrase and passphrase in self._sessions:
            return self._sessions[passphrase]
        if basic is not anonymous:
            return basic
        return bearer

    def _check_basic(self, encoded: str) -> _Identity | None:
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        entry = self._app_passwords.get(user)
        if not sep or entry is None or entry[0] != password:
            return None
        return entry[1]


def _lower_headers(items: Iterator[tuple[str, str]] | Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        if key in out:
            out[key] = out[key] + ("; " if key == "cookie" else ", ") + value
        else:
            out[key] = value
    return out


def _cookie(header: str, name: str) -> str:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        # SimpleCookie gives up on the whole header at the first odd cookie; fall back to a split.
        for part in header.split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
        return ""
    morsel = jar.get(name)
    return morsel.value if morsel is not None else ""
