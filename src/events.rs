//! Events (PROTOCOL.md part 3, askr's emit/on): a published body goes to every current subscriber
//! of its topic, on every instance — fire-and-forget, at most once, never stored.
//!
//! This is the hub of one process. Stores deliver into it: the embedded store directly, the redis
//! store from its pub/sub subscriber, so a publish on any instance reaches subscribers here. Each
//! subscriber has a small bounded buffer; one that falls behind skips events instead of slowing
//! publishers (tokio's broadcast channel reports the gap as `Lagged`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::metrics::{Open, Opened};

/// Events buffered per subscriber before it starts skipping.
const BUFFER: usize = 256;

/// The subscribers of this process, by topic. Cheap to clone.
#[derive(Clone, Default)]
pub struct Events {
    topics: Arc<Mutex<HashMap<String, broadcast::Sender<Bytes>>>>,
}

impl Events {
    /// Subscribes to `topic`; events delivered from now on reach the returned [`Subscription`].
    pub fn subscribe(&self, topic: &str) -> Subscription {
        let receiver = self
            .lock()
            .entry(topic.to_owned())
            .or_insert_with(|| broadcast::channel(BUFFER).0)
            .subscribe();
        Subscription {
            events: self.clone(),
            topic: topic.to_owned(),
            receiver,
            _open: Opened::start(Open::Subscriber),
        }
    }

    /// Hands `body` to every local subscriber of `topic`; returns how many there were.
    pub fn deliver(&self, topic: &str, body: Bytes) -> usize {
        match self.lock().get(topic) {
            Some(sender) => sender.send(body).unwrap_or(0),
            None => 0,
        }
    }

    /// How many local subscribers `topic` has.
    pub fn subscribers(&self, topic: &str) -> usize {
        self.lock().get(topic).map_or(0, |s| s.receiver_count())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, broadcast::Sender<Bytes>>> {
        // The map is consistent after every statement, so a poisoned lock is still usable.
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One subscriber; leaves its topic when dropped.
pub struct Subscription {
    events: Events,
    topic: String,
    receiver: broadcast::Receiver<Bytes>,
    _open: Opened,
}

/// What a subscriber is handed next.
#[derive(Debug, PartialEq)]
pub enum Received {
    /// An event's body.
    Event(Bytes),
    /// This many events were skipped: the subscriber fell more than [`BUFFER`] behind.
    Skipped(u64),
}

impl Subscription {
    /// The next event, or how many were skipped because this subscriber was slow.
    pub async fn next(&mut self) -> Received {
        match self.receiver.recv().await {
            Ok(body) => Received::Event(body),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                log::debug!("event subscriber of {} skipped {missed}", self.topic);
                Received::Skipped(missed)
            }
            // The hub keeps the sender while a subscription exists, so this cannot end.
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut topics = self.events.lock();
        // This receiver is still counted until it is dropped, after this function.
        if topics
            .get(&self.topic)
            .is_some_and(|s| s.receiver_count() <= 1)
        {
            topics.remove(&self.topic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subscriber of a topic gets each event; other topics do not; the topic is forgotten
    /// when its last subscriber leaves.
    #[tokio::test]
    async fn broadcast_and_cleanup() {
        let events = Events::default();
        let (mut a, mut b) = (events.subscribe("t"), events.subscribe("t"));
        let mut other = events.subscribe("u");
        assert_eq!(events.deliver("t", Bytes::from("hi")), 2);
        assert_eq!(a.next().await, Received::Event("hi".into()));
        assert_eq!(b.next().await, Received::Event("hi".into()));
        assert_eq!(events.deliver("nobody", Bytes::from("x")), 0);
        drop((a, b));
        assert_eq!(events.subscribers("t"), 0);
        assert!(!events.lock().contains_key("t"));
        events.deliver("u", Bytes::from("u1"));
        assert_eq!(other.next().await, Received::Event("u1".into()));
    }

    /// A slow subscriber skips what it missed instead of blocking the publisher, and is told how
    /// many.
    #[tokio::test]
    async fn slow_subscriber_skips() {
        let events = Events::default();
        let mut slow = events.subscribe("t");
        for n in 0..(BUFFER + 10) {
            events.deliver("t", Bytes::from(n.to_string()));
        }
        assert_eq!(slow.next().await, Received::Skipped(10));
        assert_eq!(slow.next().await, Received::Event("10".into()));
    }
}
