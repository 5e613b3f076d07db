"""The FRP server stack in memory: a scripted yamux client against the FRP listener.

No sockets and no real time: the server runs on a ``StringTransport`` and a
``MemoryReactorClock`` (whose ``listenTCP`` only records the call), and the client is
the sans-I/O :class:`harp.frp.yamux.Session` plus the message codec -- the same bytes frpc
sends (docs/compatibility.md#frp-login).  This pins the control logic (auth, bans with IPv6,
proxy rules and error texts, pool, cleanup, re-login) and the in-process endpoint.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from harp.frp import codec, msg, yamux
from harp.frp.crypto import StreamDecryptor, StreamEncryptor, auth_key, derive_key
from harp.frp.listener import FrpServerFactory
from harp.frp.mux import STREAM_WINDOW
from harp.frp.service import LOGIN_BAD_TOKEN, LOGIN_BANNED, WORK_CONN_TIMEOUT, FrpServer
from harp.frp.tunnels import TunnelRegistry
from harp.state.memory import MemoryState

KEY = "the-shared-key"
CIPHER = derive_key("")


class Env:
    def __init__(self, blacklist_count: int = 10) -> None:
        self.reactor = MemoryReactorClock()
        self.state = MemoryState(blacklist_count, 300, 60)
        self.registry = TunnelRegistry(self.reactor, idle_timeout=None)
        self.server = FrpServer(self.reactor, KEY, self.state, self.registry)
        self.factory = FrpServerFactory(self.reactor, self.server, None)


class FakeFrpc:
    """Speaks frpc's side of tcpMux over an in-memory transport."""

    def __init__(self, env: Env, peer: Any = None) -> None:
        self.env = env
        peer = peer or IPv4Address("TCP", "127.0.0.1", 40000)
        self.transport = StringTransport(peerAddress=peer,
                                         hostAddress=IPv4Address("TCP", "127.0.0.1", 8782))
        self.proto = env.factory.buildProtocol(peer)
        self.proto.makeConnection(self.transport)
        self.session = yamux.Session(client=True)
        self.received: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.reset: set[int] = set()
        self.control = 0
        self.decoder = codec.MessageDecoder()
        self.encryptor = StreamEncryptor(CIPHER)
        self.run_id = ""
        self.control_msgs: list[msg.Message] = []
        self.auto_work = True
        self.consume = True
        self.work_streams: list[int] = []

    def pump(self) -> None:
        for _ in range(50):
            out = self.session.data_to_send()
            if out and not self.transport.disconnecting:
                self.proto.dataReceived(out)
            data = self.transport.value()
            self.transport.clear()
            if not out and not data:
                return
            for event in self.session.receive_data(data):
                if isinstance(event, yamux.DataReceived):
                    self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
                    if self.consume or event.stream_id == self.control:
                        self.session.consume(event.stream_id, len(event.data))
                    if event.stream_id == self.control:
                        self._control_data(event.data)
                elif isinstance(event, yamux.StreamEnded):
                    self.ended.add(event.stream_id)
                elif isinstance(event, yamux.StreamReset):
                    self.reset.add(event.stream_id)

    def _control_data(self, data: bytes) -> None:
        self.decoder.feed(data)
        for message in self.decoder.pop_messages():
            if isinstance(message, msg.LoginResp):
                self.run_id = message.run_id
                self.decoder.set_transform(StreamDecryptor(CIPHER).decrypt)
            elif isinstance(message, msg.ReqWorkConn) and self.auto_work:
                self.open_work()
            self.control_msgs.append(message)

    def login(self, token: str | None = KEY, run_id: str = "", pool: int = 1) -> msg.LoginResp:
        metas = {} if token is None else {"token": token}
        login = msg.Login(version="0.65.0", os="linux", arch="amd64", timestamp=1795586873,
                          privilege_key=auth_key("", 1795586873), run_id=run_id,
                          metas=metas, pool_count=pool)
        self.control = self.session.open_stream()
        self.session.send(self.control, codec.encode_message(login))
        self.pump()
        resp = self.control_msgs[0]
        assert isinstance(resp, msg.LoginResp)
        return resp

    def send_control(self, message: msg.Message) -> None:
        self.session.send(self.control, self.encryptor.encrypt(codec.encode_message(message)))
        self.pump()

    def open_work(self) -> int:
        sid = self.session.open_stream()
        self.session.send(sid, codec.encode_message(msg.NewWorkConn(run_id=self.run_id)))
        self.work_streams.append(sid)
        return sid

    def new_proxy(self, name: str, port: int, **kw: Any) -> msg.NewProxyResp:
        before = len(self.control_msgs)
        self.send_control(msg.NewProxy(proxy_name=name, proxy_type="tcp", remote_port=port,
                                       **kw))
        replies = [m for m in self.control_msgs[before:] if isinstance(m, msg.NewProxyResp)]
        assert len(replies) == 1, self.control_msgs[before:]
        return replies[0]

    def of_type(self, kind: type) -> list[Any]:
        return [m for m in self.control_msgs if isinstance(m, kind)]


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data.extend(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.lost = reason


def connect(env: Env, port: int) -> tuple[Any, list[Any]]:
    endpoint = env.registry.endpoint_for(port)
    assert endpoint is not None
    results: list[Any] = []
    d = endpoint.connect(Factory.forProtocol(Collect))
    d.addBoth(results.append)
    return d, results


# ------------------------------------------------------------------------- login


def test_login_returns_run_id_then_encrypted_req_work_conn() -> None:
    env = Env()
    frpc = FakeFrpc(env)
    resp = frpc.login(pool=2)
    assert resp.error == "" and len(resp.run_id) == 16
    assert len(frpc.of_type(msg.ReqWorkConn)) == 2
    assert env.server.controls[resp.run_id] is not None


@pytest.mark.parametrize("token", ["wrong", None, ""])
def test_bad_token_is_rejected_and_counted(token: str | None) -> None:
    env = Env(blacklist_count=2)
    peer = IPv6Address("TCP", "2001:DB8:0::1", 40000)
    for _ in range(2):
        frpc = FakeFrpc(env, peer)
        assert frpc.login(token=token).error == LOGIN_BAD_TOKEN
        assert frpc.transport.disconnecting or 1 in frpc.ended
    assert env.state.is_banned("2001:db8::1")
    frpc = FakeFrpc(env, IPv6Address("TCP", "2001:db8::1", 40001))
    assert frpc.login().error == LOGIN_BANNED
    assert not env.server.controls


def test_wrong_privilege_key_rejected() -> None:
    env = Env()
    frpc = FakeFrpc(env)
    login = msg.Login(version="0.65.0", timestamp=5, privilege_key=auth_key("tok", 5),
                      metas={"token": KEY})
    frpc.control = frpc.session.open_stream()
    frpc.session.send(frpc.control, codec.encode_message(login))
    frpc.pump()
    assert "doesn't match" in frpc.control_msgs[0].error  # type: ignore[union-attr]


def test_garbage_first_message_closes_session() -> None:
    env = Env()
    frpc = FakeFrpc(env)
    sid = frpc.session.open_stream()
    frpc.session.send(sid, b"GET / HTTP/1.1\r\n\r\n")
    frpc.pump()
    assert frpc.transport.disconnecting or sid in frpc.reset


def test_session_without_login_is_closed_after_deadline() -> None:
    env = Env()
    frpc = FakeFrpc(env)
    frpc.session.open_stream()
    frpc.pump()
    env.reactor.advance(10.5)
    assert frpc.transport.disconnecting


# ------------------------------------------------------------------------- proxies


def test_new_proxy_binds_loopback_and_replies_remote_addr() -> None:
    env = Env()
    frpc = FakeFrpc(env)
    frpc.login()
    resp = frpc.new_proxy("app", 24001)
    assert (resp.proxy_name, resp.remote_addr, resp.error) == ("app", ":24001", "")
    port, _factory, _backlog, interface = env.reactor.tcpServers[-1]
    assert (port, interface) == (24001, "127.0.0.1")
    assert env.registry.ports() == [24001]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"remote_port": 25000}, "port not allowed"),
        ({"remote_port": 22999}, "port not allowed"),
        ({"proxy_type": "udp"}, "proxy type [udp] is not supported by this server, only tcp"),
        ({"proxy_type": "bogus"}, "unknown proxy type: bogus"),
        ({"use_compression": True}, "compression"),
    ],
)
def test_new_proxy_rejections(kwargs: dict[str, Any], error: str) -> None:
    env = Env()
    frpc = FakeFrpc(env)
    frpc.login()
    fields: dict[str, Any] = {"proxy_name": "x", "proxy_type": "tcp", "remote_port": 23000}
    fields.update(kwargs)
    before = len(frpc.control_msgs)
    frpc.send_control(msg.NewProxy(**fields))
    (resp,) = [m for m in frpc.control_msgs[before:] if isinstance(m, msg.NewProxyResp)]
    assert error in resp.error
    assert env.registry.ports() == []


def test_one_port_per_client_and_uniqueness_across_clients() -> None:
    env = Env()
    a, b, c = FakeFrpc(env), FakeFrpc(env), FakeFrpc(env)
    for frpc in (a, b, c):
        frpc.login()
    assert a.new_proxy("one", 24001).error == ""
    assert a.new_proxy("two", 24002).error == "exceed the max_ports_per_client"
    assert b.new_proxy("one", 24003).error == "proxy [one] already exists"
    assert c.new_proxy("other", 24001).error == "port already used"
    a.send_control(msg.CloseProxy(proxy_name="one"))
    assert env.registry.ports() == []
    assert c.new_proxy("other", 24001).error == ""


def test_ping_gets_pong() -> None:
    env = Env()
    frpc = FakeFrpc(env)
    frpc.login()
    frpc.send_control(msg.Ping())
    assert len(frpc.of_type(msg.Pong)) == 1


# ------------------------------------------------------------------------- work connections


def test_endpoint_runs_protocol_over_a_pooled_work_stream() -> None:
    env = Env()
    frpc = FakeFrpc(env)
    frpc.login()
    frpc.new_proxy("app", 24001)
    (sid,) = frpc.work_streams
    _, results = connect(env, 24001)
    frpc.pump()
    (protocol,) = results
    assert isinstance(protocol, Collect)
    start = codec.decode_message(bytes(frpc.received[sid]))
    assert isinstance(start, msg.StartWorkConn)
    assert (start.proxy_name, start.dst_port) == ("app", 24001)
    # Taking the pooled stream asked for a replacement.
    assert len(frpc.of_type(msg.ReqWorkConn)) == 2
    frpc.received[sid].clear()
    assert protocol.transport is not None
    protocol.transport.write(b"GET / HTTP/1.1\r\n\r\n")
    frpc.session.send(sid, b"HTTP/1.1 200 OK\r\n\r\n")
    frpc.pump()
    assert bytes(frpc.received[sid]) == b"GET / HTTP/1.1\r\n\r\n"
    assert bytes(protocol.data) == b"HTTP/1.1 200 OK\r\n\r\n"
    frpc.session.close_stream(sid)
    frpc.pump()
    assert protocol.lost is not None
    assert sid in frpc.ended


def test_encrypted_proxy_work_stream() -> None:
    env = Env()
    frpc = FakeFrpc(env)
    frpc.login()
    frpc.new_proxy("app", 24001, use_encryption=True)
    (sid,) = frpc.work_streams
    _, results = connect(env, 24001)
    frpc.pump()
    (protocol,) = results
    frpc.received[sid].clear()
    protocol.transport.write(b"secret request")
    enc = StreamEncryptor(CIPHER)
    frpc.session.send(sid, enc.encrypt(b"secret answer"))
    frpc.pump()
    assert StreamDecryptor(CIPHER).decrypt(bytes(frpc.received[sid])) == b"secret request"
    assert bytes(protocol.data) == b"secret answer"


def test_work_connection_wait_times_out() -> None:
    env = Env()
    frpc = FakeFrpc(env)
    frpc.auto_work = False
    frpc.login()
    frpc.new_proxy("app", 24001)
    _, results = connect(env, 24001)
    frpc.pump()
    assert results == []
    env.reactor.advance(WORK_CONN_TIMEOUT + 0.1)
    (failure,) = results
    assert isinstance(failure, Failure) and failure.check(ConnectError)


def test_waiting_connect_gets_the_next_work_stream() -> None:
    env = Env()
    frpc = FakeFrpc(env)
    frpc.auto_work = False
    frpc.login(pool=0)
    frpc.new_proxy("app", 24001)
    _, results = connect(env, 24001)
    frpc.pump()
    assert results == [] and len(frpc.of_type(msg.ReqWorkConn)) == 1
    frpc.open_work()
    frpc.pump()
    assert len(results) == 1 and isinstance(results[0], Collect)


# ------------------------------------------------------------------------- cleanup


def test_control_loss_releases_ports_and_resets_streams() -> None:
    env = Env()
    frpc = FakeFrpc(env)
    frpc.login()
    frpc.new_proxy("app", 24001)
    _, results = connect(env, 24001)
    frpc.pump()
    (protocol,) = results
    frpc.proto.connectionLost(Failure(ConnectionError("gone")))
    assert env.registry.ports() == [] and env.registry.endpoint_for(24001) is None
    assert not env.server.controls
    assert protocol.lost is not None


def test_same_run_id_replaces_the_old_session() -> None:
    env = Env()
    old = FakeFrpc(env)
    run_id = old.login().run_id
    old.new_proxy("app", 24001)
    new = FakeFrpc(env)
    assert new.login(run_id=run_id).run_id == run_id
    assert old.transport.disconnecting
    assert new.new_proxy("app", 24001).error == ""
    assert env.server.controls[run_id] is not None


def test_silent_session_is_dropped() -> None:
    env = Env()
    frpc = FakeFrpc(env)
    frpc.login()
    frpc.new_proxy("app", 24001)
    for _ in range(3):
        env.reactor.advance(30)
    assert frpc.transport.disconnecting
    assert env.registry.ports() == []


# ------------------------------------------------------------------------- flow control


class Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


def _tunnel(env: Env) -> tuple[FakeFrpc, int, Collect]:
    frpc = FakeFrpc(env)
    frpc.login()
    frpc.new_proxy("app", 24001)
    (sid,) = frpc.work_streams
    _, results = connect(env, 24001)
    frpc.pump()
    (protocol,) = results
    frpc.received[sid].clear()
    return frpc, sid, protocol


def test_paused_reader_withholds_window_until_resumed() -> None:
    """A paused consumer makes frpc stop at our window: memory bounded by STREAM_WINDOW."""
    env = Env()
    frpc, sid, protocol = _tunnel(env)
    transport: Any = protocol.transport
    transport.pauseProducing()
    size = STREAM_WINDOW + 512 * 1024
    frpc.session.send(sid, b"x" * size)
    frpc.pump()
    assert len(protocol.data) == 0
    # Stuck at the client (plus the few bytes of NewWorkConn, whose window update is batched).
    assert 0 <= frpc.session.buffered_amount(sid) - (size - STREAM_WINDOW) < 100
    transport.resumeProducing()
    frpc.pump()
    assert len(protocol.data) == size
    assert frpc.session.buffered_amount(sid) == 0


def test_writer_is_paused_while_frpc_does_not_read() -> None:
    env = Env()
    frpc, sid, protocol = _tunnel(env)
    transport: Any = protocol.transport
    producer = Producer()
    transport.registerProducer(producer, True)
    frpc.consume = False
    for _ in range(8):
        transport.write(b"y" * (256 * 1024))
        frpc.pump()
    assert producer.events == ["pause"]
    frpc.consume = True
    frpc.session.consume(sid, frpc.session.unconsumed(sid))
    frpc.pump()
    assert producer.events == ["pause", "resume"]
    assert len(frpc.received[sid]) == 8 * 256 * 1024


# ------------------------------------------------------------------------- tcpMux = false


def test_direct_control_connection_and_heartbeat_timeout() -> None:
    """Without yamux the connection itself is the control; 90 s without Ping ends it."""
    env = Env()
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    transport = StringTransport(peerAddress=peer)
    proto = env.factory.buildProtocol(peer)
    proto.makeConnection(transport)
    login = msg.Login(version="0.65.0", timestamp=7, privilege_key=auth_key("", 7),
                      metas={"token": KEY}, pool_count=1)
    proto.dataReceived(codec.encode_message(login))
    decoder = codec.MessageDecoder()
    decoder.feed(transport.value())
    resp = decoder.next_message()
    assert isinstance(resp, msg.LoginResp) and resp.run_id
    decoder.set_transform(StreamDecryptor(CIPHER).decrypt)
    assert isinstance(decoder.next_message(), msg.ReqWorkConn)
    enc = StreamEncryptor(CIPHER)
    env.reactor.advance(60)
    proto.dataReceived(enc.encrypt(codec.encode_message(msg.Ping())))
    env.reactor.advance(60)  # 120 s after login, 60 s after the Ping: still alive
    assert not transport.disconnecting
    env.reactor.advance(31)
    assert transport.disconnecting
    assert not env.server.controls
