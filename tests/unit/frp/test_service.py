"""``FrpService``: stopping HaRP ends every frpc session and frees every tunnel port.

Nothing else calls :meth:`harp.frp.service.FrpServer.shutdown`, so this is what SIGTERM
relies on (twistd stops the application's services and waits for their Deferreds).
The listener must stop first, so no new session can start while the others close.
"""

from __future__ import annotations

from twisted.application.service import Service

from harp.frp.service import FrpService
from tests.unit.frp.test_control import Env, FakeFrpc


class RecordingListener(Service):
    """Stands in for ``harp.service.ListenerService``: records what was live at its stop."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.controls_at_stop: int | None = None

    def stopService(self) -> None:
        super().stopService()
        self.controls_at_stop = len(self.env.server.controls)


def test_stop_closes_listener_then_controls_work_connections_and_ports() -> None:
    env = Env()
    frpc = FakeFrpc(env)
    frpc.login(pool=1)
    assert frpc.new_proxy("app", 24001).error == ""
    assert frpc.work_streams, "the pool holds a parked work connection"
    listener = RecordingListener(env)
    service = FrpService(env.server, listener, env.registry)
    service.startService()
    assert listener.running

    results: list[object] = []
    service.stopService().addBoth(results.append)
    frpc.pump()

    assert results == [None]
    assert not listener.running and listener.controls_at_stop == 1
    assert not env.server.controls
    assert env.registry.ports() == [] and env.registry.names() == []
    # The whole yamux session (control and work streams) is gone with the control.
    assert frpc.transport.disconnecting


def test_stop_without_sessions_completes() -> None:
    env = Env()
    service = FrpService(env.server, RecordingListener(env), env.registry)
    service.startService()
    results: list[object] = []
    service.stopService().addBoth(results.append)
    assert results == [None]
