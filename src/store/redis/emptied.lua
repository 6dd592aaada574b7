-- Put before the scripts that can empty a tunnel (see BURROW_EMPTY_TUNNEL_TTL).
-- Sets `stream` to expire after `ttl` ms once it holds no message and its group has nothing
-- pending (a message trimmed while pending keeps its entry, and may still be answered); a `ttl`
-- of 0 keeps it for ever, as the original did.
local function expire_if_emptied(stream, group, ttl)
  if tonumber(ttl) == 0 or redis.call('XLEN', stream) > 0 then
    return
  end
  local pending = redis.pcall('XPENDING', stream, group)
  if type(pending) == 'table' and not pending.err and tonumber(pending[1]) > 0 then
    return
  end
  redis.call('PEXPIRE', stream, ttl)
end
