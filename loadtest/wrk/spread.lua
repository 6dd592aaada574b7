-- Shared by the wrk scripts that spread requests over many ids: `spread.build(n, make)` pre-builds
-- `make(i)` for i = 1..n (so the Lua side costs wrk as little as possible), and `spread.pick()`
-- answers one of them at random.
local spread = {}
local requests = {}

function spread.build(n, make)
   for i = 1, n do
      requests[i] = make(i)
   end
end

function spread.pick()
   return requests[math.random(#requests)]
end

return spread
