-- Hands the next message of tunnels to their consumers; each one atomic step. One call carries
-- the consumes that queued up on one relay thread while its previous call ran (often just one).
-- KEYS[i] the stream of consume i
-- ARGV[5i-4] group, ARGV[5i-3] consumer, ARGV[5i-2] 'remove', 'pending' or 'new' (kept pending,
-- but only a message never handed out is taken),
-- ARGV[5i-1] ('pending') ms a message must have stayed unacknowledged before it is handed out
-- again, ARGV[5i] how long an emptied stream is kept, in ms (0: for ever)
-- Returns, per consume, {id, {field, value, ...}}, false (nothing to hand out) or {'error', why}.

-- The first entry of an XREADGROUP reply: {{stream, {{id, fields}}}} or nil.
local function first(read)
  if not read or not read[1] or not read[1][2] then
    return nil
  end
  return read[1][2][1]
end

local function consume(stream, group, consumer, mode, idle, empty_ttl)
  -- A tunnel nobody produced to has no stream; creating one here would leave empty keys behind.
  if redis.call('EXISTS', stream) == 0 then
    return false
  end

  -- Runs a group command; a stream without the group (made by a producer) gets it at id 0, so
  -- messages produced before the first consume are delivered too.
  local function in_group(...)
    local reply = redis.pcall(...)
    if type(reply) == 'table' and reply.err then
      if not string.find(reply.err, 'NOGROUP', 1, true) then
        error(reply)
      end
      redis.call('XGROUP', 'CREATE', stream, group, '0')
      reply = redis.call(...)
    end
    return reply
  end

  local acked_away = false
  if mode == 'pending' then
    -- The oldest pending message idle long enough is handed out again: XPENDING's IDLE filter
    -- finds it in one scan of the pending list (XAUTOCLAIM with COUNT 1 took ~17 µs a call and
    -- several calls per consume), XCLAIM takes it. A message deleted while pending cannot be
    -- handed out: XCLAIM returns no entry for it (nil in Redis 6.2; Redis 7 also drops it from
    -- the pending list), so it is acknowledged away and the next one tried, a bounded number of
    -- times so that a huge pending list cannot stall the server.
    for _ = 1, 100 do
      local oldest = in_group('XPENDING', stream, group, 'IDLE', idle, '-', '+', 1)[1]
      if not oldest then
        break
      end
      local entry = redis.call('XCLAIM', stream, group, consumer, idle, oldest[1])[1]
      if type(entry) == 'table' and entry[2] then
        return entry
      end
      redis.call('XACK', stream, group, oldest[1])
      acked_away = true
    end
  end
  if mode ~= 'remove' then
    local entry = first(in_group('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1,
      'STREAMS', stream, '>'))
    -- The entries acknowledged away may have been all that kept the stream.
    if not entry and acked_away then
      expire_if_emptied(stream, group, empty_ttl)
    end
    return entry or false
  end

  -- Removed as it is handed out: read without a pending entry and delete in the same step, so
  -- the message is delivered once and can never be lost between the read and the delete.
  local entry = first(in_group('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'NOACK',
    'STREAMS', stream, '>'))
  if not entry then
    return false
  end
  redis.call('XDEL', stream, entry[1])
  expire_if_emptied(stream, group, empty_ttl)
  return entry
end

-- A consume that fails (a key of another type) fails alone: {'error', why}.
local replies = {}
for i, stream in ipairs(KEYS) do
  local a = 5 * (i - 1)
  local ok, reply = pcall(consume, stream, ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4],
    ARGV[a + 5])
  if not ok then
    reply = { 'error', type(reply) == 'table' and reply.err or tostring(reply) }
  end
  replies[i] = reply
end
return replies
