-- Switch an adapter's registry field to a new entry only if it still holds the revision
-- the publisher saw (ARGV[2], "" for none), or an entry the same job published (ARGV[4]:
-- a re-publish after a crash). Returns {1} or {0, current revision, current job id}.
-- KEYS: the adapters hash. ARGV: field, revision seen, new entry, job id
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local e = cjson.decode(cur)
  local stamp = e['revision'] or e['version'] or ''
  local job = e['job_id']
  if type(job) ~= 'string' then job = '' end
  if stamp ~= ARGV[2] and (ARGV[4] == '' or job ~= ARGV[4]) then
    return {0, stamp, job}
  end
elseif ARGV[2] ~= '' then
  return {0, '', ''}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return {1}
