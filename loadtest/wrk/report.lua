-- Shared by the wrk scripts: done() prints one parseable RESULT line (rate, p50/p99 latency,
-- errors). `extra(summary)` may append scenario fields. wrk counts status >= 400 in
-- summary.errors.status; socket errors are connect/read/write/timeout.
local report = {}

function report.line(scenario, summary, latency, extra)
   local e = summary.errors
   local secs = summary.duration / 1e6
   io.write(string.format(
      "RESULT scenario=%s requests=%d seconds=%.2f rate=%.0f p50_ms=%.3f p99_ms=%.3f max_ms=%.3f " ..
      "status_errors=%d socket_errors=%d%s\n",
      scenario, summary.requests, secs, summary.requests / secs,
      latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
      e.status, e.connect + e.read + e.write + e.timeout, extra or ""))
end

return report
