//! What a new connection speaks: HTTP/2 without TLS (h2c, prior knowledge) or HTTP/1.
//!
//! Pingora decides by waiting for the 24 bytes of the HTTP/2 preface, so a complete HTTP/1.0
//! request shorter than that (`OPTIONS / HTTP/1.0` and a blank line, HAProxy's default health
//! check, is 22 bytes) would wait forever for bytes that never come. [`Connections`] decides as
//! soon as the bytes read stop matching the preface, hands HTTP/2 to Pingora as before, and
//! serves HTTP/1 itself with Pingora's own session loop.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora_core::protocols::http::{ReusableHttpStream, ServerSession};
use pingora_core::protocols::l4::stream::Stream as TcpStream;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use super::app::{RelayApp, KEEPALIVE_SECS};
use super::framing;
use crate::error::Error;

/// The client preface every HTTP/2 connection starts with (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a connection may stay silent before its first request, or between requests.
const FIRST_BYTES_WITHIN: Duration = Duration::from_secs(KEEPALIVE_SECS);

/// The first read of a request head: Pingora's own size for the buffer it parses a head in.
const HEAD_BUFFER: usize = 4096;

/// The most bytes a request head may take; Pingora alone would buffer up to 1 MiB per connection
/// (nginx allows about 33 KiB by default; real clients' cookies and tokens fit well within this).
const MAX_HEAD: usize = 64 * 1024;

/// The service's app: tells HTTP/2 from HTTP/1 on each new connection, then serves it.
pub struct Connections {
    app: Arc<RelayApp>,
}

impl Connections {
    /// Serves new connections with `app`.
    pub fn new(app: Arc<RelayApp>) -> Connections {
        Connections { app }
    }
}

#[async_trait]
impl ServerApp for Connections {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let (stream, h2, head_began) = sniff(stream, self.app.header_timeout()).await?;
        if h2 {
            // Answers are written by the connection's own task, which ends once they are sent:
            // a stopping relay waits a moment for it after the requests.
            let _open = self.app.in_flight().h2_connection();
            // The preface is back in front of the stream: Pingora's own check finds it at once.
            return ServerApp::process_new(&self.app, stream, shutdown).await;
        }
        serve_http1(&self.app, stream, shutdown, Some(head_began)).await;
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(self.app.as_ref()).await;
    }
}

/// Serves HTTP/1 requests on `stream` until the connection closes or is handed elsewhere, as
/// Pingora does: keep-alive on unless the server is shutting down, settings carried from one
/// request to the next. Before each request it waits for the request's first bytes itself, so
/// that the app's header timeout bounds a head in transit, not the idle time before it.
pub async fn serve_http1(
    app: &Arc<RelayApp>,
    stream: Stream,
    shutdown: &ShutdownWatch,
    mut head_began: Option<Instant>,
) {
    let mut next: Option<(Stream, Option<HttpPersistentSettings>)> = Some((stream, None));
    while let Some((stream, settings)) = next {
        let began = head_began.take();
        let Some((stream, head, refused, began)) =
            next_request(stream, app.header_timeout(), began).await
        else {
            return;
        };
        // What Pingora's parser would mend without a word is told from the raw head.
        let refused = refused.or_else(|| framing::check_raw(&head).err());
        let mut session = ServerSession::new_http1(stream);
        if let Some(refused) = refused {
            let began = began.map_or_else(std::time::Instant::now, Instant::into_std);
            // Boxed: inline, its session would size the task of every connection, idle ones too.
            Box::pin(app.refuse(session, refused, began)).await;
            return;
        }
        match settings {
            Some(settings) => settings.apply_to_session(&mut session),
            None => {
                session.set_keepalive((!*shutdown.borrow()).then_some(KEEPALIVE_SECS));
                // Requests a client sends before its previous answer are served in order (RFC
                // 9112 §9.3.2), not dropped with the connection; carried to each next request.
                session.set_pipelining_enabled(true);
            }
        }
        session.set_pipelined_prefix(fitted(head));
        next = app
            .process_new_http(session, shutdown)
            .await
            .map(|reused| reused.consume());
    }
}

/// Waits as long as a keep-alive lasts for the client's next request, then for the rest of its
/// head within `header_timeout` of its first byte (`began`, when that came before), and returns
/// the stream with the bytes read, for the session to parse without reading more. With them, why
/// the head is refused: too slow or too large ([`MAX_HEAD`]); and when it began, if known (a head
/// in one read took no time to speak of). `None` when the client leaves or stays silent.
async fn next_request(
    mut stream: Stream,
    header_timeout: Duration,
    began: Option<Instant>,
) -> Option<(Stream, BytesMut, Option<Error>, Option<Instant>)> {
    // Pingora's timer, as its own reads use: cheaper than tokio's on this per-request path.
    let mut head =
        match pingora_timeout::timeout(FIRST_BYTES_WITHIN, first_bytes(&mut stream)).await {
            Ok(Ok(head)) if !head.is_empty() => head,
            _ => return None,
        };
    // Most heads arrive in one read: no timer then.
    if head_end(&head, 0).is_some() {
        return Some((stream, head, None, began));
    }
    // A head in several reads: when it began counts for its timeout, and for its refusal's log.
    let began = began.unwrap_or_else(Instant::now);
    let rest_within = (began + header_timeout).saturating_duration_since(Instant::now());
    let rest = pingora_timeout::timeout(rest_within, read_rest(&mut stream, &mut head)).await;
    let refused = match rest {
        Ok(Ok(())) => None,
        Ok(Err(Some(refused))) => Some(refused),
        Ok(Err(None)) => {
            log::debug!("could not read a request: the client left in the middle of its head");
            return None;
        }
        Err(_) => Some(Error::HeadTooSlow(header_timeout)),
    };
    Some((stream, head, refused, Some(began)))
}

/// The first bytes the client sends, in a buffer for the head made only once they are there: a
/// connection kept alive holds none while it idles (4 KiB each). Empty when the client left.
fn first_bytes(stream: &mut Stream) -> impl Future<Output = io::Result<BytesMut>> + '_ {
    std::future::poll_fn(move |cx| {
        let mut head = BytesMut::with_capacity(HEAD_BUFFER);
        // Nothing there yet: the buffer goes, the stream stays registered for the bytes to come.
        ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut *stream),
            cx,
            &mut head
        ))?;
        Poll::Ready(Ok(head))
    })
}

/// `head` in a buffer of its own size when it takes little of its own: the session keeps it
/// for as long as the request lasts, for ever on an event stream.
fn fitted(head: BytesMut) -> BytesMut {
    match head.len() <= head.capacity() / 2 {
        true => BytesMut::from(&head[..]),
        false => head,
    }
}

/// Reads until `head` holds a whole request head; `Err(Some(_))` when the head is over
/// [`MAX_HEAD`], `Err(None)` when the client leaves.
async fn read_rest(stream: &mut Stream, head: &mut BytesMut) -> Result<(), Option<Error>> {
    let too_large = |head: &[u8]| Err(Some(over_limit(head)));
    loop {
        if head.len() >= MAX_HEAD {
            return too_large(head);
        }
        let scanned = head.len();
        head.reserve(HEAD_BUFFER);
        match stream.read_buf(head).await {
            Ok(n) if n > 0 => {}
            _ => return Err(None),
        }
        match head_end(head, scanned) {
            // The read that found the end may have brought more than the limit allows.
            Some(end) if end > MAX_HEAD => return too_large(head),
            Some(_) => return Ok(()),
            None => {}
        }
    }
}

/// Why a head over [`MAX_HEAD`] is refused: its request line alone is over it (414, as nginx
/// answers), or the head is (431).
fn over_limit(head: &[u8]) -> Error {
    let leading = blank_lines(head);
    let line_end = head[leading..].iter().position(|&b| b == b'\n');
    match line_end.is_some_and(|end| leading + end < MAX_HEAD) {
        true => Error::HeadTooLarge { limit: MAX_HEAD },
        false => Error::RequestLineTooLong { limit: MAX_HEAD },
    }
}

/// How many bytes of empty lines come before the request line: the parser skips them.
fn blank_lines(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count()
}

/// Where the request head in `bytes` ends: just past the blank line that closes it (lines end
/// in CRLF, or in a bare LF, which the parser accepts too). Empty lines before the request line
/// are not it, as the parser skips them. Only what follows `scanned` is searched: a head
/// trickling in a byte at a time is not scanned again from its start for every byte.
fn head_end(bytes: &[u8], scanned: usize) -> Option<usize> {
    let leading = blank_lines(bytes);
    let start = scanned.saturating_sub(2).max(leading);
    bytes[start..]
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .find_map(|(at, _)| match &bytes[start + at + 1..] {
            [b'\n', ..] => Some(start + at + 2),
            [b'\r', b'\n', ..] => Some(start + at + 3),
            _ => None,
        })
}

/// A finished request's connection, ready for the next request: bytes the client pipelined
/// behind it (read with it) are put back in front of the stream, where the next read finds
/// them. `Err` hands back a stream that cannot take them back (none here: TLS ends at the load
/// balancer), to be closed after any answer it still owes.
pub(super) fn with_pipelined(reusable: ReusableHttpStream) -> Result<Stream, Stream> {
    match reusable.into_parts() {
        (stream, None) => Ok(stream),
        (stream, Some(pipelined)) => {
            let mut tcp = plain_tcp(stream)?;
            tcp.rewind(&pipelined);
            Ok(tcp)
        }
    }
}

/// The stream with `bytes`, read from it already, put back in front (plain TCP only: any other
/// stream, of which there is none here, as it was).
pub(super) fn rewound(stream: Stream, bytes: &[u8]) -> Stream {
    match plain_tcp(stream) {
        Ok(mut tcp) => {
            tcp.rewind(bytes);
            tcp
        }
        Err(other) => other,
    }
}

/// The stream as plain TCP, which can take bytes back (`rewind`) once they are read; any other
/// stream as it was.
pub(super) fn plain_tcp(stream: Stream) -> Result<Box<TcpStream>, Stream> {
    if !stream.as_any().is::<TcpStream>() {
        return Err(stream);
    }
    // Checked just above; `into_any` cannot hand the stream back on a failed downcast.
    stream
        .into_any()
        .downcast::<TcpStream>()
        .map_err(|_| unreachable!("the stream was checked to be plain TCP"))
}

/// Reads until the bytes either stop matching the HTTP/2 preface or are all of it, then puts
/// them back in front of the stream; answers whether it is HTTP/2, and when the first bytes
/// came (the head's time runs from there, not again from the next read). `None` when the client left,
/// stayed silent, or sent its first bytes but not the rest within `rest_within` (the header
/// timeout). A stream that cannot take bytes back (none here: TLS ends at the load balancer) is
/// left to Pingora's check.
async fn sniff(stream: Stream, rest_within: Duration) -> Option<(Stream, bool, Instant)> {
    let mut tcp = match plain_tcp(stream) {
        Ok(tcp) => tcp,
        Err(other) => return Some((other, true, Instant::now())),
    };
    let mut seen = [0u8; H2_PREFACE.len()];
    let mut len = 0;
    // Silence before the first bytes is idle time; after them, the rest is head time.
    let mut deadline = Instant::now() + FIRST_BYTES_WITHIN;
    let mut began = None;
    while len < seen.len() && H2_PREFACE.starts_with(&seen[..len]) {
        match tokio::time::timeout_at(deadline, tcp.read(&mut seen[len..])).await {
            Ok(Ok(n)) if n > 0 => len += n,
            _ => return None,
        }
        deadline = *began.get_or_insert_with(Instant::now) + rest_within;
    }
    let h2 = seen[..len] == *H2_PREFACE;
    tcp.rewind(&seen[..len]);
    Some((tcp, h2, began.unwrap_or_else(Instant::now)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small head is kept in a buffer its size, with its bytes; a big one as it is.
    #[test]
    fn heads_are_kept_in_buffers_their_size() {
        let mut small = BytesMut::with_capacity(HEAD_BUFFER);
        small.extend_from_slice(b"GET /e/t HTTP/1.1\r\nHost: a\r\n\r\n");
        let fitted_small = fitted(small.clone());
        assert_eq!(fitted_small, small);
        assert!(fitted_small.capacity() < 64, "{}", fitted_small.capacity());
        let mut big = BytesMut::with_capacity(HEAD_BUFFER);
        big.extend_from_slice(&[b'a'; HEAD_BUFFER - 100]);
        assert_eq!(fitted(big).capacity(), HEAD_BUFFER);
    }

    /// A head ends at its blank line, CRLF or bare LF, found also across reads; empty lines
    /// before the request line do not end it.
    #[test]
    fn head_ends_at_its_blank_line() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(head_end(head, 0), Some(head.len()));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\nbody", 0), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
        assert_eq!(head_end(b"\r\nGET / HTTP/1.1\r\n", 0), None);
        assert_eq!(head_end(b"\r\n\r\n\n", 0), None);
        let late = b"\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(head_end(late, 0), Some(late.len()));
        // The blank line's first bytes came with the previous read.
        for scanned in 0..head.len() {
            assert_eq!(head_end(head, scanned), Some(head.len()), "{scanned}");
        }
    }
}
