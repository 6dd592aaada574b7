-- The presence records of every live instance.
-- KEYS[1] the set of instances; ARGV[1] the prefix of records, ARGV[2] now (unix ms)
-- Returns the records (an instance whose record just expired is skipped).
local records = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[2], '+inf')) do
  local record = redis.call('GET', ARGV[1] .. id)
  if record then
    records[#records + 1] = record
  end
end
return records
