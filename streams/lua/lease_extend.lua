-- Renew a lease only if this owner still holds it.
-- KEYS[1] lease   ARGV[1] owner token   ARGV[2] ttl (ms)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 0
