-- A reply, left in place: what `take_reply.lua` would hand out.
-- KEYS[1] reply list, KEYS[2] reply Content-Type
-- Returns {body, Content-Type or nil} or nil.
local body = redis.call('LINDEX', KEYS[1], -1)
if not body then
  return false
end
return { body, redis.call('GET', KEYS[2]) }
