//! The one error type of a request. Each variant is something a client can be told; the single
//! mapping to an HTTP status lives in `http::response`.

use crate::store::StoreError;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A path under a known prefix (`/t/`, `/r/`, `/e/`, `/ws/e/`) whose id or shape is wrong.
    #[error("Malformed url")]
    MalformedUrl,
    /// A path outside every route.
    #[error("Not found")]
    NotFound,
    /// A query parameter that does not parse or is out of range; the text says which.
    #[error("{0}")]
    BadParameter(String),
    /// A route that exists but does not serve this method.
    #[error("Method not allowed")]
    MethodNotAllowed {
        /// The methods the route serves, for the `Allow` header.
        allow: &'static str,
    },
    /// A body over `TUNNEL_MAX_MESSAGE_SIZE`.
    #[error("Message too large: the limit is {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// No credential matched.
    #[error("Access denied")]
    AccessDenied,
    /// Backpressure refused a message.
    #[error("Queue limit reached, consumers are not keeping up")]
    QueueFull {
        /// Messages in the tunnel.
        size: u64,
    },
    /// A body that is not what the route takes (a job that is not a JSON object).
    #[error("Invalid body: {0}")]
    InvalidBody(String),
    /// A Content-Type to store that is not UTF-8: it could not be handed back as it came.
    #[error("Content-Type is not UTF-8 text")]
    ContentTypeNotText,
    /// A job id that was never given out, expired, or was already collected.
    #[error("Unknown job")]
    UnknownJob(String),
    /// A WebSocket route asked for without a valid WebSocket handshake.
    #[error("Expected a WebSocket upgrade: {0}")]
    NotWebSocket(&'static str),
    /// A WebSocket upgrade asked for with a handshake that is not one; the text says why.
    #[error("{0}")]
    BadHandshake(&'static str),
    /// An HTTP/1 request head that must not be served (see `http::framing`); the text says why.
    #[error("{0}")]
    MalformedHead(&'static str),
    /// A request head still incomplete after `BURROW_HEADER_TIMEOUT`.
    #[error("Request head not complete within {} s", .0.as_secs())]
    HeadTooSlow(std::time::Duration),
    /// A request line over the relay's limit for a whole head (RFC 9110 §15.5.15: 414).
    #[error("Request line too long: the limit is {limit} bytes")]
    RequestLineTooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// A request head over the relay's limit.
    #[error("Request head too large: the limit is {limit} bytes")]
    HeadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// An HTTP/1 request head with more header fields than the relay reads.
    #[error("Too many header fields: the limit is {limit}")]
    TooManyHeaderFields {
        /// The limit in fields.
        limit: usize,
    },
    /// A request body of which nothing arrived for a minute (Pingora's read timeout).
    #[error("Request body stalled: nothing arrived for 60 s")]
    BodyStalled,
    /// A `CONNECT`: the relay carries requests, to its routes or an agent's service, not
    /// tunnels to an address.
    #[error("CONNECT is not supported")]
    Connect,
    /// A request body in a transfer coding other than `chunked` alone.
    #[error("Transfer-Encoding not supported")]
    UnsupportedCoding,
    /// The request could not be read from the client.
    #[error("Could not read the request: {0}")]
    BadRequest(String),
    /// The relay is stopping and the request's answer did not come within its grace period.
    #[error("Relay shutting down, retry")]
    ShuttingDown,
    /// An agent dialled the old process of a graceful upgrade, which hands its address over: the
    /// new process takes connections on it and is one dial away.
    #[error("Relay handing over to a new process, retry at once")]
    HandingOver,
    /// The client left before its answer was ready (logged as nginx's 499).
    #[error("Client closed request")]
    ClientGone,
    /// A request for an agent could not be served.
    #[error(transparent)]
    Route(#[from] crate::routing::RouteError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An error with its sources, on one line (hyper's and reqwest's own messages hide the cause:
/// refused, reset, DNS, TLS); a cause that its error already printed is not repeated.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
