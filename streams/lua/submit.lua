-- Accept a command: record its status and append it to its shard's command stream.
-- Idempotent by command id: a known id appends nothing and answers its current status.
--
-- KEYS[1] command status hash   KEYS[2] command stream
-- ARGV[1] command type   ARGV[2] aggregate id   ARGV[3] encoded CommandRecord
-- ARGV[4] status ttl (s)   ARGV[5] accepted-at (RFC 3339)
local known = redis.call('HMGET', KEYS[1], 'status', 'type', 'aggregate_id')
if known[1] then
  return {'known', known[1], known[2], known[3]}
end
local entry = redis.call('XADD', KEYS[2], '*', 'c', ARGV[3])
redis.call('HSET', KEYS[1], 'status', 'pending', 'type', ARGV[1], 'aggregate_id', ARGV[2],
  'accepted_at', ARGV[5], 'entry', entry)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return {'new', 'pending', ARGV[1], ARGV[2]}
