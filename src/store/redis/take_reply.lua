-- Hands out a reply and deletes it (read once).
-- KEYS[1] reply list, KEYS[2] reply Content-Type
-- Returns {body, Content-Type or nil} or nil.
local body = redis.call('RPOP', KEYS[1])
if not body then
  return false
end
return { body, redis.call('GETDEL', KEYS[2]) }
