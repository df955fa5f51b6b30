-- Where a queued job's message is, found at a cost that does not grow with the queue.
-- kombu LPUSHes and workers BRPOP, so each list runs newest (head) to oldest (tail), the
-- order of the jobs' creation times in the records' index: a binary search by that
-- time finds the message in about log2(length) LINDEX calls. Lists ahead of the one
-- holding it count whole.
-- KEYS: the queue's lists (most urgent first), then the records' index of jobs.
-- ARGV[1]: the job id. Returns the messages ahead of it, or -2 when not found this way
-- (no creation time, or a message re-sent out of order): then queue_scan looks.
local index = KEYS[#KEYS]
local mine = tonumber(redis.call('ZSCORE', index, ARGV[1]))
if not mine then return -2 end
local function at(list, i)
  local item = redis.call('LINDEX', list, i)
  if not item then return nil, nil end
  local id = string.match(item, '"id": "([%w%-]+)"')
  if not id then
    local ok, message = pcall(cjson.decode, item)
    if ok and type(message) == 'table' and type(message.headers) == 'table' then
      id = message.headers.id
    end
  end
  if not id then return nil, nil end
  return tonumber(redis.call('ZSCORE', index, id)), id
end
local ahead = 0
for k = 1, #KEYS - 1 do
  local list = KEYS[k]
  local n = redis.call('LLEN', list)
  if n > 0 then
    local lo, hi = 0, n
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      local created, id = at(list, mid)
      if id == ARGV[1] then return ahead + (n - 1 - mid) end
      -- Unknown times count as newer: a raw producer's message not recorded yet.
      if created == nil or created >= mine then lo = mid + 1 else hi = mid end
    end
    for _, i in ipairs({lo - 1, lo}) do
      if i >= 0 and i < n then
        local _, id = at(list, i)
        if id == ARGV[1] then return ahead + (n - 1 - i) end
      end
    end
    ahead = ahead + n
  end
end
return -2
