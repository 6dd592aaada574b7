//! Burrow's integration tests: one binary that runs the real `burrow` executable.
//!
//! - `support`: starting relays and redis-servers, the HTTP client, the per-store test macro.
//! - `conformance`: PROTOCOL.md part 1, written once and run against the memory store, the redis
//!   store and (when `BURROW_URL` is set) an external relay.
//! - `concurrency`: many producers and consumers racing on one tunnel, against every store.
//! - `redis_store`: what only the redis store has: the original key layout, several relay instances
//!   on one redis-server, and a store outage.
//! - `events`: PROTOCOL.md part 3 events (SSE and WebSocket subscribers) on both stores and two
//!   instances.
//! - `jobs`: PROTOCOL.md part 2 (trigger, done, WebSocket) on both stores and two instances.
//! - `lifecycle`: graceful shutdown, graceful upgrade and metrics.
//! - `startup`: configuration errors at start-up, and the access-log switch.
//! - `worker`: `burrow worker` as a real process: results, failures, timeouts, concurrency,
//!   redelivery after a worker dies, signals, relay outages and the token.
//! - `routing`: `burrow agent` as a real process against a hand-written relay side: the agent wire
//!   protocol byte by byte, the token, SIGTERM, outages, reconnects and configuration errors.

#[macro_use]
mod support;

mod concurrency;
mod conformance;
mod events;
mod jobs;
mod lifecycle;
mod redis_store;
mod routing;
mod startup;
mod worker;
