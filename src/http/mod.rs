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

/// The most of a response body written in one write: where the system does not tell what the
/// client acknowledged, a piece written counts as the client taking bytes.
const SEND_PIECE: usize = 16 * 1024;

/// Writes `chunk` of a response body (the last if `end`), piece by piece; `false` if that failed,
/// or the client took nothing for [`SEND_TIMEOUT`].
async fn write_body(
    session: &mut pingora_core::protocols::http::ServerSession,
    mut chunk: bytes::Bytes,
    end: bool,
) -> bool {
    let progress = watched::Progress::new(socket_of(session));
    loop {
        let last = chunk.len() <= SEND_PIECE;
        let piece = if last {
            std::mem::take(&mut chunk)
        } else {
            chunk.split_to(SEND_PIECE)
        };
        let written = session.write_response_body(piece, end && last);
        if !matches!(
            watched::unless_stalled(&progress, written).await,
            Some(Ok(()))
        ) {
            return false;
        }
        if last {
            return true;
        }
        progress.touch();
    }
}

/// The socket a session's connection is on, to read what its client acknowledged.
fn socket_of(
    session: &pingora_core::protocols::http::ServerSession,
) -> Option<std::sync::Arc<pingora_core::protocols::SocketDigest>> {
    session.digest()?.socket_digest.clone()
}

/// How long a subscription or a jobs socket may stay silent before a keep-alive, so that proxies
/// keep the connection and a client vanished without closing (host gone) is noticed.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

pub use app::{Lifecycle, RelayApp};
pub use connection::Connections;

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_core::protocols::http::ServerSession;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A session that has read a request from `client`'s other end and written a chunked head.
    async fn answering(relay: tokio::io::DuplexStream) -> ServerSession {
        let mut session = ServerSession::new_http1(Box::new(relay));
        assert!(session.read_request().await.expect("a request"));
        let mut head = pingora_http::ResponseHeader::build(200, None).expect("a head");
        head.insert_header("Transfer-Encoding", "chunked")
            .expect("a header");
        session
            .write_response_header(Box::new(head))
            .await
            .expect("the head is written");
        session
    }

    /// A big chunk goes to a slow but steady reader, however long it takes, and is given up on
    /// for a reader that takes nothing. (Paused time: the clock jumps to the next timer whenever
    /// every task waits.)
    #[tokio::test(start_paused = true)]
    async fn bodies_wait_for_slow_readers_not_for_stopped_ones() {
        const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let chunk = bytes::Bytes::from(vec![7; 512 * 1024]);
        let (relay, mut client) = tokio::io::duplex(16 * 1024);
        client.write_all(REQUEST).await.expect("sent");
        let mut session = answering(relay).await;
        // 8 KiB every 10 s: the chunk takes over ten minutes.
        let reader = tokio::spawn(async move {
            let mut buffer = vec![0; 8 * 1024];
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                if client.read(&mut buffer).await.unwrap_or(0) == 0 {
                    return;
                }
            }
        });
        let started = tokio::time::Instant::now();
        assert!(
            write_body(&mut session, chunk.clone(), false).await,
            "a steady reader"
        );
        assert!(started.elapsed() > Duration::from_secs(600));
        reader.abort();

        let (relay, mut client) = tokio::io::duplex(16 * 1024);
        client.write_all(REQUEST).await.expect("sent");
        let mut session = answering(relay).await;
        let started = tokio::time::Instant::now();
        assert!(
            !write_body(&mut session, chunk, false).await,
            "a stopped reader"
        );
        let waited = started.elapsed();
        assert!(
            waited >= SEND_TIMEOUT && waited < SEND_TIMEOUT * 2,
            "{waited:?}"
        );
    }
}
