//! A connection that notes when its client last took bytes, so that a push to a WebSocket is given
//! up only when the client has read nothing for a while, however big the frame: a slow but steady
//! reader of a large event or job result stays, one that stopped reading goes.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
// Tokio's clock, which tests can pause and advance.
use tokio::time::Instant;

/// When a [`Watched`] connection last wrote bytes out. Cheap to clone.
#[derive(Clone)]
pub struct Progress(Arc<Mutex<Instant>>);

impl Progress {
    /// How long since the connection last wrote anything.
    pub fn idle(&self) -> Duration {
        self.lock().elapsed()
    }

    fn touch(&self) {
        *self.lock() = Instant::now();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Instant> {
        // An `Instant` is consistent whatever panicked: a poisoned lock is still usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `inner`, noting in its [`Progress`] each write that moved bytes.
pub struct Watched<S> {
    inner: S,
    progress: Progress,
}

impl<S> Watched<S> {
    /// Wraps `inner`; the connection counts as having written just now.
    pub fn new(inner: S) -> (Watched<S>, Progress) {
        let progress = Progress(Arc::new(Mutex::new(Instant::now())));
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
        let (mut watched, progress) = Watched::new(near);
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
}
