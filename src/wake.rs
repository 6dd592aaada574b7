//! Wake-ups: the local registry of long-polls waiting for a tunnel's message or a reply.
//!
//! A waiting poll holds no store connection; it waits here on a [`tokio::sync::Notify`]. Stores
//! call [`Wakeups::wake`] when something a waiter may want has arrived: the embedded store does so
//! directly, the redis store from its one pub/sub subscriber, so a produce on any instance wakes a
//! poll on this one. A woken waiter re-reads the store, which alone decides who gets a message.
//! Once a second the store checks every waited key at once (`Store::open` starts that re-check),
//! so a lost notification delays a waiter by about a second, never forever. That check asks
//! about what the waiters could take (see [`Waited`]), so waiters on a tunnel whose messages are
//! all out with consumers are not woken for nothing every second.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// A waited key as the periodic re-check asks the store about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waited {
    /// What is waited for.
    pub key: WakeKey,
    /// For a tunnel: the shortest visibility timeout among its waiters in pending mode, after
    /// which a message left unacknowledged is theirs to take again. `None`: only a message never
    /// handed out is of use to the waiters.
    pub redeliver_after: Option<Duration>,
}

impl Waited {
    /// `key`, for waiters that take only what was never handed out (or a reply).
    pub fn new(key: WakeKey) -> Waited {
        Waited {
            key,
            redeliver_after: None,
        }
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
    /// How many of the waiters take a message back after each visibility timeout.
    redeliveries: BTreeMap<Duration, usize>,
}

impl Wakeups {
    /// Registers interest in `waited.key`; wake-ups sent from now on reach the returned
    /// [`Waiter`].
    pub fn register(&self, waited: Waited) -> Waiter {
        let Waited {
            key,
            redeliver_after,
        } = waited;
        let notify = {
            let mut waiting = self.lock();
            let slot = waiting.entry(key.clone()).or_insert_with(|| Slot {
                notify: Arc::new(Notify::new()),
                waiters: 0,
                redeliveries: BTreeMap::new(),
            });
            slot.waiters += 1;
            if let Some(after) = redeliver_after {
                *slot.redeliveries.entry(after).or_default() += 1;
            }
            slot.notify.clone()
        };
        Waiter {
            wakeups: self.clone(),
            key,
            redeliver_after,
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
    pub fn waited(&self) -> Vec<Waited> {
        let waiting = self.lock();
        let waited = waiting.iter().map(|(key, slot)| Waited {
            key: key.clone(),
            redeliver_after: slot.redeliveries.keys().next().copied(),
        });
        waited.collect()
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
    redeliver_after: Option<Duration>,
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
            if let Some(after) = self.redeliver_after {
                if let Some(count) = slot.redeliveries.get_mut(&after) {
                    *count -= 1;
                    if *count == 0 {
                        slot.redeliveries.remove(&after);
                    }
                }
            }
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
        let waiter = wakeups.register(Waited::new(key.clone()));
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

    /// The re-check is asked about the shortest visibility timeout of a tunnel's waiting pending
    /// consumers, as long as one of them waits.
    #[test]
    fn waited_keys_carry_the_shortest_redelivery() {
        let wakeups = Wakeups::default();
        let key = WakeKey::Message("t".into());
        let pending = |secs| Waited {
            key: key.clone(),
            redeliver_after: Some(Duration::from_secs(secs)),
        };
        let redelivery = || wakeups.waited().first().and_then(|w| w.redeliver_after);
        let plain = wakeups.register(Waited::new(key.clone()));
        assert_eq!(redelivery(), None);
        let long = wakeups.register(pending(60));
        let short = wakeups.register(pending(5));
        let short_too = wakeups.register(pending(5));
        assert_eq!(redelivery(), Some(Duration::from_secs(5)));
        drop(short);
        assert_eq!(redelivery(), Some(Duration::from_secs(5)));
        drop(short_too);
        assert_eq!(redelivery(), Some(Duration::from_secs(60)));
        drop(long);
        assert_eq!(redelivery(), None);
        assert_eq!(wakeups.waited(), vec![Waited::new(key.clone())]);
        drop(plain);
        assert!(wakeups.waited().is_empty());
    }
}
