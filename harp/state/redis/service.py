"""The twistd service of the Redis state: connect at start, heartbeat, disconnect at stop."""

from __future__ import annotations

from typing import Final

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall

from harp.logs import HarpLogger
from harp.state.redis.replica import RedisState

log = HarpLogger("harp.redis")

#: How often both connections are PINGed (finds half-open connections) and pending
#: registry writes retried.
HEARTBEAT_INTERVAL: Final = 10.0


class RedisStateService(Service):
    """Connects at start (never blocking start-up: Redis may come later), disconnects at
    stop, and runs the heartbeat."""

    def __init__(self, state: RedisState) -> None:
        self.state = state
        self._heartbeat = LoopingCall(state.heartbeat)
        self._heartbeat.clock = state.reactor
        self.setName("redis")

    def startService(self) -> None:
        super().startService()
        log.info("Redis: connecting to {target}", target=self.state.url.describe())
        self.state.start()
        self._heartbeat.start(HEARTBEAT_INTERVAL, now=False).addErrback(
            lambda failure: log.failure("Redis heartbeat stopped", failure)
        )

    def stopService(self) -> defer.Deferred[object]:
        super().stopService()
        if self._heartbeat.running:
            self._heartbeat.stop()
        return self.state.stop()
