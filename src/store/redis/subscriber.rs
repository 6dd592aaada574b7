//! The pub/sub subscriber of one process: the wake-ups of waiting long-polls on one channel, and
//! the events of each topic this process has subscribers of on the topic's own channel —
//! subscribed when its first local subscriber comes, left once none is left — so that an instance
//! receives only the events someone there waits for. Subscribed again after every reconnection,
//! since a new connection starts without subscriptions.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fred::prelude::{Client, ClientLike, EventInterface, PubsubInterface, Value};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::{mpsc, oneshot, watch};

use super::{bytes_of, readable, EVENT_PREFIX, QUEUE_TIMEOUT, WAKE_CHANNEL};
use crate::metrics;
use crate::store::{Audience, StoreError};
use crate::wake::WakeKey;

/// How often channels of topics left without local subscribers are unsubscribed.
const TIDY_EVERY: Duration = Duration::from_secs(5);

/// How often the feed's falling behind is logged at most.
const LAG_LOG_EVERY: Duration = Duration::from_secs(10);

/// How many distinct reasons for not reaching the store are logged per outage.
const MAX_REASONS: usize = 8;

/// The subscriber connection's reports of each (re)connection.
type Reconnects = broadcast::Receiver<fred::types::config::Server>;

/// The subscriber connection's reports of each failure, with the server it was at.
type Errors = broadcast::Receiver<(fred::error::Error, Option<fred::types::config::Server>)>;

/// What the subscriber connection reports.
pub(super) struct SubscriberEvents {
    pub messages: broadcast::Receiver<fred::types::Message>,
    pub reconnects: Reconnects,
    pub errors: Errors,
}

impl SubscriberEvents {
    /// The receivers of `subscriber`, made before it connects so that its first connect event
    /// is not missed.
    pub fn of(subscriber: &Client) -> SubscriberEvents {
        SubscriberEvents {
            messages: subscriber.message_rx(),
            reconnects: subscriber.reconnect_rx(),
            errors: subscriber.error_rx(),
        }
    }
}

/// A topic that a subscriber registered with the audience asks to hear, and where to say
/// whether its channel is subscribed.
type Ask = (String, oneshot::Sender<bool>);

/// The store's handle on the subscriber's topics. Cheap to clone.
#[derive(Clone)]
pub(super) struct Topics {
    asks: mpsc::UnboundedSender<Ask>,
    /// The topics whose channel is subscribed (or is to be again, after a reconnection).
    heard: Arc<Mutex<HashSet<String>>>,
}

impl Topics {
    /// Subscribes `topic`'s channel unless it is already; `Unavailable` if that is not done
    /// within [`QUEUE_TIMEOUT`] (the subscriber's connection is down, or the server frozen).
    /// For a subscriber already registered with the audience: the tidy-up keeps the channel of a
    /// topic that has one.
    pub async fn listen(&self, topic: &str) -> Result<(), StoreError> {
        if self.hears(topic) {
            return Ok(());
        }
        let (told, answer) = oneshot::channel();
        let unavailable =
            || StoreError::Unavailable("the events subscriber is not subscribed".into());
        self.asks
            .send((topic.to_owned(), told))
            .map_err(|_| unavailable())?;
        match tokio::time::timeout(QUEUE_TIMEOUT, answer).await {
            Ok(Ok(true)) => Ok(()),
            _ => Err(unavailable()),
        }
    }

    /// Whether `topic`'s channel is subscribed: this process's subscription then counts among the
    /// receivers of each of its events.
    pub fn hears(&self, topic: &str) -> bool {
        self.heard().contains(topic)
    }

    fn heard(&self) -> MutexGuard<'_, HashSet<String>> {
        // The set is consistent after every statement, so a poisoned lock is still usable.
        self.heard.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Starts the subscriber's tasks, which feed `audience` for the life of the process: one hands
/// out what arrives, the other subscribes and leaves channels, so that a server slow to confirm a
/// subscription does not hold up the events of topics already heard. Tells `subscribed` whether
/// the connection is up and subscribed, and counts in `returns` each time it is again after its
/// connection was lost. Answers the handle on its topics.
pub(super) fn start(
    subscriber: Client,
    events: SubscriberEvents,
    audience: Audience,
    subscribed: watch::Sender<bool>,
    returns: watch::Sender<u64>,
) -> Topics {
    let (asks, asked) = mpsc::unbounded_channel();
    let topics = Topics {
        asks,
        heard: Arc::default(),
    };
    tokio::spawn(deliver(events.messages, audience.clone()));
    let feed = Feed {
        subscriber,
        audience,
        topics: topics.clone(),
        subscribed,
        returns,
    };
    tokio::spawn(feed.run(events.reconnects, events.errors, asked));
    topics
}

/// Hands each wake-up to the waiters, each event to its topic's subscribers, until the
/// subscriber connection is dropped.
async fn deliver(mut messages: broadcast::Receiver<fred::types::Message>, audience: Audience) {
    let mut lag = Lag::default();
    loop {
        let due = lag.due();
        tokio::select! {
            received = messages.recv() => match received {
                Ok(message) => deliver_one(&audience, message),
                Err(RecvError::Lagged(missed)) => lag.dropped(missed),
                Err(RecvError::Closed) => return,
            },
            // What was dropped since the last line is told, even if nothing more comes.
            () = sleep_until_due(due), if due.is_some() => lag.report(),
        }
    }
}

/// Resolves at `due`.
async fn sleep_until_due(due: Option<Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(due.into()).await;
    }
}

/// Hands a wake-up to the waiters, an event to the topic's subscribers.
fn deliver_one(audience: &Audience, message: fred::types::Message) {
    if message.channel == WAKE_CHANNEL {
        if let Some(key) = message.value.as_str().and_then(|raw| WakeKey::decode(&raw)) {
            audience.wakeups.wake(&key);
        }
        return;
    }
    let topic = message.channel.strip_prefix(EVENT_PREFIX);
    if let (Some(topic), Some(body)) = (topic, bytes_of(message.value)) {
        audience.events.deliver(topic, body);
    }
}

/// The subscriber's task that follows the connection and keeps its subscriptions.
struct Feed {
    subscriber: Client,
    audience: Audience,
    topics: Topics,
    subscribed: watch::Sender<bool>,
    returns: watch::Sender<u64>,
}

impl Feed {
    async fn run(
        self,
        mut reconnects: Reconnects,
        mut errors: Errors,
        mut asked: mpsc::UnboundedReceiver<Ask>,
    ) {
        // Whether the connection was up once and lost since its last (re)connection.
        let (mut was_up, mut lost) = (false, false);
        // Logs one line per outage rather than one per reconnection attempt, and, while the
        // server cannot be reached, each new reason once (a wrong password is not an
        // unreachable server).
        let mut connected = false;
        let mut reasons = HashSet::new();
        // Named in every failure line: a wrong address is the usual cause.
        let configured = match self.subscriber.client_config().server {
            fred::types::config::ServerConfig::Centralized { server } => server.to_string(),
            other => format!("{other:?}"),
        };
        let mut tidy = tokio::time::interval(TIDY_EVERY);
        // Topics whose channel is to be unsubscribed, tried again until it is.
        let mut leaving = HashSet::new();
        loop {
            // Errors before reconnections: when both wait, the error is the older connection's
            // (fred reports a loss, then the new connection), and handled after the reconnection
            // it would leave the new connection marked unsubscribed.
            tokio::select! {
                biased;
                error = errors.recv() => match error {
                    Ok((error, server)) => {
                        self.subscribed.send_replace(false);
                        lost |= was_up;
                        metrics::store_up(false);
                        let text = readable(&error);
                        let at = server.map_or_else(|| configured.clone(), |s| s.to_string());
                        if std::mem::take(&mut connected) {
                            log::warn!("redis: connection to {at} lost, reconnecting: {text}");
                        } else if !reasons.contains(&text) && reasons.len() < MAX_REASONS {
                            log::warn!("redis: cannot connect to {at}: {text}");
                            reasons.insert(text);
                        }
                    }
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
                reconnect = reconnects.recv() => {
                    match reconnect {
                        Ok(server) => {
                            log::info!("redis: connected to {server}");
                            connected = true;
                            metrics::store_up(true);
                            reasons.clear();
                        }
                        Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => return,
                    }
                    self.subscribed.send_replace(self.subscribe_all().await);
                    was_up = true;
                    if std::mem::take(&mut lost) {
                        self.returns.send_modify(|n| *n += 1);
                    }
                }
                Some(ask) = asked.recv() => {
                    // Those that came meanwhile share the one SUBSCRIBE.
                    let mut asks = vec![ask];
                    while let Ok(ask) = asked.try_recv() {
                        asks.push(ask);
                    }
                    self.add(asks, &mut leaving).await;
                }
                _ = tidy.tick() => {
                    // Should a report still come out of order, a connection that is up is not
                    // left marked unsubscribed for longer than this.
                    if !*self.subscribed.borrow() && self.subscriber.is_connected() {
                        self.subscribed.send_replace(self.subscribe_all().await);
                    }
                    self.tidy(&mut leaving).await;
                }
            }
        }
    }

    /// Subscribes the channels of the topics asked for that are not yet, and tells each asker
    /// whether its topic is heard. Those not confirmed in time go to `leaving`: the server may
    /// still run their SUBSCRIBE, and nobody would leave those channels.
    async fn add(&self, asks: Vec<Ask>, leaving: &mut HashSet<String>) {
        let new: HashSet<String> = asks
            .iter()
            .map(|(topic, _)| topic.clone())
            .filter(|topic| !self.topics.hears(topic))
            .collect();
        let done = *self.subscribed.borrow() && self.subscribe(&new).await;
        if done {
            self.topics.heard().extend(new);
        } else {
            leaving.extend(new);
        }
        for (_, told) in asks {
            let _ = told.send(done);
        }
    }

    /// Unsubscribes the channels of topics that have no local subscriber left, and those that
    /// failed to be last time.
    async fn tidy(&self, leaving: &mut HashSet<String>) {
        let events = &self.audience.events;
        // Counted and forgotten under the lock that `Topics::hears` takes: a subscriber that
        // registers after the count finds its topic not heard, and asks for it again (its
        // SUBSCRIBE then follows this UNSUBSCRIBE on the connection).
        {
            let mut heard = self.topics.heard();
            leaving.retain(|topic| !heard.contains(topic));
            let left: Vec<String> = heard
                .iter()
                .filter(|topic| events.subscribers(topic) == 0)
                .cloned()
                .collect();
            for topic in left {
                heard.remove(&topic);
                leaving.insert(topic);
            }
        }
        if leaving.is_empty() || !self.subscriber.is_connected() {
            // A lost connection has no subscriptions left.
            leaving.clear();
            return;
        }
        let unsubscribing = self.subscriber.unsubscribe(channels(leaving.iter()));
        match tokio::time::timeout(QUEUE_TIMEOUT, unsubscribing).await {
            Ok(Ok(())) => leaving.clear(),
            Ok(Err(e)) => log::debug!("redis: leaving {} topics failed: {e}", leaving.len()),
            Err(_) => log::debug!("redis: leaving {} topics timed out", leaving.len()),
        }
    }

    /// Subscribes the channels of `topics` within [`QUEUE_TIMEOUT`]; whether it did.
    async fn subscribe(&self, topics: &HashSet<String>) -> bool {
        if topics.is_empty() {
            return true;
        }
        let subscribed = self.subscribed(channels(topics));
        matches!(
            tokio::time::timeout(QUEUE_TIMEOUT, subscribed).await,
            Ok(Ok(()))
        )
    }

    /// Subscribes `channels` and answers once the server has: fred ends a SUBSCRIBE when it is
    /// written, dropping the server's confirmation, so a PING follows it on the connection, whose
    /// answer comes after the SUBSCRIBE ran. Answered earlier, a subscriber could miss events
    /// published after its 200 while the server was busy.
    async fn subscribed(&self, channels: Vec<String>) -> Result<(), fred::error::Error> {
        self.subscriber.subscribe(channels).await?;
        self.subscriber.ping::<Value>(None).await.map(drop)
    }

    /// Subscribes [`WAKE_CHANNEL`] and the heard topics' channels after a (re)connection,
    /// retrying while the connection is up; a subscriber that stays unsubscribed would leave
    /// every waiter to its periodic re-check. Whether it subscribed.
    async fn subscribe_all(&self) -> bool {
        while self.subscriber.is_connected() {
            let mut all = channels(self.topics.heard().iter());
            all.push(WAKE_CHANNEL.to_owned());
            match self.subscribed(all).await {
                Ok(()) => return true,
                Err(e) => {
                    log::warn!("redis: subscribing to {WAKE_CHANNEL} failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        false
    }
}

/// Messages the feed dropped for falling behind the connection, reported at most once per
/// [`LAG_LOG_EVERY`] with the count since the last report.
#[derive(Default)]
struct Lag {
    unreported: u64,
    reported: Option<Instant>,
}

impl Lag {
    fn dropped(&mut self, missed: u64) {
        self.unreported += missed;
        if self.reported.is_some_and(|at| at.elapsed() < LAG_LOG_EVERY) {
            return;
        }
        self.report();
    }

    /// When the messages dropped since the last line are to be told, if any were.
    fn due(&self) -> Option<Instant> {
        let at = self.reported?;
        (self.unreported > 0).then(|| at + LAG_LOG_EVERY)
    }

    fn report(&mut self) {
        log::warn!(
            "redis: the pub/sub feed fell behind and dropped {} messages: events lost for this \
             instance's subscribers (waiting polls re-check)",
            self.unreported
        );
        self.unreported = 0;
        self.reported = Some(Instant::now());
    }
}

/// The channels of `topics`.
fn channels<'a>(topics: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    topics
        .into_iter()
        .map(|topic| format!("{EVENT_PREFIX}{topic}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first drop is told at once; those within [`LAG_LOG_EVERY`] after it are counted and
    /// due at its end, whether more come or not.
    #[test]
    fn dropped_messages_are_all_told() {
        let mut lag = Lag::default();
        assert_eq!(lag.due(), None);
        lag.dropped(5);
        assert_eq!((lag.unreported, lag.due()), (0, None), "told at once");
        let first = lag.reported.expect("a line");
        lag.dropped(7);
        lag.dropped(1);
        assert_eq!(lag.unreported, 8);
        assert_eq!(lag.due(), Some(first + LAG_LOG_EVERY));
        lag.report();
        assert_eq!((lag.unreported, lag.due()), (0, None));
    }
}
