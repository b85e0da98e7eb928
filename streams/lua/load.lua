-- Read the version and state of several aggregates of one shard in one step
-- (one command instead of a pipeline of HMGETs: the client's cost is per command).
-- KEYS: aggregate state hashes, all in one shard's slot.
-- Reply: one {version, state} per key (nil, nil for an aggregate that does not exist).
local reply = {}
for i, key in ipairs(KEYS) do
  reply[i] = redis.call('HMGET', key, 'version', 'state')
end
return reply
