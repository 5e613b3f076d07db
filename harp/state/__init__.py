"""State shared by every request: bans, the ExApp registry, the user-lookup cache.

One interface (:class:`State`) with the in-memory implementation as the embedded
default.  Reads are synchronous on purpose: they sit on the per-request hot path, and a
replicated backend (Redis, docs/differences.md#8) serves them from a local mirror
that it keeps current, writing through asynchronously.  The pipeline therefore never
waits for shared state, only for Nextcloud and the upstream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from harp.exapps import ExAppRecord


@dataclass(frozen=True, slots=True)
class UserInfo:
    """Nextcloud's answer for a credential: ``user_id`` "" and level 0 = anonymous."""

    user_id: str
    access_level: int


ANONYMOUS = UserInfo("", 0)


class State(Protocol):
    def is_banned(self, addr: str) -> bool: ...

    def record_failure(self, addr: str) -> bool:
        """Count one failure; True if the address is now banned."""
        ...

    def get_exapp(self, app_id: str) -> ExAppRecord | None: ...

    def put_exapp(self, app_id: str, record: ExAppRecord) -> None:
        """Store (replace) a record and forget any "not found" for the app."""
        ...

    def delete_exapp(self, app_id: str) -> bool: ...

    def is_missing(self, app_id: str) -> bool:
        """True while a recent Nextcloud lookup said the app does not exist."""
        ...

    def mark_missing(self, app_id: str) -> None: ...

    def get_user(self, key: bytes) -> UserInfo | None: ...

    def put_user(self, key: bytes, user: UserInfo) -> None: ...

    def sweep(self) -> None:
        """Drop expired entries (called periodically)."""
        ...

    def count_ban_keys(self) -> int:
        """Ban keys (IPv4 addresses, IPv6 /64s) with failures tracked by this process,
        banned or not; expired ones count until the next :meth:`sweep`.  For metrics."""
        ...

    def count_exapps(self) -> int:
        """ExApp records this process holds.  For metrics."""
        ...
