//! The redis backend: tunnels in KeyDB / Redis / Valkey streams, in http-event-relay's key layout
//! (`t:{tunnel}:s`, group `t:{tunnel}:g`, consumer `c-{tunnel}`, replies `t:{tunnel}:r-{msg}` and
//! `t:{tunnel}:rt-{msg}`), so data written by either relay is read by the other.
//!
//! Each tunnel operation that touches more than one key is atomic, a Lua script from
//! `redis/*.lua` called by SHA (loaded again after a `NOSCRIPT`); the simple ones (`len`,
//! `clear`, job records, event publishes) are plain commands.
//! The produce and reply scripts publish wake-ups on [`WAKE_CHANNEL`]; one subscriber connection
//! per process (`subscriber`) turns them into [`Wakeups::wake`] calls, and the events of the
//! topics subscribed here into deliveries. The store uses a small fixed set of
//! multiplexed connections, whatever the number of waiting polls: one per worker thread and a
//! shared pool (see `clients`). Produces and consumes issued on one thread while its previous
//! call of that script is at the server share the next call (see `batch`).
//!
//! Outages: fred reconnects forever in the background; meanwhile every operation fails at once
//! with [`StoreError::Unavailable`] instead of queueing. A command already at the server is
//! awaited up to [`ANSWER_TIMEOUT`], past the point where a hung connection is dropped: giving up
//! sooner would answer 503 for a consume or produce the server runs later anyway, losing the
//! message taken or storing the one the client then sends again. And a data-changing script that
//! the server starts only after [`FENCE_AFTER`] (it was frozen, or the call sat in a socket while
//! the relay gave up on it) does nothing at all (see `clock`).

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use fred::clients::WithOptions;
use fred::prelude::{
    Builder, Client, ClientLike, Config, ConfigInterface, ErrorKind, KeysInterface, Options,
    ReconnectPolicy, StreamsInterface, Value,
};
use fred::types::config::UnresponsiveConfig;
use fred::types::{ClusterHash, CustomCommand};
use tokio::sync::watch;

use super::{
    Audience, Backend, Bound, Delivery, Message, MessageStatus, Payload, Produced, StoreError,
};
use crate::config::RedisConfig;
use crate::metrics;
use batch::{Batched, Operation};
use clients::Clients;
use clock::ServerClock;
use subscriber::SubscriberEvents;

mod batch;
mod clients;
mod clock;
mod subscriber;
use crate::tunnel::{MessageId, TunnelId};
use crate::wake::{Waited, WakeKey};

/// The pub/sub channel carrying [`WakeKey`]s between relay instances.
pub const WAKE_CHANNEL: &str = "burrow:wake";

/// The prefix of the pub/sub channel of each event topic: `burrow:event:{topic}`.
const EVENT_PREFIX: &str = "burrow:event:";

/// The longest an operation may wait to be sent (queued behind a call at the server, or for a
/// connection's set-up) before it answers `Unavailable`, having done nothing.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest a sent command waits for its answer: past [`UNRESPONSIVE_AFTER`], so that a slow
/// server's answer is not abandoned while its connection is still deemed alive.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(6);

/// How long after [`ANSWER_TIMEOUT`] an operation is abandoned if fred has not ended it.
const SAFETY_MARGIN: Duration = Duration::from_millis(250);

/// Multiplexed command connections; more would not make a single server faster.
const MAX_POOL_SIZE: usize = 4;

/// Time to open a TCP connection (and run its set-up commands) before trying again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Pause between reconnection attempts, in ms; short, so service resumes soon after an outage.
const RECONNECT_DELAY_MS: u32 = 300;

/// The first reconnection attempt's pause, in ms, doubling up to [`RECONNECT_DELAY_MS`]. Until
/// that attempt, fred still deems the lost connection up and queues commands on it instead of
/// failing them fast; they would then wait for the answer timeout.
const FIRST_RECONNECT_DELAY_MS: u32 = 10;

/// A connection that leaves a command unanswered this long is dropped and reopened, so a
/// half-open TCP connection (server host gone) does not stay in use.
const UNRESPONSIVE_AFTER: Duration = Duration::from_secs(5);

/// A data-changing script that the server starts later than this after it was sent does nothing
/// (`fence.lua`): from [`UNRESPONSIVE_AFTER`] on, the relay may have answered 503 for it. The half
/// second between covers the error of reading the server's clock and the answer's way back.
const FENCE_AFTER: Duration = Duration::from_millis(4500);

/// Wake-ups buffered for the listener; a burst beyond this loses some, which the waiters'
/// periodic re-check absorbs.
const WAKE_BUFFER: usize = 4096;

/// A data-changing script: the fence first (see [`FENCE_AFTER`]), then the `$file`s (helpers
/// such as `emptied.lua` before the script that calls them).
macro_rules! fenced {
    ($($file:literal),+) => {
        Script::fenced(concat!(
            include_str!("redis/fence.lua"),
            $(include_str!(concat!("redis/", $file))),+
        ))
    };
}

static PRODUCE: Batched = Batched {
    script: fenced!("produce.lua"),
    arity: 8,
    name: "produce",
};
static CONSUME: Batched = Batched {
    script: fenced!("emptied.lua", "consume.lua"),
    arity: 5,
    name: "consume",
};
static ACK: Script = fenced!("emptied.lua", "ack.lua");
static CLEAR: Script = fenced!("emptied.lua", "clear.lua");
static REPLY: Script = fenced!("emptied.lua", "reply.lua");
static TAKE_REPLY: Script = fenced!("take_reply.lua");
static RESTORE_JOB: Script = fenced!("restore_job.lua");
static PUBLISH: Script = fenced!("publish.lua");
static STATUS: Script = Script::new(include_str!("redis/status.lua"));
static READY: Script = Script::new(include_str!("redis/ready.lua"));
static ANNOUNCE: Script = Script::new(include_str!("redis/announce.lua"));
static INSTANCES: Script = Script::new(include_str!("redis/instances.lua"));

/// The set of live relay instances, and the prefix of their presence records.
const INSTANCES_KEY: &str = "burrow:instances";
const INSTANCE_PREFIX: &str = "burrow:instance:";

/// Keys per re-check script call, so one call never holds the server for long.
const READY_BATCH: usize = 1000;

/// The redis store: its command connections; the wake-up subscriber runs on its own task.
pub struct RedisStore {
    clients: Arc<Clients>,
    /// Whether the subscriber connection is up and subscribed.
    hears_events: watch::Receiver<bool>,
    /// The topics whose events the subscriber takes.
    topics: subscriber::Topics,
    /// How often the subscriber connection came back after it was lost; one receiver for the
    /// life of the store, so that `back` misses no return between its calls.
    came_back: tokio::sync::Mutex<watch::Receiver<u64>>,
    /// How long an emptied stream is kept, in ms (`BURROW_EMPTY_TUNNEL_TTL`; 0: for ever).
    empty_ttl: Value,
}

impl RedisStore {
    /// Connects the command pool and the wake-up subscriber, waiting at most [`CONNECT_TIMEOUT`]:
    /// a server that is down at start-up is an outage like any other, and operations answer
    /// `Unavailable` until it is reachable. Fails only on a configuration error such as an
    /// invalid URL.
    pub async fn connect(
        config: &RedisConfig,
        audience: Audience,
    ) -> Result<RedisStore, StoreError> {
        let mut fred_config = Config::from_url(&config.url)
            .map_err(|e| StoreError::Internal(format!("invalid redis URL: {e}")))?;
        if fred_config.password.is_none() {
            fred_config.password.clone_from(&config.password);
        }
        // Retry the first connection like any later one instead of failing start-up.
        fred_config.fail_fast = false;

        let mut policy =
            ReconnectPolicy::new_exponential(0, FIRST_RECONNECT_DELAY_MS, RECONNECT_DELAY_MS, 2);
        policy.set_jitter(FIRST_RECONNECT_DELAY_MS);
        let mut builder = Builder::from_config(fred_config);
        builder
            .set_policy(policy)
            .with_connection_config(|connection| {
                connection.connection_timeout = CONNECT_TIMEOUT;
                connection.internal_command_timeout = QUEUE_TIMEOUT;
                // A script whose connection dropped may have run; sending it again could store a
                // message twice. The caller gets `Unavailable` and decides.
                connection.max_command_attempts = 1;
                connection.unresponsive = UnresponsiveConfig {
                    max_timeout: Some(UNRESPONSIVE_AFTER),
                    interval: Duration::from_secs(1),
                };
            })
            .with_performance_config(|performance| {
                performance.default_command_timeout = ANSWER_TIMEOUT;
            });

        let command_builder = builder.clone();
        let pool = builder
            .build_pool(config.pool_size.clamp(1, MAX_POOL_SIZE))
            .map_err(|e| StoreError::Internal(format!("redis pool: {e}")))?;
        // The handle only reports the end of the connection tasks, which run for the process.
        drop(pool.connect());

        builder.with_performance_config(|performance| {
            performance.broadcast_channel_capacity = WAKE_BUFFER;
        });
        let subscriber = builder
            .build()
            .map_err(|e| StoreError::Internal(format!("redis subscriber: {e}")))?;
        let events = SubscriberEvents::of(&subscriber);
        let (subscribed, hears_events) = watch::channel(false);
        let (returns, came_back) = watch::channel(0);
        let topics = subscriber::start(subscriber.clone(), events, audience, subscribed, returns);
        drop(subscriber.connect());

        // A relay that answers /health should not turn its first requests away while a reachable
        // server is still being dialled; an unreachable one is an outage like any later one.
        let mut listening = hears_events.clone();
        let reached = std::cell::Cell::new(false);
        let first_connection = async {
            pool.wait_for_connect().await?;
            subscriber.wait_for_connect().await?;
            reached.set(true);
            let _ = listening.wait_for(|subscribed| *subscribed).await;
            Ok::<(), fred::error::Error>(())
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, first_connection).await {
            Ok(Ok(())) => {}
            // Connected, yet not subscribed: an ACL without pub/sub, say (its error is logged).
            _ if reached.get() => log::warn!(
                "redis: connected, but not subscribed to its channels at start-up; \
                 waiting polls and events across instances depend on them"
            ),
            _ => log::warn!("redis: not reachable at start-up; answering 503 until it is"),
        }
        tokio::spawn(warn_if_evicting(pool.clone()));
        let clients = Arc::new(Clients::new(pool, command_builder));
        clients.clock().read(&clients.shared()).await;
        let reading = clients.clone();
        tokio::spawn(async move { reading.clock().keep_reading(|| reading.shared()).await });
        Ok(RedisStore {
            clients,
            hears_events,
            topics,
            came_back: tokio::sync::Mutex::new(came_back),
            // Zero stays zero (kept for ever): `millis` would make it one.
            empty_ttl: Value::Integer(
                i64::try_from(config.empty_tunnel_ttl.as_millis()).unwrap_or(i64::MAX),
            ),
        })
    }

    /// Starts an operation on the connection [`Clients::pick`] chooses.
    fn call(&self) -> Call<'_> {
        Call::new(&self.clients)
    }
}

/// One operation: its client, its deadline and its fence, shared by the one or two commands it
/// sends.
struct Call<'a> {
    client: Client,
    clock: &'a ServerClock,
    deadline: Instant,
    /// The server's time after which a data-changing script of this call does nothing (0: none
    /// until the server's clock has been read).
    fence: i64,
}

impl Call<'_> {
    /// An operation sent now on the connection [`Clients::pick`] chooses.
    fn new(clients: &Clients) -> Call<'_> {
        let now = Instant::now();
        Call {
            client: clients.pick(),
            clock: clients.clock(),
            deadline: now + ANSWER_TIMEOUT,
            fence: clients.clock().at(now + FENCE_AFTER),
        }
    }

    /// The client for the operation's next command. The command fails at once while the client
    /// is disconnected instead of queueing, is never sent twice, and times out at the operation's
    /// deadline. fred's own timeout (not a dropped future) marks the command abandoned, so it is
    /// not sent later, after the caller was told `Unavailable`.
    fn client(&self) -> WithOptions<Client> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        self.client.with_options(&Options {
            fail_fast: true,
            max_attempts: Some(1),
            timeout: Some(left.max(Duration::from_millis(1))),
            ..Options::default()
        })
    }
}

/// A Lua script run by SHA. The SHA is learnt from the first `SCRIPT LOAD`; the script is loaded
/// again whenever the server answers `NOSCRIPT` (after a restart or `SCRIPT FLUSH`).
struct Script {
    source: &'static str,
    sha: OnceLock<String>,
    /// Whether the script starts with `fence.lua`, and so takes the call's fence first.
    fenced: bool,
}

impl Script {
    const fn new(source: &'static str) -> Script {
        Script {
            source,
            sha: OnceLock::new(),
            fenced: false,
        }
    }

    /// A script that starts with `fence.lua` (see the `fenced!` macro).
    const fn fenced(source: &'static str) -> Script {
        Script {
            source,
            sha: OnceLock::new(),
            fenced: true,
        }
    }

    /// Runs the script with `keys` and `args`. EVALSHA and SCRIPT LOAD go out as custom
    /// commands because fred applies per-command [`Options`] only to those, not to its Lua API.
    async fn run(
        &self,
        call: &Call<'_>,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value, StoreError> {
        let fence = self.fenced.then_some(call.fence);
        let result = async {
            let result = self.send(call, &keys, fence, &args).await;
            if let Err(e) = &result {
                // Past its fence: the server stalled, or its clock stepped forward since it was
                // read. In the second case every write would be refused until the next reading,
                // so the clock is read again now.
                if e.details().starts_with("LATE") {
                    call.clock.doubt();
                }
            }
            result
        };
        bounded(result).await
    }

    /// EVALSHA, and SCRIPT LOAD first when the server does not know the script.
    async fn send(
        &self,
        call: &Call<'_>,
        keys: &[String],
        fence: Option<i64>,
        args: &[Value],
    ) -> Result<Value, fred::error::Error> {
        if let Some(sha) = self.sha.get() {
            match evalsha(&call.client(), sha, keys, fence, args).await {
                Err(e) if e.details().starts_with("NOSCRIPT") => {}
                result => return result,
            }
        }
        let load = CustomCommand::new_static("SCRIPT", ClusterHash::Random, false);
        let sha: String = call
            .client()
            .custom(load, vec!["LOAD", self.source])
            .await?;
        // Every server derives the same SHA from the same source: the first one learnt stays.
        let sha = self.sha.get_or_init(|| sha);
        evalsha(&call.client(), sha, keys, fence, args).await
    }
}

/// `EVALSHA sha numkeys key... [fence] arg...`.
async fn evalsha(
    client: &WithOptions<Client>,
    sha: &str,
    keys: &[String],
    fence: Option<i64>,
    args: &[Value],
) -> Result<Value, fred::error::Error> {
    let command = CustomCommand::new_static("EVALSHA", ClusterHash::Offset(2), false);
    let mut line = Vec::with_capacity(3 + keys.len() + args.len());
    line.push(Value::from(sha));
    line.push(Value::from(keys.len() as i64));
    line.extend(keys.iter().map(|key| Value::from(key.as_str())));
    line.extend(fence.map(Value::from));
    line.extend(args.iter().cloned());
    client.custom(command, line).await
}

/// The keys of one tunnel, as the original relay names them.
struct TunnelKeys {
    stream: String,
    group: String,
    consumer: String,
}

impl TunnelKeys {
    /// The keys of `tunnel` (a [`TunnelId`], or one as a wake-up names it).
    fn new(tunnel: &impl std::fmt::Display) -> TunnelKeys {
        TunnelKeys {
            stream: format!("t:{tunnel}:s"),
            group: format!("t:{tunnel}:g"),
            consumer: format!("c-{tunnel}"),
        }
    }
}

/// Where a job's fields are kept: Burrow's own prefix, beside the original's `t:` keys.
fn job_key(queue: &TunnelId, msg: MessageId) -> String {
    format!("{}{msg}", job_key_prefix(queue))
}

/// The job keys of `queue` without the message id, which the produce script appends.
fn job_key_prefix(queue: &TunnelId) -> String {
    format!("burrow:job:{queue}:")
}

/// The reply body and reply Content-Type keys of `msg`.
fn reply_keys(tunnel: &TunnelId, msg: MessageId) -> Vec<String> {
    vec![
        format!("t:{tunnel}:r-{msg}"),
        format!("t:{tunnel}:rt-{msg}"),
    ]
}

/// A reply as the reply scripts return it: `{body, Content-Type or nil}`, or nil for none.
fn reply_payload(reply: Value) -> Result<Option<Payload>, StoreError> {
    let parts = match reply {
        Value::Null => return Ok(None),
        Value::Array(parts) => parts,
        other => return Err(unexpected("reply", &other)),
    };
    let mut parts = parts.into_iter();
    let body = parts
        .next()
        .and_then(bytes_of)
        .ok_or_else(|| StoreError::Internal("reply without a body".into()))?;
    Ok(Some(Payload {
        body,
        content_type: parts.next().and_then(bytes_of).and_then(content_type),
    }))
}

/// Warns once, when the store is first reached, if it evicts keys under memory pressure: queued
/// messages would vanish without a word. A server that does not show its settings is left alone.
async fn warn_if_evicting(pool: fred::clients::Pool) {
    if pool.wait_for_connect().await.is_err() {
        return;
    }
    let asked = pool.config_get::<std::collections::HashMap<String, String>, _>("maxmemory-policy");
    let Ok(Ok(settings)) = tokio::time::timeout(CONNECT_TIMEOUT, asked).await else {
        return;
    };
    let Some(policy) = settings.get("maxmemory-policy") else {
        return;
    };
    if policy == "noeviction" {
        log::debug!("redis: maxmemory-policy is {policy}");
    } else {
        log::warn!(
            "redis: maxmemory-policy is {policy}: under memory pressure the server deletes keys, \
             queued messages among them; noeviction makes it refuse writes (503) instead"
        );
    }
}

/// Runs one operation, converting fred's errors. Its commands time out by themselves at the
/// deadline; this outer limit, a little later, only guards against a wait fred does not bound.
async fn bounded<T>(
    op: impl Future<Output = Result<T, fred::error::Error>>,
) -> Result<T, StoreError> {
    // Whether the server answers is recorded from every operation: a frozen one keeps its
    // connections up. An answer that refuses (out of memory, say) is an answer.
    match tokio::time::timeout(ANSWER_TIMEOUT + SAFETY_MARGIN, op).await {
        Ok(Ok(value)) => {
            metrics::store_up(true);
            Ok(value)
        }
        Ok(Err(error)) => {
            metrics::store_up(!unanswered(&error));
            Err(store_error(error))
        }
        Err(_) => {
            metrics::store_up(false);
            Err(StoreError::Unavailable(
                "redis did not answer in time".into(),
            ))
        }
    }
}

/// Connection trouble that fred reports only as an `Unknown` error with these messages: the
/// server did not answer.
const UNANSWERED: [&str; 4] = [
    "Failed to route command",
    "Too many failed write attempts",
    "Max attempts exceeded",
    "Missing expected connection",
];

/// Server replies that say it cannot serve right now (loading a dump, a script running too long,
/// failover, a replica not yet promoted, out of memory until consumers drain the tunnels, a
/// script that started past its fence): a write they refused was not done, and retrying later
/// can succeed.
const REFUSING: [&str; 7] = [
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "TRYAGAIN",
    "READONLY",
    "OOM",
    "LATE",
];

/// Whether an error's text says that retrying later can succeed: the server did not answer, or
/// answered that it cannot serve now (see [`UNANSWERED`], [`REFUSING`]).
fn is_transient(details: &str) -> bool {
    UNANSWERED
        .iter()
        .chain(&REFUSING)
        .any(|prefix| details.starts_with(prefix))
}

/// Whether `error` means that the server did not answer (as opposed to answering with an error).
fn unanswered(error: &fred::error::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::IO
            | ErrorKind::Timeout
            | ErrorKind::Canceled
            | ErrorKind::Backpressure
            | ErrorKind::Routing
    ) || UNANSWERED
        .iter()
        .any(|prefix| error.details().starts_with(prefix))
}

/// Connection trouble and refusals to serve now are `Unavailable`, anything else `Internal`.
fn store_error(error: fred::error::Error) -> StoreError {
    if unanswered(&error) || is_transient(error.details()) {
        StoreError::Unavailable(readable(&error))
    } else {
        StoreError::Internal(readable(&error))
    }
}

/// `error` as an operator should read it: fred gives an I/O error as the `Debug` form of Rust's
/// (`IO Error: Os { code: 111, kind: ConnectionRefused, message: "Connection refused" }`), whose
/// message (or a resolver's error) is what says what went wrong.
fn readable(error: &fred::error::Error) -> String {
    if matches!(error.kind(), ErrorKind::IO) {
        let details = error.details();
        for field in ["message: \"", "error: \""] {
            let quoted = details.find(field).map(|at| &details[at + field.len()..]);
            if let Some(message) = quoted.and_then(|rest| rest.split('"').next()) {
                return message.to_owned();
            }
        }
    }
    error.to_string()
}

/// A reply of the wrong shape: the server is not what Burrow expects.
fn unexpected(what: &str, value: &Value) -> StoreError {
    StoreError::Internal(format!("unexpected redis reply to {what}: {value:?}"))
}

/// A bulk string's bytes exactly as stored (not necessarily UTF-8).
fn bytes_of(value: Value) -> Option<Bytes> {
    match value {
        Value::Bytes(bytes) => Some(bytes),
        Value::String(text) => Some(text.inner().clone()),
        _ => None,
    }
}

/// A stream id such as `1746450313373-0`.
fn message_id(value: &Value) -> Option<MessageId> {
    value.as_str()?.parse().ok()
}

/// A stored Content-Type, if it is UTF-8 as Burrow stores them: one that the original relay stored
/// in another encoding is none, so that the default type applies rather than a mangled one.
fn content_type(bytes: Bytes) -> Option<String> {
    String::from_utf8(bytes.into()).ok()
}

/// Reads a stream entry `[id, [field, value, ...]]`. Fields may come in any order; an entry
/// without `data` (not written by a relay) is an empty body.
fn parse_entry(value: Value) -> Result<Message, StoreError> {
    let Value::Array(entry) = value else {
        return Err(unexpected("consume", &value));
    };
    let [id, Value::Array(fields)] = <[Value; 2]>::try_from(entry)
        .map_err(|entry| unexpected("consume", &Value::Array(entry)))?
    else {
        return Err(StoreError::Internal("malformed stream entry".into()));
    };
    let id = message_id(&id).ok_or_else(|| unexpected("consume", &id))?;
    let mut body = None;
    let mut content = None;
    let mut fields = fields.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        match name.as_bytes() {
            Some(b"data") if body.is_none() => body = bytes_of(value),
            Some(b"ct") if content.is_none() => content = bytes_of(value).and_then(content_type),
            _ => {}
        }
    }
    Ok(Message {
        id,
        payload: Payload {
            body: body.unwrap_or_default(),
            content_type: content,
        },
    })
}

/// Reads the produce script's `['full', size]` or `['stored', id(, size)]`.
fn parse_produced(value: Value) -> Result<Produced, StoreError> {
    let Value::Array(parts) = &value else {
        return Err(unexpected("produce", &value));
    };
    let outcome = match parts.as_slice() {
        [tag, size] if tag.as_str().as_deref() == Some("full") => {
            size.as_u64().map(|size| Produced::Full { size })
        }
        [tag, id] if tag.as_str().as_deref() == Some("stored") => {
            message_id(id).map(|id| Produced::Stored { id, size: None })
        }
        [tag, id, size] if tag.as_str().as_deref() == Some("stored") => message_id(id)
            .zip(size.as_u64())
            .map(|(id, size)| Produced::Stored {
                id,
                size: Some(size),
            }),
        _ => None,
    };
    outcome.ok_or_else(|| unexpected("produce", &value))
}

/// Now, in unix milliseconds (presence expiry is compared across instances).
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A duration as whole milliseconds for the scripts, at least 1 (0 would mean "no expiry").
fn millis(duration: Duration) -> Value {
    Value::Integer(millis_i64(duration))
}

fn millis_i64(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis())
        .unwrap_or(i64::MAX)
        .max(1)
}

#[async_trait]
impl Backend for RedisStore {
    async fn produce(
        &self,
        tunnel: &TunnelId,
        payload: Payload,
        bound: Bound,
        job_ttl: Option<Duration>,
    ) -> Result<Produced, StoreError> {
        let (mode, n) = match bound {
            Bound::Limit(n) => ("limit", n),
            Bound::Trim(n) => ("trim", n),
        };
        let body_len = payload.body.len();
        let operation = Operation {
            key: TunnelKeys::new(tunnel).stream,
            args: vec![
                Value::from(mode),
                Value::from(n.to_string()),
                Value::Bytes(payload.body),
                Value::from(WAKE_CHANNEL),
                Value::from(WakeKey::Message(tunnel.to_string()).encode()),
                // The script reads '' as none: an empty Content-Type says nothing either.
                Value::from(payload.content_type.unwrap_or_default()),
                Value::from(job_ttl.map_or(String::new(), |_| job_key_prefix(tunnel))),
                Value::Integer(job_ttl.map_or(0, millis_i64)),
            ],
            bytes: body_len,
        };
        let reply = batch::run(&self.clients, &PRODUCE, operation).await?;
        parse_produced(reply)
    }

    async fn consume(
        &self,
        tunnel: &TunnelId,
        delivery: Delivery,
    ) -> Result<Option<Message>, StoreError> {
        let keys = TunnelKeys::new(tunnel);
        let (mode, idle) = match delivery {
            Delivery::Remove => ("remove", Value::Integer(0)),
            Delivery::Pending { redeliver_after } => (
                "pending",
                Value::Integer(i64::try_from(redeliver_after.as_millis()).unwrap_or(i64::MAX)),
            ),
            Delivery::PendingNew => ("new", Value::Integer(0)),
        };
        let operation = Operation {
            args: vec![
                Value::from(keys.group),
                Value::from(keys.consumer),
                Value::from(mode),
                idle,
                self.empty_ttl.clone(),
            ],
            key: keys.stream,
            bytes: 0,
        };
        let reply = batch::run(&self.clients, &CONSUME, operation).await?;
        match reply {
            Value::Null => Ok(None),
            entry => parse_entry(entry).map(Some),
        }
    }

    async fn ack(&self, tunnel: &TunnelId, msg: MessageId) -> Result<(), StoreError> {
        let keys = TunnelKeys::new(tunnel);
        let args = vec![
            Value::from(keys.group),
            Value::from(msg.to_string()),
            self.empty_ttl.clone(),
        ];
        ACK.run(&self.call(), vec![keys.stream], args).await?;
        Ok(())
    }

    async fn reply(
        &self,
        tunnel: &TunnelId,
        msg: MessageId,
        reply: Payload,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let tunnel_keys = TunnelKeys::new(tunnel);
        let mut keys = vec![tunnel_keys.stream];
        keys.extend(reply_keys(tunnel, msg));
        keys.push(job_key(tunnel, msg));
        let mut args = vec![
            Value::from(tunnel_keys.group),
            Value::from(tunnel_keys.consumer),
            Value::from(msg.to_string()),
            Value::Bytes(reply.body),
            millis(ttl),
            Value::from(WAKE_CHANNEL),
            Value::from(WakeKey::Reply(tunnel.to_string(), msg.to_string()).encode()),
            self.empty_ttl.clone(),
        ];
        args.extend(reply.content_type.map(Value::from));
        let stored = REPLY.run(&self.call(), keys, args).await?;
        match stored.as_i64() {
            Some(stored) => Ok(stored == 1),
            None => Err(unexpected("reply", &stored)),
        }
    }

    async fn take_reply(
        &self,
        tunnel: &TunnelId,
        msg: MessageId,
    ) -> Result<Option<Payload>, StoreError> {
        let mut keys = reply_keys(tunnel, msg);
        keys.push(job_key(tunnel, msg));
        reply_payload(TAKE_REPLY.run(&self.call(), keys, Vec::new()).await?)
    }

    async fn status(&self, tunnel: &TunnelId, msg: MessageId) -> Result<MessageStatus, StoreError> {
        let keys = TunnelKeys::new(tunnel);
        let args = vec![
            Value::from(keys.group),
            Value::from(keys.consumer),
            Value::from(msg.to_string()),
        ];
        let status = STATUS.run(&self.call(), vec![keys.stream], args).await?;
        match status.as_str().as_deref() {
            Some("pending") => Ok(MessageStatus::Pending),
            Some("queued") => Ok(MessageStatus::Queued),
            Some("gone") => Ok(MessageStatus::Gone),
            _ => Err(unexpected("status", &status)),
        }
    }

    async fn len(&self, tunnel: &TunnelId) -> Result<u64, StoreError> {
        bounded(self.call().client().xlen(TunnelKeys::new(tunnel).stream)).await
    }

    async fn job(&self, queue: &TunnelId, msg: MessageId) -> Result<Option<Bytes>, StoreError> {
        bounded(
            self.call()
                .client()
                .get::<Option<Bytes>, _>(job_key(queue, msg)),
        )
        .await
    }

    async fn forget_job(&self, queue: &TunnelId, msg: MessageId) -> Result<bool, StoreError> {
        let client = self.call().client();
        let deleted: i64 = bounded(client.del(job_key(queue, msg))).await?;
        Ok(deleted == 1)
    }

    async fn restore_job(
        &self,
        queue: &TunnelId,
        msg: MessageId,
        record: Bytes,
        reply: Option<Payload>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut keys = reply_keys(queue, msg);
        keys.push(job_key(queue, msg));
        let mut args = vec![millis(ttl), Value::Bytes(record)];
        if let Some(reply) = reply {
            args.push(Value::Bytes(reply.body));
            args.extend(reply.content_type.map(Value::from));
        }
        RESTORE_JOB.run(&self.call(), keys, args).await?;
        Ok(())
    }

    async fn announce(
        &self,
        instance: &str,
        record: Bytes,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let keys = vec![format!("{INSTANCE_PREFIX}{instance}"), INSTANCES_KEY.into()];
        let args = vec![
            Value::from(instance),
            Value::Bytes(record),
            millis(ttl),
            Value::Integer(unix_ms()),
        ];
        ANNOUNCE.run(&self.call(), keys, args).await?;
        Ok(())
    }

    async fn instances(&self) -> Result<Vec<Bytes>, StoreError> {
        let args = vec![Value::from(INSTANCE_PREFIX), Value::Integer(unix_ms())];
        let records = INSTANCES
            .run(&self.call(), vec![INSTANCES_KEY.into()], args)
            .await?;
        match records {
            Value::Array(records) => Ok(records.into_iter().filter_map(bytes_of).collect()),
            Value::Null => Ok(Vec::new()),
            other => Err(unexpected("instances", &other)),
        }
    }

    async fn publish(&self, topic: &str, body: Bytes) -> Result<(), StoreError> {
        if !self.hears_events() {
            let why = "the events subscriber is not subscribed".into();
            return Err(StoreError::Unavailable(why));
        }
        // Read before publishing: a topic subscribed meanwhile owes its first subscriber, not yet
        // answered, nothing of this event.
        let heard = self.topics.hears(topic);
        let channel = format!("{EVENT_PREFIX}{topic}");
        let args = vec![Value::from(channel), Value::Bytes(body)];
        let published = PUBLISH.run(&self.call(), Vec::new(), args).await?;
        let receivers = published
            .as_i64()
            .ok_or_else(|| unexpected("publish", &published))?;
        // This instance's own subscription, where it has subscribers, counts among them: none
        // means it is gone, though its loss is not reported yet, and they missed the event.
        if receivers == 0 && heard {
            let why = "the events subscriber did not receive the event".into();
            return Err(StoreError::Unavailable(why));
        }
        Ok(())
    }

    fn hears_events(&self) -> bool {
        *self.hears_events.borrow()
    }

    async fn listen(&self, topic: &str) -> Result<(), StoreError> {
        self.topics.listen(topic).await
    }

    async fn back(&self) {
        // The subscriber's connection stands for the server's: lost, then up and subscribed.
        if self.came_back.lock().await.changed().await.is_err() {
            // The subscriber is gone for good: nothing will ever come back.
            std::future::pending::<()>().await;
        }
    }

    async fn ready(&self, keys: &[Waited]) -> Result<Vec<bool>, StoreError> {
        let mut ready = Vec::with_capacity(keys.len());
        for batch in keys.chunks(READY_BATCH) {
            let mut names = Vec::with_capacity(batch.len());
            let mut args = Vec::with_capacity(3 * batch.len());
            for waited in batch {
                let (name, arg) = match &waited.key {
                    WakeKey::Message(tunnel) => {
                        let keys = TunnelKeys::new(tunnel);
                        // Within what redis takes (a longer one counted the key as unreadable,
                        // so ready every second).
                        let idle = waited.redeliver_after.map(millis_i64);
                        let idle = idle.map_or_else(String::new, |ms| ms.to_string());
                        (keys.stream, ["m".to_owned(), keys.group, idle])
                    }
                    WakeKey::Reply(tunnel, msg) => (
                        format!("t:{tunnel}:r-{msg}"),
                        ["r".to_owned(), String::new(), String::new()],
                    ),
                };
                names.push(name);
                args.extend(arg.map(Value::from));
            }
            let flags = READY.run(&self.call(), names, args).await?;
            let Value::Array(flags) = &flags else {
                return Err(unexpected("ready", &flags));
            };
            if flags.len() != batch.len() {
                return Err(unexpected("ready", &Value::Array(flags.clone())));
            }
            ready.extend(flags.iter().map(|flag| flag.as_i64() == Some(1)));
        }
        Ok(ready)
    }

    async fn clear(&self, tunnel: &TunnelId) -> Result<(), StoreError> {
        let keys = TunnelKeys::new(tunnel);
        CLEAR
            .run(
                &self.call(),
                vec![keys.stream],
                vec![Value::from(keys.group), self.empty_ttl.clone()],
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An I/O error reads as its message, a resolver's as its own words; others as fred says.
    #[test]
    fn errors_read_as_their_message() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let os = std::io::Error::from_raw_os_error(111);
        assert_eq!(readable(&os.into()), "Connection refused");
        assert_eq!(
            readable(&refused.into()),
            "IO Error: Kind(ConnectionRefused)"
        );
        let lookup = std::io::Error::other("failed to lookup address information: no such host");
        let lookup = fred::error::Error::from(lookup);
        assert_eq!(
            readable(&lookup),
            "failed to lookup address information: no such host"
        );
        let other = fred::error::Error::new(ErrorKind::Timeout, "Request timed out.");
        assert_eq!(readable(&other), "Timeout Error: Request timed out.");
    }
}
