-- wrk script for the `route` scenario: GET /small with `x-backstream-client-id: svc`, so that the
-- relay routes it to the agent svc (the path is forwarded as it is); the upstream, hit directly
-- with the same script, ignores the header. Prints the RESULT line.
package.path = "loadtest/wrk/?.lua;" .. package.path
local report = require("report")

wrk.method = "GET"
wrk.path = "/small"
wrk.headers["x-backstream-client-id"] = "svc"

function done(summary, latency, requests)
   report.line("route", summary, latency)
end
