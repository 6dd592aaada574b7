-- Appends messages to tunnels' streams, bounded, and announces each; every message is one
-- atomic step, so concurrent producers can never push a stream past its limit, and a job is never
-- queued without its record. One call carries the produces that queued up on one relay thread
-- while its previous call ran (often just one).
-- KEYS[i] the stream of message i
-- ARGV[8i-7] 'limit' (refuse when full) or 'trim' (drop the oldest beyond the bound),
-- ARGV[8i-6] the bound, ARGV[8i-5] body, ARGV[8i-4] wake-up channel, ARGV[8i-3] wake-up payload,
-- ARGV[8i-2] Content-Type ('' for none), ARGV[8i-1] for a job, the key its record is kept under
-- without the message id ('' for none), ARGV[8i] the record's time to live in milliseconds
-- Returns, per message, {'full', size} or {'stored', id, size after} ('limit') or {'stored', id}
-- ('trim'), or {'error', why}.
local function produce(stream, mode, bound, body, channel, payload, content_type, job, job_ttl)
  local fields = { 'data', body }
  if content_type ~= '' then
    fields[3] = 'ct'
    fields[4] = content_type
  end

  local id, size, len
  if mode == 'limit' then
    len = redis.call('XLEN', stream)
    if len >= tonumber(bound) then
      return { 'full', len }
    end
  end
  -- A script's writes are not undone when it fails, so the announcement, which a server may
  -- refuse (an ACL without PUBLISH), comes before them: a refused produce stores nothing. A
  -- waiter it wakes reads with a command of its own, which the server runs after this script.
  redis.call('PUBLISH', channel, payload)
  if len then
    id = redis.call('XADD', stream, '*', unpack(fields))
    size = len + 1
  else
    -- Exact MAXLEN: the tunnel holds at most `bound` messages, never "about" that many.
    id = redis.call('XADD', stream, 'MAXLEN', bound, '*', unpack(fields))
  end
  if job ~= '' then
    redis.call('SET', job .. id, body, 'PX', job_ttl)
  end
  -- A stream that holds a message never expires, whoever set it to (BURROW_EMPTY_TUNNEL_TTL
  -- once it was emptied, or an operator).
  redis.call('PERSIST', stream)

  if size then
    return { 'stored', id, size }
  end
  return { 'stored', id }
end

-- A message that fails (a key of another type) fails alone: {'error', why}.
local replies = {}
for i, stream in ipairs(KEYS) do
  local a = 8 * (i - 1)
  local ok, reply = pcall(produce, stream, ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4],
    ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], ARGV[a + 8])
  if not ok then
    reply = { 'error', type(reply) == 'table' and reply.err or tostring(reply) }
  end
  replies[i] = reply
end
return replies
