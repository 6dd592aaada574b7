-- Which waited keys may have something for their waiters (the periodic re-check, one call for
-- many keys).
-- KEYS: tunnel streams and reply lists. ARGV[3i-2]: 'm' when KEYS[i] is a stream, 'r' for a list;
-- for a stream, ARGV[3i-1] is its consumers' group and ARGV[3i] the ms after which its waiters
-- take back a message left unacknowledged ('' when none of them does).
-- Returns one 1 or 0 per key: a message never handed out, one unacknowledged that long, or the
-- reply present. A stream that cannot be read (a key of another type) counts as ready: its
-- waiters' own reads report why.

local function field(info, name)
  for i = 1, #info, 2 do
    if info[i] == name then
      return info[i + 1]
    end
  end
end

local function has_message(stream, group, idle)
  if redis.call('XLEN', stream) == 0 then
    return false
  end
  local delivered
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    if field(info, 'name') == group then
      delivered = field(info, 'last-delivered-id')
    end
  end
  -- Without its group (made by the first consume) nothing was handed out yet.
  if not delivered or #redis.call('XRANGE', stream, '(' .. delivered, '+', 'COUNT', 1) > 0 then
    return true
  end
  return idle ~= '' and #redis.call('XPENDING', stream, group, 'IDLE', idle, '-', '+', 1) > 0
end

local ready = {}
for i, key in ipairs(KEYS) do
  local a = 3 * (i - 1)
  local found
  if ARGV[a + 1] == 'm' then
    local ok, message = pcall(has_message, key, ARGV[a + 2], ARGV[a + 3])
    found = not ok or message
  else
    found = redis.call('EXISTS', key) == 1
  end
  ready[i] = found and 1 or 0
end
return ready
