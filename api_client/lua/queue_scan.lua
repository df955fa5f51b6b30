-- The fallback of queue_search: a scan from the end workers take from, at most ARGV[2]
-- messages. Returns the messages ahead, -1 when the budget ran out first, -2 when the
-- message is in none of the lists (a worker holds it: it is next).
local budget = tonumber(ARGV[2])
local ahead = 0
for _, name in ipairs(KEYS) do
  local length = redis.call('LLEN', name)
  local seen = 0
  while seen < length do
    if budget <= 0 then return -1 end
    local take = math.min(100, length - seen, budget)
    local items = redis.call('LRANGE', name, -(seen + take), -(seen + 1))
    for j = #items, 1, -1 do
      if string.find(items[j], ARGV[1], 1, true) then
        return ahead + seen + (#items - j)
      end
    end
    seen = seen + take
    budget = budget - take
  end
  ahead = ahead + length
end
return -2
