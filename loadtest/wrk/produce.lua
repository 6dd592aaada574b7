-- wrk script for the `produce` scenario: POST /t/<id>?limit=0 with a 100-byte body, ids spread
-- over 1000 tunnels; prints the RESULT line.
package.path = "loadtest/wrk/?.lua;" .. package.path
local report = require("report")

local body = string.rep("x", 100)
local headers = { ["Content-Type"] = "text/plain" }
local requests = {}

function init(args)
   -- Pre-built requests, so the Lua side costs wrk as little as possible.
   for i = 1, 1000 do
      requests[i] = wrk.format("POST", "/t/lt-produce-" .. i .. "?limit=0", headers, body)
   end
end

function request()
   return requests[math.random(1000)]
end

function done(summary, latency, requests)
   report.line("produce", summary, latency)
end
