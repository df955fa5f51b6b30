-- Returns {list index, position in that list} of the first message whose headers carry
-- the id; kombu LPUSHes and BRPOPs, so the message nearest the tail runs first.
-- KEYS: the queue's priority lists. ARGV: the id as a JSON string, the id
local needle = ARGV[1]  -- the id as a JSON string, quotes included
for i, name in ipairs(KEYS) do
  local items = redis.call('LRANGE', name, 0, -1)
  for j, item in ipairs(items) do
    -- A cheap substring test first; only a candidate is decoded to compare its id.
    if string.find(item, needle, 1, true) then
      local ok, message = pcall(cjson.decode, item)
      if ok and type(message) == 'table' and type(message.headers) == 'table'
          and message.headers.id == ARGV[2] then
        return {i, j, #items, item}
      end
    end
  end
end
return nil
