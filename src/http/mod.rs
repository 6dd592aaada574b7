//! HTTP: the Pingora app that serves every route on the relay's one port.
//!
//! - `route`: request line → [`Route`](route::Route) (or the error telling the client why not);
//! - `framing`: HTTP/1 heads refused before routing (ambiguous body framing, a bad `Host`);
//! - `connection`: tells HTTP/2 (h2c) from HTTP/1 on a new connection without waiting for bytes
//!   a short request never sends, and serves HTTP/1's keep-alive loop, reading each head whole
//!   (within the header timeout, up to 64 KiB) before Pingora parses it;
//! - `app`: the `HttpServerApp` — reads, authorizes, dispatches, writes; its `routed` part
//!   chooses where a request for an agent goes (an agent here, or another instance);
//! - `parked`: long-polls that wait outside Pingora's per-connection state;
//! - `response`: responses, CORS, and the one mapping from errors to statuses;
//! - `websocket`: the jobs (`/ws`) and events (`/ws/e/{topic}`) WebSockets, and the agents'
//!   (`/agent/connect`) handshake, framed by tungstenite;
//! - `sse`: server-sent events (`GET /e/{topic}`);
//! - `watched`: a connection that notes when its client last took bytes (for pushes);
//! - `forward`: requests for agents, streamed through their connection.

mod app;
mod connection;
mod forward;
mod framing;
mod parked;
mod response;
mod route;
mod sse;
mod watched;
mod websocket;

/// How long a client may take nothing of what is written to it — a response body, a pushed job
/// result, event or keep-alive — before it is dropped (its connection's buffers full) instead of
/// holding what it was sent, its place among a topic's subscribers, or the agent's stream of a
/// routed response.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a subscription or a jobs socket may stay silent before a keep-alive, so that proxies
/// keep the connection and a client vanished without closing (host gone) is noticed.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

pub use app::{log_left_out_store_failures, Lifecycle, RelayApp};
pub use connection::Connections;
