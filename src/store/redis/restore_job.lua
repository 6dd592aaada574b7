-- Puts back a job's final state that was taken but could not be delivered, as `reply.lua` and
-- `produce.lua` wrote it: the record and, if it had one, the reply with its Content-Type.
-- KEYS[1] reply list, KEYS[2] reply Content-Type, KEYS[3] the message's job record
-- ARGV[1] ttl in ms, ARGV[2] record, ARGV[3] reply body (optional), ARGV[4] Content-Type (optional)
if ARGV[3] then
  if ARGV[4] then
    redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[1])
  end
  redis.call('RPUSH', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
-- Last: a record without its reply would read as a job that left its queue.
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[1])
return 1
