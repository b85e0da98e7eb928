-- Take up to ARGV[3] tokens from one limit (GCRA, a token bucket kept as one number:
-- the key holds the "theoretical arrival time" in µs of Redis's clock; it is full
-- when that time is now or past). One key, so any Redis Cluster slot will do.
--
-- KEYS[1] the limit's key
-- ARGV[1] µs between two tokens (1e6 / rate)   ARGV[2] burst (tokens saved up at most)
-- ARGV[3] tokens wanted (≥ 1)
-- Returns {granted, retry_us}: granted ≤ wanted; retry_us is how long until one more
-- token would be granted (0 if all were).
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local wanted = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then
  tat = now
end
local room = math.floor((now + tolerance - tat) / interval)
local granted = math.max(0, math.min(wanted, room))
if granted > 0 then
  tat = tat + granted * interval
  -- kept only while not full again: an idle tenant costs no memory
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
end
if granted == wanted then
  return {granted, 0}
end
return {granted, math.max(1, math.ceil(tat + interval - tolerance - now))}
