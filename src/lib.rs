//! Burrow: an HTTP relay for parties that cannot reach each other directly.
//!
//! Producers and consumers meet at a tunnel id; Burrow is a drop-in replacement for
//! http-event-relay (see `docs/PROTOCOL.md`), served by Pingora and backed by an embedded store or by
//! KeyDB / Redis streams.
//!
//! # Layout
//! - [`config`]: the environment, read once into a typed `Config`; errors name the variable.
//! - `cli`: the command line (`burrow serve | worker | agent`), parsed with clap.
//! - `server`: builds Pingora's `Server` from `conf/burrow.yaml` and the config, and runs it;
//!   `signals`: what SIGTERM and SIGQUIT do to it (a SIGQUIT with no new relay waiting is refused);
//!   `drain`: the routed requests a stopping relay waits for before it exits.
//! - `http`: the Pingora app — routing (`Route`), authorization, responses and the one place
//!   where errors become statuses.
//! - `tunnel`: the tunnel protocol (produce, consume, long-poll, replies…), store-agnostic.
//! - `jobs`: jobs on tunnels (`/trigger`, `/done`, `/ws`): ids, records, results, store-agnostic.
//! - `events`: topic subscribers of this process (`/e/{topic}`), fed by the store.
//! - `presence`: which agents are connected to which instance, announced in the store.
//! - `store`: the `Backend` trait and its two implementations, `memory` and `redis`.
//! - `metrics`: Prometheus metrics, served on `BURROW_METRICS_LISTEN`.
//! - `access_log`: one line per request (`BURROW_ACCESS_LOG`), written to stderr in batches.
//! - `worker`: `burrow worker`, which takes jobs from a queue and runs a command for each.
//! - `routing`: tunnel routing to agents, relay side: the agent wire protocol, connected agents
//!   (`Agents`) and forwarded requests (`Exchange`), without Pingora.
//! - `agent`: `burrow agent`, which dials out to a relay and forwards routed requests upstream.
//! - `wake`: the registry of waiting long-polls that stores wake when messages arrive.
//! - `auth`: the token, signature and public-id rules; `cors`: the CORS headers of Burrow's own
//!   answers; `error`: the errors handlers return;
//!   `duration`: Go-style durations (`1m30s`).

pub mod config;

mod access_log;
mod agent;
mod auth;
mod cli;
mod cors;
mod drain;
mod duration;
mod error;
mod events;
mod http;
mod jobs;
mod metrics;
mod presence;
mod routing;
mod server;
mod signals;
mod store;
mod tunnel;
mod wake;
mod worker;

pub use cli::run;
