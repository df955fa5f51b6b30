-- Renew the leases of a worker's running jobs in one call, and their place in the
-- running set. KEYS: running, lease of each job.
-- ARGV: ttl ms, running score, then token, id per job. Returns 1/0 per job.
local out = {}
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[2 * i - 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[2 * i])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
