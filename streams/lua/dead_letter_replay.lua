-- Put a dead command back at the end of its command stream, in one step: XADD the
-- same record (same command id), reset its status to `pending` (so apply.lua's dedup
-- lets it through, once) and delete the dead letter.
--
-- KEYS[1] dead-letter stream   KEYS[2] command stream
-- KEYS[3] command status hash (absent for a record too broken to name it)
-- ARGV[1] the dead letter's entry id   ARGV[2] status ttl (s)
-- ARGV[3] command type   ARGV[4] aggregate id
--
-- Reply: the new command-stream entry id; 'gone' (no such dead letter);
-- 'processed' (the status says applied: nothing is replayed, the dead letter stays).
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then
  return 'gone'
end
local fields = found[1][2]
local raw = ''
for i = 1, #fields, 2 do
  if fields[i] == 'raw' then
    raw = fields[i + 1]
  end
end
local status_key = KEYS[3]
if status_key and redis.call('HGET', status_key, 'status') == 'processed' then
  return 'processed'
end
local entry = redis.call('XADD', KEYS[2], '*', 'c', raw)
if status_key then
  redis.call('HDEL', status_key, 'error', 'dead_letter', 'events', 'position')
  redis.call('HSET', status_key, 'status', 'pending', 'entry', entry, 'type', ARGV[3],
    'aggregate_id', ARGV[4])
  redis.call('EXPIRE', status_key, tonumber(ARGV[2]))
end
redis.call('XDEL', KEYS[1], ARGV[1])
return entry
