-- wrk script for the `publish` scenario: POST /e/<topic> with a 1 KiB event, topics spread over
-- 1000 that nobody subscribes to; prints the RESULT line.
package.path = "loadtest/wrk/?.lua;" .. package.path
local report = require("report")
local spread = require("spread")

local body = string.rep("x", 1024)

function init(args)
   spread.build(1000, function(i)
      return wrk.format("POST", "/e/lt-publish-" .. i, nil, body)
   end)
end

request = spread.pick

function done(summary, latency, requests)
   report.line("publish", summary, latency)
end
