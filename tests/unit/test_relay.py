"""harp.relay.Relay in memory: early bytes, flow control both ways, the idle limit, full close.

Both users (WebSocket upgrades and FRP tunnel user connections) are covered end to end
by the interop suites; these pin the splice itself on ``StringTransport`` and a ``Clock``.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from harp.relay import Relay


def _relay(idle: float | None = 10.0) -> tuple[Relay, StringTransport, Clock, list[str]]:
    client, clock, events = StringTransport(), Clock(), []
    relay = Relay(client, clock, idle, lambda: events.append("idle"))
    return relay, client, clock, events


def test_client_paused_and_early_bytes_kept_until_connected() -> None:
    relay, client, _, _ = _relay()
    assert client.producerState == "paused"
    relay.from_client(b"GET ")
    relay.from_client(b"/ws")
    upstream = StringTransport()
    relay.connect(upstream)
    assert upstream.value() == b"GET /ws"
    assert client.producerState == "producing"
    # Each side is the other's producer: a full side pauses reading from the other.
    assert upstream.producer is client and client.producer is upstream
    relay.from_upstream(b"pong")
    relay.from_client(b"ping")
    assert client.value() == b"pong" and upstream.value() == b"GET /wsping"


def test_idle_limit_reset_by_traffic_either_way() -> None:
    relay, _, clock, events = _relay(idle=10.0)
    relay.connect(StringTransport())
    clock.advance(9)
    relay.from_client(b"x")
    clock.advance(9)
    relay.from_upstream(b"y")
    clock.advance(9)
    assert events == []
    clock.advance(1)
    assert events == ["idle"]


def test_no_idle_limit() -> None:
    relay, _, clock, events = _relay(idle=None)
    relay.connect(StringTransport())
    clock.advance(10**6)
    assert events == [] and not clock.getDelayedCalls()


def test_either_end_closes_the_other_once() -> None:
    relay, client, clock, events = _relay()
    upstream = StringTransport()
    relay.connect(upstream)
    relay.upstream_lost()
    assert client.disconnecting and client.producer is None
    relay.client_lost()  # the client's own connectionLost follows: nothing more happens
    relay.from_client(b"late")
    assert upstream.value() == b""
    assert not clock.getDelayedCalls() and events == []

    relay, client, _, _ = _relay()
    upstream = StringTransport()
    relay.connect(upstream)
    relay.client_lost()
    assert upstream.disconnecting and upstream.producer is None
    assert not client.disconnecting


def test_client_gone_before_upstream_arrives() -> None:
    relay, _, _, _ = _relay()
    relay.from_client(b"early")
    relay.client_lost()
    upstream = StringTransport()
    relay.connect(upstream)
    assert upstream.disconnecting and upstream.value() == b""


def test_abort_drops_both() -> None:
    relay, client, clock, _ = _relay()
    upstream = StringTransport()
    relay.connect(upstream)
    relay.abort()
    assert client.disconnected and upstream.disconnected
    assert not clock.getDelayedCalls()


def test_bytes_counted_and_the_owner_told_once_of_the_end() -> None:
    client, ended = StringTransport(), []
    relay = Relay(client, Clock(), None, lambda: None, lambda: ended.append(True))
    relay.from_client(b"early")
    relay.connect(StringTransport())
    relay.from_client(b"abc")
    relay.from_upstream(b"1234567")
    assert (relay.bytes_up, relay.bytes_down) == (8, 7)
    relay.upstream_lost()
    relay.client_lost()
    relay.close()
    assert ended == [True]
