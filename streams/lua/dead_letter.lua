-- Move one entry that kept failing out of its stream, in one step: XACK it, XADD it to
-- the shard's dead letters with its error and attempts, and, for a command, set its
-- status `failed` (code `dead_lettered`). Fenced by the shard lease, like apply.lua.
--
-- KEYS[1] source stream   KEYS[2] dead-letter stream   KEYS[3] shard lease
-- KEYS[4] command status hash (a command whose record names it; absent otherwise)
-- ARGV[1] lease owner token   ARGV[2] consumer group   ARGV[3] entry id
-- ARGV[4] status ttl (s)   ARGV[5] prefix of a dead letter's id (`<context>:<shard>:`)
-- ARGV[6] the status's error message   ARGV[7..] the dead letter's fields and values
--
-- Reply: the dead letter's entry id; 'fenced' (lease lost: nothing written);
-- 'gone' (no longer pending: another owner settled it); 'final' (the command was
-- applied already: acknowledged, nothing dead-lettered).
if redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return 'fenced'
end
if redis.call('XACK', KEYS[1], ARGV[2], ARGV[3]) == 0 then
  return 'gone'
end
local status_key = KEYS[4]
if status_key then
  local status = redis.call('HGET', status_key, 'status')
  if status == 'processed' or status == 'failed' then
    return 'final'
  end
end
local fields = {}
for i = 7, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
if status_key then
  local dead_letter = ARGV[5] .. id
  local err = cjson.encode({code = 'dead_lettered', message = ARGV[6], dead_letter_id = dead_letter})
  redis.call('HSET', status_key, 'status', 'failed', 'error', err, 'dead_letter', dead_letter)
  redis.call('EXPIRE', status_key, tonumber(ARGV[4]))
end
return id
