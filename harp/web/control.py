"""The control plane under ``/exapps/app_api/``: what AppAPI calls on HaRP itself.

Every call must carry the shared key in ``harp-shared-key`` (checked by the root before
dispatching here).  Endpoints answer with the reference's JSON shapes
(docs/compatibility.md#control-plane) so AppAPI's checks (``/info`` version ≥ 0.3.0, heartbeat)
pass unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from twisted.web.server import Request

from harp import __version__
from harp.web import responses

Handler = Callable[[Request, bytes], bytes | int]


def info_payload(kubernetes: dict[str, object]) -> dict[str, object]:
    """``/info``'s body; the Kubernetes backend (harp.k8s) fills in its own part."""
    return {"version": __version__, "docker": True, "kubernetes": kubernetes}


def info(request: Request, rest: bytes) -> bytes:
    """``GET /info``: version (a full semver string, #113), docker support, no k8s."""
    return responses.send_json(request, 200, info_payload({"enabled": False}))


def heartbeat(request: Request, rest: bytes) -> bytes:
    """``GET /heartbeat``: liveness, no I/O."""
    return responses.send_json(request, 200, {"status": "ok"})


class ControlPlane:
    """Dispatches ``/exapps/app_api/<rest>`` to the endpoint for ``(method, rest)``."""

    def __init__(self) -> None:
        self._exact: dict[tuple[bytes, bytes], Handler] = {
            (b"GET", b"/info"): info,
            (b"HEAD", b"/info"): info,
            (b"GET", b"/heartbeat"): heartbeat,
            (b"HEAD", b"/heartbeat"): heartbeat,
        }
        self._prefixed: list[tuple[bytes, bytes, Handler]] = []

    def add(self, method: bytes, path: bytes, handler: Handler) -> None:
        self._exact[(method, path)] = handler

    def add_prefix(self, method: bytes, prefix: bytes, handler: Handler) -> None:
        """Register ``handler`` for every path under ``prefix`` (e.g. ``/exapp_storage/``)."""
        self._prefixed.append((method, prefix, handler))

    def render(self, request: Request, rest: bytes) -> bytes | int:
        method = request.method
        handler = self._exact.get((method, rest))
        if handler is not None:
            return handler(request, rest)
        for want, prefix, handler in self._prefixed:
            if method == want and rest.startswith(prefix):
                return handler(request, rest)
        if any(path == rest for _, path in self._exact) or any(
            rest.startswith(prefix) for _, prefix, _ in self._prefixed
        ):
            return responses.send(request, 405, METHOD_NOT_ALLOWED)
        return responses.error(request, 404)


METHOD_NOT_ALLOWED: Final = b"405 Method Not Allowed"
