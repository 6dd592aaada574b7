-- wrk script for the `health` scenario: GET /health; prints the RESULT line.
package.path = "loadtest/wrk/?.lua;" .. package.path
local report = require("report")

wrk.method = "GET"
wrk.path = "/health"

function done(summary, latency, requests)
   report.line("health", summary, latency)
end
