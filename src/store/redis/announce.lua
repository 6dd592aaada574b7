-- Records this instance's presence (its address and agents) until it expires, and forgets
-- instances whose records have expired.
-- KEYS[1] the instance's record, KEYS[2] the set of instances (score: expiry, unix ms)
-- ARGV[1] instance id, ARGV[2] record, ARGV[3] time to live (ms), ARGV[4] now (unix ms)
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], tonumber(ARGV[4]) + tonumber(ARGV[3]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
return 1
