-- Where a message stands.
-- KEYS[1] stream
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] message id
-- Returns 'pending', 'queued' or 'gone'.
local stream, group, consumer, id = KEYS[1], ARGV[1], ARGV[2], ARGV[3]

local pending = redis.pcall('XPENDING', stream, group, id, id, 1, consumer)
if type(pending) == 'table' and pending.err then
  -- No stream or no group: nothing is pending, but the stream may still hold the message.
  if not string.find(pending.err, 'NOGROUP', 1, true) then
    error(pending)
  end
elseif #pending > 0 then
  return 'pending'
end

if #redis.call('XRANGE', stream, id, id, 'COUNT', 1) > 0 then
  return 'queued'
end
return 'gone'
