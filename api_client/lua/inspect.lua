-- The sweeper looks at one due job of the running set (workers/runtime/failover.py)
-- and claims it for a re-send or a finalize by moving it a grace ahead.
-- KEYS: running, job, lease, re-send count. ARGV: job id, now, recheck_s, grace_s,
-- most grace_s, count ttl_s
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) > tonumber(ARGV[2]) then
  return {'skip', '', '0', ''}
end
local raw = redis.call('GET', KEYS[2])
if not raw then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return {'gone', '', '0', ''}
end
local rec = cjson.decode(raw)
local status = tostring(rec['status'])
local attempt = tostring(tonumber(rec['attempt']) or 0)
local worker = rec['worker']
if type(worker) ~= 'string' then worker = '' end
local pttl = redis.call('PTTL', KEYS[3])
if pttl ~= -2 then
  local wait = tonumber(ARGV[3])
  if pttl > 0 then wait = pttl / 1000 + 1 end
  redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + wait, ARGV[1])
  return {'held', status, attempt, worker}
end
local grace = tonumber(ARGV[4])
local action = 'finalize'
if status ~= 'succeeded' and status ~= 'failed' and status ~= 'canceled' then
  action = 'redispatch'
  local sent = redis.call('INCR', KEYS[4])
  redis.call('EXPIRE', KEYS[4], ARGV[6])
  grace = math.min(grace * 2 ^ math.min(sent - 1, 30), tonumber(ARGV[5]))
end
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + grace, ARGV[1])
return {action, status, attempt, worker}
