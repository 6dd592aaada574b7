-- wrk script for the `pairs` scenario: produce then consume, a pair per message. wrk's Lua state
-- is per thread, not per connection, so each thread runs a state machine over its own 32
-- tunnels: a GET is sent only for a produce already answered 201 (so it finds a message), POSTs
-- otherwise. pairs = GET 200s; a GET answered 204 (its produce raced it) gives the credit back.
package.path = "loadtest/wrk/?.lua;" .. package.path
local report = require("report")

local threads = {}

function setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

local body = string.rep("x", 100)
local tunnels = 32
local posts, gets, credit = {}, {}, 0
local np, ng = 0, 0
pairs_done, empty, failed = 0, 0, 0

function init(args)
   for k = 1, tunnels do
      local path = "/t/lt-pairs-" .. id .. "-" .. k
      posts[k] = wrk.format("POST", path .. "?limit=0", nil, body)
      gets[k] = wrk.format("GET", path, nil, nil)
   end
end

function request()
   if credit > 0 then
      credit = credit - 1
      ng = ng % tunnels + 1
      return gets[ng]
   end
   np = np % tunnels + 1
   return posts[np]
end

function response(status, headers, body)
   if status == 201 then
      credit = credit + 1
   elseif status == 200 then
      pairs_done = pairs_done + 1
   elseif status == 204 then
      empty = empty + 1
      credit = credit + 1
   else
      failed = failed + 1
   end
end

function done(summary, latency, requests)
   local total, empties, fails = 0, 0, 0
   for _, t in ipairs(threads) do
      total = total + t:get("pairs_done")
      empties = empties + t:get("empty")
      fails = fails + t:get("failed")
   end
   local secs = summary.duration / 1e6
   report.line("pairs", summary, latency, string.format(
      " pairs=%d pairs_per_s=%.0f get_204=%d non2xx=%d", total, total / secs, empties, fails))
end
