//! Test support: relays and redis-servers as child processes, an HTTP client, and the macro that runs
//! one scenario against every store.

pub mod client;
pub mod h2;
pub mod process;
pub mod raw;
pub mod redis;
pub mod redis_proxy;
pub mod relay;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::task::JoinHandle;

pub use client::{Client, Response};
pub use redis::RedisServer;
pub use relay::{Relay, Store};

/// Error bodies the protocol fixes word for word.
pub mod says {
    pub const MALFORMED: &str = "Malformed url";
    pub const FULL: &str = "Queue limit reached, consumers are not keeping up";
    pub const LIMIT_TOO_BIG: &str = "Limit must be less than the tunnel max length";
    pub const ACCESS_DENIED: &str = "Access denied";
}

/// Sends `GET path` in a task of its own (a long-poll), answering the response and how long it took.
pub fn spawn_get(client: &Client, path: String) -> JoinHandle<(Response, Duration)> {
    let client = client.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let response = client.get(&path).await;
        (response, started.elapsed())
    })
}

/// Waits until `count` long-polls wait at the relay `api` talks to (its `burrow_waiting_polls`
/// gauge), so that a scenario tests the wake-up path, not the fast path.
///
/// An external relay (`BURROW_URL`) shows no gauge: there the polls get a pause of 300 ms
/// instead, which the scenarios do not depend on (they pass in either order).
pub async fn let_polls_start(api: &Client, count: u32) {
    let Some(metrics) = api.metrics() else {
        tokio::time::sleep(Duration::from_millis(300)).await;
        return;
    };
    wait_for_waiting_polls(&metrics, |waiting| waiting >= f64::from(count)).await;
}

/// Waits until the relay's `burrow_waiting_polls` gauge, read from its metrics page, satisfies
/// `ready` (the event a test needs, not a pause); panics after 10 s.
pub async fn wait_for_waiting_polls(metrics: &Client, ready: impl Fn(f64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting = metric(metrics, "burrow_waiting_polls").await;
        if ready(waiting) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the waiting polls never got where awaited (last {waiting})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The value of one sample line of a metrics page, e.g. `burrow_waiting_polls` (0 when absent).
pub async fn metric(metrics: &Client, sample: &str) -> f64 {
    let page = metrics.get("/metrics").await.expect(200).text();
    page.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0.0, |value| {
            value.trim().parse().expect("samples are numbers")
        })
}

/// Asserts that a waiting poll answered promptly after the event that should wake it, well before
/// the relay's one-second safety re-check could have found the message instead.
#[track_caller]
pub fn assert_prompt_wake(since: Instant) {
    let late = since.elapsed();
    assert!(
        late < Duration::from_millis(500),
        "woke {late:?} after the event"
    );
}

/// A WebSocket client connection, as `tokio_tungstenite::connect_async` opens it.
pub type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends a Close on `socket` and asserts that the relay answers with a Close within 5 s (a clean
/// close, RFC 6455 §5.5.1), not a dropped connection.
pub async fn assert_close_answered(socket: &mut WebSocket) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    socket.close(None).await.expect("a Close frame goes out");
    let answer = tokio::time::timeout(Duration::from_secs(5), socket.next()).await;
    let answer = answer.expect("an answer within 5 s");
    assert!(
        matches!(answer, Some(Ok(Message::Close(_)))),
        "no Close frame back: {answer:?}"
    );
}

/// Sends `bytes` as they are on the socket's connection (a frame tungstenite would not make), then
/// asserts that the relay answers with a Close frame of status `code`, within 5 s.
pub async fn assert_closed_for(socket: &mut WebSocket, bytes: &[u8], code: u16) {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::Message;
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = socket.get_mut() else {
        panic!("a plain TCP WebSocket");
    };
    tcp.write_all(bytes).await.expect("the bytes go out");
    let answer = tokio::time::timeout(Duration::from_secs(5), socket.next()).await;
    match answer.expect("an answer within 5 s") {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), code, "{frame}"),
        other => panic!("no Close frame with status {code}: {other:?}"),
    }
}

/// Calls `ready` every 20 ms until it holds or `limit` has passed; returns whether it held.
pub fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Awaits `ready` every 20 ms until it holds or `limit` has passed; returns whether it held.
/// (Inside async tests a blocking wait would stall the tasks sharing its worker thread.)
pub async fn eventually<F: std::future::Future<Output = bool>>(
    limit: Duration,
    mut ready: impl FnMut() -> F,
) -> bool {
    let deadline = Instant::now() + limit;
    while !ready().await {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// A connection to the relay with a receive buffer of 4 KiB, for clients that stop reading.
pub async fn small_window(api: &Client) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF set");
    let address = api.base().trim_start_matches("http://");
    let address = address.parse().expect("an address");
    socket.connect(address).await.expect("the relay accepts")
}

/// How many events an SSE stream says its subscriber skipped (`: skipped N events` comments).
pub fn skipped_events(stream: &str) -> u64 {
    stream
        .lines()
        .filter_map(|line| line.strip_prefix(": skipped "))
        .map(|rest| {
            rest.trim_end_matches(" events")
                .parse::<u64>()
                .expect("a count")
        })
        .sum()
}
/// A tunnel id no other test (or earlier run on the same store) uses: `{tag}-{unique suffix}`.
pub fn tunnel_id(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{tag}-{}-{nanos}-{n}", std::process::id())
}

/// The two stores a relay can run on; scenarios needing their own settings start relays through it.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Memory,
    Redis,
}

impl Backend {
    /// The relay with default settings that every test on this store shares (started on first use).
    pub fn shared(self) -> &'static Relay {
        static MEMORY: OnceLock<Relay> = OnceLock::new();
        static REDIS: OnceLock<Relay> = OnceLock::new();
        match self {
            Backend::Memory => MEMORY.get_or_init(|| Relay::start(Store::Memory, &[])),
            Backend::Redis => REDIS.get_or_init(|| Relay::start(Store::Redis(shared_redis()), &[])),
        }
    }

    /// A relay of its own with `env` added; on redis it uses the shared redis-server.
    pub fn start(self, env: &[(&str, &str)]) -> Relay {
        match self {
            Backend::Memory => Relay::start(Store::Memory, env),
            Backend::Redis => Relay::start(Store::Redis(shared_redis()), env),
        }
    }
}

/// The redis-server every redis test shares (tunnel ids keep tests apart).
pub fn shared_redis() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

/// A client for the relay at `BURROW_URL`, if set.
pub fn external() -> Option<Client> {
    std::env::var("BURROW_URL")
        .ok()
        .map(|url| Client::new(&url))
}

/// Generates one `#[tokio::test]` per store for each scenario.
///
/// `shared:` scenarios are `async fn(&Client)` and run on the memory and redis relays shared by all
/// tests, and on the relay at `BURROW_URL` (module `external`, ignored by default: run them with
/// `BURROW_URL=http://host:port cargo test --test tests external -- --ignored`). `dedicated:` scenarios are `async fn(Backend)` that start relays with their own
/// settings, on memory and redis only.
macro_rules! per_store {
    (shared: [$($shared:ident),* $(,)?], dedicated: [$($dedicated:ident),* $(,)?] $(,)?) => {
        per_store!(@store memory, Memory, [$($shared),*], [$($dedicated),*]);
        per_store!(@store redis, Redis, [$($shared),*], [$($dedicated),*]);
        mod external {
            $(
                #[doc = concat!("`", stringify!($shared), "` against the relay at `BURROW_URL`.")]
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "targets an external relay: set BURROW_URL and run ignored tests"]
                async fn $shared() {
                    let client = $crate::support::external()
                        .expect("BURROW_URL names the relay under test");
                    super::$shared(&client).await;
                }
            )*
        }
    };
    (@store $module:ident, $backend:ident, [$($shared:ident),*], [$($dedicated:ident),*]) => {
        mod $module {
            use $crate::support::Backend;
            $(
                #[doc = concat!("`", stringify!($shared), "` on the ", stringify!($module), " store.")]
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $shared() {
                    super::$shared(&Backend::$backend.shared().client()).await;
                }
            )*
            $(
                #[doc = concat!("`", stringify!($dedicated), "` on the ", stringify!($module), " store.")]
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $dedicated() {
                    super::$dedicated(Backend::$backend).await;
                }
            )*
        }
    };
}
