-- Appends a message to a tunnel's stream, bounded, and announces it; one atomic step, so
-- concurrent producers can never push a stream past its limit.
-- KEYS[1] stream
-- ARGV[1] 'limit' (refuse when full) or 'trim' (drop the oldest beyond the bound), ARGV[2] the bound,
-- ARGV[3] body, ARGV[4] wake-up channel, ARGV[5] wake-up payload, ARGV[6] Content-Type (optional)
-- Returns {'full', size} or {'stored', id, size after} ('limit') or {'stored', id} ('trim').
local stream, mode, bound = KEYS[1], ARGV[1], ARGV[2]
local fields = { 'data', ARGV[3] }
if ARGV[6] then
  fields[3] = 'ct'
  fields[4] = ARGV[6]
end

local id, size
if mode == 'limit' then
  local len = redis.call('XLEN', stream)
  if len >= tonumber(bound) then
    return { 'full', len }
  end
  id = redis.call('XADD', stream, '*', unpack(fields))
  size = len + 1
else
  -- Exact MAXLEN: the tunnel holds at most `bound` messages, never "about" that many.
  id = redis.call('XADD', stream, 'MAXLEN', bound, '*', unpack(fields))
end

redis.call('PUBLISH', ARGV[4], ARGV[5])
if size then
  return { 'stored', id, size }
end
return { 'stored', id }
