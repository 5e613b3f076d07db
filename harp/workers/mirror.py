"""A worker's :class:`~harp.state.State`: a local mirror of the primary's, written through.

The same shape as :class:`~harp.state.redis.RedisState` (reads from local tables only,
writes go through to where the truth is), with the primary process in Redis' place:

* **Bans** -- a failure is counted locally (the answer of :meth:`record_failure`, so a
  worker on its own bans exactly as a single process would) *and* sent to the primary,
  which counts every worker's failures in the authoritative state and, when an address
  becomes banned there, tells every worker how long the ban lasts (:meth:`apply_ban`).
* **ExApp registry** -- the primary pushes the whole registry when the worker starts and
  every change afterwards (:meth:`apply_exapp`).  A record this worker learns from
  Nextcloud itself (:meth:`put_exapp`) is kept at once and sent to the primary, which
  shares it with the other workers.  ``/exapp_storage`` never writes here directly: the
  worker's storage endpoint asks the primary and answers only when every worker holds
  the change (:mod:`harp.workers.worker`).
* **User lookups and "not found" marks** stay local: they are caches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred

from harp.bans import ban_key
from harp.exapps import ExAppRecord
from harp.state.memory import MemoryState, SharedBansState


class Primary(Protocol):
    """What the mirror writes through to (the worker's channel to the primary)."""

    def failure(self, key: str) -> None: ...

    def put(self, app_id: str, record: ExAppRecord) -> Deferred[None]: ...

    def delete(self, app_id: str) -> Deferred[bool]: ...


class MirrorState(SharedBansState):
    def __init__(
        self,
        blacklist_count: int,
        blacklist_window: float,
        session_lifetime: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(blacklist_count, blacklist_window, session_lifetime, clock=clock)
        self.primary: Primary | None = None

    # --- State

    def record_failure(self, addr: str) -> bool:
        key = ban_key(addr)
        banned = self.bans.record(key)
        if self.primary is not None:
            self.primary.failure(key)
        return banned

    def put_exapp(self, app_id: str, record: ExAppRecord) -> None:
        super().put_exapp(app_id, record)
        if self.primary is not None:
            self.primary.put(app_id, record).addErrback(lambda _: None)

    def delete_exapp(self, app_id: str) -> bool:
        found = super().delete_exapp(app_id)
        if self.primary is not None:
            self.primary.delete(app_id).addErrback(lambda _: None)
        return found

    # --- what the primary tells

    def apply_ban(self, key: str, seconds: float) -> None:
        if seconds > 0:
            self.keep_remote_ban(key, seconds)

    def apply_exapp(self, app_id: str, record: ExAppRecord | None) -> bool:
        """Hold (or drop, ``None``) the primary's record; True if one was held before."""
        if record is None:
            return self.records.pop(app_id, None) is not None
        held = app_id in self.records
        MemoryState.put_exapp(self, app_id, record)
        return held
