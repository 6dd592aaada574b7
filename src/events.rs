//! Events (PROTOCOL.md part 3, askr's emit/on): a published body goes to every current subscriber
//! of its topic, on every instance — fire-and-forget, at most once, never stored.
//!
//! This is the hub of one process. Stores deliver into it: the embedded store directly, the redis
//! store from its pub/sub subscriber, so a publish on any instance reaches subscribers here. Each
//! subscriber has a bounded queue of its own; one that falls behind skips its oldest events
//! instead of slowing publishers, and is told how many. A queue holds only what waits in it (a
//! broadcast channel's ring, allocated whole, cost 16 KiB per topic however idle).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::metrics::{Open, Opened};

/// Events queued per subscriber before it starts skipping.
const BUFFER: usize = 256;

/// The subscribers of this process, by topic. Cheap to clone.
#[derive(Clone, Default)]
pub struct Events {
    topics: Arc<Mutex<HashMap<String, Subscribers>>>,
}

/// A topic's subscribers, shared with deliveries under way (changed by copy when one is).
type Subscribers = Arc<Vec<Arc<Queue>>>;

/// One subscriber's events, waiting to be taken.
#[derive(Default)]
struct Queue {
    waiting: Mutex<Waiting>,
    ready: Notify,
}

/// What a subscriber has not taken yet.
#[derive(Default)]
struct Waiting {
    events: VecDeque<Bytes>,
    /// Events dropped from the front of `events` since the subscriber last took one.
    skipped: u64,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        // Consistent after every statement, so a poisoned lock is still usable.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `body`, the oldest event skipped when the queue is full, and wakes the subscriber.
    fn push(&self, body: Bytes) {
        {
            let mut waiting = self.lock();
            if waiting.events.len() == BUFFER {
                waiting.events.pop_front();
                waiting.skipped += 1;
            }
            waiting.events.push_back(body);
        }
        self.ready.notify_one();
    }
}

impl Events {
    /// Subscribes to `topic`; events delivered from now on reach the returned [`Subscription`].
    pub fn subscribe(&self, topic: &str) -> Subscription {
        let queue = Arc::new(Queue::default());
        let mut topics = self.lock();
        let subscribers = topics.entry(topic.to_owned()).or_default();
        Arc::make_mut(subscribers).push(queue.clone());
        drop(topics);
        Subscription {
            events: self.clone(),
            topic: topic.to_owned(),
            queue,
            _open: Opened::start(Open::Subscriber),
        }
    }

    /// Hands `body` to every local subscriber of `topic`; returns how many there were.
    pub fn deliver(&self, topic: &str, body: Bytes) -> usize {
        // Handed out once the hub is unlocked: a topic with thousands of subscribers must not
        // hold up the others.
        let Some(queues) = self.lock().get(topic).cloned() else {
            return 0;
        };
        for queue in queues.iter() {
            queue.push(body.clone());
        }
        queues.len()
    }

    /// How many local subscribers `topic` has.
    pub fn subscribers(&self, topic: &str) -> usize {
        self.lock().get(topic).map_or(0, |queues| queues.len())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Subscribers>> {
        // The map is consistent after every statement, so a poisoned lock is still usable.
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One subscriber; leaves its topic when dropped.
pub struct Subscription {
    events: Events,
    topic: String,
    queue: Arc<Queue>,
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
    /// The next event, or how many were skipped (older than any still queued) because this
    /// subscriber was slow.
    pub async fn next(&mut self) -> Received {
        loop {
            {
                let mut waiting = self.queue.lock();
                if waiting.skipped > 0 {
                    let missed = std::mem::take(&mut waiting.skipped);
                    log::debug!("event subscriber of {} skipped {missed}", self.topic);
                    return Received::Skipped(missed);
                }
                if let Some(body) = waiting.events.pop_front() {
                    return Received::Event(body);
                }
            }
            // A push between the look above and this wait leaves its permit: it is not missed.
            self.queue.ready.notified().await;
        }
    }

    /// What is queued for this subscriber now, without waiting, for a stopping relay to hand
    /// out before it ends the subscription: how many were skipped (if any), then the events.
    pub fn take_queued(&mut self) -> Vec<Received> {
        let mut waiting = self.queue.lock();
        let skipped = std::mem::take(&mut waiting.skipped);
        let skipped = (skipped > 0).then_some(Received::Skipped(skipped));
        let events = waiting.events.drain(..).map(Received::Event);
        skipped.into_iter().chain(events).collect()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut topics = self.events.lock();
        if let Some(queues) = topics.get_mut(&self.topic) {
            Arc::make_mut(queues).retain(|queue| !Arc::ptr_eq(queue, &self.queue));
            if queues.is_empty() {
                topics.remove(&self.topic);
            }
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
        events.deliver("t", Bytes::from("queued"));
        assert_eq!(a.take_queued(), [Received::Event("queued".into())]);
        assert_eq!(a.take_queued(), []);
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
