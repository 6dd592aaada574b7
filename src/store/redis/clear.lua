-- Empties a tunnel: its messages and its pending state. The stream itself is kept, emptied, so
-- that it remembers its last id and a new message never reuses the id of a cleared one (whose
-- reply may still be waiting to be read), until it expires if it is set to. A key that is not a
-- stream is deleted.
-- KEYS[1] stream
-- ARGV[1] group, ARGV[2] how long an emptied stream is kept, in ms (0: for ever)
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'none' then
  return 0
end
if kind ~= 'stream' then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('XTRIM', KEYS[1], 'MAXLEN', 0)
-- The group goes with its pending list; the next consume creates it again.
redis.pcall('XGROUP', 'DESTROY', KEYS[1], ARGV[1])
expire_if_emptied(KEYS[1], ARGV[1], ARGV[2])
return 0
