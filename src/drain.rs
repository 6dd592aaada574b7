//! What a stopping relay waits for before it exits: the requests in flight (a routed one may take
//! seconds: a slow upstream, a long download) and the HTTP/2 connections, whose answers are
//! written by the connection's own task. Pingora sleeps out its whole grace period on every
//! shutdown, so the grace period is the longest wait, and the relay exits as soon as nothing is
//! left (and [`AT_LEAST`] after the signal, in which waiting long-polls, answered outside any
//! request, and sockets told to close are done).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

/// How long a stopping relay waits even when nothing is in flight: long-polls are answered (204)
/// and sockets closed in that time.
pub const AT_LEAST: Duration = Duration::from_secs(1);

/// The requests and HTTP/2 connections in flight in this process.
#[derive(Clone, Default)]
pub struct InFlight(Arc<Count>);

#[derive(Default)]
struct Count {
    open: AtomicUsize,
    none_left: Notify,
}

impl InFlight {
    /// Counts a request (or an HTTP/2 connection) until the returned guard is dropped.
    pub fn enter(&self) -> Entered {
        self.0.open.fetch_add(1, Ordering::AcqRel);
        Entered(self.clone())
    }

    /// Resolves once nothing is in flight.
    pub async fn none_left(&self) {
        loop {
            let notified = self.0.none_left.notified();
            tokio::pin!(notified);
            // Registered before the count is read, so a request ending in between still wakes it.
            notified.as_mut().enable();
            if self.0.open.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One request or connection in flight; dropping it ends the count.
pub struct Entered(InFlight);

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
        assert!(in_flight.none_left().now_or_never().is_some());
        let (first, second) = (in_flight.enter(), in_flight.enter());
        let mut waiting = Box::pin(in_flight.none_left());
        assert!(waiting.as_mut().now_or_never().is_none());
        drop(first);
        assert!(waiting.as_mut().now_or_never().is_none(), "one is left");
        drop(second);
        assert!(waiting.as_mut().now_or_never().is_some());
    }
}
