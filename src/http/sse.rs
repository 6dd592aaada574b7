//! Server-sent events (`GET /e/{topic}`): each event published on the topic becomes one SSE
//! event (`data:` lines, a blank line), with a keep-alive comment when the topic is quiet so that
//! proxies keep the connection and a client vanished without closing (host gone) is noticed.

use bytes::Bytes;
use pingora_core::protocols::http::ServerSession;

use super::app::client_gone;
use super::watched::{write_pieces, Progress, Socket};
use super::KEEPALIVE;
use crate::events::{Received, Subscription};
use crate::tunnel::Shutdown;

/// Streams the subscription's events until the client goes away or the relay shuts down.
pub async fn serve(session: &mut ServerSession, mut events: Subscription, mut shutdown: Shutdown) {
    // A first comment tells the client the subscription is live.
    let mut chunk = Bytes::from_static(b": subscribed\n\n");
    let progress = Progress::new(Socket::of(session));
    let mut keepalive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    loop {
        if !write_pieces(session, &progress, chunk, false).await {
            return;
        }
        chunk = tokio::select! {
            received = events.next() => written(received),
            _ = keepalive.tick() => Bytes::from_static(b": keep-alive\n\n"),
            _ = shutdown.changed() => break,
            // Noticed at once, not at the next write, so `X-Subscribers` counts live clients.
            () = client_gone(session) => return,
        };
    }
    // What was published to this subscriber before the relay began to stop still goes out: its
    // publisher was told it reached it.
    for received in events.take_queued() {
        if !write_pieces(session, &progress, written(received), false).await {
            return;
        }
    }
    write_pieces(session, &progress, Bytes::new(), true).await;
}

/// What the stream says of what a subscriber received.
fn written(received: Received) -> Bytes {
    match received {
        Received::Event(body) => event(&body),
        // A comment, which EventSource ignores, so that a reader can tell a gap.
        Received::Skipped(missed) => Bytes::from(format!(": skipped {missed} events\n\n")),
    }
}

/// One SSE event: every line of the body behind `data: ` (SSE is text, so bytes that are not
/// UTF-8 are replaced). Lines end at CRLF, LF or a lone CR, as SSE parsers read them: a body
/// cannot smuggle an `event:`, `id:` or `retry:` field of its own.
fn event(body: &[u8]) -> Bytes {
    let text = String::from_utf8_lossy(body);
    let mut event = String::with_capacity(text.len() + 8);
    for line in text.split("\r\n").flat_map(|line| line.split(['\n', '\r'])) {
        event.push_str("data: ");
        event.push_str(line);
        event.push('\n');
    }
    event.push('\n');
    Bytes::from(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Multi-line bodies become several `data:` lines of one event.
    #[test]
    fn event_format() {
        assert_eq!(event(b"hello"), "data: hello\n\n");
        assert_eq!(event(b"a\r\nb"), "data: a\ndata: b\n\n");
        // A lone CR ends a line too: what follows stays data.
        assert_eq!(
            event(b"hi\revent: evil\rid: 6"),
            "data: hi\ndata: event: evil\ndata: id: 6\n\n"
        );
        assert_eq!(event(b"a\n\rb"), "data: a\ndata: \ndata: b\n\n");
    }
}
