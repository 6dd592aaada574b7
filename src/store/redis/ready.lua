-- Which waited keys may have something for their waiters (the periodic re-check, one call for
-- many keys).
-- KEYS: tunnel streams and reply lists; ARGV[i]: 'm' when KEYS[i] is a stream, 'r' for a list.
-- Returns one 1 or 0 per key: a stream holding messages, or a reply present.
local ready = {}
for i, key in ipairs(KEYS) do
  local found
  if ARGV[i] == 'm' then
    found = redis.call('XLEN', key) > 0
  else
    found = redis.call('EXISTS', key) == 1
  end
  ready[i] = found and 1 or 0
end
return ready
