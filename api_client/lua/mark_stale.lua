-- A run that lost its job wrote result.json anyway: mark it stale (see stale.lua).
-- KEYS: once. ARGV: now, ttl s
-- include stale
redis.call('HSET', KEYS[1], STALE, ARGV[1])
return redis.call('EXPIRE', KEYS[1], ARGV[2])
