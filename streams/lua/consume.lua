-- Mark commands a worker has read as `consumed` (only those still `pending`).
-- KEYS: command status hashes, all in one shard's slot.
local changed = 0
for _, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'status') == 'pending' then
    redis.call('HSET', key, 'status', 'consumed')
    changed = changed + 1
  end
end
return changed
