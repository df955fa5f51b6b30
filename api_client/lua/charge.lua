-- charge(once, day, tenants, now, kind, model_s, keep_s, tenant, record_ttl): count a
-- final job's usage once (a field of its once-hash), in every script that ends a job.
local function charge(once, day, tenants, now, kind, model_s, keep_s, tenant, record_ttl)
  if redis.call('HSETNX', once, 'usage', now) == 0 then return 0 end
  redis.call('EXPIRE', once, record_ttl)
  redis.call('HINCRBY', day, kind .. '.jobs', 1)
  redis.call('HINCRBYFLOAT', day, kind .. '.model_s', model_s)
  redis.call('EXPIRE', day, keep_s)
  redis.call('SADD', tenants, tenant)
  return 1
end
