-- Progress, or the final record (the lease checked, and taken back if it lapsed while
-- the job is still this run's), only while the record is this run's attempt. A final
-- write charges the job's usage (once per job) and, unless a run that lost the job
-- marked its result.json stale ('rewrite': this run writes it again, then claims and
-- releases), claims result.json and, with release, lets go of the job.
-- KEYS: job, channel, lease, once, running, usage day, usage tenants
-- ARGV: new record, ttl_s, attempt, token, lease ttl ms, final (1/0), claim
--       result.json (1/0), now, release (1/0), job id, kind, model_s, usage keep s,
--       usage tenant, claims...
-- include stale

-- include charge

-- A final write that is not this run's to make wrote its result.json all the same:
-- marked stale in this same call, so whichever run ends the job writes it again.
local function stale_and(answer)
  if ARGV[6] == '1' then
    redis.call('HSET', KEYS[4], STALE, ARGV[8])
    redis.call('EXPIRE', KEYS[4], ARGV[2])
  end
  return answer
end

local raw = redis.call('GET', KEYS[1])
if not raw then return {'gone', ''} end
local rec = cjson.decode(raw)
-- include final
if final then return {'final', raw} end
if rec['status'] ~= 'running' or tostring(rec['attempt']) ~= ARGV[3] then
  return stale_and({'moved', raw})
end
if ARGV[6] == '1' then
  local holder = redis.call('GET', KEYS[3])
  if holder ~= ARGV[4] then
    if holder then return stale_and({'lost', raw}) end
    redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[1])
if ARGV[6] == '1' then
  charge(KEYS[4], KEYS[6], KEYS[7], ARGV[8], ARGV[11], ARGV[12], ARGV[13], ARGV[14], ARGV[2])
end
if ARGV[6] == '1' and redis.call('HDEL', KEYS[4], STALE) == 1 then
  return {'rewrite', ''}
end
if ARGV[7] == '1' then
  redis.call('HSETNX', KEYS[4], 'result.json', ARGV[8])
  redis.call('EXPIRE', KEYS[4], ARGV[2])
end
if ARGV[9] == '1' then
  for i = 15, #ARGV do redis.call('HSETNX', KEYS[4], ARGV[i], ARGV[8]) end
  redis.call('EXPIRE', KEYS[4], ARGV[2])
  redis.call('ZREM', KEYS[5], ARGV[10])
  redis.call('DEL', KEYS[3])
end
return {'ok', ''}
