-- A compare-and-set from the record the claim read to the running one.
-- KEYS: job, channel. ARGV: the record as read, the new record, ttl_s
local raw = redis.call('GET', KEYS[1])
if raw ~= ARGV[1] then return {'changed', raw or ''} end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('PUBLISH', KEYS[2], ARGV[2])
return {'ok', ''}
