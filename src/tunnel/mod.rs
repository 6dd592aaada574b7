//! The tunnel protocol (PROTOCOL.md part 1): produce with backpressure, consume with or without
//! pending mode, long-polls, acknowledgements and replies. Store-agnostic: it speaks only to the
//! [`Store`] handle and knows nothing of HTTP.

mod id;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

pub use id::{MessageId, TunnelId};

use crate::config::TunnelConfig;
use crate::error::Error;
use crate::metrics::{self, MessageEvent, StoreOp, Waiting};
use crate::store::{Bound, Delivery, Message, MessageStatus, Payload, Produced, Store};
use crate::wake::{Waited, WakeKey};

/// A produce's `limit` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// No `limit`: backpressure as `TUNNEL_BACKPRESSURE` says, at `TUNNEL_MAXLEN`.
    Default,
    /// `limit=0` or negative: no backpressure for this request.
    Off,
    /// `limit=N`: backpressure at N messages.
    At(u64),
}

/// Signals that the server is shutting down (`true`); long-polls then answer at once.
pub type Shutdown = watch::Receiver<bool>;

/// Resolves once the server is shutting down: at once if it already is.
pub async fn stopping(shutdown: &mut Shutdown) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// The tunnels of one relay process.
#[derive(Clone)]
pub struct Tunnels {
    store: Store,
    config: TunnelConfig,
}

impl Tunnels {
    /// Tunnels kept in `store`, following `config`.
    pub fn new(store: Store, config: TunnelConfig) -> Tunnels {
        Tunnels { store, config }
    }

    /// The rules these tunnels follow.
    pub fn config(&self) -> &TunnelConfig {
        &self.config
    }

    /// Stores a message; [`Error::QueueFull`] when backpressure refuses it.
    pub async fn produce(
        &self,
        tunnel: &TunnelId,
        payload: Payload,
        limit: Limit,
    ) -> Result<(MessageId, Option<u64>), Error> {
        self.produce_kept(tunnel, payload, limit, None).await
    }

    /// Stores a job's message (its body the job's fields) with the job's record, kept for the job
    /// TTL (a reply shortens it to its own), in one step; [`Error::QueueFull`] when backpressure
    /// refuses it.
    pub async fn produce_job(
        &self,
        queue: &TunnelId,
        payload: Payload,
        limit: Limit,
    ) -> Result<MessageId, Error> {
        let ttl = Some(self.config.job_ttl);
        let (msg, _) = self.produce_kept(queue, payload, limit, ttl).await?;
        Ok(msg)
    }

    /// How a produce with `limit` is bounded: 400 for a limit above `TUNNEL_MAXLEN`.
    pub fn bound(&self, limit: Limit) -> Result<Bound, Error> {
        let maxlen = self.config.maxlen;
        match limit {
            // The original's words, though a limit of the max length itself is taken.
            Limit::At(n) if n > maxlen => Err(Error::BadParameter(
                "Limit must be less than the tunnel max length".into(),
            )),
            Limit::At(n) => Ok(Bound::Limit(n)),
            Limit::Default if self.config.backpressure => Ok(Bound::Limit(maxlen)),
            Limit::Default | Limit::Off => Ok(Bound::Trim(maxlen)),
        }
    }

    /// Stores a message, with a job record kept for `job_ttl` if given.
    async fn produce_kept(
        &self,
        tunnel: &TunnelId,
        payload: Payload,
        limit: Limit,
        job_ttl: Option<Duration>,
    ) -> Result<(MessageId, Option<u64>), Error> {
        let bound = self.bound(limit)?;
        let produced = metrics::store_op(
            StoreOp::Produce,
            self.store.produce(tunnel, payload, bound, job_ttl),
        );
        match produced.await? {
            Produced::Stored { id, size } => {
                metrics::message(MessageEvent::Produced);
                Ok((id, size))
            }
            Produced::Full { size } => {
                metrics::message(MessageEvent::Rejected);
                Err(Error::QueueFull { size })
            }
        }
    }

    /// Takes a message, waiting up to `wait` for one (`None`: answer at once).
    pub async fn consume(
        &self,
        tunnel: &TunnelId,
        delivery: Delivery,
        wait: Option<Duration>,
        shutdown: &mut Shutdown,
    ) -> Result<Option<Message>, Error> {
        let key = Waited {
            key: WakeKey::Message(tunnel.to_string()),
            // Only these waiters take back what others left unacknowledged: the others need not
            // be woken for a message that is out with a consumer.
            redeliver_after: match delivery {
                Delivery::Pending { redeliver_after } if !redeliver_after.is_zero() => {
                    Some(redeliver_after)
                }
                _ => None,
            },
        };
        let waited = AtomicBool::new(false);
        let attempt = || {
            let delivery = match waited.swap(true, Ordering::Relaxed) {
                false => delivery,
                true => delivery.once_waited(),
            };
            metrics::store_op(StoreOp::Consume, self.store.consume(tunnel, delivery))
        };
        let message = self.wait_for(key, wait, shutdown, attempt).await?;
        if message.is_some() {
            metrics::message(MessageEvent::Consumed);
        }
        Ok(message)
    }

    /// Acknowledges a message (always succeeds, also for unknown ids).
    pub async fn ack(&self, tunnel: &TunnelId, msg: MessageId) -> Result<(), Error> {
        metrics::store_op(StoreOp::Ack, self.store.ack(tunnel, msg)).await?;
        metrics::message(MessageEvent::Acknowledged);
        Ok(())
    }

    /// Acknowledges a pending message with a reply; `false` if it was not pending.
    pub async fn reply(
        &self,
        tunnel: &TunnelId,
        msg: MessageId,
        reply: Payload,
    ) -> Result<bool, Error> {
        let ttl = self.config.reply_ttl;
        let replied =
            metrics::store_op(StoreOp::Reply, self.store.reply(tunnel, msg, reply, ttl)).await?;
        if replied {
            metrics::message(MessageEvent::Replied);
        }
        Ok(replied)
    }

    /// Hands out the reply to `msg` once, waiting up to `wait` for it (`None`: answer at once).
    pub async fn take_reply(
        &self,
        tunnel: &TunnelId,
        msg: MessageId,
        wait: Option<Duration>,
        shutdown: &mut Shutdown,
    ) -> Result<Option<Payload>, Error> {
        let always = || async { Ok(true) };
        self.take_reply_while(tunnel, msg, wait, shutdown, always)
            .await
    }

    /// [`Tunnels::take_reply`], waiting only while `wanted` holds, which is asked each time a
    /// wake-up finds the reply not there (not at the first look: the caller knows it holds then):
    /// a waiter whose reply someone else took need not wait out its time.
    pub async fn take_reply_while<W, Fut>(
        &self,
        tunnel: &TunnelId,
        msg: MessageId,
        wait: Option<Duration>,
        shutdown: &mut Shutdown,
        wanted: W,
    ) -> Result<Option<Payload>, Error>
    where
        W: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<bool, crate::store::StoreError>>,
    {
        let key = Waited::new(WakeKey::Reply(tunnel.to_string(), msg.to_string()));
        let woken = AtomicBool::new(false);
        let attempt = || async {
            let taken = self.store.take_reply(tunnel, msg);
            if let Some(reply) = metrics::store_op(StoreOp::TakeReply, taken).await? {
                return Ok(Some(Some(reply)));
            }
            if !woken.swap(true, Ordering::Relaxed) {
                return Ok(None);
            }
            Ok((!wanted().await?).then_some(None))
        };
        Ok(self.wait_for(key, wait, shutdown, attempt).await?.flatten())
    }

    /// Waits up to `wait` until `msg` has a reply, leaving it in place; whether it has one.
    pub async fn await_reply(
        &self,
        tunnel: &TunnelId,
        msg: MessageId,
        wait: Duration,
        shutdown: &mut Shutdown,
    ) -> Result<bool, Error> {
        let key = Waited::new(WakeKey::Reply(tunnel.to_string(), msg.to_string()));
        let keys = [key.clone()];
        let attempt = || async {
            let ready = self.store.ready(&keys).await?;
            Ok(ready.first().copied().unwrap_or(false).then_some(()))
        };
        Ok(self
            .wait_for(key, Some(wait), shutdown, attempt)
            .await?
            .is_some())
    }

    /// Where a message stands.
    pub async fn status(&self, tunnel: &TunnelId, msg: MessageId) -> Result<MessageStatus, Error> {
        Ok(metrics::store_op(StoreOp::Status, self.store.status(tunnel, msg)).await?)
    }

    /// Messages in the tunnel, pending ones included.
    pub async fn len(&self, tunnel: &TunnelId) -> Result<u64, Error> {
        Ok(metrics::store_op(StoreOp::Len, self.store.len(tunnel)).await?)
    }

    /// Deletes the tunnel with its pending state.
    pub async fn clear(&self, tunnel: &TunnelId) -> Result<(), Error> {
        Ok(metrics::store_op(StoreOp::Clear, self.store.clear(tunnel)).await?)
    }

    /// The long-poll: runs `attempt` until it yields something, re-running it on each wake-up of
    /// `key` (including the store's periodic re-check), until `wait` runs out or the server shuts
    /// down. Waiting holds no store connection and no timer beyond the deadline.
    async fn wait_for<T, F, Fut>(
        &self,
        key: Waited,
        wait: Option<Duration>,
        shutdown: &mut Shutdown,
        attempt: F,
    ) -> Result<Option<T>, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>, crate::store::StoreError>>,
    {
        let Some(wait) = wait.filter(|w| !w.is_zero()) else {
            return Ok(attempt().await?);
        };
        let deadline = Instant::now() + wait;
        let waiter = self.store.wakeups().register(key);
        let _waiting = Waiting::poll();
        loop {
            let notified = waiter.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(found) = attempt().await? {
                return Ok(Some(found));
            }
            if *shutdown.borrow() || Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = shutdown.changed() => return Ok(None),
            }
        }
    }
}
