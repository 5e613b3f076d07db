"""The embedded default state: everything in this process, bounded."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from mypy_extensions import mypyc_attr

from harp.bans import FailureTable, ban_key
from harp.exapps import ExAppRecord
from harp.logs import HarpLogger
from harp.lru import TTLCache
from harp.state import UserInfo

log = HarpLogger("harp.state")

#: How long "Nextcloud does not know this app" is believed (docs/compatibility.md#exapp-registry).
NEGATIVE_TTL: Final = 15.0
MAX_SESSIONS: Final = 100_000
MAX_MISSING: Final = 10_000
#: Ban keys (IPv4 addresses, IPv6 /64s) tracked at most (docs/differences.md#6).
MAX_BAN_KEYS: Final = 100_000


def _log_ban_table_full() -> None:
    log.warn(
        "ban table full of active bans ({n} entries): new failures are not counted until "
        "bans lapse", n=MAX_BAN_KEYS,
    )


# Subclassed outside the compiled modules (harp/compiled.py): the Redis and primary states.
@mypyc_attr(allow_interpreted_subclasses=True)
class MemoryState:
    def __init__(
        self,
        blacklist_count: int,
        blacklist_window: float,
        session_lifetime: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bans = FailureTable(
            blacklist_count, blacklist_window, MAX_BAN_KEYS, clock=clock,
            on_full=_log_ban_table_full,
        )
        self.records: dict[str, ExAppRecord] = {}
        self.missing: TTLCache[str, bool] = TTLCache(MAX_MISSING, NEGATIVE_TTL, clock=clock)
        self.users: TTLCache[bytes, UserInfo] = TTLCache(
            MAX_SESSIONS, session_lifetime, clock=clock
        )

    def is_banned(self, addr: str) -> bool:
        return self.bans.is_banned(addr)

    def record_failure(self, addr: str) -> bool:
        return self.bans.record(addr)

    def get_exapp(self, app_id: str) -> ExAppRecord | None:
        return self.records.get(app_id)

    def put_exapp(self, app_id: str, record: ExAppRecord) -> None:
        self.records[app_id] = record
        self.missing.pop(app_id)

    def delete_exapp(self, app_id: str) -> bool:
        return self.records.pop(app_id, None) is not None

    def is_missing(self, app_id: str) -> bool:
        return self.missing.get(app_id) is not None

    def mark_missing(self, app_id: str) -> None:
        self.missing.set(app_id, True)

    def get_user(self, key: bytes) -> UserInfo | None:
        return self.users.get(key)

    def put_user(self, key: bytes, user: UserInfo) -> None:
        self.users.set(key, user)

    def sweep(self) -> None:
        self.bans.sweep()
        self.missing.sweep()
        self.users.sweep()

    def count_ban_keys(self) -> int:
        return len(self.bans)

    def count_exapps(self) -> int:
        return len(self.records)


#: Bans decided elsewhere (other replicas, the primary) that are kept at most.
MAX_REMOTE_BANS: Final = 100_000


@mypyc_attr(allow_interpreted_subclasses=True)
class SharedBansState(MemoryState):
    """A :class:`MemoryState` that also enforces bans decided elsewhere.

    Both states that mirror an authority -- :class:`~harp.state.redis.RedisState`
    (other replicas, through Redis) and :class:`~harp.workers.mirror.MirrorState` (the
    primary) -- learn bans they did not count; they keep them here, by ban key, for the
    time the authority gave.  A full table drops the newcomer, never a live ban.
    """

    def __init__(
        self,
        blacklist_count: int,
        blacklist_window: float,
        session_lifetime: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(blacklist_count, blacklist_window, session_lifetime, clock=clock)
        self.remote_bans: TTLCache[str, bool] = TTLCache(
            MAX_REMOTE_BANS, blacklist_window, clock=clock
        )

    def is_banned(self, addr: str) -> bool:
        if self.bans.is_banned(addr):
            return True
        return self.remote_bans.get(ban_key(addr)) is not None

    def keep_remote_ban(self, key: str, seconds: float) -> bool:
        """Enforce a ban decided elsewhere for ``seconds``; False if the table is full."""
        return self.remote_bans.set_if_room(ban_key(key), True, ttl=seconds)

    def sweep(self) -> None:
        super().sweep()
        self.remote_bans.sweep()
