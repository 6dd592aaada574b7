//! Wake-ups: the local registry of long-polls waiting for a tunnel's message or a reply.
//!
//! A waiting poll holds no store connection; it waits here on a [`tokio::sync::Notify`]. Stores
//! call [`Wakeups::wake`] when something a waiter may want has arrived: the embedded store does so
//! directly, the redis store from its one pub/sub subscriber, so a produce on any instance wakes a
//! poll on this one. A woken waiter re-reads the store, which alone decides who gets a message.
//! Once a second the store checks every waited key at once (`Store::open` starts that re-check),
//! so a lost notification delays a waiter by about a second, never forever.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// What a waiter waits for, as published between instances.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WakeKey {
    /// A new message in this tunnel.
    Message(String),
    /// The reply to this message (`tunnel`, `message id`).
    Reply(String, String),
}

impl WakeKey {
    /// The form sent over pub/sub: `m:{tunnel}` or `r:{tunnel}:{msg}`.
    pub fn encode(&self) -> String {
        match self {
            WakeKey::Message(tunnel) => format!("m:{tunnel}"),
            WakeKey::Reply(tunnel, msg) => format!("r:{tunnel}:{msg}"),
        }
    }

    /// Reads the pub/sub form back; `None` for anything else.
    pub fn decode(raw: &str) -> Option<WakeKey> {
        if let Some(tunnel) = raw.strip_prefix("m:") {
            return Some(WakeKey::Message(tunnel.to_owned()));
        }
        let (tunnel, msg) = raw.strip_prefix("r:")?.rsplit_once(':')?;
        Some(WakeKey::Reply(tunnel.to_owned(), msg.to_owned()))
    }
}

/// The waiters of this process, by key. Cheap to clone.
#[derive(Clone, Default)]
pub struct Wakeups {
    waiting: Arc<Mutex<HashMap<WakeKey, Slot>>>,
}

struct Slot {
    notify: Arc<Notify>,
    waiters: usize,
}

impl Wakeups {
    /// Registers interest in `key`; wake-ups sent from now on reach the returned [`Waiter`].
    pub fn register(&self, key: WakeKey) -> Waiter {
        let notify = {
            let mut waiting = self.lock();
            let slot = waiting.entry(key.clone()).or_insert_with(|| Slot {
                notify: Arc::new(Notify::new()),
                waiters: 0,
            });
            slot.waiters += 1;
            slot.notify.clone()
        };
        Waiter {
            wakeups: self.clone(),
            key,
            notify,
        }
    }

    /// Wakes one waiter of `key`: one message serves one consumer, so waking more is wasted work.
    /// A woken waiter that finds nothing waits again; the periodic re-check covers the rest.
    pub fn wake(&self, key: &WakeKey) {
        if let Some(slot) = self.lock().get(key) {
            match key {
                WakeKey::Message(_) => slot.notify.notify_one(),
                WakeKey::Reply(..) => slot.notify.notify_waiters(),
            }
        }
    }

    /// Wakes every waiter of `key`: the periodic re-check found something that a lost
    /// notification may have left several waiters unaware of.
    pub fn wake_all(&self, key: &WakeKey) {
        if let Some(slot) = self.lock().get(key) {
            slot.notify.notify_waiters();
        }
    }

    /// The keys waited on right now.
    pub fn keys(&self) -> Vec<WakeKey> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WakeKey, Slot>> {
        // A panic while holding this lock cannot leave the map inconsistent, so poison is ignored.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One registered waiter; unregisters itself when dropped.
pub struct Waiter {
    wakeups: Wakeups,
    key: WakeKey,
    notify: Arc<Notify>,
}

impl Waiter {
    /// The notification to await. Create and `enable` it before checking the store, so that a
    /// wake-up sent between the check and the await is not missed.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiting = self.wakeups.lock();
        if let Some(slot) = waiting.get_mut(&self.key) {
            slot.waiters -= 1;
            if slot.waiters == 0 {
                waiting.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys survive the round trip through their pub/sub form, tunnel ids with `-` and `_` too.
    #[test]
    fn keys_round_trip() {
        for key in [
            WakeKey::Message("a-b_c".into()),
            WakeKey::Reply("t_1".into(), "17-0".into()),
        ] {
            assert_eq!(WakeKey::decode(&key.encode()), Some(key));
        }
        assert_eq!(WakeKey::decode("x:y"), None);
    }

    /// A wake-up reaches a registered waiter, and dropping the last waiter forgets the key.
    #[tokio::test]
    async fn wake_reaches_waiter() {
        let wakeups = Wakeups::default();
        let key = WakeKey::Message("t".into());
        let waiter = wakeups.register(key.clone());
        {
            let notified = waiter.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            wakeups.wake(&key);
            notified.await;
        }
        assert_eq!(wakeups.lock()[&key].waiters, 1);
        drop(waiter);
        assert!(wakeups.lock().is_empty());
    }
}
