-- Hands out a reply and deletes it (read once), with the job record of its message if it is a
-- job: a job's final state is handed out once, in the same step as its record goes.
-- KEYS[1] reply list, KEYS[2] reply Content-Type, KEYS[3] the message's job record
-- Returns {body, Content-Type or nil} or nil.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
-- First, so that a refused DEL fails the call before the reply is taken.
redis.call('DEL', KEYS[3])
local body = redis.call('RPOP', KEYS[1])
return { body, redis.call('GETDEL', KEYS[2]) }
