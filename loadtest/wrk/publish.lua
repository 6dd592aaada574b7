-- wrk script for the `publish` scenario: POST /e/<topic> with a 1 KiB event, topics spread over
-- 1000 that nobody subscribes to; prints the RESULT line.
package.path = "loadtest/wrk/?.lua;" .. package.path
local report = require("report")

local body = string.rep("x", 1024)
local requests = {}

function init(args)
   -- Pre-built requests, so the Lua side costs wrk as little as possible.
   for i = 1, 1000 do
      requests[i] = wrk.format("POST", "/e/lt-publish-" .. i, nil, body)
   end
end

function request()
   return requests[math.random(1000)]
end

function done(summary, latency, requests)
   report.line("publish", summary, latency)
end
