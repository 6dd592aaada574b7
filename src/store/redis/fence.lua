-- Put before every script that changes data (see clock.rs). ARGV[1] is the time on this server's
-- clock, in Unix ms, after which the relay may no longer wait for the call (0: no fence); the
-- script's own arguments follow, and are ARGV from here on. A call that starts later does
-- nothing and answers LATE, so a client told 503 can send it again: nothing lost, nothing twice.
if redis.replicate_commands then
  redis.replicate_commands()
end
local fence = tonumber(ARGV[1])
local ARGV = { unpack(ARGV, 2) }
if fence > 0 then
  local now = redis.call('TIME')
  if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > fence then
    return redis.error_reply('LATE the relay stopped waiting for this call')
  end
end
