-- Put a claimed retry back at its due time, only if it is still this pump's claim.
-- KEYS: due. ARGV: event, in flight until, due time to put back.
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1])) == tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
  return 1
end
return 0
