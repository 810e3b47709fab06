"""The Lua scripts the Redis stores run (each atomic on the node that holds a circle's slot),
and the packing of their calls in the Redis protocol for the batched write paths. Wake-ups are
published with 'PUBLISH'; the cluster store runs the same texts with 'SPUBLISH'."""

from __future__ import annotations

CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'blob', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: state, events, home, fence. ARGV: expected, new, blob, ttl ms, maxlen, channel, wake,
# fencing token ('' = none: compare-and-set only), now ms, keep events ms, events...
SAVE = """
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return 'missing' end
-- a save retried after a lost reply finds its own write: it succeeded
if v == ARGV[2] and v ~= ARGV[1] and redis.call('HGET', KEYS[1], 'blob') == ARGV[3] then
  return 'ok'
end
if ARGV[8] ~= '' and redis.call('HGET', KEYS[3], 'token') ~= ARGV[8] then return 'stale' end
if v ~= ARGV[1] then return 'conflict' end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'blob', ARGV[3])
-- the entries saved `keep` ms ago or earlier go (a save adds one, so a few a save keep pace)
local cutoff = tonumber(ARGV[9]) - tonumber(ARGV[10])
local last_old = nil
for _, e in ipairs(redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 8)) do
  if e[2][3] == 't' and tonumber(e[2][4]) <= cutoff then last_old = e[1] else break end
end
if last_old then
  redis.call('XTRIM', KEYS[2], 'MINID', string.match(last_old, '^%d+') .. '-1')
end
local entry = {'v', ARGV[2], 't', ARGV[9]}
for i = 11, #ARGV do
  entry[#entry + 1] = tostring(i - 11)
  entry[#entry + 1] = ARGV[i]
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], ARGV[2] .. '-0', unpack(entry))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[10])
redis.call('PEXPIRE', KEYS[4], ARGV[4])
-- a fenced save comes from the circle's home, where all its sessions live and hear it at once
if ARGV[8] == '' then redis.call('PUBLISH', ARGV[6], ARGV[7]) end
return 'ok'
"""

# KEYS: state, home, fence. ARGV: owner, url, lease ttl ms, idle ttl ms.
# -> {1, token} taken (it was free), {2, token} already ours, {0, url} another's, {-1} missing
ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local h = redis.call('HMGET', KEYS[2], 'owner', 'token', 'url')
if h[1] and h[1] ~= ARGV[1] then return {0, h[3] or ''} end
local how, token = 2, h[2]
if not h[1] then
  how, token = 1, redis.call('INCR', KEYS[3])
  redis.call('HSET', KEYS[2], 'owner', ARGV[1], 'token', token, 'url', ARGV[2])
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {how, tonumber(token)}
"""

# KEYS: home. ARGV: owner, token, lease ttl ms (renew) -> 1 held and extended, 0 lost
RENEW = """
local h = redis.call('HMGET', KEYS[1], 'owner', 'token')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: home. ARGV: owner, token -> 1 released, 0 not ours (any more)
RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'owner', 'token')
if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] then return 0 end
return redis.call('DEL', KEYS[1])
"""

# KEYS[1] the live processes; ARGV: owner id, URL, ttl ms. Expired entries are pruned here,
# by the clock of Redis (one clock for every process).
ANNOUNCE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], (now + tonumber(ARGV[3])) .. '|' .. ARGV[2])
local all = redis.call('HGETALL', KEYS[1])
local alive = {}
for i = 1, #all, 2 do
  local sep = string.find(all[i + 1], '|', 1, true)
  if sep and tonumber(string.sub(all[i + 1], 1, sep - 1)) > now then
    alive[#alive + 1] = all[i]
    alive[#alive + 1] = string.sub(all[i + 1], sep + 1)
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return alive
"""

# KEYS[1] the hand-overs asked of one process: all of them, taken at once.
TAKE_ALL = """
local asked = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return asked
"""

DELETE = """
redis.call('DEL', KEYS[3], KEYS[4])
local n = redis.call('DEL', KEYS[1], KEYS[2])
if n > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return n
"""


def resp_command(*args: bytes | str | int) -> bytes:
    """One command in the Redis protocol (RESP: an array of bulk strings), for the save path:
    redis-py's general `pack_command` took half the CPU of a save (cProfile of 3000 saves);
    the arguments here are only bytes, str and int (tests compare it with redis-py's)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)
