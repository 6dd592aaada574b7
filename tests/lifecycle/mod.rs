//! The relay's life as an operator sees it: SIGTERM drains gracefully, SIGQUIT hands the listening
//! socket to a new process (graceful upgrade), Prometheus metrics move with the traffic, and the
//! access log is written (batched, and all of it by the time the relay exits).
//!
//! These tests signal the relay and watch it exit, so they start it as a plain child process
//! (killed on drop) instead of through the shared-relay guardian.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::AsyncWriteExt;

use crate::support::process::{self, free_port};
use crate::support::relay::status_of;
use crate::support::{
    eventually, metric, shared_redis, skipped_events, small_window, spawn_get, tunnel_id,
    wait_for_waiting_polls, wait_until, Client, RedisServer,
};

/// Pingora settings for these tests: a grace period of 1 s (conf/burrow.yaml's is 8 s; no test
/// here has a routed request outlast it) and an upgrade socket of the test's own, so parallel
/// tests cannot hand sockets to each other.
const CONF: &str = "---
version: 1
threads: 2
grace_period_seconds: 1
graceful_shutdown_timeout_seconds: 2
upgrade_sock: UPGRADE_SOCK
";

/// How long SIGTERM may take: the grace period, the runtimes' shutdown timeout, and a margin.
const EXIT_WITHIN: Duration = Duration::from_secs(5);

/// A `burrow serve` child process with its own Pingora configuration; killed on drop.
struct Burrow {
    child: Child,
    port: u16,
    log: PathBuf,
}

/// What every relay of one test shares: the Pingora configuration and the upgrade socket.
struct Site {
    dir: TempDir,
}

impl Site {
    fn new() -> Site {
        let dir = TempDir::new().expect("a tempdir for the relay's configuration");
        let sock = dir.path().join("upgrade.sock");
        let conf = CONF.replace("UPGRADE_SOCK", &sock.display().to_string());
        std::fs::write(dir.path().join("burrow.yaml"), conf).expect("the tempdir is writable");
        Site { dir }
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("burrow.yaml")
    }

    fn upgrade_sock(&self) -> PathBuf {
        self.dir.path().join("upgrade.sock")
    }

    /// Starts `burrow serve args…` on `port` with `env` added; waits for `/health` unless upgrading.
    fn start(&self, port: u16, args: &[&str], env: &[(&str, &str)]) -> Burrow {
        let mut command = Command::new(Path::new(env!("CARGO_BIN_EXE_burrow")));
        command.arg("serve").args(args);
        let burrow = self.spawn(command, port, args.len(), env);
        if !args.contains(&"--upgrade") {
            let healthy = wait_until(Duration::from_secs(10), || {
                status_of(port, "/health") == Some(200)
            });
            assert!(
                healthy,
                "burrow on port {port} did not become healthy:\n{}",
                burrow.log()
            );
        }
        burrow
    }

    /// Starts `burrow serve` with `env` added and its metrics served on a port of their own;
    /// answers the relay and a client of its metrics page.
    fn start_with_metrics(&self, env: &[(&str, &str)]) -> (Burrow, Client) {
        let metrics_listen = format!("127.0.0.1:{}", free_port());
        let mut env = env.to_vec();
        env.push(("BURROW_METRICS_LISTEN", &metrics_listen));
        let relay = self.start(free_port(), &[], &env);
        (relay, Client::new(&format!("http://{metrics_listen}")))
    }

    /// Runs `command` (a relay on `port`, the `nth` there) with this site's configuration and
    /// `env` added, its output in a log of its own.
    fn spawn(&self, mut command: Command, port: u16, nth: usize, env: &[(&str, &str)]) -> Burrow {
        let log_path = self.dir.path().join(format!("relay-{port}-{nth}.log"));
        let log = std::fs::File::create(&log_path).expect("the tempdir is writable");
        let child = command
            .env("BURROW_LISTEN", format!("127.0.0.1:{port}"))
            .env("BURROW_CONF", self.conf())
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("a file handle can be duplicated"))
            .stderr(log)
            .spawn()
            .expect("the burrow binary starts");
        Burrow {
            child,
            port,
            log: log_path,
        }
    }
}

impl Burrow {
    fn client(&self) -> Client {
        Client::new(&format!("http://127.0.0.1:{}", self.port))
    }

    /// Sends `signal` (`TERM`, `QUIT`) to the relay.
    fn signal(&self, signal: &str) {
        process::signal(&self.child, signal);
    }

    /// What the relay has written to stdout and stderr so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `limit` for the relay to have written `line`; fails the test, showing its log,
    /// if it has not.
    async fn expect_logged(&self, line: &str, limit: Duration) {
        let logged = || std::future::ready(self.log().contains(line));
        assert!(eventually(limit, logged).await, "{}", self.log());
    }

    /// The exit status, if the relay exits within `limit`.
    async fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        process::exit_within(&mut self.child, limit).await
    }
}

impl Drop for Burrow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client that opens a new connection per request, so no request is sent on a kept-alive
/// connection that the draining relay is closing: every failure is then a refused connection.
fn fresh_connections(port: u16) -> (reqwest::Client, String) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a plain HTTP client builds");
    (http, format!("http://127.0.0.1:{port}"))
}

/// Produces on `tunnel` until `stop` is set; returns the ids answered 201 and how many
/// connections were refused. Any answer but 201 fails the test, and so does a connection closed
/// after the relay took the request. Refused connections (no relay listening) and resets of
/// connections still in the kernel's accept queue when the listener closed (never taken by the
/// relay, so no request of theirs was in flight) are counted, not failed.
async fn produce_until(port: u16, tunnel: String, stop: Arc<AtomicBool>) -> (Vec<String>, usize) {
    let (http, base) = fresh_connections(port);
    let (mut stored, mut refused) = (Vec::new(), 0);
    for i in 0..100_000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let sent = http
            .post(format!("{base}/t/{tunnel}?limit=0"))
            .body(format!("m{i}"))
            .send()
            .await;
        match sent {
            Ok(response) => {
                assert_eq!(
                    response.status().as_u16(),
                    201,
                    "a request in flight failed"
                );
                let id = response.headers()["x-message-id"]
                    .to_str()
                    .expect("ids are ASCII");
                stored.push(id.to_owned());
            }
            Err(e) if e.is_connect() || was_reset(&e) => {
                refused += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("a request failed mid-flight: {e:?}"),
        }
    }
    (stored, refused)
}

/// Whether the connection was reset (RST) rather than closed after taking the request.
fn was_reset(error: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionReset;
        }
        source = cause.source();
    }
    false
}

/// The ids in the redis stream of `tunnel`.
fn stored_ids(tunnel: &str) -> Vec<String> {
    let entries = shared_redis().command(&["XRANGE", &format!("t:{tunnel}:s"), "-", "+"]);
    entries
        .items()
        .iter()
        .map(|e| e.items()[0].text())
        .collect()
}

/// A relay on the shared redis-server whose tunnels hold every message these tests produce.
fn redis_env(redis_url: &str) -> [(&str, &str); 3] {
    [
        ("BURROW_STORE", "redis"),
        ("REDIS_URL", redis_url),
        ("TUNNEL_MAXLEN", "10000000"),
    ]
}

/// How many messages the redis stream of `tunnel` holds.
fn stored_count(tunnel: &str) -> i64 {
    shared_redis()
        .command(&["XLEN", &format!("t:{tunnel}:s")])
        .int()
}

/// SIGTERM answers every waiting long-poll with 204 at once, closes WebSockets with 1001 (going
/// away), and exits 0 within the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_waiting_polls_and_exits() {
    let site = Site::new();
    let (mut relay, metrics) = site.start_with_metrics(&[]);
    let api = relay.client();
    let polls: Vec<_> = (0..5)
        .map(|_| spawn_get(&api, format!("/t/{}/poll?timeout=30", tunnel_id("drain"))))
        .collect();
    wait_for_waiting_polls(&metrics, |n| n == 5.0).await;
    let ws = api.base().replacen("http", "ws", 1);
    let mut sockets = Vec::new();
    for path in ["/ws".to_owned(), format!("/ws/e/{}", tunnel_id("drain"))] {
        let (socket, _) = tokio_tungstenite::connect_async(format!("{ws}{path}"))
            .await
            .expect("the relay accepts the WebSocket");
        sockets.push(socket);
    }

    relay.signal("TERM");
    let signalled = Instant::now();
    for poll in polls {
        let (response, _) = poll.await.expect("the poll task does not panic");
        response.expect(204);
    }
    for mut socket in sockets {
        use futures_util::StreamExt;
        let closing = tokio::time::timeout(Duration::from_secs(2), socket.next()).await;
        match closing.expect("a Close within 2 s") {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1001);
            }
            other => panic!("expected a Close with 1001, got {other:?}"),
        }
    }
    let answered = signalled.elapsed();
    assert!(
        answered < Duration::from_millis(500),
        "polls answered {answered:?} after SIGTERM"
    );
    let status = relay
        .exit_within(EXIT_WITHIN)
        .await
        .expect("the relay exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
}

/// Events published to a subscriber before SIGTERM reach it before its stream ends, over SSE and
/// over a WebSocket: their publisher was told they reached it (probe BE: those still queued for
/// a subscriber busy writing were dropped, as the stop and the next event raced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_events_go_out_at_sigterm() {
    use futures_util::StreamExt;
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::tungstenite::Message;
    let site = Site::new();
    let relay = site.start(free_port(), &[], &[]);
    let api = relay.client();
    let topic = tunnel_id("flush");
    // Small windows, read by nobody until the signal: what the relay's socket buffers (4 MiB
    // at most) cannot take waits in its queue for the subscriber (256 events, the oldest
    // skipped beyond).
    let mut sse = small_window(&api).await;
    let request = format!("GET /e/{topic} HTTP/1.1\r\nHost: relay\r\n\r\n");
    sse.write_all(request.as_bytes()).await.expect("sent");
    let url = format!("ws://127.0.0.1:{}/ws/e/{topic}", relay.port);
    let (mut ws, _) = tokio_tungstenite::client_async(url, small_window(&api).await)
        .await
        .expect("a WebSocket");
    // 6 MB, in events under the 16 KiB an SSE chunk holds.
    let event = "e".repeat(10_000);
    let published = 600;
    for body in std::iter::repeat_n(event.as_str(), published as usize).chain(["last"]) {
        let response = api.post(&format!("/e/{topic}"), body).await.expect(202);
        assert_eq!(response.header("x-subscribers"), Some("2"));
    }
    relay.signal("TERM");
    let read_sse = async {
        let mut seen = Vec::new();
        // To the end of the chunked stream.
        while !seen.ends_with(b"0\r\n\r\n") {
            let mut chunk = vec![0u8; 64 * 1024];
            let n = sse.read(&mut chunk).await.expect("readable");
            assert!(n > 0, "the stream was cut");
            seen.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    };
    let read_ws = async {
        let mut events = Vec::new();
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => events.push(text.to_string()),
                Some(Ok(Message::Close(frame))) => {
                    assert_eq!(frame.map(|f| u16::from(f.code)), Some(1001));
                    return events;
                }
                Some(Ok(Message::Ping(_))) => {}
                other => panic!("expected events then a Close, got {other:?}"),
            }
        }
    };
    let both = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(read_sse, read_ws)
    });
    let (sse, ws) = both.await.expect("both streams end within 20 s");
    // Over SSE every event is there or counted as skipped, the last one there.
    let delivered = sse.matches(&format!("data: {event}\n")).count() as u64;
    let skipped = skipped_events(&sse);
    assert_eq!(delivered + skipped, published, "{skipped} skipped");
    assert!(sse.contains("data: last\n"), "the last event is missing");
    // A WebSocket has no word for a gap: the last event is there, behind those not skipped.
    let last = ws.last().is_some_and(|text| text == "last");
    assert!(last, "the last event is missing ({} events)", ws.len());
    assert!(ws[..ws.len() - 1].iter().all(|text| *text == event));
}

/// A long-poll that waited, and whose client then reads nothing of its answer (a message bigger
/// than the kernel's buffers), is let go and its connection reset, as from any other answer
/// (probe AY: it held the connection and megabytes for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waited_poll_whose_client_reads_nothing_is_let_go() {
    let site = Site::new();
    let (relay, metrics) = site.start_with_metrics(&[("TUNNEL_MAX_MESSAGE_SIZE", "16777216")]);
    let api = relay.client();
    let t = tunnel_id("unread");
    let mut stalled = small_window(&api).await;
    let request = format!("GET /t/{t}/poll?timeout=60 HTTP/1.1\r\nHost: relay\r\n\r\n");
    stalled.write_all(request.as_bytes()).await.expect("sent");
    wait_for_waiting_polls(&metrics, |n| n == 1.0).await;
    // Twice what the relay's send buffer may grow to.
    api.produce(&t, &"m".repeat(8 << 20)).await;
    let reset = || async {
        stalled.take_error().ok().flatten().map(|e| e.kind())
            == Some(std::io::ErrorKind::ConnectionReset)
    };
    // 30 s without progress, looked at every 5 s.
    let reset = eventually(Duration::from_secs(45), reset).await;
    assert!(
        reset,
        "a client that reads nothing holds the waited poll's connection"
    );
}

/// Over h2c a slow but steady reader of a big answer (8 KiB/s, granting its stream's window as it
/// reads) stays, past the 30 s in which a stalled one is let go (probe BA: the answer went out
/// in one write, which counted as progress only once done, and the reader was cut at 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_h2_reader_of_a_big_answer_stays() {
    let site = Site::new();
    let (relay, _metrics) = site.start_with_metrics(&[("TUNNEL_MAX_MESSAGE_SIZE", "1048576")]);
    let api = relay.client();
    let t = tunnel_id("slowh2");
    api.produce(&t, &"s".repeat(512 << 10)).await;
    let socket = tokio::net::TcpStream::connect(format!("127.0.0.1:{}", relay.port))
        .await
        .expect("the relay accepts");
    let (mut client, connection) = h2::client::Builder::new()
        .initial_window_size(16 * 1024)
        .handshake::<_, bytes::Bytes>(socket)
        .await
        .expect("an h2c handshake");
    tokio::spawn(connection);
    let request = http::Request::get(format!("{}/t/{t}", api.base()))
        .body(())
        .expect("a request");
    let (response, _) = client.send_request(request, true).expect("sent");
    let mut body = response.await.expect("an answer").into_body();
    // 8 KiB a second for 36 s: past the 30 s (and the 5 s between looks) of a stalled reader.
    let mut read = 0;
    while read < 36 * 8 * 1024 {
        let chunk = body
            .data()
            .await
            .expect("more of the answer")
            .unwrap_or_else(|e| panic!("cut after {read} bytes: {e}"));
        read += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
        let pace = Duration::from_secs_f64(chunk.len() as f64 / 8192.0);
        tokio::time::sleep(pace).await;
    }
}

/// A long-poll whose client hangs up (or, over h2c, resets its stream) stops waiting at once and
/// takes nothing: the message, reply or job result that arrives afterwards is there for the next
/// client, on both stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_polls_take_nothing() {
    for store in [None, Some(shared_redis().url())] {
        let site = Site::new();
        let mut env = Vec::new();
        if let Some(url) = &store {
            env.extend([("BURROW_STORE", "redis"), ("REDIS_URL", url.as_str())]);
        }
        let (relay, metrics) = site.start_with_metrics(&env);
        let api = relay.client();
        let t = tunnel_id("abandoned");
        let msg = api.produce(&t, "question").await;
        api.consume(&t, "?pending").await.expect(200);
        let queue = tunnel_id("abandonedjobs");
        let trigger = api
            .post(&format!("/trigger?queue={queue}"), r#"{"n":1}"#)
            .await;
        let job: serde_json::Value =
            serde_json::from_slice(&trigger.expect(202).body).expect("JSON");
        let job = job["id"].as_str().expect("a job id").to_owned();
        let address = format!("127.0.0.1:{}", relay.port);
        let mut hung_up = Vec::new();
        // The last two send more behind the poll (a next request, pipelined, and the first byte
        // of one): the socket is still watched for the hang-up.
        for (path, behind) in [
            (format!("/t/{t}/poll?timeout=30"), ""),
            (format!("/t/{t}/{msg}/reply/poll?timeout=30"), ""),
            (format!("/done/{job}?wait=30"), ""),
            (
                format!("/t/{t}/poll?timeout=30"),
                "GET /health HTTP/1.1\r\n\r\n",
            ),
            (format!("/t/{t}/poll?timeout=30"), "G"),
        ] {
            let mut socket = tokio::net::TcpStream::connect(&address)
                .await
                .expect("the relay accepts");
            let request = format!("GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n{behind}");
            socket.write_all(request.as_bytes()).await.expect("sent");
            hung_up.push(socket);
        }
        // Over h2c the poll waits on a stream of a shared connection: the client resets it.
        let h2c = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .expect("an h2c client builds");
        let reset = tokio::spawn(
            h2c.get(format!("http://{address}/t/{t}/poll?timeout=30"))
                .send(),
        );
        wait_for_waiting_polls(&metrics, |n| n == 6.0).await;
        drop(hung_up);
        reset.abort();
        wait_for_waiting_polls(&metrics, |n| n == 0.0).await;

        api.produce(&t, "kept").await;
        api.post(&format!("/t/{t}/{msg}/reply"), "answer")
            .await
            .expect(201);
        assert_eq!(api.consume(&t, "").await.expect(200).text(), "kept");
        let reply = api.get(&format!("/t/{t}/{msg}/reply")).await.expect(200);
        assert_eq!(reply.text(), "answer");
        let taken = api.consume(&queue, "?pending").await.expect(200);
        let path = format!("/t/{queue}/{}/reply", taken.message_id());
        api.post(&path, "done").await.expect(201);
        let done = api.get(&format!("/done/{job}")).await.expect(200);
        let done: serde_json::Value = serde_json::from_slice(&done.body).expect("JSON");
        assert_eq!(
            (done["status"].as_str(), done["result"].as_str()),
            (Some("Done"), Some("done"))
        );
    }
}

/// `BURROW_ACCESS_LOG=1` writes one line per request (method, route, status, duration, tunnel),
/// a long-poll answered outside Pingora's session included, within a few seconds and in any case
/// before the relay exits; `0`, or a `RUST_LOG` that filters `burrow::access` out, writes none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_switch() {
    let site = Site::new();
    let cases = [
        ("1", "info", true),
        ("0", "info", false),
        ("1", "warn", false),
    ];
    for (setting, filter, logged) in cases {
        let env = [("BURROW_ACCESS_LOG", setting), ("RUST_LOG", filter)];
        let mut relay = site.start(free_port(), &[], &env);
        let api = relay.client();
        let t = tunnel_id("logged");
        api.produce(&t, "x").await;
        api.get(&format!("/t/{t}-poll/poll?timeout=1"))
            .await
            .expect_empty();
        let line_for = |log: &str, tunnel: &str| {
            log.lines()
                .find(|l| l.contains("burrow::access") && l.ends_with(&format!("tunnel={tunnel}")))
                .map(String::from)
        };
        if logged {
            // Written by the flusher while the relay runs.
            let written = || std::future::ready(line_for(&relay.log(), &t).is_some());
            assert!(
                eventually(Duration::from_secs(5), written).await,
                "{}",
                relay.log()
            );
        }
        // A method of 5,000 characters is shown cut: one short line per request.
        let long = reqwest::Method::from_bytes("X".repeat(5000).as_bytes()).expect("a token");
        api.send(api.request(long, &format!("/t/{t}")))
            .await
            .expect(405);
        let last = tunnel_id("last");
        api.produce(&last, "x").await;
        relay.signal("TERM");
        let status = relay.exit_within(EXIT_WITHIN).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "exit status {status:?}"
        );
        let log = relay.log();
        let case = format!("BURROW_ACCESS_LOG={setting} RUST_LOG={filter}");
        assert_eq!(line_for(&log, &t).is_some(), logged, "{case}: {log}");
        assert_eq!(line_for(&log, &last).is_some(), logged, "{case}: {log}");
        assert_eq!(log.contains("burrow::access"), logged, "{case}: {log}");
        let cut = format!("] {}… ", "X".repeat(32));
        assert_eq!(log.contains(&cut), logged, "{case}: {log}");
        assert!(
            !log.contains(&"X".repeat(33)),
            "{case}: a method logged whole"
        );
        if logged {
            let line = line_for(&log, &t).unwrap_or_default();
            assert!(
                line.contains("INFO  burrow::access] POST produce 201 "),
                "{line}"
            );
            assert!(line.contains("ms client=127.0.0.1 tunnel="), "{line}");
            let poll = line_for(&log, &format!("{t}-poll")).unwrap_or_default();
            assert!(poll.contains("] GET poll 204 "), "{log}");
        }
    }
}

/// The access log names an IPv4 client of a dual-stack listener as IPv4, as a load balancer's
/// own log does (not `::ffff:127.0.0.1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_names_ipv4_clients_of_dual_stack_listeners() {
    let site = Site::new();
    let port = free_port();
    let listen = format!("[::]:{port}");
    let env = [("BURROW_LISTEN", listen.as_str()), ("RUST_LOG", "info")];
    let relay = site.start(port, &[], &env);
    let t = tunnel_id("dual-stack");
    relay.client().produce(&t, "x").await;
    let said = format!("client=127.0.0.1 tunnel={t}");
    relay.expect_logged(&said, Duration::from_secs(5)).await;
}

/// SIGINT stops the relay at once, with its access log written. (Burrow stops itself: Pingora's
/// own quick shutdown left about one relay in twenty spinning on accept errors for ever, in runs of
/// `kill -INT` half a second after a request, which no test here waits for.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_at_once() {
    let site = Site::new();
    let env = [("BURROW_ACCESS_LOG", "1"), ("RUST_LOG", "info")];
    let mut relay = site.start(free_port(), &[], &env);
    relay.client().produce(&tunnel_id("interrupted"), "x").await;
    relay.signal("INT");
    let status = relay.exit_within(Duration::from_secs(5)).await;
    let log = relay.log();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(log.contains("POST produce 201"), "{log}");
    assert!(!log.contains("Accept() failed"), "{log}");
}

/// A SIGINT while the relay waits for its store at start-up stops it too, also when its parent
/// ignores SIGINT (`burrow serve &` in a script): the handler is installed before that wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_while_starting_stops_it() {
    let site = Site::new();
    // The shell's `trap '' INT` leaves SIGINT ignored in the relay it becomes.
    let mut command = Command::new("sh");
    command
        .args(["-c", "trap '' INT; exec \"$0\" serve"])
        .arg(env!("CARGO_BIN_EXE_burrow"));
    let nobody = free_port().to_string();
    let env = [("BURROW_STORE", "redis"), ("REDIS_PORT", nobody.as_str())];
    let mut relay = site.spawn(command, free_port(), 0, &env);
    let said = "redis: cannot connect";
    relay.expect_logged(said, Duration::from_secs(10)).await;
    relay.signal("INT");
    let status = relay.exit_within(EXIT_WITHIN).await;
    let log = relay.log();
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {log}");
    assert!(
        !log.contains("not reachable at start-up"),
        "stopped only after the wait: {log}"
    );
}

/// A SIGTERM while the relay waits for its store at start-up drains it as soon as it runs: exit 0,
/// not the default action's 143.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_starting_stops_it_cleanly() {
    let site = Site::new();
    let nobody = free_port().to_string();
    let env = [("BURROW_STORE", "redis"), ("REDIS_PORT", nobody.as_str())];
    let mut relay = site.spawn(
        Command::new(env!("CARGO_BIN_EXE_burrow")),
        free_port(),
        0,
        &env,
    );
    // The line names the address it tried, and why in the system's words.
    let said = format!("redis: cannot connect to 127.0.0.1:{nobody}: Connection refused\n");
    relay.expect_logged(&said, Duration::from_secs(10)).await;
    relay.signal("TERM");
    let status = relay.exit_within(EXIT_WITHIN).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}: {}",
        relay.log()
    );
}

/// A SIGQUIT with no new relay waiting to take the listening socket is refused, with a word why:
/// handing the socket to nobody would leave nothing listening. A socket file left by a new relay
/// that was killed while it waited is not one waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_without_a_new_relay_is_refused() {
    let site = Site::new();
    let relay = site.start(free_port(), &[], &[]);
    // Nor does a socket file left by a new relay that was killed while it waited.
    let left = std::os::unix::net::UnixListener::bind(site.upgrade_sock());
    drop(left.expect("the upgrade socket can be made"));
    assert!(site.upgrade_sock().exists());
    refused_with_a_word(relay, "QUIT").await;
}

/// A SIGHUP (nginx's reload) is ignored with a word why: the relay has nothing to reload, and
/// stopping, the default, would cut every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_is_ignored() {
    let site = Site::new();
    refused_with_a_word(site.start(free_port(), &[], &[]), "HUP").await;
}

/// Sends `relay` SIG`signal`, which it must log as ignored and serve on, then stops it.
async fn refused_with_a_word(mut relay: Burrow, signal: &str) {
    relay.signal(signal);
    let said = format!("SIG{signal} ignored");
    relay.expect_logged(&said, Duration::from_secs(10)).await;
    relay.client().get("/health").await.expect(200);
    relay.signal("TERM");
    let status = relay.exit_within(EXIT_WITHIN).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// Presence follows agents at once: an agent connecting is announced without waiting for the
/// 5 s tick, and a relay stopped with SIGTERM withdraws its agents as it stops, instead of other
/// instances listing them (and sending it their requests) until its record expires (15 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_announced_and_withdrawn_at_once() {
    let site = Site::new();
    let redis_url = shared_redis().url();
    let mut relay = site.start(free_port(), &[], &redis_env(&redis_url));
    let other = site.start(free_port(), &[], &redis_env(&redis_url));
    let name = tunnel_id("present");
    let url = format!("ws://127.0.0.1:{}/agent/connect?name={name}", relay.port);
    let (_agent, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("the relay accepts the agent");
    let listed = || async {
        let agents = other.client().get("/agents").await.expect(200).json();
        let agents = agents["agents"].as_array().cloned().unwrap_or_default();
        agents.iter().filter(|a| a["name"] == name.as_str()).count()
    };
    let announced = eventually(Duration::from_secs(3), || async { listed().await == 1 }).await;
    assert!(announced, "not listed by the other instance within 3 s");
    relay.signal("TERM");
    let status = relay.exit_within(EXIT_WITHIN).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert_eq!(listed().await, 0, "still listed after the relay stopped");
}

/// Under a stream of produces, SIGTERM fails no request in flight and loses nothing it answered 201.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_loses_nothing_acknowledged() {
    let site = Site::new();
    let redis_url = shared_redis().url();
    let env = redis_env(&redis_url);
    let mut relay = site.start(free_port(), &[], &env);
    let tunnel = tunnel_id("sigterm");
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let t = format!("{tunnel}-{p}");
            tokio::spawn(produce_until(relay.port, t, stop.clone()))
        })
        .collect();
    // Let real traffic flow before the signal: wait for stored messages, not for time.
    let all_stored = || (0..4).all(|p| stored_count(&format!("{tunnel}-{p}")) > 0);
    assert!(eventually(Duration::from_secs(10), || std::future::ready(all_stored())).await);
    relay.signal("TERM");
    let status = relay
        .exit_within(EXIT_WITHIN)
        .await
        .expect("the relay exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
    stop.store(true, Ordering::Relaxed);
    for (p, producer) in producers.into_iter().enumerate() {
        let (stored, _) = producer.await.expect("the producer does not panic");
        assert!(!stored.is_empty());
        assert_eq!(
            stored_ids(&format!("{tunnel}-{p}")),
            stored,
            "every 201 is in the store"
        );
    }
}

/// SIGQUIT hands the socket to a relay started with `--upgrade`: no request fails, none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_upgrade_hands_over_the_socket() {
    let site = Site::new();
    let redis_url = shared_redis().url();
    let env = redis_env(&redis_url);
    let port = free_port();
    let mut old = site.start(port, &[], &env);
    let tunnel = tunnel_id("upgrade");
    let stop = Arc::new(AtomicBool::new(false));
    let producer = tokio::spawn(produce_until(port, tunnel.clone(), stop.clone()));

    let new = site.start(port, &["--upgrade"], &env);
    let sock = site.upgrade_sock();
    assert!(
        eventually(Duration::from_secs(10), || std::future::ready(
            sock.exists()
        ))
        .await,
        "the new relay never listened for the socket"
    );
    old.signal("QUIT");
    // The old relay keeps serving while it hands over, then drains and exits.
    let status = old
        .exit_within(Duration::from_secs(15))
        .await
        .expect("the old relay exits");
    assert!(status.success(), "exit status {status}");
    let served_after = new.client().get("/health").await.expect(200);
    drop(served_after);
    let before = stored_count(&tunnel);
    assert!(
        eventually(Duration::from_secs(10), || {
            std::future::ready(stored_count(&tunnel) > before)
        })
        .await,
        "the new relay takes produces"
    );
    stop.store(true, Ordering::Relaxed);
    let (stored, refused) = producer.await.expect("the producer does not panic");
    assert_eq!(refused, 0, "the listening socket was never closed");
    assert_eq!(stored_ids(&tunnel), stored, "every 201 is in the store");
}

/// A SIGTERM in the 5 s the old process serves on after the hand-over is taken only at their end
/// (Pingora watches no signal then): the relay says so at once, and exits as it would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_the_hand_over_is_told() {
    let site = Site::new();
    let port = free_port();
    let mut old = site.start(port, &[], &[("RUST_LOG", "info")]);
    let _new = site.start(port, &["--upgrade"], &[]);
    let sock = site.upgrade_sock();
    let waiting = || std::future::ready(sock.exists());
    assert!(
        eventually(Duration::from_secs(10), waiting).await,
        "no new relay waits"
    );
    old.signal("QUIT");
    old.expect_logged("SIGQUIT received", Duration::from_secs(10))
        .await;
    old.signal("TERM");
    let told = "SIGTERM during the upgrade's hand-over";
    old.expect_logged(told, Duration::from_secs(2)).await;
    let status = old.exit_within(Duration::from_secs(15)).await;
    assert!(status.is_some_and(|status| status.success()), "{status:?}");
}

/// Everything the relay answers on `raw` until it closes the connection.
async fn until_closed(raw: &mut tokio::net::TcpStream) -> String {
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(raw, &mut answer)
        .await
        .expect("an answer, then the connection closed");
    answer
}

/// A request refused for a head slower than `BURROW_HEADER_TIMEOUT` is counted with the time its
/// head took (it was counted as taking no time), so that slow heads show in the histogram.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_are_counted_with_their_time() {
    let site = Site::new();
    let (relay, metrics) = site.start_with_metrics(&[("BURROW_HEADER_TIMEOUT", "1")]);
    let address = relay
        .client()
        .base()
        .trim_start_matches("http://")
        .to_owned();
    let mut raw = tokio::net::TcpStream::connect(&address)
        .await
        .expect("the relay accepts");
    raw.write_all(b"GET /health HTTP/1.1\r\nHost:")
        .await
        .expect("sent");
    let answer = until_closed(&mut raw).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let sample = "burrow_request_duration_seconds_sum{route=\"invalid\"}";
    let seconds = metric(&metrics, sample).await;
    assert!(seconds >= 1.0, "{sample} {seconds}");
    // One trickled over half a second that then turns out malformed (framed two ways) counts its
    // half second too. (The pause is the time being measured, not a wait for an event.)
    let mut raw = tokio::net::TcpStream::connect(&address)
        .await
        .expect("the relay accepts");
    raw.write_all(b"POST /t/x HTTP/1.1\r\nHost: r\r\n")
        .await
        .expect("sent");
    tokio::time::sleep(Duration::from_millis(500)).await;
    raw.write_all(b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .expect("sent");
    let answer = until_closed(&mut raw).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // From the relay's first read of the head, which may come a little after the client's write.
    let more = metric(&metrics, sample).await - seconds;
    assert!(more >= 0.4, "{sample} grew by {more}");
}

/// The metrics page counts the agents, event subscribers and job sockets open right now, and
/// says whether the store is connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_open_connections() {
    let site = Site::new();
    let (relay, metrics) = site.start_with_metrics(&[]);
    let open = |kind: &'static str| {
        let metrics = metrics.clone();
        async move { metric(&metrics, &format!("burrow_open{{kind=\"{kind}\"}}")).await }
    };
    let kinds = ["agent", "subscriber", "job_socket"];
    let page = metrics.get("/metrics").await.expect(200).text();
    for kind in kinds {
        let sample = format!("burrow_open{{kind=\"{kind}\"}} 0");
        assert!(
            page.lines().any(|line| line == sample),
            "no {sample}:\n{page}"
        );
    }
    assert_eq!(metric(&metrics, "burrow_store_up").await, 1.0);
    let ws = relay.client().base().replacen("http", "ws", 1);
    let mut sockets = Vec::new();
    for path in ["/agent/connect?name=svc", "/ws/e/topic", "/ws"] {
        let (socket, _) = tokio_tungstenite::connect_async(format!("{ws}{path}"))
            .await
            .expect("the relay accepts the WebSocket");
        sockets.push(socket);
    }
    for kind in kinds {
        let one = eventually(Duration::from_secs(5), || async { open(kind).await == 1.0 });
        assert!(one.await, "{kind}: {}", open(kind).await);
    }
    drop(sockets);
    for kind in kinds {
        let none = eventually(Duration::from_secs(5), || async { open(kind).await == 0.0 });
        assert!(none.await, "{kind}: {}", open(kind).await);
    }
}

/// The metrics page says whether the store answers: 0 while redis is down, and while it is frozen
/// (its connections stay up, its operations time out); 1 again once it answers, and 1 while it
/// answers only to refuse writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_say_whether_the_store_answers() {
    let mut redis = RedisServer::start();
    let site = Site::new();
    let url = redis.url();
    let (relay, metrics) = site.start_with_metrics(&[("REDIS_URL", url.as_str())]);
    let up = |up: f64| {
        let metrics = metrics.clone();
        eventually(Duration::from_secs(10), move || {
            let metrics = metrics.clone();
            async move { metric(&metrics, "burrow_store_up").await == up }
        })
    };
    assert!(up(1.0).await, "up at start-up");
    redis.stop();
    assert!(up(0.0).await, "down with redis");
    redis.restart();
    assert!(up(1.0).await, "up again");
    let api = relay.client();
    let t = tunnel_id("frozen-gauge");
    // A server that answers, if only to refuse (out of memory), is up.
    let msg = api.produce(&t, "question").await;
    api.consume(&t, "?pending").await.expect(200);
    redis.command(&["CONFIG", "SET", "maxmemory", "1"]);
    let refused = api.post(&format!("/t/{t}/{msg}/reply"), "answer").await;
    redis.command(&["CONFIG", "SET", "maxmemory", "0"]);
    refused.expect_one_line_error(503);
    assert_eq!(
        metric(&metrics, "burrow_store_up").await,
        1.0,
        "refusing is answering"
    );
    let pid = redis.pid();
    process::signal_pid(pid, "STOP");
    api.post(&format!("/t/{t}"), "x")
        .await
        .expect_one_line_error(503);
    let frozen = up(0.0).await;
    process::signal_pid(pid, "CONT");
    assert!(frozen, "down while frozen");
    let answered = eventually(Duration::from_secs(10), || async {
        api.post(&format!("/t/{t}"), "y").await.status == 201
    });
    assert!(answered.await, "answers again");
    assert!(up(1.0).await, "up once it answers");
}

/// The metrics page counts requests, messages and waiting polls as they happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_traffic() {
    let site = Site::new();
    let (relay, metrics) = site.start_with_metrics(&[]);
    let api = relay.client();
    // Series with labels known in advance are there at zero before any traffic.
    let page = metrics.get("/metrics").await.expect(200).text();
    for sample in [
        "burrow_waiting_polls 0",
        "burrow_messages_total{event=\"produced\"} 0",
        "burrow_messages_total{event=\"rejected\"} 0",
        "burrow_store_errors_total{op=\"produce\"} 0",
        "burrow_store_errors_total{op=\"take_reply\"} 0",
        "burrow_store_duration_seconds_count{op=\"consume\"} 0",
    ] {
        assert!(
            page.lines().any(|line| line == sample),
            "no {sample}:\n{page}"
        );
    }
    let t = tunnel_id("metrics");
    api.produce(&t, "a").await;
    api.produce(&t, "b").await;
    api.post(&format!("/t/{t}?limit=2"), "c").await.expect(507);
    api.consume(&t, "").await.expect(200);
    assert_eq!(
        metric(&metrics, "burrow_messages_total{event=\"produced\"}").await,
        2.0
    );
    assert_eq!(
        metric(&metrics, "burrow_messages_total{event=\"rejected\"}").await,
        1.0
    );
    assert_eq!(
        metric(&metrics, "burrow_messages_total{event=\"consumed\"}").await,
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "burrow_requests_total{route=\"produce\",status=\"201\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            "burrow_requests_total{route=\"produce\",status=\"507\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "burrow_request_duration_seconds_count{route=\"consume\"}"
        )
        .await,
        1.0
    );
    // A request refused before routing (here, framed two ways at once) is counted too.
    let mut raw = tokio::net::TcpStream::connect(api.base().trim_start_matches("http://"))
        .await
        .expect("the relay accepts");
    let smuggling = "POST /t/x HTTP/1.1\r\nHost: r\r\nContent-Length: 1\r\n\
                     Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    raw.write_all(smuggling.as_bytes()).await.expect("sent");
    let answer = until_closed(&mut raw).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(
        metric(
            &metrics,
            "burrow_requests_total{route=\"invalid\",status=\"400\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "burrow_store_duration_seconds_count{op=\"produce\"}"
        )
        .await,
        3.0
    );

    let idle = tunnel_id("metrics-poll");
    let poll = spawn_get(&api, format!("/t/{idle}/poll?timeout=30"));
    wait_for_waiting_polls(&metrics, |n| n == 1.0).await;
    api.produce(&idle, "wake").await;
    poll.await
        .expect("the poll task does not panic")
        .0
        .expect(200);
    wait_for_waiting_polls(&metrics, |n| n == 0.0).await;
    // A long-poll that waited (outside Pingora's session) is counted once answered, like any.
    let answered = "burrow_requests_total{route=\"poll\",status=\"200\"}";
    let counted = eventually(Duration::from_secs(5), || async {
        metric(&metrics, answered).await == 1.0
    });
    assert!(counted.await, "{answered} never reached 1");
}

/// An HTTP/2 connection without a stream is closed after a minute, as an idle HTTP/1 one is, so
/// that idle connections cannot pile up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2c_connections_are_closed() {
    use tokio::io::AsyncReadExt;
    let relay = crate::support::Backend::Memory.start(&[]);
    let address = relay.base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address)
        .await
        .expect("the relay accepts");
    // The client preface, an empty SETTINGS frame, and the acknowledgement of the relay's.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    hello.extend_from_slice(&[0, 0, 0, 4, 1, 0, 0, 0, 0]);
    socket.write_all(&hello).await.expect("sent");
    let opened = Instant::now();
    let mut frames = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(90), socket.read_to_end(&mut frames));
    assert!(read.await.is_ok(), "still open after 90 s");
    let idle = opened.elapsed();
    assert!(idle >= Duration::from_secs(55), "closed after {idle:?}");
}
