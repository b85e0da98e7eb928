-- The one atomic step of a worker: a batch of decided commands of one shard.
-- For each command, nothing is written unless all of it is:
--   command id not yet applied · aggregate version as expected · new state written ·
--   events appended to the shard's event stream · command status set · XACK.
-- The whole call is fenced by the shard lease: a worker that lost its lease writes nothing.
--
-- KEYS[1] event stream   KEYS[2] shard lease   KEYS[3] command stream
-- KEYS[2i+2], KEYS[2i+3]  aggregate state hash and command status hash of command i (1-based)
-- ARGV[1] lease owner token   ARGV[2] status ttl (s)   ARGV[3] consumer group
-- then per command: command-stream entry id, outcome ('processed' | 'failed'),
--   expected version (-1: a failure that does not depend on the state), new state,
--   error JSON, event ids (comma-separated), event count n, then n encoded envelopes
--
-- Reply: 'fenced', or one item per command:
--   {'ok', entry ids...} | {'duplicate', status} | {'conflict', actual version}
-- An ok or duplicate command is acknowledged; a conflicting one stays pending.
-- Once a command of an aggregate conflicts, later commands of that aggregate in the
-- same call conflict too: they were decided on the state the first one would have made.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 'fenced'
end
local ttl = tonumber(ARGV[2])
local group = ARGV[3]
local replies = {}
local broken = {}
local a = 4
local k = 4
while a <= #ARGV do
  local aggregate, status_key = KEYS[k], KEYS[k + 1]
  local entry, outcome, expected = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local state, err, ids = ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local n = tonumber(ARGV[a + 6])
  local first = a + 7
  a = first + n
  k = k + 2
  local status = redis.call('HGET', status_key, 'status')
  local version = tonumber(redis.call('HGET', aggregate, 'version') or '0')
  if status == 'processed' or status == 'failed' then
    replies[#replies + 1] = {'duplicate', status}
  elseif broken[aggregate] or (expected >= 0 and version ~= expected) then
    broken[aggregate] = true
    replies[#replies + 1] = {'conflict', tostring(version)}
  elseif outcome == 'failed' then
    redis.call('HSET', status_key, 'status', 'failed', 'error', err)
    redis.call('EXPIRE', status_key, ttl)
    replies[#replies + 1] = {'ok'}
  else
    local reply = {'ok'}
    for i = 0, n - 1 do
      reply[#reply + 1] = redis.call('XADD', KEYS[1], '*', 'e', ARGV[first + i])
    end
    if n > 0 then
      redis.call('HSET', aggregate, 'version', expected + n, 'state', state)
      redis.call('HSET', status_key, 'status', 'processed', 'events', ids, 'position', reply[n + 1])
    else
      redis.call('HSET', status_key, 'status', 'processed', 'events', '')
    end
    redis.call('EXPIRE', status_key, ttl)
    replies[#replies + 1] = reply
  end
  if replies[#replies][1] ~= 'conflict' then
    redis.call('XACK', KEYS[3], group, entry)
  end
end
return replies
