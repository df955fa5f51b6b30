-- Watch a job unless a lease is held (a run that started watches it itself).
-- KEYS: running, lease. ARGV: job id, score
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
end
return 0
