-- Publishes an event, fenced like the scripts that change data: a PUBLISH the relay answered 503
-- for (the server stalled) must not reach subscribers later, or a publisher that retries would
-- have its event delivered twice.
-- ARGV[1] channel, ARGV[2] the event. Returns the number of receivers, as PUBLISH does.
return redis.call('PUBLISH', ARGV[1], ARGV[2])
