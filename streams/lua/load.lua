-- The start of a worker's batch on one shard, in one step: mark the batch's commands
-- `consumed` (those still `pending`) and read the aggregates' versions and states.
-- (One command instead of a pipeline: the client's cost is per command.)
--
-- KEYS[1..n] command status hashes   KEYS[n+1..] aggregate state hashes (one slot)
-- ARGV[1] n
-- Reply: one {version, state} per aggregate (nil, nil for one that does not exist).
local n = tonumber(ARGV[1])
for i = 1, n do
  if redis.call('HGET', KEYS[i], 'status') == 'pending' then
    redis.call('HSET', KEYS[i], 'status', 'consumed')
  end
end
local reply = {}
for i = n + 1, #KEYS do
  reply[#reply + 1] = redis.call('HMGET', KEYS[i], 'version', 'state')
end
return reply
