//! The server's clock as this process reads it, for the fence every data-changing script checks
//! first (`fence.lua`): a call that starts at the server after the relay may have stopped waiting
//! for it (the server was frozen, or the call sat in a socket) does nothing. Otherwise a client
//! told 503 would lose the message its consume took later, or store twice what it sent again.
//!
//! Fences are in the server's clock, which may differ from this host's: the offset is read with
//! `TIME` every few seconds, and carried forward on this process's monotonic clock, so a step of
//! the local wall clock changes nothing.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use fred::prelude::{Client, ClientLike, Options, Value};
use fred::types::{ClusterHash, CustomCommand};
use tokio::sync::Notify;

/// How often the server's clock is read again (a step of its clock is followed this late).
const READ_EVERY: Duration = Duration::from_secs(5);

/// How often it is tried while it has never been read (no fence meanwhile).
const FIRST_READ_EVERY: Duration = Duration::from_millis(250);

/// The least time between two readings that doubts ask for: scripts that keep finding their
/// fence passed (the server's clocks disagree, say) cost the server ten readings a second, not
/// one after another.
const DOUBT_GAP: Duration = Duration::from_millis(100);

/// How long a reading may take; a slower one is tried again at the next turn.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The latest reading of the server's clock: `server_ms` at the local instant `at`.
#[derive(Default)]
pub(super) struct ServerClock {
    reading: Mutex<Option<(Instant, i64)>>,
    /// Told when a script found itself past its fence: the reading may be stale.
    doubted: Notify,
}

impl ServerClock {
    /// The server's time in Unix milliseconds at the local instant `at`; 0 (no fence) until the
    /// clock has been read once.
    pub(super) fn at(&self, at: Instant) -> i64 {
        let reading = *self.reading.lock().unwrap_or_else(|e| e.into_inner());
        let Some((then, server_ms)) = reading else {
            return 0;
        };
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        match at.checked_duration_since(then) {
            Some(later) => server_ms.saturating_add(ms(later)),
            None => server_ms.saturating_sub(ms(then.duration_since(at))),
        }
    }

    /// Reads the server's clock with `TIME` on `client`. The server read it somewhere within the
    /// round trip; the reading is placed at its end, so that a fence computed from it is never
    /// later than meant, only earlier by up to the round trip (a server far away gets less
    /// patience, never a call run after the relay gave up on it).
    pub(super) async fn read(&self, client: &Client) {
        let command = CustomCommand::new_static("TIME", ClusterHash::Random, false);
        // fred's own timeout, so that a reading not sent in time is never sent.
        let client = client.with_options(&Options {
            fail_fast: true,
            max_attempts: Some(1),
            timeout: Some(READ_TIMEOUT),
            ..Options::default()
        });
        let Ok(Value::Array(parts)) = client.custom::<Value, Value>(command, Vec::new()).await
        else {
            return;
        };
        let received = Instant::now();
        let number = |value: &Value| value.as_str().and_then(|text| text.parse::<i64>().ok());
        let [Some(seconds), Some(micros)] =
            [parts.first(), parts.get(1)].map(|v| v.and_then(number))
        else {
            return;
        };
        let server_ms = seconds.saturating_mul(1000).saturating_add(micros / 1000);
        *self.reading.lock().unwrap_or_else(|e| e.into_inner()) = Some((received, server_ms));
    }

    /// Asks for a new reading at once (the reader does one at a time, so a burst of doubts
    /// costs one or two readings).
    pub(super) fn doubt(&self) {
        self.doubted.notify_one();
    }

    /// Reads the server's clock every [`READ_EVERY`] (every [`FIRST_READ_EVERY`] until the
    /// first reading), and whenever the reading is doubted, for the life of the process.
    pub(super) async fn keep_reading(&self, client: impl Fn() -> Client) {
        loop {
            let read = self
                .reading
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some();
            let wait = if read { READ_EVERY } else { FIRST_READ_EVERY };
            let last_read = Instant::now();
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.doubted.notified() => {
                    tokio::time::sleep_until((last_read + DOUBT_GAP).into()).await;
                }
            }
            self.read(&client()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unread, the clock sets no fence; read, it carries the reading forward and back on the
    /// local monotonic clock.
    #[test]
    fn carries_the_reading_on_the_local_clock() {
        let clock = ServerClock::default();
        let now = Instant::now();
        assert_eq!(clock.at(now), 0);
        *clock.reading.lock().expect("not poisoned") = Some((now, 1_000_000));
        assert_eq!(clock.at(now + Duration::from_millis(4500)), 1_004_500);
        let before = now.checked_sub(Duration::from_millis(500));
        assert_eq!(clock.at(before.expect("a past instant")), 999_500);
    }
}
