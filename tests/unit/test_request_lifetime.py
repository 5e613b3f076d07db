"""A proxied request is freed by reference counting the moment it is done.

Why: a request that sits in a reference cycle (request -> exchange -> request, or
request -> body pipe -> request) is only freed by Python's cyclic garbage collector,
and at twenty thousand requests a second those collections were ≈6 % of HaRP's CPU
(docs/performance.md).  These tests run requests through the real ``Root``,
``ExAppProxy`` and upstream exchange over in-memory transports with the collector
switched off, and require every request object to be gone once its response is.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from harp.client_address import ClientAddressResolver, parse_trusted_proxies
from harp.exapps import parse_record
from harp.state.memory import MemoryState
from harp.web import pipeline as P
from harp.web.channel import HarpChannel
from harp.web.control import ControlPlane
from harp.web.headers import KeyCheck
from harp.web.proxy import ExAppProxy
from harp.web.root import Root
from harp.web.site import HarpRequest, HarpSite

UPSTREAM_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Stack:
    """Root + the real proxy; the upstream is a StringTransport we answer by hand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.clock = MemoryReactorClock()
        state = MemoryState(10, 60, 300)
        state.put_exapp("app", parse_record("app", {
            "exapp_token": "tok", "exapp_version": "1.0", "host": "127.0.0.1", "port": 23000,
            "routes": [{"url": "^/", "access_level": 0}],
        }))
        trusted, _ = parse_trusted_proxies("")
        pipeline = P.Pipeline(
            state, None, KeyCheck("key"),  # type: ignore[arg-type]
            ClientAddressResolver(trusted),
        )
        self.proxy = ExAppProxy(self.clock, connect_timeout=5.0, server_timeout=30.0)
        root = Root(pipeline, ControlPlane(), self.proxy, tunnel_timeout=60.0)
        self.site = HarpSite(root, head_timeout=30.0)
        self.requests: list[weakref.ref[HarpRequest]] = []
        process = HarpRequest.process

        def recorded(request: HarpRequest) -> None:
            self.requests.append(weakref.ref(request))
            process(request)

        monkeypatch.setattr(HarpRequest, "process", recorded)
        self.upstream: Any = None
        self.upstream_transport = StringTransport()

    def client(self) -> tuple[HarpChannel, StringTransport]:
        channel = self.site.buildProtocol(None)
        assert isinstance(channel, HarpChannel)
        channel.clock = self.clock
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000))
        channel.makeConnection(transport)
        return channel, transport

    def answer(self) -> None:
        """Connect the upstream on first use (MemoryReactor only records it), then answer."""
        if self.upstream is None:
            factory = self.clock.tcpClients[-1][2]
            self.upstream = factory.buildProtocol(None)
            self.upstream.makeConnection(self.upstream_transport)
        assert self.upstream_transport.value().startswith((b"GET ", b"POST "))
        self.upstream_transport.clear()
        self.upstream.dataReceived(UPSTREAM_ANSWER)


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    gc.collect()
    gc.disable()
    try:
        yield Stack(monkeypatch)
    finally:
        gc.enable()


def test_a_proxied_get_is_freed_without_the_collector(stack: Stack) -> None:
    channel, transport = stack.client()
    for _ in range(3):  # the first connects upstream, the others reuse the pooled connection
        channel.dataReceived(b"GET /exapps/app/x HTTP/1.1\r\nHost: harp\r\n\r\n")
        stack.answer()
        assert transport.value().startswith(b"HTTP/1.1 200 ")
        assert transport.value().endswith(b"\r\n\r\nok")
        transport.clear()
    assert len(stack.requests) == 3
    assert [ref() for ref in stack.requests] == [None, None, None]


def test_a_proxied_post_is_freed_without_the_collector(stack: Stack) -> None:
    channel, transport = stack.client()
    channel.dataReceived(
        b"POST /exapps/app/x HTTP/1.1\r\nHost: harp\r\nContent-Length: 5\r\n\r\nhello"
    )
    stack.answer()
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert len(stack.requests) == 1
    assert stack.requests[0]() is None
