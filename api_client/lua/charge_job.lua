-- Count one final job's usage (api_client/usage.py), once per job.
-- KEYS: once, usage day, usage tenants. ARGV: now, kind, model_s, keep s, tenant, ttl s
-- include charge

return charge(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
