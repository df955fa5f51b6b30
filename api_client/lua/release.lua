-- The once-only claims of the side effects just done, then out of the running set,
-- then the lease (if still this run's).
-- KEYS: running, lease, once. ARGV: job id, token, ttl_s, now, claims...
for i = 5, #ARGV do redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[4]) end
if #ARGV >= 5 then redis.call('EXPIRE', KEYS[3], ARGV[3]) end
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 1
