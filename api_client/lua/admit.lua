-- One call per gateway submit: the rate bucket and the in-flight set are checked
-- together and written only when both allow, so a refused submit spends nothing.
-- KEYS: the rate bucket, the tenant's limits, its in-flight set.
-- ARGV: default rate, default cap, the job id to count ('' for a rate-only check), now,
-- and how long the set may live (the records' lifetime).
-- Returns {1, 0} (go), {0, seconds to wait} (rate) or {2, cap} (in flight).
local rate = tonumber(redis.call('HGET', KEYS[2], 'rate') or ARGV[1])
local tokens, now, burst = nil, nil, nil
if rate > 0 then
  burst = math.max(1, rate)
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
  tokens = tonumber(state[1]) or burst
  local at = tonumber(state[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
  if tokens < 1 then
    return {0, string.format('%.3f', (1 - tokens) / rate)}
  end
end
if ARGV[3] ~= '' then
  local cap = tonumber(redis.call('HGET', KEYS[2], 'max_in_flight') or ARGV[2])
  if cap > 0 and redis.call('ZCARD', KEYS[3]) >= cap then
    return {2, cap}
  end
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
  -- Outlives no job: a tenant idle for the records' lifetime starts afresh.
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
if rate > 0 then
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens - 1), 'at',
             string.format('%.6f', now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
end
return {1, 0}
