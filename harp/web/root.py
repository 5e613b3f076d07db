"""The one root resource of the ExApp frontends, and the Site that serves it.

The root is a leaf: it sees the raw path once and dispatches it, instead of letting
``twisted.web`` walk a resource tree segment by segment, which would URL-split the path
the pipeline must inspect raw (reference-behaviour §3.1 works on the undecoded path).
"""

from __future__ import annotations

import hmac
import time
from typing import Final

from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from harp.logs import HarpLogger
from harp.web import responses
from harp.web.control import ControlPlane

log = HarpLogger("harp.access")

CONTROL_PREFIX: Final = b"/exapps/app_api"


def last_header(request: Request, name: bytes) -> bytes | None:
    """The header's last value: the reference keeps the last of repeated headers."""
    values = request.requestHeaders.getRawHeaders(name)
    return values[-1] if values else None


class KeyCheck:
    """Constant-time comparison with the shared key (spec README, difference 4)."""

    __slots__ = ("_key",)

    def __init__(self, key: str) -> None:
        self._key = key.encode("ascii")

    def __call__(self, candidate: bytes | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate, self._key)


class Root(Resource):
    """Dispatch ``/exapps/app_api/…`` to the control plane, the rest to ExApps."""

    isLeaf = True

    def __init__(self, key_check: KeyCheck, control: ControlPlane) -> None:
        super().__init__()
        self.key_ok = key_check
        self.control = control

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        path = request.path
        if path.startswith(CONTROL_PREFIX) and (
            len(path) == len(CONTROL_PREFIX) or path[len(CONTROL_PREFIX)] == 0x2F
        ):
            if not self.key_ok(last_header(request, b"harp-shared-key")):
                return responses.error(request, 401)
            return self.control.render(request, path[len(CONTROL_PREFIX) :])
        return responses.error(request, 404)


class HarpRequest(Request):
    """Remembers when it started and which app it was for, for the access line."""

    started: float = 0.0
    app_id: str = "-"
    # A proxied response without Content-Type must stay without one.
    defaultContentType = None

    def process(self) -> None:
        self.started = time.monotonic()
        super().process()

    def render(self, resrc: Resource) -> None:
        # twisted.web announces itself; a reverse proxy should not.
        self.responseHeaders.removeHeader(b"server")
        super().render(resrc)


class HarpSite(Site):
    """A Site whose access log is one line at info level, without secrets or query."""

    requestFactory = HarpRequest
    displayTracebacks = False
    noisy = False

    def log(self, request: http.Request) -> None:
        if not isinstance(request, HarpRequest):
            return
        client = request.getClientAddress()
        log.info(
            "{client} {method} {path} {status} app={app} {ms:.1f}ms",
            client=getattr(client, "host", "-"),
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            status=request.code,
            app=request.app_id,
            ms=(time.monotonic() - request.started) * 1000,
        )
