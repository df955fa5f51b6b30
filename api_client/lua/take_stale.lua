-- Whether a run that lost the job marked its result.json stale; the mark is removed.
-- KEYS: once
-- include stale
return redis.call('HDEL', KEYS[1], STALE)
