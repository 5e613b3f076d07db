"""Shared state in Redis, so that N HaRP replicas behind a load balancer act as one.

docs/differences.md#8.  Reads stay synchronous (see :mod:`harp.state`): every
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

Modules, one concern each, data flowing downwards:

* :mod:`~harp.state.redis.service` -- the twistd service: start, heartbeat, stop;
* :mod:`~harp.state.redis.replica` -- :class:`RedisState`, the mirror and its replication;
* :mod:`~harp.state.redis.links` -- one reconnecting Redis connection each (commands,
  pub/sub) and the backoff;
* :mod:`~harp.state.redis.outage` -- what is logged while Redis is away (once per outage);
* :mod:`~harp.state.redis.scripts` -- the Lua scripts, each one atomic step;
* :mod:`~harp.state.redis.events` -- the codec of what is published on ``harp:events``.

``HP_REDIS_URL`` is parsed by :mod:`harp.config.redis_url`, with the other settings.
"""

from harp.state.redis.replica import RedisState
from harp.state.redis.service import RedisStateService

__all__ = ["RedisState", "RedisStateService"]
