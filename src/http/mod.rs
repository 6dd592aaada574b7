//! HTTP: the Pingora app that serves every route on the relay's one port.
//!
//! - `route`: request line → [`Route`](route::Route) (or the error telling the client why not);
//! - `framing`: HTTP/1 heads refused before routing (ambiguous body framing, a bad `Host`);
//! - `connection`: tells HTTP/2 (h2c) from HTTP/1 on a new connection without waiting for bytes
//!   a short request never sends, and serves HTTP/1's keep-alive loop, reading each head whole
//!   (within the header timeout, up to 64 KiB) before Pingora parses it;
//! - `app`: the `HttpServerApp` — reads, authorizes, dispatches, writes;
//! - `parked`: long-polls that wait outside Pingora's per-connection state;
//! - `response`: responses, CORS, and the one mapping from errors to statuses;
//! - `websocket`: the jobs (`/ws`) and events (`/ws/e/{topic}`) WebSockets, and the agents'
//!   (`/agent/connect`) handshake, framed by tungstenite;
//! - `sse`: server-sent events (`GET /e/{topic}`);
//! - `forward`: requests for agents, streamed through their connection.

mod app;
mod connection;
mod forward;
mod framing;
mod parked;
mod response;
mod route;
mod sse;
mod websocket;

pub use app::RelayApp;
pub use connection::Connections;
