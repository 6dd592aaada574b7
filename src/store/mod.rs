//! Stores: where tunnels live. One narrow [`Backend`] trait with the few operations the tunnel
//! protocol needs, two implementations — [`memory`] (embedded) and [`redis`] (KeyDB / Redis
//! streams in http-event-relay's key layout) — and the [`Store`] handle the rest of Burrow holds.
//!
//! Every backend makes each operation atomic on its own (produce-with-backpressure included) and
//! reports new messages and replies to the process's [`Wakeups`], and published events to its
//! [`Events`], from whichever instance they came.

mod memory;
mod redis;

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::config::StoreConfig;
use crate::events::Events;
use crate::tunnel::{MessageId, TunnelId};
use crate::wake::{Waited, Wakeups};

/// How often every waited key is re-checked against the store, so that a lost notification (or a
/// producer that publishes none, like the Lua relay during a migration) delays a waiter by at most
/// about this long.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// A store failure. Every backend converts its own errors into this one type.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or did not answer in time; the client should retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered something Burrow cannot use.
    #[error("store error: {0}")]
    Internal(String),
}

/// A body with its optional Content-Type: a message or a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// The bytes exactly as produced.
    pub body: Bytes,
    /// The producer's Content-Type, if it gave one.
    pub content_type: Option<String>,
}

/// A message handed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The message's id in its tunnel.
    pub id: MessageId,
    /// What the producer sent.
    pub payload: Payload,
}

/// How a produce bounds the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// Backpressure: refuse the message if the tunnel already holds `limit` messages.
    Limit(u64),
    /// No backpressure: store, then drop the oldest messages beyond `maxlen`.
    Trim(u64),
}

/// The outcome of a produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Produced {
    /// Stored under `id`; `size` is the tunnel's size afterwards when backpressure was on.
    Stored { id: MessageId, size: Option<u64> },
    /// Refused by backpressure; the tunnel holds `size` messages.
    Full { size: u64 },
}

/// How a consumer takes a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Removed as it is handed out.
    Remove,
    /// Kept pending until acknowledged. A pending message is handed out again once it has been
    /// unacknowledged for `redeliver_after` (zero: at once, the original's `?pending`).
    Pending { redeliver_after: Duration },
    /// Kept pending until acknowledged, but only a new message is handed out: how a long-poll of
    /// the original's `?pending` takes one once it has waited (see [`Delivery::once_waited`]).
    PendingNew,
}

impl Delivery {
    /// How a long-poll takes a message after its first attempt found none. The original's
    /// `?pending` hands a pending message out again to every consumer that asks, but a poll
    /// already waiting sees new messages only (a blocking `XREADGROUP ... >`), so a message
    /// produced while several such polls wait goes to exactly one of them.
    pub fn once_waited(self) -> Delivery {
        match self {
            Delivery::Pending { redeliver_after } if redeliver_after.is_zero() => {
                Delivery::PendingNew
            }
            other => other,
        }
    }
}

/// Where a message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageStatus {
    /// In the tunnel, not yet handed out.
    Queued,
    /// Handed out in pending mode and not acknowledged.
    Pending,
    /// Never existed, consumed without `pending`, or acknowledged.
    Gone,
}

/// The operations a store provides; each one is atomic.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Appends a message, bounded as `bound` says, and wakes a consumer waiting on the tunnel.
    /// With `job_ttl`, the same atomic step keeps the body as the job record of the new message
    /// for that long (see [`Backend::job`]), so a job is never queued without its record.
    async fn produce(
        &self,
        tunnel: &TunnelId,
        payload: Payload,
        bound: Bound,
        job_ttl: Option<Duration>,
    ) -> Result<Produced, StoreError>;

    /// Takes the next message for a consumer, if there is one.
    async fn consume(
        &self,
        tunnel: &TunnelId,
        delivery: Delivery,
    ) -> Result<Option<Message>, StoreError>;

    /// Acknowledges a message: removes it from the pending set and the tunnel. Idempotent.
    async fn ack(&self, tunnel: &TunnelId, msg: MessageId) -> Result<(), StoreError>;

    /// If `msg` is pending: acknowledges it, keeps `reply` (and the message's job record, if it is
    /// a job) for `ttl`, wakes its readers and returns `true`. Otherwise stores nothing and
    /// returns `false`.
    async fn reply(
        &self,
        tunnel: &TunnelId,
        msg: MessageId,
        reply: Payload,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Hands out the reply to `msg` and deletes it (read once), with `msg`'s job record if it is
    /// a job, in one step.
    async fn take_reply(
        &self,
        tunnel: &TunnelId,
        msg: MessageId,
    ) -> Result<Option<Payload>, StoreError>;

    /// Where `msg` stands in `tunnel`.
    async fn status(&self, tunnel: &TunnelId, msg: MessageId) -> Result<MessageStatus, StoreError>;

    /// Messages in the tunnel, pending ones included.
    async fn len(&self, tunnel: &TunnelId) -> Result<u64, StoreError>;

    /// Deletes the tunnel with its pending state.
    async fn clear(&self, tunnel: &TunnelId) -> Result<(), StoreError>;

    /// The fields of a job (the JSON object it was triggered with, kept by `produce` with a
    /// `job_ttl`), if it is known: triggered, not expired, not yet collected. Any instance can
    /// answer for the job with it while it runs and once it is done.
    async fn job(&self, queue: &TunnelId, msg: MessageId) -> Result<Option<Bytes>, StoreError>;

    /// Forgets a job that will never finish (its message left the queue without a reply);
    /// whether this call is the one that forgot it.
    async fn forget_job(&self, queue: &TunnelId, msg: MessageId) -> Result<bool, StoreError>;

    /// Puts back a job's final state that was taken (by `take_reply` or `forget_job`) but could
    /// not be delivered: its record and, if it had one, its reply, kept for `ttl`.
    async fn restore_job(
        &self,
        queue: &TunnelId,
        msg: MessageId,
        record: Bytes,
        reply: Option<Payload>,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Records the presence of relay instance `instance` (its address and agents) for `ttl`.
    async fn announce(
        &self,
        instance: &str,
        record: Bytes,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// The presence records of every live instance, this one included.
    async fn instances(&self) -> Result<Vec<Bytes>, StoreError>;

    /// Publishes an event to the subscribers of `topic` on every instance (fire-and-forget).
    /// Refused while [`Backend::hears_events`] is false: this instance's own subscribers would
    /// miss it.
    async fn publish(&self, topic: &str, body: Bytes) -> Result<(), StoreError>;

    /// Whether events published now reach this process's subscribers (redis: its pub/sub
    /// connection is up and subscribed).
    fn hears_events(&self) -> bool {
        true
    }

    /// Makes the events published on `topic` from now on reach this process, for a subscriber
    /// registered with the audience first (redis: the subscriber takes the topic's channel while
    /// the topic has subscribers here). `Unavailable` if that cannot be done now.
    async fn listen(&self, _topic: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Resolves the next time the store is back after its connection was lost: a server
    /// restarted without persistence has lost what it held (the presence records). Never, for
    /// a store in the process.
    async fn back(&self) {
        std::future::pending::<()>().await;
    }

    /// For each key, whether its waiters may find something now: a message in the tunnel never
    /// handed out, one unacknowledged for its `redeliver_after`, or the reply. A false positive
    /// costs a waiter one store read; the answer must not miss anything.
    async fn ready(&self, keys: &[Waited]) -> Result<Vec<bool>, StoreError>;
}

/// What a store reports to: the waiting long-polls and the event subscribers of this process.
#[derive(Clone, Default)]
pub struct Audience {
    /// Waiters, woken when a message or reply they wait for arrives.
    pub wakeups: Wakeups,
    /// Event subscribers, handed every event published on their topic.
    pub events: Events,
}

/// The store handle the relay holds: a backend plus the audience it feeds. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    audience: Audience,
}

impl Store {
    /// Opens the configured store and starts the periodic re-check of waited keys. For redis this
    /// connects and starts the wake-up subscriber; an unreachable server is not fatal — requests
    /// answer 503 until it is back. Call within the runtime that should run the background tasks.
    pub async fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        let audience = Audience::default();
        let backend: Arc<dyn Backend> = match config {
            StoreConfig::Memory => {
                crate::metrics::store_up(true);
                Arc::new(memory::MemoryStore::new(audience.clone()))
            }
            StoreConfig::Redis(redis) => {
                Arc::new(redis::RedisStore::connect(redis, audience.clone()).await?)
            }
        };
        tokio::spawn(recheck(Arc::downgrade(&backend), audience.wakeups.clone()));
        Ok(Store { backend, audience })
    }

    /// The waiters of this process, fed by the backend.
    pub fn wakeups(&self) -> &Wakeups {
        &self.audience.wakeups
    }

    /// The event subscribers of this process, fed by the backend.
    pub fn events(&self) -> &Events {
        &self.audience.events
    }
}

/// Once per [`RECHECK_EVERY`], asks the store about every waited key in one batch and wakes the
/// waiters of those that have something; ends when the store is dropped.
async fn recheck(backend: std::sync::Weak<dyn Backend>, wakeups: Wakeups) {
    let mut tick = tokio::time::interval(RECHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(backend) = backend.upgrade() else {
            return;
        };
        let keys = wakeups.waited();
        if keys.is_empty() {
            continue;
        }
        match backend.ready(&keys).await {
            Ok(ready) => {
                let found = keys.iter().zip(ready).filter(|(_, ready)| *ready);
                found.for_each(|(waited, _)| wakeups.wake_all(&waited.key));
            }
            // The waiters' own reads report the outage; this one only waits for the next tick.
            Err(e) => log::debug!("re-check of {} waited keys failed: {e}", keys.len()),
        }
    }
}

impl Deref for Store {
    type Target = dyn Backend;

    fn deref(&self) -> &(dyn Backend + 'static) {
        self.backend.as_ref()
    }
}
