"""Shared state in Redis, so that N HaRP replicas behind a load balancer act as one.

Spec README deliberate difference 8.  Reads stay synchronous (see :mod:`harp.state`): every
replica keeps a complete local mirror and the request pipeline only ever looks at it.  Redis
is where writes go through to and where the other replicas learn about them:

* **ExApp registry** -- the hash ``harp:exapps`` (app id -> the record's JSON).  ``put`` and
  ``delete`` update the local mirror at once, then run one Lua script that changes the hash
  *and* publishes the change on ``harp:events``, so the order of the published events is the
  order of the changes to the hash.  Every replica (the writer included) applies every event
  in that order, so all mirrors converge to the hash.  On every (re)connection the mirror is
  reloaded from the hash.  The negative cache ("Nextcloud does not know this app") stays
  local: it is a 15-second optimisation whose only cost when unshared is one more lookup.
* **Bans** -- each failure is counted locally (the answer of :meth:`record_failure`) *and*
  added to the sorted set ``harp:fail:<key>`` (``key`` from :func:`harp.bans.ban_key`: the
  IPv4 address or the IPv6 /64) by a Lua script that uses Redis' clock, keeps
  only failures younger than ``HP_BLACKLIST_WINDOW`` and, once ``HP_BLACKLIST_COUNT`` is
  reached, records the ban in ``harp:bans`` (addr -> end) and publishes it.  Every replica
  keeps the published bans in a bounded local table, so :meth:`is_banned` stays an O(1)
  lookup.  Redis' clock is used so that replicas never have to agree on the time: a ban
  travels as "banned for this many more milliseconds".
* **User lookups** stay local (a bounded :class:`~harp.lru.TTLCache` as in memory state).
  Sharing them would mean either an asynchronous Redis read on the hot path (the State reads
  are synchronous by design) or broadcasting every lookup to every replica, which turns one
  client's flood of distinct cookies into memory and traffic on all N replicas.  Unshared,
  the cost is at most one Nextcloud round trip per replica per credential per
  ``HP_SESSION_LIFETIME``; no credential material, not even its hash, ever leaves the process.

When Redis is unreachable everything keeps working per replica (local bans, local registry).
Registry changes made meanwhile are remembered and written when the connection is back; if
Redis lost its data meanwhile (a restart without persistence, detected by the ``harp:epoch``
key changing), every replica re-seeds the hash from its mirror.  A delete leaves a tombstone,
locally until it has reached Redis and in Redis (``harp:gone:<app>``, one day), so that a
replica still holding the app cannot re-seed it back.  Both connections (commands
and pub/sub) reconnect with capped exponential backoff, never block the reactor, and every
Redis error is caught and logged once per outage.  The password is never logged.
"""

from __future__ import annotations

import json
import random
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from harp.bans import ban_key
from harp.config import ConfigError
from harp.exapps import ExAppRecord, RecordError, parse_record
from harp.logs import HarpLogger
from harp.lru import TTLCache
from harp.state.memory import MemoryState

log = HarpLogger("harp.redis")

#: Prefix of every key and channel HaRP uses, so a Redis can be shared with other software.
KEY_PREFIX: Final = "harp:"
#: Bans learnt from other replicas that are kept at most (deliberate difference 6).
MAX_REMOTE_BANS: Final = 100_000
#: Reconnection backoff: first delay, growth factor, cap (seconds), +-20 % jitter.
RECONNECT_INITIAL: Final = 0.5
RECONNECT_FACTOR: Final = 2.0
RECONNECT_MAX: Final = 5.0
CONNECT_TIMEOUT: Final = 5.0
#: A command not answered within this is a dead connection: it is aborted and re-made.
REPLY_TIMEOUT: Final = 5.0
#: How often both connections are PINGed (finds half-open connections) and pending
#: registry writes retried.
HEARTBEAT_INTERVAL: Final = 10.0
#: How long Redis remembers that an ExApp was deleted (``harp:gone:<app>``).  A replica
#: that missed the delete (it was cut off from Redis) and finds Redis emptied by a restart
#: re-seeds from its mirror; the tombstone stops it from bringing the app back.  Replicas
#: reconnect within seconds (RECONNECT_MAX), so a day is far more than needed, and a
#: tombstone costs a few bytes per deleted app.
TOMBSTONE_TTL_MS: Final = 24 * 3600 * 1000


# --------------------------------------------------------------------------------------------
# HP_REDIS_URL
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where Redis is and how to log in, parsed from ``HP_REDIS_URL``."""

    host: str | None
    port: int
    path: str | None
    tls: bool
    db: int | None
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """For logs: scheme, address and database, never the credentials."""
        if self.path is not None:
            where = f"unix://{self.path}"
        else:
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            where = f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}"
        return where if self.db is None else f"{where}/{self.db}"


def parse_redis_url(url: str) -> RedisTarget:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://…`` (TLS) or
    ``unix:///path[?db=N]``.  Errors are :class:`ConfigError` without the password."""

    def bad(why: str) -> ConfigError:
        return ConfigError("HP_REDIS_URL", target_without_password(url), why)

    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 -- validates the port
    except ValueError:
        raise bad("the port must be a number 1-65535") from None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if parts.scheme == "unix":
        query = dict(item.partition("=")[::2] for item in parts.query.split("&") if item)
        db = _db(query.get("db") or query.get("dbid") or "", bad)
        return RedisTarget(None, 0, parts.path, False, db, username, password)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise bad("expected redis://[:password@]host:port[/db] or unix:///path/to/redis.sock")
    return RedisTarget(
        parts.hostname, parts.port or 6379, None, parts.scheme == "rediss",
        _db(parts.path.strip("/"), bad), username, password,
    )


def _db(text: str, bad: Callable[[str], ConfigError]) -> int | None:
    if not text:
        return None
    if not text.isdigit():
        raise bad("the database must be a number, e.g. redis://host:6379/0")
    return int(text)


def target_without_password(url: str) -> str:
    """``url`` with any password replaced, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:<redacted>@{netloc}").geturl()


# --------------------------------------------------------------------------------------------
# Events on the pub/sub channel (pure)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One change published on ``harp:events``.

    ``origin``/``seq`` identify the replica and its write number, so that a replica can tell
    its own echoes apart; ``record`` is the record's JSON object (``put``), ``ttl`` the
    remaining ban time in milliseconds (``ban``).
    """

    kind: Literal["put", "del", "ban"]
    origin: str
    seq: int = 0
    app: str = ""
    record: Mapping[str, Any] | None = None
    addr: str = ""
    ttl: float = 0.0


def encode_put(origin: str, seq: int, app_id: str, source: Mapping[str, Any]) -> str:
    return json.dumps(
        {"k": "put", "o": origin, "s": seq, "app": app_id, "rec": source},
        separators=(",", ":"),
    )


def encode_delete(origin: str, seq: int, app_id: str) -> str:
    return json.dumps({"k": "del", "o": origin, "s": seq, "app": app_id}, separators=(",", ":"))


def decode_event(raw: str | bytes) -> Event | None:
    """Parse an event; None for anything malformed (another program on the channel, a newer
    HaRP's event kind): ignoring it is always safe, the next sync repairs the mirror."""
    try:
        data = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("o"), str):
        return None
    kind = data.get("k")
    seq = data.get("s", 0)
    if isinstance(seq, bool) or not isinstance(seq, int):
        return None
    if kind in ("put", "del"):
        app = data.get("app")
        if not isinstance(app, str) or not app:
            return None
        if kind == "del":
            return Event("del", data["o"], seq, app)
        record = data.get("rec")
        if not isinstance(record, dict):
            return None
        return Event("put", data["o"], seq, app, record)
    if kind == "ban":
        addr, ttl = data.get("addr"), data.get("ttl")
        if (
            not isinstance(addr, str) or not addr or isinstance(ttl, bool)
            or not isinstance(ttl, int | float) or not ttl > 0
        ):
            return None
        return Event("ban", data["o"], addr=addr, ttl=float(ttl))
    return None


def backoff_delay(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds before reconnection attempt ``attempt`` (0-based): capped exponential growth,
    +-20 % jitter so that N replicas do not stampede a Redis that just came back."""
    base = min(RECONNECT_INITIAL * RECONNECT_FACTOR ** min(attempt, 32), RECONNECT_MAX)
    return float(base * (0.8 + 0.4 * rand()))


# --------------------------------------------------------------------------------------------
# Lua scripts: each is one atomic step, so concurrent replicas cannot interleave inside it
# --------------------------------------------------------------------------------------------

# KEYS: hash, channel, tombstone of the app.  ARGV: app id, record JSON, event.
_PUT: Final = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('DEL', KEYS[3])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
"""

# Re-seeding after Redis lost its data: never overwrite what another replica wrote first,
# and never bring back an app another replica deleted since (its tombstone).
_PUT_NX: Final = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('PUBLISH', KEYS[2], ARGV[3])
  return 1
end
return 0
"""

# KEYS: hash, channel, tombstone of the app.  ARGV: app id, event, tombstone lifetime ms.
_DELETE: Final = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""

# KEYS: epoch.  ARGV: a fresh epoch, used if the key is missing (new or emptied Redis).
_EPOCH: Final = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  redis.call('SET', KEYS[1], ARGV[1])
  epoch = ARGV[1]
end
return epoch
"""

# Sliding-window failure count on Redis' clock (ms).  A failure at t counts while
# now - t < window, as in FailureTable.  KEYS: failures of addr, bans, channel.
# ARGV: count, window ms, unique member, addr, origin.
# Returns {failures, ban ms left, 1 if this failure started the ban}.
_FAILURE: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local count = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(count + 1))
redis.call('PEXPIRE', KEYS[1], window)
local n = redis.call('ZCARD', KEYS[1])
if n < count then return {n, 0, 0} end
local oldest = tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2])
local left = oldest + window - now
if left <= 0 then return {n, 0, 0} end
local current = redis.call('ZSCORE', KEYS[2], ARGV[4])
local new = 0
if not current or tonumber(current) <= now then new = 1 end
if not current or tonumber(current) < oldest + window then
  redis.call('ZADD', KEYS[2], oldest + window, ARGV[4])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('PUBLISH', KEYS[3], cjson.encode({k='ban', o=ARGV[5], addr=ARGV[4], ttl=left}))
return {n, left, new}
"""

# KEYS: bans.  Returns {addr, ms left, addr, ms left, ...} of the bans in force.
_BANS: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local rows = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local out = {}
for i = 1, #rows, 2 do
  out[#out + 1] = rows[i]
  out[#out + 1] = tostring(tonumber(rows[i + 1]) - now)
end
return out
"""


# --------------------------------------------------------------------------------------------
# Connections
# --------------------------------------------------------------------------------------------


class _ProtocolOwner:
    """What txredisapi's protocol expects of ``self.factory``.

    On a failed AUTH or SELECT it calls ``stopTrying()`` and ``connectionError(msg)`` and
    drops the connection.  We do not give up (Redis may be restarting with a new ACL); the
    link retries with backoff and the message (the server's answer, never the password) is
    logged once.
    """

    isLazy = False

    def __init__(self, link: _Link) -> None:
        self.link = link

    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        self.link.owner.login_failed(why)


class _CommandProtocol(txredisapi.RedisProtocol):  # type: ignore[misc]
    link: _Link | None = None

    def connectionMade(self) -> Any:
        _keepalive(self)
        return super().connectionMade()

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        if self.link is not None:
            self.link.lost(self)


class _SubscriberProtocol(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    link: _Link | None = None

    def connectionMade(self) -> Any:
        _keepalive(self)
        return super().connectionMade()

    def messageReceived(self, pattern: object, channel: object, message: object) -> None:
        if self.link is not None and isinstance(message, str | bytes):
            self.link.owner.on_message(message)

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        if self.link is not None:
            self.link.lost(self)


def _keepalive(protocol: Any) -> None:
    """TCP keepalive: a Redis host that vanished is noticed even on an idle connection."""
    setter = getattr(protocol.transport, "setTcpKeepAlive", None)
    if setter is not None:
        try:
            setter(1)
        except OSError:
            pass


class _Link:
    """One Redis connection, re-made with backoff until :meth:`stop`.

    Hand-rolled rather than ``ClientService`` because "connected" here means "AUTH and
    SELECT done", which may fail after TCP succeeded; such a connection must count as a
    failed attempt for the backoff, not reset it.
    """

    def __init__(
        self,
        owner: RedisState,
        name: str,
        reactor: IReactorTime,
        endpoint: IStreamClientEndpoint,
        protocol_class: type[Any],
        target: RedisTarget,
    ) -> None:
        self.owner = owner
        self.name = name
        self.reactor = reactor
        self.endpoint = endpoint
        self.protocol_class = protocol_class
        self.target = target
        self.protocol: Any = None  # ready (logged in, database selected) or None
        self._connecting: defer.Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._attempt = 0
        self._stopped = True
        self._current: Any = None  # the protocol of the live TCP connection, ready or not

    def start(self) -> None:
        self._stopped = False
        self._connect()

    def _build(self) -> Any:
        protocol = self.protocol_class(
            charset="utf-8", replyTimeout=REPLY_TIMEOUT, password=self.target.password,
            dbid=self.target.db, convertNumbers=False, username=self.target.username,
        )
        protocol.factory = _ProtocolOwner(self)
        protocol.link = self
        protocol.whenConnected().addCallback(self._ready)
        self._current = protocol
        return protocol

    def _connect(self) -> None:
        self._retry = None
        if self._stopped:
            return
        connecting = self.endpoint.connect(_LinkFactory(self))
        self._connecting = connecting
        connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, protocol: Any) -> None:
        self._connecting = None

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._stopped:
            return
        self.owner.connection_problem(self.name, failure.getErrorMessage())
        self._schedule()

    def _ready(self, protocol: Any) -> None:
        if self._stopped or protocol is not self._current:
            return
        self._attempt = 0
        self.protocol = protocol
        self.owner.link_ready(self)

    def lost(self, protocol: Any) -> None:
        if protocol is not self._current:
            return
        self._current = None
        was_ready = self.protocol is not None
        self.protocol = None
        if was_ready:
            self.owner.link_lost(self)
        if not self._stopped:
            self._schedule()

    def _schedule(self) -> None:
        delay = backoff_delay(self._attempt)
        self._attempt += 1
        self._retry = self.reactor.callLater(delay, self._connect)

    def stop(self) -> defer.Deferred[None]:
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.addErrback(lambda _: None)
            connecting.cancel()
        current, self._current, self.protocol = self._current, None, None
        if current is None or current.transport is None:
            return defer.succeed(None)
        gone: defer.Deferred[None] = current.whenDisconnected()
        gone.addCallback(lambda _: None)
        current.transport.loseConnection()
        return gone


class _LinkFactory(Factory):
    noisy = False  # one "Starting factory" line per reconnection attempt helps nobody

    def __init__(self, link: _Link) -> None:
        self.link = link

    def buildProtocol(self, addr: object) -> Any:
        return self.link._build()


def _call(protocol: Any, method: str, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    """Call a txredisapi command as a Deferred: it raises synchronously when the
    connection has just gone, which must not reach the request that caused the write."""
    return defer.maybeDeferred(getattr(protocol, method), *args, **kwargs)


def _endpoint(reactor: Any, target: RedisTarget) -> IStreamClientEndpoint:
    if target.path is not None:
        return UNIXClientEndpoint(reactor, target.path, timeout=CONNECT_TIMEOUT)
    assert target.host is not None
    endpoint: IStreamClientEndpoint = HostnameEndpoint(
        reactor, target.host, target.port, timeout=CONNECT_TIMEOUT
    )
    if target.tls:
        endpoint = wrapClientTLS(optionsForClientTLS(target.host), endpoint)
    return endpoint


# --------------------------------------------------------------------------------------------
# The state
# --------------------------------------------------------------------------------------------


class RedisState(MemoryState):
    """The :class:`~harp.state.State` of a replica sharing bans and registry through Redis.

    A :class:`~harp.state.memory.MemoryState` (whose tables every read looks at) that
    writes through to Redis and applies the other replicas' changes.  Reads are served
    from local tables only.  :meth:`start` / :meth:`stop` (called by
    :class:`RedisStateService`) manage the two connections; before the first sync and during
    an outage the state behaves like :class:`~harp.state.memory.MemoryState`.
    """

    def __init__(
        self,
        url: str,
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
        self.target = parse_redis_url(url)
        self.reactor = reactor
        # Local tables (bans, records, missing, users): what every read looks at.
        super().__init__(blacklist_count, blacklist_window, session_lifetime, clock=clock)
        self.remote_bans: TTLCache[str, bool] = TTLCache(
            MAX_REMOTE_BANS, blacklist_window, clock=clock
        )
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
        # replica's re-seeding says -- until the delete has reached Redis (README hole 15).
        self._tombstones: dict[str, int] = {}
        self._epoch: str | None = None
        self._buffer: list[Event] | None = None  # events seen while a sync is running
        self._syncing = False
        self._sync_again = False
        self.synced = False
        self._outage_logged = False
        self._error_logged = False
        self._login_errors: set[str] = set()
        self.syncs = 0
        self._command = _Link(
            self, "commands", reactor, _endpoint(reactor, self.target), _CommandProtocol,
            self.target,
        )
        self._subscriber = _Link(
            self, "pub/sub", reactor, _endpoint(reactor, self.target), _SubscriberProtocol,
            self.target,
        )
        self._subscribed = False
        self._remote_full_logged = False

    # --- State: bans

    def is_banned(self, addr: str) -> bool:
        if self.bans.is_banned(addr):
            return True
        return self.remote_bans.get(ban_key(addr)) is not None

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
                _call(
                    command, "eval", _FAILURE,
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
        if not self.remote_bans.set_if_room(ban_key(key), True, ttl=left_ms / 1000):
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

    def sweep(self) -> None:
        super().sweep()
        self.remote_bans.sweep()

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
            call = _call(
                command, "eval", _DELETE, keys=keys,
                args=[app_id, encode_delete(self.origin, seq, app_id), str(TOMBSTONE_TTL_MS)],
            )
        else:
            source = json.dumps(dict(record.source), separators=(",", ":"))
            call = _call(
                command, "eval", _PUT_NX if nx else _PUT, keys=keys,
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
            if not self._error_logged:
                self._error_logged = True
                log.warn("Redis: could not {what}: {error}", what=what,
                         error=failure.getErrorMessage())
            return None

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
        if not self._outage_logged:
            self._outage_logged = True
            log.warn(
                "Redis {target} unavailable ({link}: {why}); bans and the ExApp registry are "
                "per-replica until it is back", target=self.target.describe(), link=link, why=why,
            )

    def login_failed(self, why: str) -> None:
        """AUTH or SELECT refused: an operator error worth its own line even in an outage
        already logged (``why`` is the server's answer; the password is not in it)."""
        self.connection_problem("login", why)
        if why not in self._login_errors:
            if len(self._login_errors) < 8:
                self._login_errors.add(why)
            log.error("Redis {target}: {why}; check HP_REDIS_URL",
                      target=self.target.describe(), why=why)

    def link_ready(self, link: _Link) -> None:
        if link is self._subscriber:
            protocol = link.protocol
            self._run(_call(protocol, "subscribe", self.channel), "subscribe").addCallback(
                self._subscribed_ok, protocol
            )
            return
        self._maybe_sync()

    def _subscribed_ok(self, reply: object, protocol: Any) -> None:
        if reply is None or protocol is not self._subscriber.protocol:
            return  # failed (logged) or already replaced; the link retries
        self._subscribed = True
        self._maybe_sync()

    def link_lost(self, link: _Link) -> None:
        if link is self._subscriber:
            self._subscribed = False
        self.synced = False
        self.connection_problem(link.name, "connection lost")

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
        epoch = await _call(
            command, "eval", _EPOCH, keys=[self.key_epoch], args=[secrets.token_hex(8)]
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
        snapshot = await _call(command, "hgetall", self.key_exapps)
        bans = await _call(command, "eval", _BANS, keys=[self.key_bans])
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
        self._error_logged = False
        self.syncs += 1
        if self._outage_logged:
            self._outage_logged = False
            log.warn("Redis {target} reconnected: bans and the ExApp registry are shared "
                     "again", target=self.target.describe())
        log.info("Redis state synchronised: {n} ExApps, {b} bans from {target}",
                 n=len(self.records), b=len(bans) // 2 if isinstance(bans, list) else 0,
                 target=self.target.describe())

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
                self._run(_call(protocol, "execute_command", "PING"), "ping")
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
        log.info("Redis: connecting to {target}", target=self.state.target.describe())
        self.state.start()
        self._heartbeat.start(HEARTBEAT_INTERVAL, now=False).addErrback(
            lambda failure: log.failure("Redis heartbeat stopped", failure)
        )

    def stopService(self) -> defer.Deferred[object]:
        super().stopService()
        if self._heartbeat.running:
            self._heartbeat.stop()
        return self.state.stop()
