"""The Lua scripts HaRP runs in Redis.

Each is one atomic step, so concurrent replicas cannot interleave inside it; which keys and
arguments each takes is written above it.  The replica (:mod:`harp.state.redis.replica`)
runs them with ``EVAL``.
"""

from __future__ import annotations

from typing import Final

# KEYS: hash, channel, tombstone of the app.  ARGV: app id, record JSON, event.
PUT_LUA: Final = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('DEL', KEYS[3])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
"""

# Re-seeding after Redis lost its data: never overwrite what another replica wrote first,
# and never bring back an app another replica deleted since (its tombstone).
PUT_NX_LUA: Final = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('PUBLISH', KEYS[2], ARGV[3])
  return 1
end
return 0
"""

# KEYS: hash, channel, tombstone of the app.  ARGV: app id, event, tombstone lifetime ms.
DELETE_LUA: Final = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return 1
"""

# KEYS: epoch.  ARGV: a fresh epoch, used if the key is missing (new or emptied Redis).
EPOCH_LUA: Final = """
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
FAILURE_LUA: Final = """
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
BANS_LUA: Final = """
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
