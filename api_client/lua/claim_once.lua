-- True for exactly one caller per (job, what); the expiry set by that caller.
-- KEYS: once. ARGV: what, now, ttl s
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  return redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return 0
