-- A delivery claims its job: the record made if a raw Celery message brought none; a
-- final, canceled or unserved job refused; else the lease taken and the job watched.
-- KEYS: job, doc, cancel, lease, running, jobs index, channel, tenant index
-- ARGV: record, document, ttl_s, now, job id, token, lease ttl ms, running score,
--       served (1/0), tenant (1/0)
local raw = redis.call('GET', KEYS[1])
local doc = redis.call('GET', KEYS[2])
if (not raw or not doc) and ARGV[1] == '' then return {'missing', '', ''} end
if not raw then
  raw = ARGV[1]
  redis.call('SET', KEYS[1], raw, 'EX', ARGV[3])
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
  redis.call('ZADD', KEYS[6], ARGV[4], ARGV[5])
  if ARGV[10] == '1' then redis.call('ZADD', KEYS[8], ARGV[4], ARGV[5]) end
  redis.call('PUBLISH', KEYS[7], raw)
  doc = ARGV[2]
end
if not doc then
  doc = ARGV[2]
  redis.call('SET', KEYS[2], doc, 'EX', ARGV[3])
end
local rec = cjson.decode(raw)
-- include final
if final then return {'final', raw, doc} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {'canceled', raw, doc} end
if ARGV[9] ~= '1' then return {'unserved', raw, doc} end
if not redis.call('SET', KEYS[4], ARGV[6], 'NX', 'PX', ARGV[7]) then
  if redis.call('GET', KEYS[4]) ~= ARGV[6] then return {'held', raw, doc} end
end
redis.call('ZADD', KEYS[5], ARGV[8], ARGV[5])
return {'leased', raw, doc}
