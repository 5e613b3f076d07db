"""The two Docker HTTP adapters, in memory: which answer wins when several things are wrong.

``docker-engine-port`` is parsed and a refused selection answered by one helper
(:func:`harp.docker.engines.requested_port`, :func:`~harp.docker.engines.refuse_selection`),
but each adapter keeps its own order of checks: ``/docker/exapp/*`` judges the body before
asking whether an engine is connected, the passthrough judges the allow-list before that.
These pin both orders without an engine or a HaRP process.
"""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from harp.docker.engines import EngineEndpoints
from harp.docker.lifecycle import DockerLifecycle
from harp.docker.passthrough import DockerPassthrough
from harp.docker.routes import MISSING_PORT, LifecycleRoutes
from harp.web.control import ControlPlane, Handler
from harp.web.proxy import ExAppProxy
from harp.web.site import HarpRequest


class _Control:
    """Collects what the routes register, as the control plane would."""

    def __init__(self) -> None:
        self.handlers: dict[bytes, Handler] = {}

    def add(self, method: bytes, path: bytes, handler: Handler) -> None:
        assert method == b"POST"
        self.handlers[path] = handler


def _endpoints(clock: Clock) -> EngineEndpoints:
    return EngineEndpoints(clock, Path("/nonexistent/docker.sock"), None, 5)


def _request(port: bytes | None, body: bytes = b"", uri: bytes = b"/", method: bytes = b"POST"
             ) -> Request:
    # HaRP's request, as the frontends make it (compiled code checks the type); its body
    # counts as received, as for the control plane's buffered requests.
    request = HarpRequest(DummyChannel())
    request.body_complete = True
    request.method = method
    request.uri = uri
    request.content = BytesIO(body)
    if port is not None:
        request.requestHeaders.setRawHeaders(b"docker-engine-port", [port])
    return request


def _exists(port: bytes | None, body: bytes) -> tuple[int, Any]:
    clock = Clock()
    control = _Control()
    LifecycleRoutes(clock, _endpoints(clock), DockerLifecycle(clock, None)).register(
        cast(ControlPlane, control)
    )
    request = _request(port, body)
    answer = control.handlers[b"/docker/exapp/exists"](request, b"/docker/exapp/exists")
    assert isinstance(answer, bytes)
    return request.code, answer


def test_lifecycle_missing_port_is_plain_400() -> None:
    assert _exists(None, b"{}") == (400, MISSING_PORT)
    assert _exists(b"  ", b"{}") == (400, MISSING_PORT)


def test_lifecycle_invalid_port_is_json_400() -> None:
    code, body = _exists(b"8080", b'{"name": "app"}')
    assert code == 400
    assert json.loads(body)["docker_engine_port"] == "8080"


def test_lifecycle_body_is_judged_before_the_engine() -> None:
    assert _exists(b"24001", b"not json") == (400, b"Invalid JSON body")


def test_lifecycle_no_engine_is_json_503() -> None:
    code, body = _exists(b"24001", b'{"name": "app"}')
    assert code == 503
    assert json.loads(body)["docker_engine_port"] == "24001"


class _NoProxy(ExAppProxy):
    """A proxy never built (the compiled passthrough checks its type, harp/compiled.py)."""

    def __init__(self) -> None:
        pass


def _passthrough(port: bytes, method: bytes, uri: bytes) -> Request:
    clock = Clock()
    # Never reached: every case here is answered before forwarding.
    passthrough = DockerPassthrough(_endpoints(clock), _NoProxy())
    request = _request(port, uri=uri, method=method)
    passthrough.passthrough(request, uri.partition(b"?")[0])
    assert request.finished
    return request


def test_passthrough_invalid_port_is_json_400() -> None:
    assert _passthrough(b"abc", b"GET", b"/_ping").code == 400


def test_passthrough_allow_list_is_judged_before_the_engine() -> None:
    assert _passthrough(b"24001", b"POST", b"/containers/create").code == 403
    assert _passthrough(b"24001", b"GET", b"/_ping?x=1").code == 403


def test_passthrough_no_engine_is_503() -> None:
    assert _passthrough(b"24001", b"GET", b"/v1.44/_ping").code == 503
