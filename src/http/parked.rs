//! Long-polls that wait with almost nothing held.
//!
//! While a request runs, Pingora keeps about 12 KiB per connection: the 4 KiB buffer the request
//! head was read into (its headers point into it), the session, and the futures and task that
//! drive the connection. A long-poll can wait for a minute, and a relay holds thousands of them, so
//! an HTTP/1 long-poll leaves all that behind: it takes the connection's stream out of the
//! session, returns to Pingora (which frees its part), and waits in a task of its own that holds
//! only the stream and what it waits for, and watches the socket: a client that hangs up ends the
//! wait, taking nothing. It then writes its response itself and serves the client's next requests
//! (`connection::serve_http1`).

use std::future::Future;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::Version;
use log::debug;
use pingora_core::protocols::http::date::get_cached_date;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Stream;
use pingora_http::RequestHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::connection::{plain_tcp, with_pipelined};
use super::response::Response;
use crate::jobs::JobId;
use crate::store::Delivery;
use crate::tunnel::{MessageId, TunnelId};

/// How much of what a client sends behind a waiting poll is kept while the socket is watched; a
/// client that sends more is not watched for a hang-up beyond that.
const WATCHED_BYTES: usize = 64 * 1024;

/// What a long-poll that has nothing to answer yet waits for, and for how long at most.
pub enum Wait {
    /// A message on the tunnel.
    Message {
        tunnel: TunnelId,
        delivery: Delivery,
        timeout: Duration,
    },
    /// The reply to a message.
    Reply {
        tunnel: TunnelId,
        msg: MessageId,
        timeout: Duration,
    },
    /// A job to finish (`GET /done/{id}?wait=N`).
    Job { job: JobId, timeout: Duration },
}

/// A long-poll's connection, taken out of its session or not.
pub enum Detached {
    /// An HTTP/1 connection's stream, with whether the client keeps it open after the response.
    Stream(Stream, bool),
    /// Any other session, handed back: h2c streams share one connection, so they wait in place,
    /// watching for the client to reset the stream.
    InPlace(Box<ServerSession>),
    /// The connection failed while it was taken out.
    Lost,
}

/// Takes an HTTP/1 connection's stream out of its session. Bytes of the client's next requests,
/// pipelined behind the poll and read with its head, are put back in front of the stream.
pub async fn detach(session: ServerSession) -> Detached {
    let ServerSession::H1(h1) = session else {
        return Detached::InPlace(Box::new(session));
    };
    let head = h1.req_header();
    let asked = client_keeps_alive(head);
    // A body nobody reads would be taken for the next request: close after answering.
    let no_body = !head.headers.contains_key(TRANSFER_ENCODING)
        && head
            .headers
            .get(CONTENT_LENGTH)
            .is_none_or(|length| length.as_bytes() == b"0");
    if !(asked && no_body && h1.will_keepalive()) {
        return Detached::Stream(h1.into_inner(), false);
    }
    // Pingora's own hand-over to the next request, which carries the pipelined bytes along.
    let reusable = match h1.reuse().await {
        Ok(Some(reusable)) => reusable,
        Ok(None) => return Detached::Lost,
        Err(e) => {
            debug!("could not take a long-poll's connection: {e}");
            return Detached::Lost;
        }
    };
    match with_pipelined(reusable) {
        Ok(stream) => Detached::Stream(stream, true),
        Err(stream) => Detached::Stream(stream, false),
    }
}

/// Whether an HTTP/1 client keeps its connection after this request (RFC 9112 §9.3): HTTP/1.1
/// unless it says `close`, HTTP/1.0 only when it asks for `keep-alive`.
pub fn client_keeps_alive(head: &RequestHeader) -> bool {
    // Runs for every request: the `Connection` tokens are compared in place, not lowercased.
    let says = |token: &str| {
        head.headers.get_all(CONNECTION).iter().any(|value| {
            value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    };
    if says("close") {
        return false;
    }
    says("keep-alive") || head.version == Version::HTTP_11
}

/// Runs `waiting` to its end, and gives the stream back with whether the client hung up
/// meanwhile. A client that hangs up is told through `stop`, on which `waiting` ends at its next
/// look, rather than dropped mid-way: a store step under way would have taken what it found for
/// nobody. Watching the socket reads it: what the client sends behind the poll (its next
/// requests, pipelined) is kept, up to [`WATCHED_BYTES`], and put back in front of the stream for
/// the next request; the socket is watched for a hang-up until then.
pub async fn until_hung_up<T>(
    stream: Stream,
    stop: &watch::Sender<bool>,
    waiting: impl Future<Output = T>,
) -> (T, Stream, bool) {
    // Only a plain TCP stream can take bytes back (TLS ends at the load balancer).
    let mut tcp = match plain_tcp(stream) {
        Ok(tcp) => tcp,
        Err(other) => return (waiting.await, other, false),
    };
    tokio::pin!(waiting);
    let mut ahead = BytesMut::new();
    let mut hung_up = false;
    let answer = loop {
        tokio::select! {
            answer = &mut waiting => break answer,
            read = tcp.read_buf(&mut ahead), if !hung_up && ahead.len() < WATCHED_BYTES => {
                if matches!(read, Ok(0) | Err(_)) {
                    hung_up = true;
                    stop.send_replace(true);
                }
            }
        }
    };
    if !ahead.is_empty() {
        tcp.rewind(&ahead);
    }
    (answer, tcp, hung_up)
}

/// Writes `response` as Pingora would have: its head with `Date` and `Connection`, then its body.
pub async fn write(
    stream: &mut Stream,
    response: Response,
    keepalive: bool,
) -> std::io::Result<()> {
    let mut head = response.head().map_err(std::io::Error::other)?;
    let connection = if keepalive { "keep-alive" } else { "close" };
    head.insert_header(DATE, get_cached_date())
        .and_then(|_| head.insert_header(CONNECTION, connection))
        .map_err(std::io::Error::other)?;
    let mut wire = BytesMut::with_capacity(256 + response.body.len());
    wire.put_slice(b"HTTP/1.1 ");
    wire.put_slice(head.status.as_str().as_bytes());
    wire.put_u8(b' ');
    wire.put_slice(head.status.canonical_reason().unwrap_or("").as_bytes());
    wire.put_slice(b"\r\n");
    head.header_to_h1_wire(&mut wire);
    wire.put_slice(b"\r\n");
    wire.put_slice(&response.body);
    stream.write_all(&wire).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(version: Version, connection: Option<&str>) -> RequestHeader {
        let mut head = RequestHeader::build("GET", b"/", None).expect("a valid head");
        head.set_version(version);
        if let Some(value) = connection {
            head.insert_header(CONNECTION, value)
                .expect("a valid header");
        }
        head
    }

    /// `Connection` tokens in any case and list position decide; else the version does.
    #[test]
    fn keep_alive_asked() {
        assert!(client_keeps_alive(&head(Version::HTTP_11, None)));
        assert!(!client_keeps_alive(&head(Version::HTTP_10, None)));
        assert!(client_keeps_alive(&head(
            Version::HTTP_10,
            Some("Upgrade, Keep-Alive")
        )));
        assert!(!client_keeps_alive(&head(
            Version::HTTP_11,
            Some("x, CLOSE")
        )));
        assert!(!client_keeps_alive(&head(
            Version::HTTP_11,
            Some("keep-alive, close")
        )));
        assert!(client_keeps_alive(&head(
            Version::HTTP_11,
            Some("closed-caption")
        )));
    }
}
