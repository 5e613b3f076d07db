"""One replica's Redis-backed :class:`~harp.state.State`: a local mirror, written through.

The design (what is shared, how mirrors converge, outages) is described in
:mod:`harp.state.redis`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from twisted.internet import defer
from twisted.python.failure import Failure

from harp.bans import ban_key
from harp.config import RedisURL
from harp.exapps import ExAppRecord, RecordError, parse_record
from harp.logs import HarpLogger
from harp.state.memory import MAX_REMOTE_BANS, SharedBansState
from harp.state.redis.events import Event, decode_event, encode_delete, encode_put
from harp.state.redis.links import (
    CommandProtocol,
    Link,
    SubscriberProtocol,
    redis_call,
)
from harp.state.redis.outage import OutageLog
from harp.state.redis.scripts import (
    BANS_LUA,
    DELETE_LUA,
    EPOCH_LUA,
    FAILURE_LUA,
    PUT_LUA,
    PUT_NX_LUA,
)

log = HarpLogger("harp.redis")

#: Prefix of every key and channel HaRP uses, so a Redis can be shared with other software.
KEY_PREFIX: Final = "harp:"
#: How long Redis remembers that an ExApp was deleted (``harp:gone:<app>``).  A replica
#: that missed the delete (it was cut off from Redis) and finds Redis emptied by a restart
#: re-seeds from its mirror; the tombstone stops it from bringing the app back.  Replicas
#: reconnect within seconds (:data:`~harp.state.redis.links.RECONNECT_MAX`), so a day is far
#: more than needed, and a tombstone costs a few bytes per deleted app.
TOMBSTONE_TTL_MS: Final = 24 * 3600 * 1000


class RedisState(SharedBansState):
    """The :class:`~harp.state.State` of a replica sharing bans and registry through Redis.

    A :class:`~harp.state.memory.MemoryState` (whose tables every read looks at) that
    writes through to Redis and applies the other replicas' changes.  Reads are served
    from local tables only.  :meth:`start` / :meth:`stop` (called by
    :class:`~harp.state.redis.service.RedisStateService`) manage the two connections;
    before the first sync and during an outage the state behaves like
    :class:`~harp.state.memory.MemoryState`.
    """

    def __init__(
        self,
        url: RedisURL,
        blacklist_count: int,
        blacklist_window: float,
        session_lifetime: float,
        *,
        reactor: Any = None,
        prefix: str = KEY_PREFIX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.url = url
        self.reactor = reactor
        # Local tables (bans, records, missing, users): what every read looks at.
        super().__init__(blacklist_count, blacklist_window, session_lifetime, clock=clock)
        self.blacklist_count = blacklist_count
        self.window_ms = max(1, round(blacklist_window * 1000))
        # Redis names.
        self.key_exapps = prefix + "exapps"
        self.key_epoch = prefix + "epoch"
        self.key_bans = prefix + "bans"
        self.key_fail = prefix + "fail:"
        self.key_gone = prefix + "gone:"
        self.channel = prefix + "events"
        # Replication bookkeeping.
        self.origin = secrets.token_hex(8)
        self._seq = 0
        self._own_pending: dict[str, int] = {}  # app -> seq of our newest unechoed write
        self._dirty: set[str] = set()  # apps changed while a write could not reach Redis
        # Local tombstones: app -> seq of the delete write in flight (-1: not sent yet).
        # An app deleted here stays deleted in the mirror -- whatever a snapshot or another
        # replica's re-seeding says -- until the delete has reached Redis
        # (docs/security.md#known-limits-what-is-still-weak).
        self._tombstones: dict[str, int] = {}
        self._epoch: str | None = None
        self._buffer: list[Event] | None = None  # events seen while a sync is running
        self._syncing = False
        self._sync_again = False
        self.synced = False
        self.outage = OutageLog(url)
        self.syncs = 0
        self._command = Link(self, "commands", reactor, url, CommandProtocol)
        self._subscriber = Link(self, "pub/sub", reactor, url, SubscriberProtocol)
        self._subscribed = False
        self._remote_full_logged = False

    # --- State: bans

    def record_failure(self, addr: str) -> bool:
        """Count locally (the answer) and in Redis (the cluster-wide decision, async).

        Counted under :func:`~harp.bans.ban_key` (IPv6 per /64) locally and in Redis, so
        every replica agrees on what a ban covers."""
        key = ban_key(addr)
        banned = self.bans.record(key)
        command = self._command.protocol
        if command is not None:
            self._seq += 1
            self._run(
                redis_call(
                    command, "eval", FAILURE_LUA,
                    keys=[self.key_fail + key, self.key_bans, self.channel],
                    args=[str(self.blacklist_count), str(self.window_ms),
                          f"{self.origin}:{self._seq}", key, self.origin],
                ),
                "count a failure",
            ).addCallback(self._failure_counted, key)
        return banned

    def _failure_counted(self, result: object, key: str) -> None:
        if not isinstance(result, list) or len(result) != 3:
            return
        failures, left, new = result
        if not isinstance(left, int) or left <= 0:
            return
        if new == 1:  # exactly one replica logs a ban: the one whose failure started it
            log.warn("banning {client}: {n} failures across replicas", client=key, n=failures)
        self._remote_ban(key, left)

    def _remote_ban(self, key: str, left_ms: float) -> None:
        """Keep a cluster-wide ban; a full table drops the newcomer, never a live ban."""
        if not self.keep_remote_ban(key, left_ms / 1000):
            if not self._remote_full_logged:
                self._remote_full_logged = True
                log.warn("Redis: table of cluster-wide bans full ({n}); a new ban is only "
                         "enforced where it was counted", n=MAX_REMOTE_BANS)
        else:
            self._remote_full_logged = False

    # --- State: registry

    def put_exapp(self, app_id: str, record: ExAppRecord) -> None:
        self._tombstones.pop(app_id, None)
        super().put_exapp(app_id, record)
        self._write(app_id)

    def delete_exapp(self, app_id: str) -> bool:
        if self.records.pop(app_id, None) is None:
            return False
        self._tombstones[app_id] = -1
        self._write(app_id)
        return True

    def _buried(self, app_id: str, seq: int) -> None:
        """The delete write ``seq`` reached Redis: the local tombstone has done its job."""
        if self._tombstones.get(app_id) == seq:
            del self._tombstones[app_id]

    # is_missing/mark_missing and the user-lookup cache stay local (MemoryState's);
    # see the module docstring.

    # --- writing through

    def _write(self, app_id: str, nx: bool = False) -> defer.Deferred[object]:
        """Write the mirror's current entry for ``app_id`` to Redis (put or delete) and
        publish it; remembered as dirty if Redis cannot be reached."""
        command = self._command.protocol
        if command is None:
            self._dirty.add(app_id)
            return defer.succeed(None)
        self._dirty.discard(app_id)
        self._seq += 1
        seq = self._seq
        record = self.records.get(app_id)
        keys = [self.key_exapps, self.channel, self.key_gone + app_id]
        if record is None:
            if app_id in self._tombstones:
                self._tombstones[app_id] = seq
            call = redis_call(
                command, "eval", DELETE_LUA, keys=keys,
                args=[app_id, encode_delete(self.origin, seq, app_id), str(TOMBSTONE_TTL_MS)],
            )
        else:
            source = json.dumps(dict(record.source), separators=(",", ":"))
            call = redis_call(
                command, "eval", PUT_NX_LUA if nx else PUT_LUA, keys=keys,
                args=[app_id, source, encode_put(self.origin, seq, app_id, record.source)],
            )
        self._own_pending[app_id] = seq

        def forget() -> None:
            if self._own_pending.get(app_id) == seq:
                del self._own_pending[app_id]

        def written(result: object) -> object:
            if result == 0:  # HSETNX found a value: nothing published, no echo to wait for
                forget()
            if record is None:
                self._buried(app_id, seq)
            return result

        def failed(failure: Failure) -> Failure:
            self._dirty.add(app_id)
            forget()
            return failure

        return self._run(call.addCallbacks(written, failed), "store an ExApp")

    def _run(self, call: defer.Deferred[Any], what: str) -> defer.Deferred[object]:
        """Attach the error handling every Redis call needs: log once, never raise."""

        def failed(failure: Failure) -> None:
            self.outage.call_failed(what, failure)

        result: defer.Deferred[object] = call.addErrback(failed)
        return result

    # --- events

    def on_message(self, raw: str | bytes) -> None:
        event = decode_event(raw)
        if event is None:
            return
        if self._buffer is not None:
            self._buffer.append(event)
        self.apply(event)

    def apply(self, event: Event) -> None:
        """Apply one published change to the local mirror (idempotent)."""
        if event.kind == "ban":
            self._remote_ban(event.addr, event.ttl)
            return
        app = event.app
        if event.origin == self.origin:
            pending = self._own_pending.get(app)
            if pending is not None and event.seq < pending:
                return  # a newer write of ours is on its way: this one is already superseded
            if pending == event.seq:
                del self._own_pending[app]
            if event.kind == "del":
                self._buried(app, event.seq)
        if event.kind == "del":
            self.records.pop(app, None)
            return
        if app in self._tombstones:
            return  # deleted here; that delete reaches Redis after this put and wins
        assert event.record is not None
        current = self.records.get(app)
        if current is not None and current.source == event.record:
            return
        try:
            self.records[app] = parse_record(app, dict(event.record))
        except RecordError as exc:
            log.warn("Redis: ignoring invalid record of ExApp {app}: {error}", app=app,
                     error=str(exc))
            return
        self.missing.pop(app)

    # --- connection events

    def connection_problem(self, link: str, why: str) -> None:
        self.outage.unavailable(link, why)

    def login_failed(self, why: str) -> None:
        self.outage.login_refused(why)

    def link_ready(self, link: Link) -> None:
        if link is self._subscriber:
            protocol = link.protocol
            self._run(redis_call(protocol, "subscribe", self.channel), "subscribe").addCallback(
                self._subscribed_ok, protocol
            )
            return
        self._maybe_sync()

    def _subscribed_ok(self, reply: object, protocol: Any) -> None:
        if reply is None or protocol is not self._subscriber.protocol:
            return  # failed (logged) or already replaced; the link retries
        self._subscribed = True
        self._maybe_sync()

    def link_lost(self, link: Link) -> None:
        if link is self._subscriber:
            self._subscribed = False
        self.synced = False
        self.outage.unavailable(link.name, "connection lost")

    def _maybe_sync(self) -> None:
        if self._command.protocol is None or not self._subscribed:
            return
        if self._syncing:
            self._sync_again = True
            return
        self._syncing = True
        defer.Deferred.fromCoroutine(self._sync()).addBoth(self._sync_done)

    def _sync_done(self, result: object) -> None:
        self._syncing = False
        self._buffer = None
        if isinstance(result, Failure):
            self._run(defer.fail(result), "synchronise")
        if self._sync_again:
            self._sync_again = False
            self._maybe_sync()

    async def _sync(self) -> None:
        """Bring Redis and the mirror together after a (re)connection.

        Order matters: subscribed first (done), then our pending writes, then the snapshot,
        then the events that arrived meanwhile re-applied on top of it.  Events are "set to"
        operations, so re-applying one the snapshot already contains is harmless, and any
        later one wins as it should.
        """
        command = self._command.protocol
        self._buffer = []
        # Echoes of writes made before this subscription may never come: forget them.
        # The snapshot plus the replayed events give the right state without them.
        self._own_pending.clear()
        epoch = await redis_call(
            command, "eval", EPOCH_LUA, keys=[self.key_epoch], args=[secrets.token_hex(8)]
        )
        reset = self._epoch is not None and epoch != self._epoch
        self._epoch = epoch
        writes: list[defer.Deferred[object]]
        if reset:
            log.warn("Redis lost HaRP's data (restarted without persistence?): re-seeding "
                     "the ExApp registry from this replica")
            # Our own changes made during the outage win; the rest only fills gaps, so
            # that N replicas re-seeding at once end with the union, not a free-for-all.
            # Deletes made meanwhile are written too (with their tombstones), or a replica
            # that still has the app would re-seed it.
            dirty, self._dirty = self._dirty, set()
            apps = sorted(set(self.records) | dirty)
            writes = [self._write(app, nx=app not in dirty) for app in apps]
        else:
            writes = [self._write(app) for app in sorted(self._dirty)]
        await defer.gatherResults(writes)
        snapshot_seq = self._seq
        snapshot = await redis_call(command, "hgetall", self.key_exapps)
        bans = await redis_call(command, "eval", BANS_LUA, keys=[self.key_bans])
        if command is not self._command.protocol:
            return  # lost meanwhile: the reconnection syncs again
        self._load(snapshot if isinstance(snapshot, dict) else {}, snapshot_seq)
        if isinstance(bans, list):
            for addr, left in zip(bans[::2], bans[1::2], strict=False):
                if float(left) > 0:
                    self._remote_ban(str(addr), float(left))
        for event in self._buffer:
            self.apply(event)
        self._buffer = None
        self.synced = True
        self.syncs += 1
        self.outage.synced()
        log.info("Redis state synchronised: {n} ExApps, {b} bans from {target}",
                 n=len(self.records), b=len(bans) // 2 if isinstance(bans, list) else 0,
                 target=self.url.describe())

    def _load(self, snapshot: Mapping[object, object], snapshot_seq: int) -> None:
        """Replace the mirror by the hash, keeping records that did not change (no
        re-parsing, no repeated warnings about invalid route regexes).  Writes of ours sent
        after the snapshot was asked for (seq above ``snapshot_seq``) are newer than it."""
        records: dict[str, ExAppRecord] = {}
        for app, text in snapshot.items():
            if not isinstance(app, str) or not isinstance(text, str | bytes):
                continue
            try:
                data = json.loads(text)
            except ValueError:
                log.warn("Redis: ignoring non-JSON record of ExApp {app}", app=app)
                continue
            current = self.records.get(app)
            if current is not None and current.source == data:
                records[app] = current
                continue
            try:
                records[app] = parse_record(app, data)
            except RecordError as exc:
                log.warn("Redis: ignoring invalid record of ExApp {app}: {error}", app=app,
                         error=str(exc))
                continue
            self.missing.pop(app)
        for app, seq in self._own_pending.items():
            if seq <= snapshot_seq:
                continue
            if app in self.records:
                records[app] = self.records[app]
            else:
                records.pop(app, None)
        for app in self._tombstones:
            records.pop(app, None)
        self.records = records

    # --- lifecycle

    def heartbeat(self) -> None:
        """PING both connections (a dead one is aborted by the reply timeout and re-made)
        and retry registry writes that failed while connected."""
        for link in (self._command, self._subscriber):
            protocol = link.protocol
            if protocol is not None:
                self._run(redis_call(protocol, "execute_command", "PING"), "ping")
        if self._dirty and self.synced:
            for app in sorted(self._dirty):
                self._write(app)

    def start(self) -> None:
        self._command.start()
        self._subscriber.start()

    def stop(self) -> defer.Deferred[object]:
        return defer.gatherResults(
            [self._command.stop(), self._subscriber.stop()], consumeErrors=True
        ).addErrback(lambda _: None)
