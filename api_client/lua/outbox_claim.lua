-- Claim a due webhook retry for this pump: moved into its in-flight window.
-- KEYS: due. ARGV: event, now, in flight until. Returns the due time it had, or false.
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) > tonumber(ARGV[2]) then return false end
redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
return due
