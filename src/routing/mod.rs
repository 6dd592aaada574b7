//! Tunnel routing to agents (PROTOCOL.md part 3), relay side, without Pingora: agents dial in over
//! a WebSocket and carry many requests at once; see docs/AGENT-PROTOCOL.md for the wire format.
//!
//! - `frame`: the frame codec, `[type: u8][stream id: u32 BE][payload]`.
//! - `head`: the request and response heads (JSON in `HEAD` / `RESPONSE`), hop-by-hop headers.
//! - `stream`: streams multiplexed on one connection, with per-stream flow control (shared with
//!   the agent).
//! - `writer`: the task writing a connection's WebSocket.
//! - `link`: one connected agent: [`serve`] runs its connection.
//! - `agents`: the registry ([`Agents`]): presence and the choice of an agent per request.
//! - `exchange`: one forwarded request ([`Exchange`]) and its retry on another agent.
//!
//! The HTTP layer upgrades `GET /agent/connect?name=NAME` and hands the socket to [`serve`]; for a
//! routed request it calls [`Agents::forward`] and maps [`RouteError`] to a status.

mod agents;
mod exchange;
pub(crate) mod frame;
pub(crate) mod head;
mod link;
pub(crate) mod stream;
pub(crate) mod writer;

#[cfg(test)]
mod tests;

pub use agents::{Agents, RETURN_WITHIN};
pub use exchange::{Exchange, RouteError};
pub use head::{strip_hop_by_hop, Headers, RequestHead};
pub use link::{serve, HEARTBEAT_TIMEOUT};
