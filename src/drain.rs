//! What a stopping relay waits for before it exits: the requests in flight (a routed one may take
//! seconds: a slow upstream, a long download), then its HTTP/2 connections, whose answers are
//! written by the connection's own task. Pingora sleeps out its whole grace period on every
//! shutdown, so the grace period is the longest wait, and the relay exits as soon as nothing is
//! left (and [`AT_LEAST`] after the signal, in which waiting long-polls, answered outside any
//! request, and sockets told to close are done).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How long a stopping relay waits even when nothing is in flight: long-polls are answered (204)
/// and sockets closed in that time.
pub const AT_LEAST: Duration = Duration::from_secs(1);

/// How long a stopping relay with no request left waits for its HTTP/2 connections to send their
/// last answers and close: one whose client never acknowledges the closing (frozen, or gone
/// without a word) holds it no longer.
const H2_LINGER: Duration = Duration::from_secs(1);

/// The requests and HTTP/2 connections in flight in this process, and since when it stops.
#[derive(Clone, Default)]
pub struct InFlight {
    requests: Count,
    h2_connections: Count,
    stopping_since: Arc<OnceLock<Instant>>,
}

impl InFlight {
    /// Notes that the relay began to stop now (the first call counts).
    pub fn stopping(&self) {
        self.stopping_since.get_or_init(Instant::now);
    }

    /// What is left of a grace period of `grace` that began when the relay began to stop (all
    /// of it before then).
    pub fn grace_left(&self, grace: Duration) -> Duration {
        let since = self
            .stopping_since
            .get()
            .map_or(Duration::ZERO, Instant::elapsed);
        grace.saturating_sub(since)
    }

    /// Counts a request until the returned guard is dropped, its answer written.
    pub fn request(&self) -> Entered {
        self.requests.enter()
    }

    /// Counts an HTTP/2 connection until the returned guard is dropped, the connection closed.
    pub fn h2_connection(&self) -> Entered {
        self.h2_connections.enter()
    }

    /// Resolves once no request is in flight and the HTTP/2 connections have closed, or have had
    /// [`H2_LINGER`] to.
    pub async fn drained(&self) {
        self.requests.none_left().await;
        let _ = tokio::time::timeout(H2_LINGER, self.h2_connections.none_left()).await;
    }
}

/// How many of one kind are open.
#[derive(Clone, Default)]
struct Count(Arc<Open>);

#[derive(Default)]
struct Open {
    open: AtomicUsize,
    none_left: Notify,
}

impl Count {
    fn enter(&self) -> Entered {
        self.0.open.fetch_add(1, Ordering::AcqRel);
        Entered(self.clone())
    }

    async fn none_left(&self) {
        loop {
            let notified = self.0.none_left.notified();
            tokio::pin!(notified);
            // Registered before the count is read, so one ending in between still wakes it.
            notified.as_mut().enable();
            if self.0.open.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One request or connection in flight; dropping it ends the count.
pub struct Entered(Count);

impl Drop for Entered {
    fn drop(&mut self) {
        let count = &self.0 .0;
        if count.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            count.none_left.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    /// The wait ends when the last request does, not before.
    #[tokio::test]
    async fn waits_for_the_last_request() {
        let in_flight = InFlight::default();
        assert!(in_flight.drained().now_or_never().is_some());
        let (first, second) = (in_flight.request(), in_flight.request());
        let mut waiting = Box::pin(in_flight.drained());
        assert!(waiting.as_mut().now_or_never().is_none());
        drop(first);
        assert!(waiting.as_mut().now_or_never().is_none(), "one is left");
        drop(second);
        assert!(waiting.as_mut().now_or_never().is_some());
    }

    /// An HTTP/2 connection that does not close holds the wait for [`H2_LINGER`] only.
    #[tokio::test(start_paused = true)]
    async fn lingers_for_open_connections() {
        let in_flight = InFlight::default();
        let _open = in_flight.h2_connection();
        let started = tokio::time::Instant::now();
        in_flight.drained().await;
        assert_eq!(started.elapsed(), H2_LINGER);
    }
}
