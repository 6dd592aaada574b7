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

/// How often the server's clock is read again (a step of its clock is followed this late).
const READ_EVERY: Duration = Duration::from_secs(5);

/// A reading whose round trip took longer says too little about when the server read its clock.
const MAX_ROUND_TRIP: Duration = Duration::from_millis(100);

/// The latest reading of the server's clock: `server_ms` at the local instant `at`.
#[derive(Default)]
pub(super) struct ServerClock {
    reading: Mutex<Option<(Instant, i64)>>,
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

    /// Reads the server's clock with `TIME` on `client`; keeps the reading if the round trip was
    /// short enough to place it.
    pub(super) async fn read(&self, client: &Client) {
        let command = CustomCommand::new_static("TIME", ClusterHash::Random, false);
        let sent = Instant::now();
        // fred's own timeout, so that a reading not sent in time is never sent.
        let client = client.with_options(&Options {
            fail_fast: true,
            max_attempts: Some(1),
            timeout: Some(MAX_ROUND_TRIP),
            ..Options::default()
        });
        let Ok(Value::Array(parts)) = client.custom::<Value, Value>(command, Vec::new()).await
        else {
            return;
        };
        let round_trip = sent.elapsed();
        let number = |value: &Value| value.as_str().and_then(|text| text.parse::<i64>().ok());
        let [Some(seconds), Some(micros)] =
            [parts.first(), parts.get(1)].map(|v| v.and_then(number))
        else {
            return;
        };
        let server_ms = seconds.saturating_mul(1000).saturating_add(micros / 1000);
        let midway = sent + round_trip / 2;
        *self.reading.lock().unwrap_or_else(|e| e.into_inner()) = Some((midway, server_ms));
    }

    /// Reads the server's clock every [`READ_EVERY`], for the life of the process.
    pub(super) async fn keep_reading(&self, client: impl Fn() -> Client) {
        let mut every = tokio::time::interval(READ_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
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
