//! The embedded store: tunnels in this process's memory, with the same observable behaviour as
//! the redis store. One `std::sync::Mutex` guards all state; it is never held across an `.await`,
//! and every operation is a few map look-ups, so contention stays low and each step is atomic.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    Audience, Backend, Bound, Delivery, Message, MessageStatus, Payload, Produced, StoreError,
};
use crate::tunnel::{MessageId, TunnelId};
use crate::wake::{Waited, WakeKey};

/// How often expired replies and job records are swept away.
const PURGE_EVERY: Duration = Duration::from_secs(10);

/// The embedded store.
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    audience: Audience,
}

#[derive(Default)]
struct State {
    /// Tunnels holding messages; one that empties is let go.
    tunnels: HashMap<TunnelId, Tunnel>,
    /// The newest message id given out in any tunnel: ids increase store-wide, so a tunnel let go
    /// and made again never repeats an id (whose unread reply a new message could read).
    last_id: Option<MessageId>,
    replies: HashMap<(TunnelId, MessageId), Expiring<Payload>>,
    jobs: HashMap<(TunnelId, MessageId), Expiring<Bytes>>,
    instances: HashMap<String, Expiring<Bytes>>,
}

/// One tunnel: a stream of messages, some of them pending.
#[derive(Default)]
struct Tunnel {
    /// Messages not yet handed out, oldest first.
    queued: VecDeque<(MessageId, Payload)>,
    /// Messages handed out in pending mode, with when they were last handed out. A message
    /// trimmed away while pending keeps its entry without a body, as in a stream's pending list:
    /// its consumer may still answer it, and it is dropped when it would be handed out again.
    pending: BTreeMap<MessageId, (Option<Payload>, Instant)>,
}

impl Tunnel {
    /// Hands out the next message as `delivery` says, at `now`.
    fn take(&mut self, delivery: Delivery, now: Instant) -> Option<Message> {
        if let Delivery::Pending { redeliver_after } = delivery {
            let is_due = |handed_out: &Instant| now.duration_since(*handed_out) >= redeliver_after;
            // A trimmed message found due is dropped, as XCLAIM drops it from a stream's list.
            self.pending
                .retain(|_, (body, handed_out)| body.is_some() || !is_due(handed_out));
            let due = self.pending.iter_mut().find(|(_, (_, at))| is_due(at));
            if let Some((id, (Some(payload), handed_out))) = due {
                *handed_out = now;
                return Some(Message {
                    id: *id,
                    payload: payload.clone(),
                });
            }
        }
        let (id, payload) = self.queued.pop_front()?;
        if delivery != Delivery::Remove {
            self.pending.insert(id, (Some(payload.clone()), now));
        }
        Some(Message { id, payload })
    }

    /// Whether a consumer could take a message now: one never handed out, or (`redeliver_after`)
    /// one unacknowledged that long whose body was not trimmed away.
    fn has_message_for(&self, redeliver_after: Option<Duration>, now: Instant) -> bool {
        let due = |after: Duration| {
            let mut pending = self.pending.values();
            pending.any(|(body, at)| body.is_some() && now.duration_since(*at) >= after)
        };
        !self.queued.is_empty() || redeliver_after.is_some_and(due)
    }

    /// Nothing queued and nothing pending, not even a trimmed message awaiting its answer.
    fn holds_nothing(&self) -> bool {
        self.queued.is_empty() && self.pending.is_empty()
    }

    fn len(&self) -> u64 {
        let pending = self.pending.values().filter(|(body, _)| body.is_some());
        (self.queued.len() + pending.count()) as u64
    }

    /// Drops the oldest messages, pending or not, until at most `maxlen` remain.
    fn trim(&mut self, maxlen: u64) {
        while self.len() > maxlen {
            let oldest_queued = self.queued.front().map(|(id, _)| *id);
            let oldest_pending = self
                .pending
                .iter_mut()
                .find(|(_, (body, _))| body.is_some());
            match (oldest_queued, oldest_pending) {
                (Some(q), Some((p, (body, _)))) if *p < q => *body = None,
                (Some(_), _) => {
                    self.queued.pop_front();
                }
                (None, Some((_, (body, _)))) => *body = None,
                (None, None) => break,
            }
        }
    }
}

/// A reply or a job record, dropped at `expires`.
struct Expiring<T> {
    value: T,
    expires: Instant,
}

impl<T> Expiring<T> {
    fn new(value: T, ttl: Duration) -> Expiring<T> {
        Expiring {
            value,
            expires: Instant::now() + ttl,
        }
    }

    /// The value, unless it has expired.
    fn live(self) -> Option<T> {
        (self.expires > Instant::now()).then_some(self.value)
    }
}

impl MemoryStore {
    /// An empty store reporting to `audience`; a background task sweeps expired entries.
    pub fn new(audience: Audience) -> MemoryStore {
        let state = Arc::new(Mutex::new(State::default()));
        tokio::spawn(purge_expired(Arc::downgrade(&state)));
        MemoryStore { state, audience }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl State {
    /// Lets `tunnel` go if it holds nothing: a relay whose clients use a tunnel id per session
    /// would otherwise keep every id it ever saw.
    fn release_if_empty(&mut self, tunnel: &TunnelId) {
        if self.tunnels.get(tunnel).is_some_and(Tunnel::holds_nothing) {
            self.tunnels.remove(tunnel);
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every operation leaves the state consistent before it can panic, so poison is ignored.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sweeps expired replies and job records until the store is dropped.
async fn purge_expired(state: Weak<Mutex<State>>) {
    let mut tick = tokio::time::interval(PURGE_EVERY);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        let now = Instant::now();
        let mut state = lock(&state);
        state.replies.retain(|_, r| r.expires > now);
        state.jobs.retain(|_, j| j.expires > now);
        state.instances.retain(|_, i| i.expires > now);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[async_trait]
impl Backend for MemoryStore {
    async fn produce(
        &self,
        tunnel: &TunnelId,
        payload: Payload,
        bound: Bound,
        job_ttl: Option<Duration>,
    ) -> Result<Produced, StoreError> {
        let produced = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let t = state.tunnels.entry(tunnel.clone()).or_default();
            if let Bound::Limit(limit) = bound {
                if t.len() >= limit {
                    return Ok(Produced::Full { size: t.len() });
                }
            }
            let id = MessageId::next_after(state.last_id, now_ms());
            state.last_id = Some(id);
            let record = job_ttl.map(|ttl| Expiring::new(payload.body.clone(), ttl));
            t.queued.push_back((id, payload));
            let produced = match bound {
                Bound::Limit(_) => Produced::Stored {
                    id,
                    size: Some(t.len()),
                },
                Bound::Trim(maxlen) => {
                    t.trim(maxlen);
                    Produced::Stored { id, size: None }
                }
            };
            if let Some(record) = record {
                state.jobs.insert((tunnel.clone(), id), record);
            }
            produced
        };
        self.audience
            .wakeups
            .wake(&WakeKey::Message(tunnel.to_string()));
        Ok(produced)
    }

    async fn consume(
        &self,
        tunnel: &TunnelId,
        delivery: Delivery,
    ) -> Result<Option<Message>, StoreError> {
        let mut state = self.lock();
        let Some(t) = state.tunnels.get_mut(tunnel) else {
            return Ok(None);
        };
        let message = t.take(delivery, Instant::now());
        state.release_if_empty(tunnel);
        Ok(message)
    }

    async fn ack(&self, tunnel: &TunnelId, msg: MessageId) -> Result<(), StoreError> {
        let mut state = self.lock();
        if let Some(t) = state.tunnels.get_mut(tunnel) {
            t.pending.remove(&msg);
            if let Ok(at) = t.queued.binary_search_by_key(&msg, |(id, _)| *id) {
                t.queued.remove(at);
            }
        }
        state.release_if_empty(tunnel);
        Ok(())
    }

    async fn reply(
        &self,
        tunnel: &TunnelId,
        msg: MessageId,
        reply: Payload,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        {
            let mut state = self.lock();
            let was_pending = state
                .tunnels
                .get_mut(tunnel)
                .is_some_and(|t| t.pending.remove(&msg).is_some());
            if !was_pending {
                return Ok(false);
            }
            state.release_if_empty(tunnel);
            let stored = Expiring::new(reply, ttl);
            state.replies.insert((tunnel.clone(), msg), stored);
            // A job's record is kept as long as its result, unless it has expired already.
            let now = Instant::now();
            let record = state.jobs.get_mut(&(tunnel.clone(), msg));
            if let Some(record) = record.filter(|record| record.expires > now) {
                record.expires = now + ttl;
            }
        }
        self.audience
            .wakeups
            .wake(&WakeKey::Reply(tunnel.to_string(), msg.to_string()));
        Ok(true)
    }

    async fn take_reply(
        &self,
        tunnel: &TunnelId,
        msg: MessageId,
    ) -> Result<Option<Payload>, StoreError> {
        let mut state = self.lock();
        let key = (tunnel.clone(), msg);
        let reply = state.replies.remove(&key).and_then(Expiring::live);
        if reply.is_some() {
            state.jobs.remove(&key);
        }
        Ok(reply)
    }

    async fn status(&self, tunnel: &TunnelId, msg: MessageId) -> Result<MessageStatus, StoreError> {
        let state = self.lock();
        let Some(t) = state.tunnels.get(tunnel) else {
            return Ok(MessageStatus::Gone);
        };
        Ok(if t.pending.contains_key(&msg) {
            MessageStatus::Pending
        } else if t.queued.binary_search_by_key(&msg, |(id, _)| *id).is_ok() {
            MessageStatus::Queued
        } else {
            MessageStatus::Gone
        })
    }

    async fn len(&self, tunnel: &TunnelId) -> Result<u64, StoreError> {
        Ok(self.lock().tunnels.get(tunnel).map_or(0, Tunnel::len))
    }

    async fn clear(&self, tunnel: &TunnelId) -> Result<(), StoreError> {
        // Ids keep increasing all the same (see `State::last_id`).
        self.lock().tunnels.remove(tunnel);
        Ok(())
    }

    async fn job(&self, queue: &TunnelId, msg: MessageId) -> Result<Option<Bytes>, StoreError> {
        let state = self.lock();
        let record = state.jobs.get(&(queue.clone(), msg));
        Ok(record
            .filter(|r| r.expires > Instant::now())
            .map(|r| r.value.clone()))
    }

    async fn forget_job(&self, queue: &TunnelId, msg: MessageId) -> Result<bool, StoreError> {
        let forgotten = self.lock().jobs.remove(&(queue.clone(), msg));
        Ok(forgotten.and_then(Expiring::live).is_some())
    }

    async fn restore_job(
        &self,
        queue: &TunnelId,
        msg: MessageId,
        record: Bytes,
        reply: Option<Payload>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        let key = (queue.clone(), msg);
        if let Some(reply) = reply {
            state.replies.insert(key.clone(), Expiring::new(reply, ttl));
        }
        state.jobs.insert(key, Expiring::new(record, ttl));
        Ok(())
    }

    async fn announce(
        &self,
        instance: &str,
        record: Bytes,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let record = Expiring::new(record, ttl);
        self.lock().instances.insert(instance.to_owned(), record);
        Ok(())
    }

    async fn instances(&self) -> Result<Vec<Bytes>, StoreError> {
        let now = Instant::now();
        let state = self.lock();
        let live = state.instances.values().filter(|i| i.expires > now);
        Ok(live.map(|i| i.value.clone()).collect())
    }

    async fn publish(&self, topic: &str, body: Bytes) -> Result<(), StoreError> {
        self.audience.events.deliver(topic, body);
        Ok(())
    }

    async fn ready(&self, keys: &[Waited]) -> Result<Vec<bool>, StoreError> {
        let state = self.lock();
        let now = Instant::now();
        let ready = |waited: &Waited| -> Option<bool> {
            Some(match &waited.key {
                WakeKey::Message(tunnel) => state
                    .tunnels
                    .get(&TunnelId::parse(tunnel)?)?
                    .has_message_for(waited.redeliver_after, now),
                WakeKey::Reply(tunnel, msg) => {
                    let key = (TunnelId::parse(tunnel)?, msg.parse().ok()?);
                    state.replies.contains_key(&key)
                }
            })
        };
        Ok(keys.iter().map(|key| ready(key).unwrap_or(false)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(body: &'static str) -> Payload {
        Payload {
            body: Bytes::from_static(body.as_bytes()),
            content_type: None,
        }
    }

    async fn produce(store: &MemoryStore, tunnel: &TunnelId) -> MessageId {
        match store
            .produce(tunnel, payload("m"), Bound::Limit(10), None)
            .await
        {
            Ok(Produced::Stored { id, .. }) => id,
            other => panic!("not stored: {other:?}"),
        }
    }

    /// A tunnel that empties is let go, however it empties (consumed, acknowledged, replied,
    /// cleared), and a message produced in it afterwards still gets a newer id.
    #[tokio::test]
    async fn empty_tunnels_are_let_go() {
        let store = MemoryStore::new(Audience::default());
        let t = TunnelId::parse("t").unwrap();
        let pending = Delivery::Pending {
            redeliver_after: Duration::from_secs(60),
        };
        let mut last = produce(&store, &t).await;
        store.consume(&t, Delivery::Remove).await.unwrap();
        assert!(store.lock().tunnels.is_empty(), "consumed");
        for how in ["ack", "reply", "clear"] {
            let id = produce(&store, &t).await;
            assert!(id > last, "{id} after {last}");
            last = id;
            store.consume(&t, pending).await.unwrap();
            assert!(!store.lock().tunnels.is_empty(), "pending, before {how}");
            match how {
                "ack" => store.ack(&t, id).await.unwrap(),
                "reply" => {
                    let replied = store.reply(&t, id, payload("r"), Duration::from_secs(60));
                    assert!(replied.await.unwrap());
                }
                _ => store.clear(&t).await.unwrap(),
            }
            assert!(store.lock().tunnels.is_empty(), "{how}");
        }
    }
}
