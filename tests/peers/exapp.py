"""A real nc_py_api ExApp, run as a subprocess, for testing what HaRP forwards.

Why nc_py_api and not a hand-written echo server: the point is to prove that what HaRP sends is
accepted by the framework real ExApps use. Identity headers are therefore checked by nc_py_api's
own ``AppAPIAuthMiddleware`` (``sign_check``), and the app is started with nc_py_api's ``run_app``,
which picks TCP or the unix socket the same way a deployed ExApp does.

Run it as ``python -m tests.peers.exapp`` (from the repository root) or by file path, configured
with the environment AppAPI gives ExApps: ``APP_ID``, ``APP_SECRET``, ``APP_VERSION``,
``APP_HOST``, ``APP_PORT``, ``AA_VERSION``, ``NEXTCLOUD_URL``, ``APP_DISPLAY_NAME``. When
``HP_SHARED_KEY`` is set, ``run_app`` listens on the unix socket ``HP_EXAPP_SOCK`` (default
``/tmp/exapp.sock``) instead of TCP; tests should always set ``HP_EXAPP_SOCK`` to a private path.

What nc_py_api 0.30.x checks (``NcSessionAppBasic.sign_check``), for every path but ``/heartbeat``:
``EX-APP-ID``, ``EX-APP-VERSION`` and ``AUTHORIZATION-APP-API`` non-empty, ``EX-APP-ID == APP_ID``,
and the secret decoded from ``AUTHORIZATION-APP-API`` equal to ``APP_SECRET``; any failure is a
``401`` with the plain-text body ``Unauthorized``. It does **not** look at ``AA-VERSION`` and does
**not** compare ``EX-APP-VERSION`` with ``APP_VERSION`` (older releases and the AppAPI docs say it
should). So that HaRP tests can still prove it sets these two headers, this app adds a *strict*
check after nc_py_api's (on unless ``EXAPP_STRICT_IDENTITY=0``): ``AA-VERSION`` non-empty and
``EX-APP-VERSION == APP_VERSION``, else 401 with a body naming the header.

Routes (all except ``/heartbeat`` need valid identity headers):

* ``GET /public``, ``/user``, ``/admin`` -> ``{"route", "user", "query"}``: ``user`` is what
  nc_py_api decoded from ``AUTHORIZATION-APP-API``, ``query`` the raw query string;
* ``GET|POST /echo-headers`` -> every received header as a JSON object (lower-case names);
* WebSocket ``/ws``: answers each text message ``m`` with ``Echo: m``;
* ``GET /sse``: three server-sent events, 0.5 s apart;
* nc_py_api's own ``/heartbeat``, ``/init`` and ``/enabled`` (``set_handlers``).

Offline behaviour: nothing at startup talks to Nextcloud. ``/enabled`` answers ``{"error": ""}``
without network access. nc_py_api's default ``/init`` answers ``200 {}`` at once, then in a
background task reports progress with ``PUT {NEXTCLOUD_URL}/ocs/v1.php/apps/app_api/ex-app/status``;
if Nextcloud is unreachable that task fails and logs a traceback, but the app keeps serving.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from nc_py_api import AsyncNextcloudApp
from nc_py_api.ex_app import AppAPIAuthMiddleware, run_app, set_handlers

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SSE_EVENTS = 3
SSE_INTERVAL = 0.5


class StrictIdentityMiddleware:
    """The checks nc_py_api 0.30 skips: ``AA-VERSION`` present, ``EX-APP-VERSION`` exact.

    It runs *inside* ``AppAPIAuthMiddleware``, so a request reaching it already passed nc_py_api's
    own check; ``/heartbeat`` is exempt like there.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] == "/heartbeat":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = ""
        if not headers.get("aa-version"):
            problem = "Missing AA-VERSION"
        elif headers.get("ex-app-version") != os.environ["APP_VERSION"]:
            problem = (
                f"Invalid EX-APP-VERSION:{headers.get('ex-app-version')} != "
                f"{os.environ['APP_VERSION']}"
            )
        if not problem:
            await self.app(scope, receive, send)
            return
        print(f"strict identity check failed: {problem}", flush=True)
        # Like nc_py_api's own rejection: for a WebSocket, Starlette sends this as the HTTP
        # denial response of the handshake (ASGI "websocket.http.response"), also a 401.
        await PlainTextResponse(problem, status_code=401)(scope, receive, send)


async def enabled_handler(enabled: bool, nc: AsyncNextcloudApp) -> str:
    """Accept enable/disable without calling Nextcloud, so the app works offline."""
    print(f"enabled_handler: enabled={enabled}", flush=True)
    return ""


def _user(request: Request | WebSocket) -> str:
    # AppAPIAuthMiddleware stores sign_check()'s result (the user id) in the ASGI scope.
    return str(request.scope.get("username", ""))


def create_app() -> FastAPI:
    """Build the FastAPI application; kept in a function so tests could also mount it in-process."""
    app = FastAPI(title="harp-test-exapp")
    if os.environ.get("EXAPP_STRICT_IDENTITY", "1") != "0":
        app.add_middleware(StrictIdentityMiddleware)
    # Added last, so it is the outermost middleware: nc_py_api checks first.
    app.add_middleware(AppAPIAuthMiddleware)
    set_handlers(app, enabled_handler, map_app_static=False)

    def route_reply(name: str, request: Request) -> JSONResponse:
        return JSONResponse({"route": name, "user": _user(request), "query": request.url.query})

    @app.get("/public")
    async def public(request: Request) -> JSONResponse:
        return route_reply("public", request)

    @app.get("/user")
    async def user(request: Request) -> JSONResponse:
        return route_reply("user", request)

    @app.get("/admin")
    async def admin(request: Request) -> JSONResponse:
        return route_reply("admin", request)

    @app.api_route("/echo-headers", methods=["GET", "POST"])
    async def echo_headers(request: Request) -> JSONResponse:
        merged: dict[str, str] = {}
        for name, value in request.headers.items():
            merged[name] = f"{merged[name]}, {value}" if name in merged else value
        return JSONResponse(merged)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                message = await websocket.receive_text()
                await websocket.send_text(f"Echo: {message}")
        except WebSocketDisconnect:
            return

    @app.get("/sse")
    async def sse() -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            for n in range(SSE_EVENTS):
                if n:
                    await asyncio.sleep(SSE_INTERVAL)
                yield f"id: {n}\nevent: tick\ndata: {n}\n\n".encode()

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


def main() -> None:
    """Serve with nc_py_api's ``run_app`` (TCP ``APP_HOST:APP_PORT`` or unix ``HP_EXAPP_SOCK``)."""
    for name in ("APP_ID", "APP_SECRET", "APP_VERSION", "APP_PORT", "NEXTCLOUD_URL"):
        if not os.environ.get(name):
            sys.exit(f"exapp: environment variable {name} is required")
    where = (
        f"unix:{os.environ.get('HP_EXAPP_SOCK', '/tmp/exapp.sock')}"
        if os.environ.get("HP_SHARED_KEY")
        else f"tcp:{os.environ.get('APP_HOST', '127.0.0.1')}:{os.environ['APP_PORT']}"
    )
    print(f"exapp: {os.environ['APP_ID']} {os.environ['APP_VERSION']} on {where}", flush=True)
    run_app(
        create_app(),
        log_level=os.environ.get("EXAPP_LOG_LEVEL", "info"),
        timeout_graceful_shutdown=2,
    )


if __name__ == "__main__":
    main()
