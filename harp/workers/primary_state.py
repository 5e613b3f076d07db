"""The primary's state: the authoritative MemoryState/RedisState, reporting to the workers.

With ``HP_WORKERS`` > 1 the primary holds the one true ban table and ExApp registry
(:mod:`harp.workers.primary`); these subclasses add only the reports the workers need:
every new ban (with its remaining time) and, with ``HP_REDIS_URL``, every registry change
made by another replica.  """

from __future__ import annotations

from collections.abc import Mapping

from harp.bans import ban_key
from harp.state.memory import MemoryState
from harp.state.redis import RedisState
from harp.state.redis.events import Event


class StateListener:
    """What the primary's state reports: new bans and registry changes it did not make
    through :class:`WorkerPool` (other Redis replicas)."""

    def banned(self, key: str, seconds: float) -> None: ...

    def exapp_changed(self, app_id: str) -> None: ...


class _ReportsBans(MemoryState):
    """Reports every ban this state starts to the workers (with its remaining time)."""

    listener: StateListener | None = None

    def record_failure(self, addr: str) -> bool:
        banned = super().record_failure(addr)
        if banned and self.listener is not None:
            self.listener.banned(ban_key(addr), self.bans.ban_left(addr))
        return banned


class PrimaryMemoryState(_ReportsBans):
    """:class:`MemoryState` that reports every new ban to the workers."""

    def snapshot_bans(self) -> list[tuple[str, float]]:
        return self.bans.active_bans()


class PrimaryRedisState(_ReportsBans, RedisState):
    """:class:`RedisState` that reports bans and registry changes (its own and other
    replicas') to the workers."""

    def _remote_ban(self, key: str, left_ms: float) -> None:
        super()._remote_ban(key, left_ms)
        if self.listener is not None:
            self.listener.banned(ban_key(key), left_ms / 1000)

    def apply(self, event: Event) -> None:
        before = self.records.get(event.app)
        super().apply(event)
        if self.listener is not None and self.records.get(event.app) is not before:
            self.listener.exapp_changed(event.app)

    def _load(self, snapshot: Mapping[object, object], snapshot_seq: int) -> None:
        before = dict(self.records)
        super()._load(snapshot, snapshot_seq)
        if self.listener is not None:
            for app in set(before) | set(self.records):
                if before.get(app) is not self.records.get(app):
                    self.listener.exapp_changed(app)

    def snapshot_bans(self) -> list[tuple[str, float]]:
        return self.bans.active_bans() + self.remote_bans.remaining()


PrimaryState = PrimaryMemoryState | PrimaryRedisState
