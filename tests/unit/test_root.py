"""The root resource in memory: each verdict carried out on the wire.

Why: ``Root`` turns the pipeline's verdict into bytes (a generated error, a silent drop,
a control-plane answer, or a hand-off to the proxy), and that is what clients see.
Here it is driven through HaRP's own channel (``HarpSite``) over a ``StringTransport``
with a ``MemoryReactorClock``, so each case costs microseconds instead of a subprocess.
The proxy and the Docker passthrough are fakes that record what they were given.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.server import Request

from harp import __version__, logs
from harp.client_address import ClientAddressResolver, parse_trusted_proxies
from harp.exapps import parse_record
from harp.state.memory import MemoryState
from harp.web import pipeline as P
from harp.web import responses
from harp.web.channel import HarpChannel
from harp.web.control import ControlPlane
from harp.web.headers import KeyCheck
from harp.web.proxy import ExAppProxy
from harp.web.root import CONTROL_BODY_LIMIT, Root
from harp.web.site import HarpRequest, HarpSite

CONTROL = P.ControlPlaneCall

KEY = b"the-shared-key"
CLIENT = "192.0.2.20"
WITH_KEY = b"harp-shared-key: " + KEY + b"\r\n"


class _RecordingPipeline(P.Pipeline):
    """The real pipeline, recording each verdict it returns (what Root acted on)."""

    def __init__(self, verdicts: list[P.Verdict], *args: Any) -> None:
        super().__init__(*args)
        self.verdicts = verdicts

    async def decide(self, request: Request, client: str) -> P.Verdict:
        verdict = await super().decide(request, client)
        self.verdicts.append(verdict)
        return verdict


class FakeProxy(ExAppProxy):
    """Stands in for ``ExAppProxy``: records the hand-off and answers 200 "upstream".

    A subclass, not a look-alike: the compiled root (harp/compiled.py) checks the type."""

    def __init__(self) -> None:
        self.forwarded: list[dict[str, Any]] = []
        self.upgraded: list[dict[str, Any]] = []

    def forward(self, request: Request, host: str, port: int, target: bytes,
                identity: list[tuple[bytes, bytes]], body: object, on_status: object,
                unresolvable_status: int, headers_as_received: bool = False) -> None:
        self.forwarded.append({"host": host, "port": port, "target": target,
                               "identity": dict(identity), "body": body,
                               "headers_as_received": headers_as_received})
        responses.finish(request, responses.send(request, 200, b"upstream"))

    def upgrade(self, request: Request, host: str, port: int, target: bytes,
                identity: list[tuple[bytes, bytes]], protocol: bytes, idle: float | None,
                on_status: object) -> None:
        self.upgraded.append({"target": target, "protocol": protocol, "idle": idle})


class FakeDocker:
    """Stands in for the Docker Engine API passthrough."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def passthrough(self, request: HarpRequest, rest: bytes) -> None:
        self.calls.append(rest)
        responses.finish(request, responses.send(request, 200, b"engine"))


class Server:
    """``Root`` behind a ``HarpSite``; :meth:`connect` opens one client connection."""

    def __init__(self) -> None:
        self.state = MemoryState(1, 60, 3)  # one failure bans
        self.state.put_exapp("myapp", parse_record("myapp", {
            "exapp_token": "tok", "exapp_version": "2.0", "host": "10.0.0.9", "port": 23009,
            "routes": [{"url": "^/", "access_level": 0}],
        }))
        trusted, _ = parse_trusted_proxies("")
        # No Nextcloud: every record is in the state, no request carries credentials.
        #: Every verdict the pipeline returned, in order: what Root acted on.
        self.verdicts: list[P.Verdict] = []
        self.pipeline = _RecordingPipeline(
            self.verdicts, self.state, None, KeyCheck(KEY.decode()),  # type: ignore[arg-type]
            ClientAddressResolver(trusted),
        )
        self.control = ControlPlane()
        self.proxy = FakeProxy()
        self.docker = FakeDocker()
        self.root = Root(
            self.pipeline, self.control, self.proxy,  # type: ignore[arg-type]
            tunnel_timeout=60.0, docker=self.docker,
        )
        self.site = HarpSite(self.root, head_timeout=30.0)
        self.clock = MemoryReactorClock()

    def connect(self, client: str = CLIENT) -> tuple[HarpChannel, StringTransport]:
        channel = self.site.buildProtocol(None)
        assert isinstance(channel, HarpChannel)
        channel.clock = self.clock
        transport = StringTransport(peerAddress=IPv4Address("TCP", client, 40000))
        channel.makeConnection(transport)
        return channel, transport

    def exchange(self, head: bytes, body: bytes = b"", client: str = CLIENT) -> StringTransport:
        """Send one request (``head`` without the blank line) and return the transport."""
        channel, transport = self.connect(client)
        channel.dataReceived(head + b"\r\n" + body)
        return transport


class Parsed:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ")[1])
        self.headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(b":") for line in lines[1:])
        }


@pytest.fixture
def server() -> Server:
    return Server()


def get(path: bytes, extra: bytes = b"", method: bytes = b"GET") -> bytes:
    return method + b" " + path + b" HTTP/1.1\r\nHost: harp\r\n" + extra


# --- Reply: a generated error


def test_reply_writes_the_reference_error_and_keeps_the_connection(server: Server) -> None:
    transport = server.exchange(get(b"/elsewhere"))
    answer = Parsed(transport.value())
    assert (answer.status, answer.body) == (404, b"404 Not Found")
    assert answer.headers[b"content-type"] == b"text/plain"
    assert b"server" not in answer.headers  # a reverse proxy does not announce itself
    assert not transport.disconnecting
    assert server.site.metrics.responses == {404: 1}
    assert server.verdicts == [P.Reply(404, "no app id in path")]


def test_reply_before_the_body_closes_after_answering(server: Server) -> None:
    head = get(b"/elsewhere", b"Content-Length: 100000\r\n", b"POST")
    transport = server.exchange(head, b"x" * 10)
    answer = Parsed(transport.value())
    assert answer.status == 404
    assert answer.headers[b"connection"] == b"close"  # the client need not upload the rest
    assert transport.disconnecting


def test_control_plane_without_the_key_is_401(server: Server) -> None:
    answer = Parsed(server.exchange(get(b"/exapps/app_api/info")).value())
    assert (answer.status, answer.body) == (401, b"401 Unauthorized")
    assert server.verdicts == [P.Reply(401, "bad shared key on app_api")]


# --- Drop: close without a byte


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        (b"/exapps/x/../y", "dot-dot or malformed path"),
        (b"http://h/exapps/x", "bad request-target"),
    ],
)
def test_drop_closes_silently_and_is_counted(server: Server, path: bytes, reason: str) -> None:
    transport = server.exchange(get(path))
    assert transport.value() == b""
    assert transport.disconnecting
    assert server.site.metrics.drops == {reason: 1}
    assert server.verdicts == [P.Drop(reason)]


def test_banned_client_is_dropped_even_with_the_key(server: Server) -> None:
    server.state.record_failure(CLIENT)
    transport = server.exchange(get(b"/exapps/app_api/info", WITH_KEY))
    assert transport.value() == b"" and transport.disconnecting
    other = server.exchange(get(b"/exapps/app_api/info", WITH_KEY), client="192.0.2.21")
    assert Parsed(other.value()).status == 200


# --- Control: the control plane answers


def test_control_plane_info(server: Server) -> None:
    answer = Parsed(server.exchange(get(b"/exapps/app_api/info", WITH_KEY)).value())
    assert server.verdicts == [CONTROL(b"/info")]
    assert answer.status == 200
    assert answer.headers[b"content-type"] == b"application/json"
    assert json.loads(answer.body)["version"] == __version__


def test_control_plane_unknown_endpoint_is_404(server: Server) -> None:
    answer = Parsed(server.exchange(get(b"/exapps/app_api/nothing", WITH_KEY)).value())
    assert answer.status == 404


def test_control_plane_reads_the_body_first(server: Server) -> None:
    seen: list[bytes] = []

    def echo(request: Request, rest: bytes) -> bytes:
        assert request.content is not None
        seen.append(request.content.read())
        return responses.send(request, 200, b"got it")

    server.control.add(b"POST", b"/echo", echo)
    channel, transport = server.connect()
    channel.dataReceived(get(b"/exapps/app_api/echo", WITH_KEY + b"Content-Length: 6\r\n",
                             b"POST") + b"\r\nabc")
    assert transport.value() == b"" and seen == []  # waits for the whole body
    channel.dataReceived(b"def")
    assert seen == [b"abcdef"]
    assert Parsed(transport.value()).status == 200


def test_control_plane_body_over_the_limit_is_413(server: Server) -> None:
    server.control.add(b"POST", b"/echo", lambda request, rest: b"unreachable")
    size = CONTROL_BODY_LIMIT + 100
    head = get(b"/exapps/app_api/echo", WITH_KEY + b"Content-Length: %d\r\n" % size, b"POST")
    transport = server.exchange(head, b"x" * (CONTROL_BODY_LIMIT + 1))
    answer = Parsed(transport.value())
    assert (answer.status, answer.body) == (413, b"413 Payload Too Large")
    assert answer.headers[b"connection"] == b"close" and transport.disconnecting


def test_control_plane_body_crossing_the_limit_in_its_last_chunk(server: Server) -> None:
    server.control.add(b"POST", b"/echo", lambda request, rest: b"unreachable")
    size = CONTROL_BODY_LIMIT + 1
    head = get(b"/exapps/app_api/echo", WITH_KEY + b"Content-Length: %d\r\n" % size, b"POST")
    transport = server.exchange(head, b"x" * size)
    assert Parsed(transport.value()).status == 413


def test_docker_engine_port_selects_the_passthrough(server: Server) -> None:
    extra = WITH_KEY + b"docker-engine-port: 24000\r\n"
    answer = Parsed(server.exchange(get(b"/exapps/app_api/v1.41/containers/json", extra)).value())
    assert (answer.status, answer.body) == (200, b"engine")
    assert server.docker.calls == [b"/v1.41/containers/json"]
    # HaRP's own /docker/... endpoints are never passed through.
    server.exchange(get(b"/exapps/app_api/docker/exapp/exists", extra, b"POST"))
    assert server.docker.calls == [b"/v1.41/containers/json"]


# --- Forward: handed to the proxy with the identity headers


def test_forward_hands_the_identity_to_the_proxy(server: Server) -> None:
    answer = Parsed(server.exchange(get(b"/exapps/myapp/deep/path?q=1")).value())
    assert (answer.status, answer.body) == (200, b"upstream")
    (verdict,) = server.verdicts
    assert isinstance(verdict, P.Forward) and verdict.target == b"/deep/path"
    (call,) = server.proxy.forwarded
    assert (call["host"], call["port"], call["target"]) == ("10.0.0.9", 23009, b"/deep/path")
    assert call["identity"][b"ex-app-id"] == b"myapp"
    assert call["identity"][b"ex-app-version"] == b"2.0"
    assert call["identity"][b"aa-version"] == b"32"
    assert call["identity"][b"authorization-app-api"] == P.identity_token("", "tok")
    assert call["body"] is None
    # Nothing on the ExApp route changes the request's headers before they are forwarded.
    assert call["headers_as_received"] is True


def test_websocket_upgrade_goes_to_the_tunnel(server: Server) -> None:
    extra = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    server.exchange(get(b"/exapps/myapp/ws", extra))
    assert server.proxy.upgraded == [{"target": b"/ws", "protocol": b"websocket", "idle": 60.0}]


def test_upgrade_with_a_body_is_refused(server: Server) -> None:
    extra = b"Upgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 3\r\n"
    answer = Parsed(server.exchange(get(b"/exapps/myapp/ws", extra), b"abc").value())
    assert answer.status == 400
    assert server.proxy.upgraded == []


# --- failures of the pipeline itself


def test_pipeline_bug_is_a_503(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(request: Request, client: str) -> P.Verdict:
        raise RuntimeError("bug")

    monkeypatch.setattr(server.pipeline, "decide", broken)
    answer = Parsed(server.exchange(get(b"/exapps/myapp/x")).value())
    assert answer.status == 503


def test_client_gone_before_the_verdict_gets_nothing(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    later: Deferred[P.Verdict] = Deferred()

    async def slow(request: Request, client: str) -> P.Verdict:
        return await later

    monkeypatch.setattr(server.pipeline, "decide", slow)
    channel, transport = server.connect()
    channel.dataReceived(get(b"/elsewhere") + b"\r\n")
    channel.connectionLost(Failure(ConnectionDone()))
    later.callback(P.Reply(404, "no app id in path"))
    assert transport.value() == b""


@pytest.mark.parametrize("outcome", ["verdict", "failure"])
def test_decision_that_waits_is_resumed_where_it_stopped(
    server: Server, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    """Root runs the decision's first step itself; one that waits is finished by Twisted."""
    first: Deferred[str] = Deferred()
    second: Deferred[P.Verdict] = Deferred()
    seen: list[str] = []

    async def two_waits(request: Request, client: str) -> P.Verdict:
        seen.append(await first)
        return await second

    monkeypatch.setattr(server.pipeline, "decide", two_waits)
    channel, transport = server.connect()
    channel.dataReceived(get(b"/elsewhere") + b"\r\n")
    assert transport.value() == b""
    first.callback("looked up")
    assert seen == ["looked up"] and transport.value() == b""
    if outcome == "verdict":
        second.callback(P.Reply(404, "no app id in path"))
        assert Parsed(transport.value()).status == 404
    else:
        second.errback(RuntimeError("Nextcloud client bug"))
        assert Parsed(transport.value()).status == 503


# --- the access log: one line per request, however it ends


@pytest.fixture
def access_lines() -> Iterator[list[str]]:
    """The access lines logged during the test, formatted."""
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "harp.access":
            lines.append(formatEvent(event))

    logs.set_level("info")
    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def test_answered_and_dropped_requests_have_one_line_each(
    server: Server, access_lines: list[str]
) -> None:
    server.exchange(get(b"/exapps/myapp/page"))
    dropped, _ = server.connect()
    dropped.dataReceived(get(b"/exapps/x/../y") + b"\r\n")
    dropped.connectionLost(Failure(ConnectionDone()))
    assert len(access_lines) == 2, access_lines
    assert access_lines[0].startswith(f"{CLIENT} GET /exapps/myapp/page 200 app=myapp ")
    assert " GET /exapps/x/../y drop app=- " in access_lines[1]
    assert access_lines[1].endswith("(dot-dot or malformed path)")


def test_request_cut_short_still_gets_its_line(server: Server, access_lines: list[str]) -> None:
    """The fake proxy never answers an upgrade: the client leaves first."""
    channel, _ = server.connect()
    upgrade = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
    channel.dataReceived(get(b"/exapps/myapp/ws", upgrade) + b"\r\n")
    assert server.proxy.upgraded and access_lines == []
    channel.connectionLost(Failure(ConnectionDone()))
    assert len(access_lines) == 1, access_lines
    assert " GET /exapps/myapp/ws - app=myapp " in access_lines[0]
    assert access_lines[0].endswith("(client gone)")
    assert server.site.metrics.responses == {}  # nothing was answered


def test_stripped_prefix_answered_with_the_fix(server: Server) -> None:
    transport = server.exchange(get(b"/myapp/page"))
    answer = Parsed(transport.value())
    assert (answer.status, answer.body) == (404, P.STRIPPED_BODY)
    assert answer.headers[b"content-length"] == b"%d" % len(P.STRIPPED_BODY)
    assert not transport.disconnecting
