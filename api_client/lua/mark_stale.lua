-- A run that lost its job wrote result.json anyway (see stale.lua): marked stale in the
-- same call that finds the job still running, so the run that ends it, later, writes
-- result.json again. Returns 1 (marked) or 0: the job ended meanwhile (or expired), and
-- the caller writes result.json again from its final record itself.
-- KEYS: job, once. ARGV: now, ttl s
-- include stale
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
-- include final
if final then return 0 end
redis.call('HSET', KEYS[2], STALE, ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
