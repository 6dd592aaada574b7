-- Acknowledges a message: drops it from the pending set and from the stream. Idempotent.
-- KEYS[1] stream
-- ARGV[1] group, ARGV[2] message id, ARGV[3] how long an emptied stream is kept, in ms (0: for
-- ever)
local reply = redis.pcall('XACK', KEYS[1], ARGV[1], ARGV[2])
-- Without the group nothing can be pending; any other error is real.
if type(reply) == 'table' and reply.err and not string.find(reply.err, 'NOGROUP', 1, true) then
  error(reply)
end
redis.call('XDEL', KEYS[1], ARGV[2])
expire_if_emptied(KEYS[1], ARGV[1], ARGV[3])
return 1
