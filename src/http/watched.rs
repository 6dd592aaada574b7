//! When a client last took bytes, so that a write to it (a response body, an event, a WebSocket
//! push) is given up only when the client has read nothing for [`SEND_TIMEOUT`], however big the
//! write: a slow but steady reader stays, one that stopped reading goes, its connection reset.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use log::debug;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::l4::stream::Stream as TcpStream;
use pingora_core::protocols::{SocketDigest, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
// Tokio's clock, which tests can pause and advance.
use tokio::time::Instant;

use super::SEND_TIMEOUT;

/// When a client last took bytes: a change in what its TCP stack acknowledged, read from the
/// socket when asked, or where the system does not tell, a write that moved bytes (through
/// [`Watched`], or finished). Writes are no measure where it tells: the kernel makes room in a full
/// send buffer only once a third of it has drained, so where the buffer grew big (a fast link) a
/// slow but steady reader takes bytes for a long time before a write moves any; and a buffer that
/// grows takes more bytes from a writer whose client took none. Cheap to clone.
#[derive(Clone)]
pub struct Progress(Arc<Mutex<Seen>>);

struct Seen {
    /// How long the client may take nothing before it is given up on.
    patience: Duration,
    at: Instant,
    socket: Socket,
    /// What the socket had acknowledged when last looked at with progress (none before the first
    /// look, which a write that goes at once never needs).
    acked: Option<u64>,
}

impl Progress {
    /// Progress of the connection on `socket`, as of now, whose client is given up on once it
    /// took nothing for [`SEND_TIMEOUT`].
    pub fn new(socket: Socket) -> Progress {
        Progress::with_patience(socket, SEND_TIMEOUT)
    }

    /// The same, given up on after `patience`.
    pub fn with_patience(socket: Socket, patience: Duration) -> Progress {
        let seen = Seen {
            patience,
            at: Instant::now(),
            socket,
            acked: None,
        };
        Progress(Arc::new(Mutex::new(seen)))
    }

    /// How long since the client last took bytes, as far as can be told now: where the socket
    /// tells, since it last acknowledged [`MIN_PROGRESS`] more (a receiver that reads nothing may
    /// still take a few bytes now and then, as its kernel packs what it holds), or since the first
    /// look.
    pub fn idle(&self) -> Duration {
        let mut seen = self.lock();
        let acked = seen.socket.acked();
        let moved = match (acked, seen.acked) {
            (Some(now), Some(before)) => now >= before.saturating_add(MIN_PROGRESS),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if moved {
            seen.acked = acked;
            seen.at = Instant::now();
        }
        seen.at.elapsed()
    }

    /// Notes that bytes went out just now: progress where the socket's acknowledgements are not
    /// known (or not looked at yet).
    pub fn touch(&self) {
        let mut seen = self.lock();
        if seen.acked.is_none() {
            seen.at = Instant::now();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        // Each field is consistent whatever panicked: a poisoned lock is still usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How many more bytes a client must acknowledge to count as having taken bytes.
const MIN_PROGRESS: u64 = 16 * 1024;

/// The bytes the peer of `socket` has acknowledged, where the system tells.
fn acked(socket: &SocketDigest) -> Option<u64> {
    socket.tcp_info().map(|info| info.tcpi_bytes_acked)
}

/// The connection a client is on, as far as the watch needs it: what tells what the client
/// acknowledged (nothing: only writes count), and the descriptor to reset once the client is let
/// go (none: it is closed as usual).
#[derive(Clone, Default)]
pub struct Socket {
    digest: Option<Arc<SocketDigest>>,
    reset: Option<RawFd>,
}

impl Socket {
    /// The connection `stream` is, the client's alone (as once upgraded).
    pub fn of_stream(stream: &Stream) -> Socket {
        Socket {
            digest: stream.get_socket_digest(),
            reset: own_descriptor(stream),
        }
    }

    /// How many bytes the client's TCP stack has acknowledged, where the system tells.
    pub fn acked(&self) -> Option<u64> {
        self.digest.as_deref().and_then(acked)
    }

    /// How many bytes were written to the connection, sent or still queued, where the system
    /// tells: the end of the last write, to compare with [`Socket::acked`] later.
    pub fn written(&self) -> Option<u64> {
        let info = self.digest.as_deref()?.tcp_info()?;
        let sent_once = info.tcpi_bytes_sent.saturating_sub(info.tcpi_bytes_retrans);
        Some(sent_once.saturating_add(u64::from(info.tcpi_notsent_bytes)))
    }

    /// Makes the connection reset when it is closed, where it is the client's alone (see
    /// [`reset_on_close`]).
    ///
    /// # Safety
    /// The connection must still be open: its stream must outlive the call.
    pub unsafe fn reset_when_closed(&self) {
        if let Some(fd) = self.reset {
            // SAFETY: the caller keeps the connection, and so `fd`, open.
            unsafe { reset_on_close(fd) };
        }
    }

    /// The connection a session is on, over HTTP/1. Over HTTP/2 none: the connection carries
    /// other requests, so its acknowledgements tell nothing of this one's client (a stream whose
    /// reader stopped granting it window looked alive while others moved), and it is not reset;
    /// only what is written counts (a write waits for the stream's window).
    pub fn of(session: &ServerSession) -> Socket {
        session.stream().map(Socket::of_stream).unwrap_or_default()
    }
}

/// The descriptor of a plain TCP stream (the only kind the relay serves: TLS ends at the load
/// balancer).
fn own_descriptor(stream: &Stream) -> Option<RawFd> {
    let tcp = stream.as_any().downcast_ref::<TcpStream>()?;
    Some(tcp.as_raw_fd())
}

/// Makes closing the connection on `fd` reset it, dropping what it still holds unsent (nginx's
/// `reset_timedout_connection`): closed as usual, a connection whose client reads nothing stays
/// in the kernel for minutes with up to megabytes queued for it.
///
/// # Safety
/// `fd` must be open for the whole call: the connection must not be closed meanwhile.
unsafe fn reset_on_close(fd: RawFd) {
    // SAFETY: the caller keeps `fd` open for the call, the only time the borrow lives.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    if let Err(e) = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO)) {
        debug!("could not make a connection reset when closed: {e}");
    }
}

/// Runs `write` to its end (`Some` of its outcome), unless the client takes nothing for the
/// progress's patience meanwhile (`None`; its connection then resets when closed). A write that
/// goes at once costs no timer and no look at the socket.
pub async fn unless_stalled<F: Future>(progress: &Progress, write: F) -> Option<F::Output> {
    tokio::pin!(write);
    let at_once = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx)));
    if let Poll::Ready(done) = at_once.await {
        return Some(done);
    }
    let started = Instant::now();
    let patience = progress.lock().patience;
    loop {
        // Idle since the write began or the client last took bytes, whichever is later.
        let idle = progress.idle().min(started.elapsed());
        let Some(left) = patience.checked_sub(idle).filter(|left| !left.is_zero()) else {
            // SAFETY: `write`, alive until this returns, is a write on that connection.
            unsafe { progress.lock().socket.reset_when_closed() };
            return None;
        };
        // Looked at again within `LOOK_EVERY`: progress seen at a look counts from then, so
        // bytes taken just after one look and none since would otherwise count as taken a whole
        // patience later.
        if let Ok(done) = tokio::time::timeout(left.min(LOOK_EVERY), &mut write).await {
            return Some(done);
        }
    }
}

/// How often a waiting write looks at what its client acknowledged: a client is let go within
/// this much after its patience ran out.
const LOOK_EVERY: Duration = Duration::from_secs(5);

/// The most of a response body written in one write: where the system does not tell what the
/// client acknowledged, a piece written counts as the client taking bytes.
const SEND_PIECE: usize = 16 * 1024;

/// Writes `chunk` of a response body (the last if `end`), piece by piece, watched by the
/// `progress` of the response (one for all its writes, its head's included); `false` if that
/// failed, or the client took nothing for the progress's patience.
pub async fn write_pieces(
    session: &mut ServerSession,
    progress: &Progress,
    mut chunk: Bytes,
    end: bool,
) -> bool {
    loop {
        let last = chunk.len() <= SEND_PIECE;
        let piece = if last {
            std::mem::take(&mut chunk)
        } else {
            chunk.split_to(SEND_PIECE)
        };
        let written = session.write_response_body(piece, end && last);
        if !matches!(unless_stalled(progress, written).await, Some(Ok(()))) {
            return false;
        }
        if last {
            return true;
        }
        progress.touch();
    }
}

/// `inner`, noting in its [`Progress`] each write that moved bytes.
pub struct Watched<S> {
    inner: S,
    progress: Progress,
}

impl<S> Watched<S> {
    /// Wraps `inner`, the connection on `socket`; it counts as having written just now.
    pub fn new(inner: S, socket: Socket) -> (Watched<S>, Progress) {
        let progress = Progress::new(socket);
        let watched = Watched {
            inner,
            progress: progress.clone(),
        };
        (watched, progress)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.progress.touch();
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Progress moves with the bytes written, not with time.
    #[tokio::test(start_paused = true)]
    async fn progress_follows_writes() {
        let (near, mut far) = tokio::io::duplex(4);
        let (mut watched, progress) = Watched::new(near, Socket::default());
        tokio::time::sleep(Duration::from_millis(30)).await;
        let before = progress.idle();
        assert!(before >= Duration::from_millis(30), "{before:?}");
        watched.write_all(b"abcd").await.unwrap();
        assert!(progress.idle() < before);
        // A full pipe takes nothing more, and the idle time grows again.
        let blocked = tokio::time::timeout(Duration::from_millis(30), watched.write_all(b"e"));
        assert!(blocked.await.is_err());
        assert!(progress.idle() >= Duration::from_millis(30));
        let mut read = [0; 4];
        far.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"abcd");
    }

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
        let chunk = Bytes::from(vec![7; 512 * 1024]);
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
        let progress = Progress::new(Socket::of(&session));
        let started = tokio::time::Instant::now();
        assert!(
            write_pieces(&mut session, &progress, chunk.clone(), false).await,
            "a steady reader"
        );
        assert!(started.elapsed() > Duration::from_secs(600));
        reader.abort();

        let (relay, mut client) = tokio::io::duplex(16 * 1024);
        client.write_all(REQUEST).await.expect("sent");
        let mut session = answering(relay).await;
        let progress = Progress::new(Socket::of(&session));
        let started = tokio::time::Instant::now();
        assert!(
            !write_pieces(&mut session, &progress, chunk, false).await,
            "a stopped reader"
        );
        let waited = started.elapsed();
        assert!(
            waited >= SEND_TIMEOUT && waited < SEND_TIMEOUT * 2,
            "{waited:?}"
        );
    }
}
