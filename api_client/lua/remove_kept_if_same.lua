-- Remove a kept webhook delivery unless it was kept again meanwhile.
-- KEYS: kept events, their index. ARGV: webhook id, the entry as read.
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
return 0
