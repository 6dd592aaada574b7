-- Acknowledges a pending message with a reply, keeps the reply for a while and announces it.
-- KEYS[1] stream, KEYS[2] reply list, KEYS[3] reply Content-Type, KEYS[4] the message's job record
-- (if it is a job: then kept as long as the reply)
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] message id, ARGV[4] body, ARGV[5] ttl in ms,
-- ARGV[6] wake-up channel, ARGV[7] wake-up payload, ARGV[8] how long an emptied stream is kept,
-- in ms (0: for ever), ARGV[9] Content-Type (optional)
-- Returns 1 when stored, 0 when the message was not pending (nothing stored).
local stream, group, consumer, id = KEYS[1], ARGV[1], ARGV[2], ARGV[3]

local pending = redis.pcall('XPENDING', stream, group, id, id, 1, consumer)
if type(pending) == 'table' and pending.err then
  -- No stream or no group: nothing is pending.
  if string.find(pending.err, 'NOGROUP', 1, true) then
    return 0
  end
  error(pending)
end
if #pending == 0 then
  return 0
end

-- A script's writes are not undone when it fails, so the steps that can be refused (the
-- announcement by an ACL without PUBLISH, a key of another type, out of memory) come first: then
-- the message stays pending, to be answered again. A waiter the announcement wakes reads with a
-- command of its own, which the server runs after this script.
redis.call('PUBLISH', ARGV[6], ARGV[7])
if ARGV[9] then
  redis.call('SET', KEYS[3], ARGV[9], 'PX', ARGV[5])
end
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('XACK', stream, group, id)
redis.call('XDEL', stream, id)
redis.call('PEXPIRE', KEYS[4], ARGV[5])
expire_if_emptied(stream, group, ARGV[8])
return 1
