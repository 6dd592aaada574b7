-- wrk script for the `produce` scenario: POST /t/<id>?limit=0 with a 100-byte body, ids spread
-- over 1000 tunnels; prints the RESULT line.
package.path = "loadtest/wrk/?.lua;" .. package.path
local report = require("report")
local spread = require("spread")

local body = string.rep("x", 100)
local headers = { ["Content-Type"] = "text/plain" }

function init(args)
   spread.build(1000, function(i)
      return wrk.format("POST", "/t/lt-produce-" .. i .. "?limit=0", headers, body)
   end)
end

request = spread.pick

function done(summary, latency, requests)
   report.line("produce", summary, latency)
end
