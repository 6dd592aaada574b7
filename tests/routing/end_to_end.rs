//! PROTOCOL.md part 3 end to end: a client, the real relay, a real `burrow agent` process and an
//! upstream HTTP service inside the test, all over real sockets.
//!
//! Waiting is on events (an agent listed by `GET /agents`, a line in the agent's log, the upstream
//! receiving a request), each bounded by a deadline; nothing sleeps a fixed time to synchronise.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use tokio::task::JoinSet;

use super::upstream::{blob, sha256, Echo, Upstream};
use super::{
    upstream_answering, upstream_answering_unread, upstream_closing_on_the_second_request,
    upstream_holding, Agent,
};
use crate::support::h2;
use crate::support::process::free_port;
use crate::support::{
    metric, says, tunnel_id, wait_until, Backend, Client, RedisServer, Relay, Response, Store,
};

/// How long an agent may take to (re)connect: its back-off reaches 10 s.
const RECONNECT: Duration = Duration::from_secs(15);
/// How long anything else may take.
const WAIT: Duration = Duration::from_secs(10);

const CLIENT_ID: &str = "x-backstream-client-id";
const TIMEOUT: &str = "x-backstream-request-timeout";

impl Agent {
    /// `burrow agent --relay RELAY --name NAME --upstream UPSTREAM [--token TOKEN]`.
    fn serve(relay: &str, name: &str, upstream: &str, token: Option<&str>) -> Agent {
        let mut args = vec!["--relay", relay, "--name", name, "--upstream", upstream];
        if let Some(token) = token {
            args.extend(["--token", token]);
        }
        Agent::start(&args)
    }

    /// SIGKILL: the agent vanishes without a goodbye.
    fn kill(&mut self) {
        self.child.kill().expect("the agent can be killed");
        self.child.wait().expect("the agent can be waited on");
    }

    /// Waits until the agent's log contains `text`; panics with the log if it does not within
    /// [`WAIT`].
    async fn expect_logged(&self, text: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log().contains(text) {
            assert!(Instant::now() < deadline, "no {text:?} in:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// How many agents named `name` `GET /agents` lists (0 while the relay does not answer).
async fn agents_named(client: &Client, name: &str) -> usize {
    let Ok(response) = client
        .request(Method::GET, "/agents")
        .timeout(Duration::from_secs(2))
        .send()
        .await
    else {
        return 0;
    };
    let Ok(body) = response.bytes().await else {
        return 0;
    };
    let json: serde_json::Value = serde_json::from_slice(&body).expect("/agents answers JSON");
    json["agents"]
        .as_array()
        .expect("/agents has an `agents` array")
        .iter()
        .filter(|agent| agent["name"] == name)
        .count()
}

/// Waits until `GET /agents` lists exactly `count` agents named `name`; panics after `limit` with
/// the logs of `agents`.
async fn wait_agents(
    client: &Client,
    name: &str,
    count: usize,
    limit: Duration,
    agents: &[&Agent],
) {
    let deadline = Instant::now() + limit;
    loop {
        let listed = agents_named(client, name).await;
        if listed == count {
            return;
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = agents.iter().map(|a| a.log()).collect();
            panic!(
                "after {limit:?} /agents lists {listed} agents named {name}, not {count}; agent logs:\n{}",
                logs.join("\n---\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A relay, an upstream and one agent in front of it, connected.
struct Setup {
    relay: Relay,
    upstream: Upstream,
    agent: Agent,
    name: String,
    client: Client,
}

impl Setup {
    async fn start(store: Store<'_>, env: &[(&str, &str)]) -> Setup {
        let relay = Relay::start(store, env);
        Setup::on(relay).await
    }

    /// A set-up on the shared redis-server, and a second relay instance B on it that already
    /// lists the agent (learnt from A's announcement, made as the agent connected).
    async fn with_second_instance() -> (Setup, Relay) {
        let redis = crate::support::shared_redis();
        let setup = Setup::start(Store::Redis(redis), &[]).await;
        let b = Relay::start(Store::Redis(redis), &[]);
        wait_agents(&b.client(), &setup.name, 1, WAIT, &[&setup.agent]).await;
        (setup, b)
    }

    async fn on(relay: Relay) -> Setup {
        let upstream = Upstream::start("up").await;
        let name = tunnel_id("agent");
        let agent = Agent::serve(&relay.base, &name, &upstream.url(), None);
        let client = relay.client();
        wait_agents(&client, &name, 1, RECONNECT, &[&agent]).await;
        Setup {
            relay,
            upstream,
            agent,
            name,
            client,
        }
    }
}

/// `GET /r/{name}/echo` answered 200 by upstream `id`.
async fn echo_through(client: &Client, name: &str, id: &str) {
    let response = client.get(&format!("/r/{name}/echo")).await.expect(200);
    assert_eq!(Echo::parse(&response.body).upstream, id);
}

/// The request's method, path, query, headers and body reach the upstream (hop-by-hop headers,
/// the relay's own headers removed; `X-Forwarded-*` added), and its status, headers and body come
/// back, whichever way the agent is addressed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_and_query_preserved() {
    let setup = Setup::start(Store::Memory, &[]).await;
    let (client, name) = (&setup.client, &setup.name);
    // A response head with more headers than hyper takes by default (100) comes back whole; read
    // raw, since the test's own client stops at 100 too.
    let many = raw_answer(&setup.relay.base, &format!("/r/{name}/many-headers")).await;
    assert!(many.starts_with("HTTP/1.1 200"), "{many}");
    assert!(
        many.contains("x-h-149: 149\r\n") && many.ends_with("many"),
        "{many}"
    );
    let relay_host = setup.relay.base.strip_prefix("http://").unwrap().to_owned();
    let upstream_host = format!("127.0.0.1:{}", setup.upstream.port);
    let request = |client: &Client, path: &str| {
        client
            .request(Method::PUT, path)
            .header("Content-Type", "text/plain")
            .header("X-Custom", "kept as is")
            .header("X-Multi", "1")
            .header("X-Multi", "2")
            .header("Connection", "keep-alive, X-Hop")
            .header("X-Hop", "named in Connection")
            .header("Keep-Alive", "timeout=5")
            .header("X-Echo-Status", "201")
            .header("X_Forwarded_For", "6.6.6.6")
            .header("api_key", "kept")
            .header(TIMEOUT, "5s")
            .body("the body")
    };

    // The client really sends the hop-by-hop headers: straight to the upstream they arrive.
    let direct = Client::new(&setup.upstream.url());
    let echo = Echo::parse(&direct.send(request(&direct, "/x")).await.expect(201).body);
    for sent in ["connection", "keep-alive", "x-hop"] {
        assert!(echo.has(sent), "{sent} not sent: {echo:?}");
    }

    let query = "?x=1&y=a%20b&x=2&empty=&flag";
    let cases = [
        (
            request(client, &format!("/some/a%20b/path{query}")).header(CLIENT_ID, name.as_str()),
            format!("/some/a%20b/path{query}"),
        ),
        (
            request(client, &format!("/r/{name}/some/a%20b/path{query}")),
            format!("/some/a%20b/path{query}"),
        ),
        (request(client, &format!("/r/{name}?q=1")), "/?q=1".into()),
        (
            request(client, &format!("/r/{name}/t/x?limit=1")),
            "/t/x?limit=1".into(),
        ),
    ];
    for (request, uri) in cases {
        let response = client.send(request).await.expect(201);
        let echo = Echo::parse(&response.body);
        assert_eq!(echo.method, "PUT", "{echo:?}");
        assert_eq!(echo.uri, uri, "{echo:?}");
        assert_eq!(echo.body, "the body", "{echo:?}");
        assert_eq!(echo.one("content-type"), "text/plain");
        assert_eq!(echo.one("x-custom"), "kept as is");
        assert_eq!(echo.all("x-multi"), ["1", "2"], "{echo:?}");
        assert_eq!(echo.one("content-length"), "8");
        assert_eq!(echo.one("x-forwarded-for"), "127.0.0.1");
        assert_eq!(echo.one("api_key"), "kept");
        assert_eq!(echo.one("x-forwarded-proto"), "http");
        assert_eq!(echo.one("x-forwarded-host"), relay_host);
        assert_eq!(
            echo.one("host"),
            upstream_host,
            "the upstream gets its own host"
        );
        for removed in [
            "x-backstream-client-id",
            "x-backstream-request-timeout",
            "x_forwarded_for",
            "connection",
            "keep-alive",
            "x-hop",
        ] {
            assert!(
                !echo.has(removed),
                "{removed} reached the upstream: {echo:?}"
            );
        }

        assert_eq!(response.header("x-upstream-id"), Some("up"));
        assert_eq!(response.header("x-reply"), Some("yes"));
        assert_eq!(response.header("content-type"), Some("application/json"));
        let cookies: Vec<_> = response.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"], "{response:?}");
    }

    // A GET without a body arrives without one.
    let response = client.get(&format!("/r/{name}/plain")).await.expect(200);
    let echo = Echo::parse(&response.body);
    assert_eq!((echo.method.as_str(), echo.uri.as_str()), ("GET", "/plain"));
    assert_eq!(echo.body, "");
    assert!(!echo.has("transfer-encoding"), "{echo:?}");

    // A client's own chain is joined and extended with its address, also when it sends the
    // instances' hop marker, which it cannot use to pass for another instance.
    let forged = client
        .request(Method::GET, &format!("/r/{name}/plain"))
        .header("X-Forwarded-For", "6.6.6.6")
        .header("X-Forwarded-For", "7.7.7.7")
        .header("X-Burrow-Hop", "forged");
    let echo = Echo::parse(&client.send(forged).await.expect(200).body);
    assert_eq!(echo.all("x-forwarded-for"), ["6.6.6.6, 7.7.7.7, 127.0.0.1"]);
}

/// 422 for a name no agent has, 400 for a timeout that does not parse (or is 0), 504 when the upstream is
/// slower than the timeout, 502 when the agent cannot reach its upstream or dies mid-request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status() {
    let mut setup = Setup::start(Store::Memory, &[]).await;
    let (client, name) = (setup.client.clone(), setup.name.clone());

    let nobody = tunnel_id("nobody");
    let not_found = format!("connection for clientID='{nobody}' not found");
    let by_header = client.request(Method::GET, "/x").header(CLIENT_ID, &nobody);
    client.send(by_header).await.expect_error(422, &not_found);
    let by_path = client.get(&format!("/r/{nobody}/x?y=1")).await;
    by_path.expect_error(422, &not_found);

    // Values that are not ASCII are read too (not taken for an absent header): "\xff" is not
    // UTF-8, and "1µs" is a Go duration.
    let not_utf8 =
        reqwest::header::HeaderValue::from_bytes(b"\xff").expect("obs-text is a valid value");
    let request = client
        .request(Method::GET, &format!("/r/{name}/echo"))
        .header(TIMEOUT, not_utf8);
    client.send(request).await.expect_one_line_error(400);
    let micro =
        reqwest::header::HeaderValue::from_bytes("1\u{b5}s".as_bytes()).expect("a valid value");
    let request = client
        .request(Method::GET, "/sleep")
        .header(CLIENT_ID, &name)
        .header(TIMEOUT, micro);
    client.send(request).await.expect(504);
    for bad in [
        "soon",
        "12",
        "1.5.s",
        "-",
        "25h",
        "3000000000000000h",
        "0",
        "0s",
        "0ms",
    ] {
        let request = client
            .request(Method::GET, &format!("/r/{name}/echo"))
            .header(TIMEOUT, bad);
        let response = client.send(request).await;
        assert_eq!(response.status, 400, "timeout {bad:?}: {response:?}");
        let response = response.expect_one_line_error(400);
        assert!(response.text().contains(TIMEOUT), "{response:?}");
    }
    // The same request with a good timeout goes through.
    let request = client
        .request(Method::GET, &format!("/r/{name}/echo"))
        .header(TIMEOUT, "1m30s");
    client.send(request).await.expect(200);
    // A header sent twice is one list, naming no one agent or timeout, whichever came first.
    let echo = || client.request(Method::GET, "/echo");
    let twice = [
        (
            CLIENT_ID,
            echo().header(CLIENT_ID, &nobody).header(CLIENT_ID, &name),
        ),
        (
            TIMEOUT,
            echo()
                .header(CLIENT_ID, &name)
                .header(TIMEOUT, "1s")
                .header(TIMEOUT, "2s"),
        ),
    ];
    for (header, request) in twice {
        let response = client.send(request).await.expect_one_line_error(400);
        assert!(response.text().contains(header), "{response:?}");
    }

    let asked = Instant::now();
    let request = client
        .request(Method::GET, "/sleep")
        .header(CLIENT_ID, &name)
        .header(TIMEOUT, "300ms");
    let response = client.send(request).await;
    let took = asked.elapsed();
    assert_eq!(response.status, 504, "{response:?}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1500),
        "504 after {took:?}"
    );

    let closed = format!("http://127.0.0.1:{}", free_port());
    let broken = tunnel_id("broken");
    let broken_agent = Agent::serve(&setup.relay.base, &broken, &closed, None);
    wait_agents(&client, &broken, 1, RECONNECT, &[&broken_agent]).await;
    let response = client.get(&format!("/r/{broken}/x")).await;
    let response = response.expect_one_line_error(502);
    let text = response.text();
    assert!(
        text.starts_with("agent failed: upstream unreachable: "),
        "{text}"
    );
    // The cause is named once, though hyper's error and its source both print it.
    assert_eq!(text.matches("Connection refused").count(), 1, "{text}");
    broken_agent.expect_logged("GET /x status=refused").await;
    // Beside an agent whose upstream is up, the one that refuses loses no request.
    let working = Agent::serve(&setup.relay.base, &broken, &setup.upstream.url(), None);
    wait_agents(&client, &broken, 2, RECONNECT, &[&broken_agent, &working]).await;
    for _ in 0..10 {
        echo_through(&client, &broken, "up").await;
    }
    // The agent's own refusal of a path that climbs (`..;` is a name to URL parsers, `..` to
    // Tomcat) is an error like the relay's.
    let response = client.get(&format!("/r/{name}/a/..;/b")).await;
    let response = response.expect_one_line_error(400);
    assert!(response.text().contains("segments"), "{response:?}");
    // The agent's line for a request shows a long method and path cut, not whole.
    let method = Method::from_bytes("M".repeat(50).as_bytes()).expect("a token");
    let path = "a".repeat(5000);
    client
        .send(client.request(method, &format!("/r/{name}/{path}")))
        .await;
    let cut = format!("{}… /{}… status=", "M".repeat(32), "a".repeat(255));
    setup.agent.expect_logged(&cut).await;
    assert!(!setup.agent.log().contains(&"a".repeat(256)));

    // The agent dies while its upstream works on the request (it was taken: no replay).
    let slept_before = *setup.upstream.sleeping.borrow();
    let request = client
        .request(Method::GET, &format!("/r/{name}/sleep"))
        .header(TIMEOUT, "10s");
    let pending = tokio::spawn({
        let client = client.clone();
        async move {
            let asked = Instant::now();
            (client.send(request).await, asked.elapsed())
        }
    });
    let mut sleeping = setup.upstream.sleeping.subscribe();
    let reached = sleeping.wait_for(|&n| n > slept_before);
    tokio::time::timeout(WAIT, reached)
        .await
        .expect("the request reaches the upstream")
        .expect("the upstream runs");
    setup.agent.kill();
    let (response, took) = tokio::time::timeout(WAIT, pending).await.unwrap().unwrap();
    assert_eq!(response.status, 502, "{response:?}");
    assert!(
        took < Duration::from_millis(1900),
        "502 only after {took:?}"
    );
}

/// A request body the upstream does not take runs out of credit: when the timeout passes while
/// the relay is still sending it, the answer is 504 (the timeout), not a 502; so it is when the
/// client's body stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_while_sending_the_body() {
    let setup = Setup::start(Store::Memory, &[]).await;
    let len = 64 << 20;
    let head = format!(
        "PUT /r/{}/sleep HTTP/1.1\r\nHost: relay\r\n{TIMEOUT}: 300ms\r\nContent-Length: {len}\r\n\r\n",
        setup.name
    );
    let (status, took) = raw_request(&setup.relay.base, head, vec![7; len], true).await;
    assert_eq!(status, 504);
    assert!(took < Duration::from_secs(2), "504 only after {took:?}");
    // A body that stalls (ten bytes of a thousand, then nothing) is a late answer too.
    let head = format!(
        "PUT /r/{}/sleep HTTP/1.1\r\nHost: relay\r\n{TIMEOUT}: 300ms\r\nContent-Length: 1000\r\n\r\n",
        setup.name
    );
    let (status, took) = raw_request(&setup.relay.base, head, vec![7; 10], true).await;
    assert_eq!(status, 504);
    assert!(took < Duration::from_secs(2), "504 only after {took:?}");
}

/// A client that leaves while the upstream has not answered yet (here it never will) ends its
/// exchange with the agent at once, over HTTP/1 and h2c, not when the request's timeout (an hour
/// here) runs out; the agent logs that the client left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_ends_the_upstream_request() {
    use tokio::io::AsyncWriteExt;
    let setup = Setup::start(Store::Memory, &[]).await;
    let mut hanging = setup.upstream.hanging.subscribe();
    let address = setup.relay.base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address)
        .await
        .expect("the relay accepts");
    let head = format!(
        "GET /r/{}/hang HTTP/1.1\r\nHost: relay\r\n{TIMEOUT}: 1h\r\n\r\n",
        setup.name
    );
    socket.write_all(head.as_bytes()).await.expect("sent");
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("an h2c client builds");
    let url = format!("{}/r/{}/hang", setup.relay.base, setup.name);
    let reset = tokio::spawn(h2c.get(url).header(TIMEOUT, "1h").send());
    hanging_at(&mut hanging, 2, "both requests reach the upstream").await;
    assert_eq!(in_flight(&setup.client, &setup.name).await, 2);
    drop(socket);
    reset.abort();
    // The agent drops both upstream requests, as the relay ends both exchanges.
    hanging_at(
        &mut hanging,
        0,
        "the upstream requests end with their clients",
    )
    .await;
    no_exchange_left(
        &setup.client,
        &setup.name,
        "the exchanges outlived their clients",
    )
    .await;
    let told = || std::future::ready(setup.agent.log().matches("reason=client left").count() == 2);
    let told = crate::support::eventually(WAIT, told).await;
    assert!(told, "the agent logs why: {}", setup.agent.log());
}

/// A client that leaves after the response head, while the body does not come (an event stream,
/// a long-poll), ends its exchange too: the upstream request does not outlive it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_body_ends_the_upstream_request() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let setup = Setup::start(Store::Memory, &[]).await;
    let mut hanging = setup.upstream.hanging.subscribe();
    let address = setup.relay.base.trim_start_matches("http://");
    let socket = tokio::net::TcpStream::connect(address)
        .await
        .expect("the relay accepts");
    let mut socket = tokio::io::BufReader::new(socket);
    let head = format!(
        "GET /r/{}/hang-body HTTP/1.1\r\nHost: relay\r\n\r\n",
        setup.name
    );
    socket.write_all(head.as_bytes()).await.expect("sent");
    let mut status = String::new();
    socket.read_line(&mut status).await.expect("a status line");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    hanging_at(&mut hanging, 1, "the upstream answered").await;
    drop(socket);
    hanging_at(&mut hanging, 0, "the upstream request ends with its client").await;
    no_exchange_left(
        &setup.client,
        &setup.name,
        "the exchange outlived its client",
    )
    .await;
    let told = || std::future::ready(setup.agent.log().contains("reason=client left"));
    let told = crate::support::eventually(WAIT, told).await;
    assert!(told, "the agent logs why: {}", setup.agent.log());
}

/// A client that stops reading a routed download is let go once it has taken nothing for 30 s
/// (its connection's buffers full): its exchange ends, and the upstream request with it, rather
/// than holding the agent's stream for as long as the client keeps its connection open. A slow
/// but steady reader (8 KiB/s, through send and receive buffers grown to megabytes, where the
/// kernel makes room for a write only once a third of the send buffer drained) stays: it started
/// first, and is still served once the other is let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_is_let_go() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let setup = Setup::start(Store::Memory, &[]).await;
    let stopped_name = tunnel_id("stopped");
    let other = Agent::serve(
        &setup.relay.base,
        &stopped_name,
        &setup.upstream.url(),
        None,
    );
    wait_agents(&setup.client, &stopped_name, 1, RECONNECT, &[&other]).await;
    let address: std::net::SocketAddr = setup
        .relay
        .base
        .trim_start_matches("http://")
        .parse()
        .expect("an address");
    let download = |name: &str| {
        format!(
            "GET /r/{name}/blob?bytes={} HTTP/1.1\r\nHost: relay\r\n\r\n",
            64 << 20
        )
    };

    let mut steady = tokio::net::TcpStream::connect(address)
        .await
        .expect("the relay accepts");
    steady
        .write_all(download(&setup.name).as_bytes())
        .await
        .expect("sent");
    let (read_some, mut reading) = tokio::sync::watch::channel(0usize);
    let reader = tokio::spawn(async move {
        let mut buffer = vec![0; 8 * 1024];
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match steady.read(&mut buffer).await {
                Ok(read @ 1..) => read_some.send_modify(|total| *total += read),
                _ => return,
            }
        }
    });
    let started = reading.wait_for(|&total| total >= 16 * 1024);
    tokio::time::timeout(WAIT, started)
        .await
        .expect("the steady reader reads")
        .expect("the reader runs");

    let stopped = tokio::net::TcpSocket::new_v4().expect("a socket");
    stopped
        .set_recv_buffer_size(16 * 1024)
        .expect("a small buffer");
    let mut stopped = stopped.connect(address).await.expect("the relay accepts");
    stopped
        .write_all(download(&stopped_name).as_bytes())
        .await
        .expect("sent");
    let client = &setup.client;
    let taken = || async { in_flight(client, &stopped_name).await == 1 };
    assert!(crate::support::eventually(WAIT, taken).await, "never taken");
    // Never read.
    let let_go = || async { in_flight(client, &stopped_name).await == 0 };
    // 30 s without progress, looked at every 5 s.
    let let_go = crate::support::eventually(Duration::from_secs(45), let_go).await;
    assert!(let_go, "a client that reads nothing holds its exchange");
    other.expect_logged("reason=client left").await;
    assert_eq!(
        in_flight(client, &setup.name).await,
        1,
        "the steady reader was let go too"
    );
    let so_far = *reading.borrow();
    let more = reading.wait_for(|&total| total > so_far);
    tokio::time::timeout(WAIT, more)
        .await
        .expect("the steady reader goes on")
        .expect("the reader runs");
    reader.abort();
    // Reset, not closed behind what it was still to be sent.
    let mut buffer = vec![0; 64 * 1024];
    let end = async {
        loop {
            match stopped.read(&mut buffer).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e.kind()),
            }
        }
    };
    let end = tokio::time::timeout(WAIT, end)
        .await
        .expect("the connection ends");
    assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset));
}

/// A request in flight when the agent's connection to the relay is lost ends at the upstream and
/// gets its log line (it was dropped without one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cut_by_a_lost_connection_are_logged() {
    let Setup {
        relay,
        upstream,
        agent,
        name,
        client,
    } = Setup::start(Store::Memory, &[]).await;
    let mut hanging = upstream.hanging.subscribe();
    let request = tokio::spawn(async move {
        let request = client.request(Method::GET, &format!("/r/{name}/hang"));
        // Never answered: the relay goes away.
        request.header(TIMEOUT, "1h").send().await
    });
    hanging_at(&mut hanging, 1, "the request reaches the upstream").await;
    drop(relay);
    hanging_at(
        &mut hanging,
        0,
        "the upstream request ends with the connection",
    )
    .await;
    agent.expect_logged("GET /hang status=reset").await;
    request.abort();
}

/// Waits until `count` `/hang` requests are in progress at the upstream, or panics saying `what`.
async fn hanging_at(hanging: &mut tokio::sync::watch::Receiver<u64>, count: u64, what: &str) {
    let reached = hanging.wait_for(|&n| n == count);
    let reached = tokio::time::timeout(WAIT, reached).await;
    reached.expect(what).expect("the upstream runs");
}

/// Waits until the agents named `name` have no request in flight, or panics saying `what`.
async fn no_exchange_left(client: &Client, name: &str, what: &str) {
    let deadline = Instant::now() + WAIT;
    while in_flight(client, name).await != 0 {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The requests in flight on the agents named `name`, as `GET /agents` counts them.
async fn in_flight(client: &Client, name: &str) -> u64 {
    let agents = client.get("/agents").await.expect(200).json();
    agents["agents"]
        .as_array()
        .expect("/agents has an `agents` array")
        .iter()
        .filter(|agent| agent["name"] == name)
        .filter_map(|agent| agent["requests_in_flight"].as_u64())
        .sum()
}

/// A client whose body breaks off gets 400 at once, not the route timeout's 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_request_body() {
    let setup = Setup::start(Store::Memory, &[]).await;
    let head = format!(
        "PUT /r/{}/sha256 HTTP/1.1\r\nHost: relay\r\n{TIMEOUT}: 10s\r\nContent-Length: 100\r\n\r\n",
        setup.name
    );
    let (status, took) = raw_request(&setup.relay.base, head, vec![7; 10], false).await;
    assert_eq!(status, 400);
    assert!(took < Duration::from_secs(2), "400 only after {took:?}");
}

/// A client whose upload breaks off after the agent took the request: one that closes its side
/// gets 400 and the agent logs why; one that resets its connection left (499, `client left`).
/// Either way the agent drops the upstream request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_cut_after_the_agent_took_it() {
    let setup = Setup::start(Store::Memory, &[]).await;
    cut_uploads(&setup, &setup.relay).await;
    // One that half-closes after its request counts as gone too: it is told nothing (nginx's 499
    // is for the log), and the connection closes.
    let connection = crate::support::raw::Connection::open(&setup.relay.base).await;
    let hang = format!("GET /r/{}/hang HTTP/1.1\r\nHost: relay\r\n\r\n", setup.name);
    assert!(connection.half_closed(&hang).await.is_none(), "answered");
    let logged = setup.agent.log();
    assert!(logged.contains("reason=client body failed: "), "{logged}");
    let reset = || std::future::ready(setup.agent.log().contains("reason=client left"));
    let reset = crate::support::eventually(WAIT, reset).await;
    assert!(reset, "{}", setup.agent.log());
}

/// The same through an instance without the agent: the client that closed its side gets that
/// instance's 400 (not a 499, which is only logged), the one that reset is its 499.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_cut_at_another_instance() {
    let (setup, b) = Setup::with_second_instance().await;
    cut_uploads(&setup, &b).await;
}

/// Cuts two uploads through `entry` once the agent has taken each: the first half-closed (400
/// expected), the second reset (counted as 499 by `entry`).
async fn cut_uploads(setup: &Setup, entry: &Relay) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let metrics = entry
        .client()
        .metrics()
        .expect("the relay has a metrics page");
    let (client, name) = (&setup.client, setup.name.as_str());
    let taken = |socket: tokio::net::TcpStream| async move {
        let head = format!(
            "PUT /r/{name}/sha256 HTTP/1.1\r\nHost: relay\r\nContent-Length: 1000000\r\n\r\n"
        );
        let mut socket = socket;
        socket.write_all(head.as_bytes()).await.expect("sent");
        socket.write_all(&[7; 1000]).await.expect("sent");
        let taken = || async { in_flight(client, name).await == 1 };
        assert!(crate::support::eventually(WAIT, taken).await, "never taken");
        socket
    };
    let address = entry.base.trim_start_matches("http://");
    let connect = || tokio::net::TcpStream::connect(address);

    let mut socket = taken(connect().await.expect("the relay accepts")).await;
    socket.shutdown().await.expect("half-closed");
    let mut answer = String::new();
    socket.read_to_string(&mut answer).await.expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    setup.agent.expect_logged("PUT /sha256 status=reset").await;
    no_exchange_left(client, name, "the half-closed upload's exchange stays").await;

    let socket = taken(connect().await.expect("the relay accepts")).await;
    socket.set_zero_linger().expect("linger set");
    drop(socket);
    let left = "burrow_requests_total{route=\"forward\",status=\"499\"}";
    let counted = || async { metric(&metrics, left).await == 1.0 };
    assert!(crate::support::eventually(WAIT, counted).await, "not a 499");
    no_exchange_left(client, name, "the reset upload's exchange stays").await;
}

/// Sends `head` and then `body` on a raw connection (keeping the write side open when `keep_open`,
/// else closing it), and answers the status of the response with how long it took. The body is
/// written by its own task, so that a relay that stops reading it still gets its answer read.
async fn raw_request(base: &str, head: String, body: Vec<u8>, keep_open: bool) -> (u16, Duration) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let address = base.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("the relay accepts");
    let (read, mut write) = stream.into_split();
    let asked = Instant::now();
    let writer = tokio::spawn(async move {
        // The relay may stop reading and close: a failed write is expected then.
        if write.write_all(head.as_bytes()).await.is_ok() && write.write_all(&body).await.is_ok() {
            if keep_open {
                return Some(write);
            }
            let _ = write.shutdown().await;
        }
        None
    });
    let mut line = String::new();
    let mut read = BufReader::new(read);
    tokio::time::timeout(WAIT, read.read_line(&mut line))
        .await
        .expect("the relay answers in time")
        .expect("the status line is readable");
    let took = asked.elapsed();
    writer.abort();
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok());
    (
        status.unwrap_or_else(|| panic!("not a status line: {line:?}")),
        took,
    )
}

/// The agent keeps its upstream connections alive: sequential requests share one connection,
/// and one the upstream closes (`Connection: close`) is not used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_kept_alive() {
    let setup = Setup::start(Store::Memory, &[]).await;
    let (client, name) = (&setup.client, &setup.name);
    echo_through(client, name, "up").await;
    let opened = setup.upstream.connections();
    for _ in 0..20 {
        echo_through(client, name, "up").await;
    }
    for _ in 0..5 {
        let request = client.request(Method::PUT, &format!("/r/{name}/mirror"));
        let response = client.send(request.body("a body")).await.expect(200);
        assert_eq!(response.text(), "a body");
    }
    assert_eq!(
        setup.upstream.connections(),
        opened,
        "25 requests, 5 with a body, no new connection"
    );
    for i in 1..=5 {
        let response = client.get(&format!("/r/{name}/close")).await.expect(200);
        assert_eq!(response.text(), "bye");
        echo_through(client, name, "up").await;
        assert_eq!(
            setup.upstream.connections(),
            opened + i,
            "a new one after each close"
        );
    }
}

/// An upstream that closes each connection after one answer without saying so (no `Connection:
/// close`, as after an idle timeout): the agent does not send a request on a connection already
/// closed, so every request succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_silently() {
    let port = upstream_answering("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi").await;
    let (relay, _agent, name) = agent_of(port, "curt").await;
    let client = relay.client();
    for _ in 0..30 {
        let response = client.get(&format!("/r/{name}/x")).await.expect(200);
        assert_eq!(response.text(), "hi");
    }
}

/// A relay on the embedded store with one agent of a new name (from `prefix`) in front of the
/// upstream on `port`, once the relay lists it.
async fn agent_of(port: u16, prefix: &str) -> (Relay, Agent, String) {
    let relay = Relay::start(Store::Memory, &[]);
    let name = tunnel_id(prefix);
    let upstream = format!("http://127.0.0.1:{port}");
    let agent = Agent::serve(&relay.base, &name, &upstream, None);
    wait_agents(&relay.client(), &name, 1, RECONNECT, &[&agent]).await;
    (relay, agent, name)
}

/// A request on a kept-alive connection that the upstream closes before answering (its idle
/// timeout ran out as the request came) goes out again on a new connection when it can be sent
/// twice (idempotent, without a body), and is 502 when it cannot: never sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_on_a_connection_closed_meanwhile() {
    let (port, heads) = upstream_closing_on_the_second_request("").await;
    let (relay, _agent, name) = agent_of(port, "idle-closed").await;
    let client = relay.client();
    for method in [Method::GET, Method::DELETE, Method::GET] {
        let response = client.request(method, &format!("/r/{name}/x")).send().await;
        let response = response.expect("the relay answers");
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(response.text().await.expect("a body"), "hi");
    }
    // Two connections, each closed on its second request, and the third's first.
    assert_eq!(heads.load(Ordering::SeqCst), 5);
    let posted = client.post(&format!("/r/{name}/x"), "once").await;
    assert_eq!(posted.status, 502, "{posted:?}");
    assert!(
        posted
            .text()
            .starts_with("agent failed: upstream answered badly"),
        "{posted:?}"
    );
    assert_eq!(heads.load(Ordering::SeqCst), 6, "the POST was sent twice");
}

/// A connection that breaks after the start of an answer broke after the upstream took the
/// request: it is not sent again, idempotent or not (502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_cut_after_the_start_of_its_answer() {
    let partial = "HTTP/1.1 200 OK\r\nContent-Le";
    let (port, heads) = upstream_closing_on_the_second_request(partial).await;
    let (relay, _agent, name) = agent_of(port, "half-answered").await;
    let client = relay.client();
    client.get(&format!("/r/{name}/x")).await.expect(200);
    let cut = client.get(&format!("/r/{name}/x")).await;
    assert_eq!(cut.status, 502, "{cut:?}");
    assert_eq!(heads.load(Ordering::SeqCst), 2, "sent twice");
}

/// A response framed both by a length and by chunks is read by its chunks (RFC 9112 §6.3), and
/// reaches the client whole, without the length that would cut it short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_with_length_and_chunks() {
    let answer = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5\r\nhello\r\n0\r\n\r\n";
    let port = upstream_answering(answer).await;
    let (relay, _agent, name) = agent_of(port, "framed-twice").await;
    let response = relay
        .client()
        .get(&format!("/r/{name}/x"))
        .await
        .expect(200);
    assert_eq!(response.text(), "hello");
}

/// An upstream that refuses an upload without reading it, and keeps the connection open: its
/// answer reaches the client once the body is sent (the agent drops what the upstream does not
/// read), not a 504 at the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_before_an_unread_upload() {
    let answer =
        "HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\nConnection: close\r\n\r\nno way";
    let port = upstream_answering_unread(answer).await;
    let (relay, agent, name) = agent_of(port, "refusing").await;
    assert_eq!(upload_status(&relay, &name, "8s").await, 401);
    agent.expect_logged("POST /upload status=401").await;
}

/// The status of a 20 MiB `POST /r/{name}/upload` through `relay` with `timeout`.
async fn upload_status(relay: &Relay, name: &str, timeout: &str) -> u16 {
    let len = 20 << 20;
    let head = format!(
        "POST /r/{name}/upload HTTP/1.1\r\nHost: relay\r\n{TIMEOUT}: {timeout}\r\nContent-Length: {len}\r\n\r\n"
    );
    raw_request(&relay.base, head, vec![7; len], true).await.0
}

/// An upload whose upstream stopped reading it, timed out (504), leaves no upstream connection
/// behind: the agent resets it (closed, it would stay open behind the bytes the upstream never
/// takes, and so would the upstream's worker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_upload_resets_its_upstream_connection() {
    let (port, go, mut endings) = upstream_holding().await;
    let (relay, agent, name) = agent_of(port, "holding").await;
    assert_eq!(upload_status(&relay, &name, "1s").await, 504);
    agent.expect_logged("POST /upload status=reset").await;
    go.send(()).await.expect("the upstream runs");
    let ending = tokio::time::timeout(WAIT, endings.recv()).await;
    let reset = ending
        .expect("the connection ends")
        .expect("the upstream runs");
    assert!(reset, "the upstream connection was closed, not reset");
}

/// An upstream that switches protocols unasked: 502 from the agent, which logs it so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_switching_protocols_is_502() {
    let answer = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n";
    let port = upstream_answering(answer).await;
    let relay = Relay::start(Store::Memory, &[]);
    let client = relay.client();
    let name = tunnel_id("switching");
    let agent = Agent::serve(
        &relay.base,
        &name,
        &format!("http://127.0.0.1:{port}"),
        None,
    );
    wait_agents(&client, &name, 1, RECONNECT, &[&agent]).await;
    let why = "agent failed: upstream switched protocols, which cannot cross the relay";
    let response = client.get(&format!("/r/{name}/up")).await;
    // Exactly as the relay's own errors: no trailing newline, no charset.
    assert_eq!(response.text(), why, "{response:?}");
    let response = response.expect_error(502, why);
    assert_eq!(response.header("content-type"), Some("text/plain"));
    agent.expect_logged("GET /up status=502").await;
}

/// An `https://` upstream: the agent verifies its certificate against the system's roots
/// (`SSL_CERT_FILE` here) and sends `Host` as the upstream URL has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream() {
    let dir = tempfile::TempDir::new().unwrap();
    let (ca, cert, key) = certificates(dir.path(), "up");
    let (other, _, _) = certificates(dir.path(), "other");
    let upstream = Upstream::start_tls("secure", &cert, &key).await;
    let relay = Relay::start(Store::Memory, &[]);
    let client = relay.client();
    // An agent for the upstream whose only root is `roots`, connected; its name.
    let agent_trusting = |roots: PathBuf| {
        let (relay, upstream, client) = (&relay.base, upstream.url(), &client);
        async move {
            let name = tunnel_id("tls");
            let args = ["--relay", relay, "--name", &name, "--upstream", &upstream];
            let agent = Agent::start_with(&args, &[("SSL_CERT_FILE", roots.as_os_str())]);
            wait_agents(client, &name, 1, RECONNECT, &[&agent]).await;
            (name, agent)
        }
    };

    let (name, _agent) = agent_trusting(ca).await;
    let response = client.get(&format!("/r/{name}/echo?q=1")).await.expect(200);
    let echo = Echo::parse(&response.body);
    assert_eq!(
        (echo.upstream.as_str(), echo.uri.as_str()),
        ("secure", "/echo?q=1")
    );
    assert_eq!(echo.one("host"), format!("localhost:{}", upstream.port));

    // With another authority as its only root the agent refuses the upstream: 502.
    let (doubting, _agent) = agent_trusting(other).await;
    let response = client.get(&format!("/r/{doubting}/echo")).await;
    assert_eq!(response.status, 502, "{response:?}");
    assert!(response.text().contains("certificate"), "{response:?}");
}

/// A certificate authority `dir/NAME-ca.pem` and a certificate for `localhost` it signed, with
/// its key: `(ca, cert, key)`.
fn certificates(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let file = |suffix: &str| dir.join(format!("{name}{suffix}"));
    let (ca, ca_key, cert, key) = (file("-ca.pem"), file("-ca.key"), file(".pem"), file(".key"));
    let new_certificate = || {
        let mut openssl = std::process::Command::new("openssl");
        openssl
            .args(["req", "-x509", "-nodes", "-days", "1"])
            .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]);
        openssl
    };
    let mut authority = new_certificate();
    authority
        .args(["-subj", "/CN=test CA", "-keyout"])
        .arg(&ca_key)
        .arg("-out")
        .arg(&ca);
    let mut leaf = new_certificate();
    leaf.args([
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
    ])
    .args(["-addext", "basicConstraints=critical,CA:FALSE"])
    .arg("-CA")
    .arg(&ca)
    .arg("-CAkey")
    .arg(&ca_key)
    .arg("-keyout")
    .arg(&key)
    .arg("-out")
    .arg(&cert);
    for mut openssl in [authority, leaf] {
        let made = openssl.output().expect("openssl runs");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
    (ca, cert, key)
}

/// The size of the large bodies.
const LARGE: usize = 20 * 1024 * 1024;

/// 20 MB up through relay and agent to the upstream, compared by SHA-256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload() {
    let setup = Setup::start(Store::Memory, &[]).await;
    let (client, name) = (&setup.client, &setup.name);
    let data = blob(LARGE);
    let expected = sha256(&data);
    let request = client
        .request(Method::POST, &format!("/r/{name}/sha256"))
        .header("Content-Type", "application/octet-stream")
        .header(TIMEOUT, "30s")
        .body(data);
    let response = client.send(request).await.expect(200);
    let json = response.json();
    assert_eq!(json["len"], LARGE, "{json}");
    assert_eq!(json["sha256"], expected.as_str(), "{json}");
}

/// 20 MB down from the upstream through agent and relay, compared by SHA-256.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download() {
    let setup = Setup::start(Store::Memory, &[]).await;
    let (client, name) = (&setup.client, &setup.name);
    let response = client
        .get(&format!("/r/{name}/blob?bytes={LARGE}"))
        .await
        .expect(200);
    assert_eq!(response.body.len(), LARGE);
    assert_eq!(sha256(&response.body), sha256(&blob(LARGE)));
    assert_eq!(
        response.header("content-type"),
        Some("application/octet-stream")
    );
}

/// 100 requests at once over one agent connection each get their own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests() {
    let setup = Setup::start(Store::Memory, &[]).await;
    let mut requests = JoinSet::new();
    for i in 0..100 {
        let (client, name) = (setup.client.clone(), setup.name.clone());
        requests.spawn(async move {
            let body = format!("request {i}: {}", "x".repeat(i * 97));
            let request = client
                .request(Method::POST, &format!("/r/{name}/mirror/{i}"))
                .header(TIMEOUT, "20s")
                .body(body.clone());
            (client.send(request).await, body)
        });
    }
    let mut answered = 0;
    while let Some(joined) = requests.join_next().await {
        let (response, body) = joined.expect("the request task ends");
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.text(), body);
        answered += 1;
    }
    assert_eq!(answered, 100);
    assert_eq!(setup.upstream.arrived(), 100);
}

/// Two agents under one name share the requests; when one is killed, the other serves them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_agents_one_name() {
    let relay = Relay::start(Store::Memory, &[]);
    let client = relay.client();
    let name = tunnel_id("pair");
    let (up_a, up_b) = (Upstream::start("A").await, Upstream::start("B").await);
    let mut agent_a = Agent::serve(&relay.base, &name, &up_a.url(), None);
    let agent_b = Agent::serve(&relay.base, &name, &up_b.url(), None);
    wait_agents(&client, &name, 2, RECONNECT, &[&agent_a, &agent_b]).await;

    let mut served = Vec::new();
    for _ in 0..20 {
        let response = client.get(&format!("/r/{name}/who")).await.expect(200);
        served.push(Echo::parse(&response.body).upstream);
    }
    for id in ["A", "B"] {
        assert!(
            served.iter().any(|s| s == id),
            "{id} served none: {served:?}"
        );
    }

    // Traffic keeps flowing while agent A is killed.
    let before = up_a.arrived();
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = JoinSet::new();
    for _ in 0..4 {
        let (stop, url) = (stop.clone(), format!("{}/r/{name}/during", relay.base));
        senders.spawn(async move {
            let http = reqwest::Client::new();
            let (mut sent, mut failed) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                sent += 1;
                let outcome = match http.get(&url).timeout(WAIT).send().await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        match response.bytes().await {
                            Ok(body) if status == 200 => Echo::parse(&body).upstream,
                            Ok(body) => format!("{status} {}", String::from_utf8_lossy(&body)),
                            Err(e) => format!("{status}, body failed: {e}"),
                        }
                    }
                    Err(e) => format!("no answer: {e}"),
                };
                if outcome != "A" && outcome != "B" {
                    failed.push(outcome);
                }
            }
            (sent, failed)
        });
    }
    // The kill lands amid the traffic: A has received some of it.
    wait_arrivals(&up_a, before, 10).await;
    agent_a.kill();
    wait_agents(&client, &name, 1, WAIT, &[&agent_b]).await;
    stop.store(true, Ordering::Relaxed);
    let (mut sent, mut failed) = (0, Vec::new());
    while let Some(joined) = senders.join_next().await {
        let (s, f) = joined.expect("the sender ends");
        sent += s;
        failed.extend(f);
    }
    // Only a request agent A had already taken can fail: one per sender at most, and a 502.
    eprintln!("during the kill: {sent} requests, failed: {failed:?}");
    assert!(failed.len() <= 4, "{failed:?}");
    for failure in &failed {
        assert!(failure.starts_with("502"), "{failed:?}");
    }

    for _ in 0..20 {
        echo_through(&client, &name, "B").await;
    }
}

/// Waits until `up` has received `more` requests beyond the `since` it had.
async fn wait_arrivals(up: &Upstream, since: u64, more: u64) {
    let deadline = Instant::now() + WAIT;
    while up.arrived() < since + more {
        assert!(Instant::now() < deadline, "upstream A got no requests");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A killed agent's name is free (422) until a new agent of that name connects; a relay killed
/// and started again on the same port gets its agent back by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_relay_restarts() {
    let mut setup = Setup::start(Store::Memory, &[]).await;
    let (client, name) = (setup.client.clone(), setup.name.clone());
    echo_through(&client, &name, "up").await;

    setup.agent.kill();
    wait_agents(&client, &name, 0, WAIT, &[&setup.agent]).await;
    let response = client.get(&format!("/r/{name}/echo")).await;
    response.expect_error(422, &format!("connection for clientID='{name}' not found"));
    setup.agent = Agent::serve(&setup.relay.base, &name, &setup.upstream.url(), None);
    wait_agents(&client, &name, 1, RECONNECT, &[&setup.agent]).await;
    echo_through(&client, &name, "up").await;

    let port = setup.relay.port();
    setup.relay.kill();
    setup
        .agent
        .expect_logged("connection to the relay lost")
        .await;
    setup.relay = Relay::start_on(port, Store::Memory, &[]);
    wait_agents(&client, &name, 1, RECONNECT, &[&setup.agent]).await;
    echo_through(&client, &name, "up").await;
    let response = client
        .request(Method::GET, "/again?x=1")
        .header(CLIENT_ID, &name);
    let echo = Echo::parse(&client.send(response).await.expect(200).body);
    assert_eq!(echo.uri, "/again?x=1");
    assert!(
        setup.agent.log().contains("connected to the relay again"),
        "{}",
        setup.agent.log()
    );
}

/// A request for a name whose only agent is leaving (its own SIGTERM, a request still in flight),
/// or left within 10 s, waits, up to 5 s within its timeout, for another to connect, as in a
/// rolling restart of a one-replica agent, rather than be told at once that no agent has the
/// name (422); unless the relay begins to stop meanwhile (503: retry elsewhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_waits_for_a_restarting_agent() {
    let setup = Setup::start(Store::Memory, &[]).await;
    let (client, name) = (setup.client.clone(), setup.name.clone());
    let _in_flight = at_the_upstream(&setup).await;
    crate::support::process::signal(&setup.agent.child, "TERM");
    let draining = || flagged(&client, &name, "draining");
    assert!(crate::support::eventually(WAIT, draining).await);

    let waiting = held_request(&client, &name).await;
    let mut next = Agent::serve(&setup.relay.base, &name, &setup.upstream.url(), None);
    let answer = waiting.await.expect("the request task does not panic");
    assert_eq!(Echo::parse(&answer.expect(200).body).upstream, "up");
    let metrics = client.metrics().expect("the relay has a metrics page");
    assert_eq!(metric(&metrics, "burrow_awaiting_agent").await, 0.0);

    // Gone altogether (killed, the other one done), the name is waited for as well.
    next.kill();
    wait_agents(&client, &name, 0, WAIT, &[&setup.agent, &next]).await;
    let waiting = held_request(&client, &name).await;
    let mut last = Agent::serve(&setup.relay.base, &name, &setup.upstream.url(), None);
    let answer = waiting.await.expect("the request task does not panic");
    assert_eq!(Echo::parse(&answer.expect(200).body).upstream, "up");

    // A relay that begins to stop sends a waiting request elsewhere at once.
    last.kill();
    wait_agents(&client, &name, 0, WAIT, &[&last]).await;
    let waiting = held_request(&client, &name).await;
    setup.relay.signal("TERM");
    let answer = waiting.await.expect("the request task does not panic");
    answer.expect_error(503, "Relay shutting down, retry");
}

/// A client that leaves while its request waits for the agent ends the wait (499), so that the
/// request is not sent on when the agent is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_ends_the_wait_for_its_agent() {
    let mut setup = Setup::start(Store::Memory, &[]).await;
    let (client, name) = (setup.client.clone(), setup.name.clone());
    let metrics = client.metrics().expect("the relay has a metrics page");
    setup.agent.kill();
    wait_agents(&client, &name, 0, WAIT, &[&setup.agent]).await;
    let address = setup.relay.base.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&address)
        .await
        .expect("the relay takes connections");
    let head = format!("GET /r/{name}/echo HTTP/1.1\r\nHost: x\r\n{TIMEOUT}: 20s\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut socket, head.as_bytes())
        .await
        .expect("the request is sent");
    let held = || async { metric(&metrics, "burrow_awaiting_agent").await == 1.0 };
    assert!(crate::support::eventually(WAIT, held).await, "not held");
    drop(socket);
    let left = "burrow_requests_total{route=\"forward\",status=\"499\"}";
    let ended = || async { metric(&metrics, left).await == 1.0 };
    assert!(
        crate::support::eventually(WAIT, ended).await,
        "the wait did not end with its client"
    );
    assert_eq!(metric(&metrics, "burrow_awaiting_agent").await, 0.0);
}

/// SIGTERM lets the agent finish its requests in flight; a second signal stops it at once, exit
/// code 1, cutting them (502), as a worker's second signal does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_stops_the_agent_at_once() {
    let mut setup = Setup::start(Store::Memory, &[]).await;
    let in_flight = at_the_upstream(&setup).await;
    setup.agent.terminate();
    setup
        .agent
        .expect_logged("signal again to stop at once")
        .await;
    crate::support::process::signal(&setup.agent.child, "INT");
    let status = setup.agent.exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "{}", setup.agent.log());
    let answer = in_flight.await.expect("the request task does not panic");
    assert_eq!(answer.status, 502, "{answer:?}");
}

/// A terminal hanging up stops its agent as SIGTERM does, finishing its requests in flight; the
/// second SIGHUP it often sends (the shell passes one on, the kernel sends another) does not cut
/// them. Under `nohup`, SIGHUP stays ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangups_stop_the_agent_gracefully() {
    let mut setup = Setup::start(Store::Memory, &[]).await;
    let in_flight = at_the_upstream(&setup).await;
    crate::support::process::signal(&setup.agent.child, "HUP");
    setup
        .agent
        .expect_logged("signal again to stop at once")
        .await;
    crate::support::process::signal(&setup.agent.child, "HUP");
    let answer = in_flight.await.expect("the request task does not panic");
    assert_eq!(answer.status, 200, "{answer:?}\n{}", setup.agent.log());
    let status = setup.agent.exit(WAIT).await;
    assert_eq!(status.code(), Some(0), "{}", setup.agent.log());

    let name = tunnel_id("nohup");
    let upstream = setup.upstream.url();
    let args = [
        "--relay",
        &setup.relay.base,
        "--name",
        &name,
        "--upstream",
        &upstream,
    ];
    let mut agent = Agent::start_nohup(&args);
    wait_agents(&setup.client, &name, 1, RECONNECT, &[&agent]).await;
    let mut sleeping = setup.upstream.sleeping.subscribe();
    let asked = *sleeping.borrow();
    let (client, path) = (setup.client.clone(), format!("/r/{name}/sleep"));
    let in_flight = tokio::spawn(async move { client.get(&path).await });
    sleeping
        .wait_for(|&n| n > asked)
        .await
        .expect("the upstream is reached");
    // Ignored: the SIGTERM that follows is the first signal, which lets the request finish.
    crate::support::process::signal(&agent.child, "HUP");
    agent.terminate();
    agent.expect_logged("signal again to stop at once").await;
    let answer = in_flight.await.expect("the request task does not panic");
    assert_eq!(answer.status, 200, "{answer:?}\n{}", agent.log());
    assert_eq!(agent.exit(WAIT).await.code(), Some(0), "{}", agent.log());
}

/// A request that the only agent of its name refused as it began to leave (its `HEAD` crossed
/// the agent's `GOAWAY`) waits for a successor too, rather than get 502 (`agent failed: agent is
/// shutting down`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_refused_by_a_leaving_agent_waits_for_its_successor() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let relay = Relay::start(Store::Memory, &[]);
    let client = relay.client();
    let upstream = Upstream::start("up").await;
    let name = tunnel_id("leaving");
    let mut leaving = raw_agent(&relay, &name).await;
    let path = format!("/r/{name}/echo");
    let request = client.request(Method::GET, &path).header(TIMEOUT, "20s");
    let sender = client.clone();
    let waiting = tokio::spawn(async move { sender.send(request).await });
    let head = loop {
        let message = tokio::time::timeout(WAIT, leaving.next()).await;
        match message.expect("a frame in time").expect("the link is open") {
            Ok(Message::Binary(bytes)) => break bytes,
            Ok(_) => continue,
            Err(err) => panic!("the link failed: {err}"),
        }
    };
    assert_eq!(head[0], 1, "a HEAD");
    let stream = &head[1..5];
    let goaway = [7, 0, 0, 0, 0];
    let reset = [&[5], stream, b"agent is shutting down"].concat();
    for frame in [goaway.to_vec(), reset] {
        let sent = leaving.send(Message::binary(frame)).await;
        sent.expect("the frame is sent");
    }
    let metrics = client.metrics().expect("the relay has a metrics page");
    let held = || async { metric(&metrics, "burrow_awaiting_agent").await == 1.0 };
    assert!(crate::support::eventually(WAIT, held).await, "not held");
    let _successor = Agent::serve(&relay.base, &name, &upstream.url(), None);
    let answer = waiting.await.expect("the request task does not panic");
    assert_eq!(Echo::parse(&answer.expect(200).body).upstream, "up");
}

/// A request with a body does not wait: whether its client is still there cannot be seen without
/// reading the body, and one that left must not be sent on once the agent is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_with_a_body_does_not_wait() {
    let mut setup = Setup::start(Store::Memory, &[]).await;
    let (client, name) = (setup.client.clone(), setup.name.clone());
    setup.agent.kill();
    wait_agents(&client, &name, 0, WAIT, &[&setup.agent]).await;
    let metrics = client.metrics().expect("the relay has a metrics page");
    let sender = client.clone();
    let path = format!("/r/{name}/echo");
    let request = sender.request(Method::POST, &path).header(TIMEOUT, "20s");
    let mut answer = tokio::spawn(async move { sender.send(request.body("body")).await });
    loop {
        tokio::select! {
            answered = &mut answer => {
                answered.expect("the request task does not panic").expect(422);
                break;
            }
            held = metric(&metrics, "burrow_awaiting_agent") => assert_eq!(held, 0.0, "held"),
        }
    }
}

/// A request at another instance for an agent that refuses it (its upstream down) gets that
/// agent's 502 at once, not a wait that ends in 422 "not found".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_at_another_instance_is_its_502() {
    let redis = crate::support::shared_redis();
    let a = Relay::start(Store::Redis(redis), &[]);
    let b = Relay::start(Store::Redis(redis), &[]);
    let name = tunnel_id("refusing");
    let closed = format!("http://127.0.0.1:{}", free_port());
    let agent = Agent::serve(&a.base, &name, &closed, None);
    wait_agents(&b.client(), &name, 1, RECONNECT, &[&agent]).await;
    let answer = b.client().get(&format!("/r/{name}/x")).await;
    let text = answer.expect_one_line_error(502).text();
    assert!(
        text.starts_with("agent failed: upstream unreachable"),
        "{text}"
    );
}

/// A relay restarted in place after a SIGTERM (which withdrew its agents from the store) waits for
/// its predecessor's agents too: its predecessor's record still names them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successor_after_sigterm_waits_for_the_agents() {
    use futures_util::StreamExt;
    let redis = crate::support::shared_redis();
    let mut first = Relay::start(Store::Redis(redis), &[]);
    let name = tunnel_id("moving");
    let mut gone = raw_agent(&first, &name).await;
    first.signal("TERM");
    // The agent says nothing and leaves when told to go.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, gone.next()).await {}
    drop(gone);
    assert!(first.exits_within(WAIT).await, "{}", first.output());
    let port = first.port();
    first.kill();
    let successor = Relay::start_on(port, Store::Redis(redis), &[]);
    let client = successor.client();
    let waiting = held_request(&client, &name).await;
    let upstream = Upstream::start("up").await;
    let _agent = Agent::serve(&successor.base, &name, &upstream.url(), None);
    let answer = waiting.await.expect("the request task does not panic");
    assert_eq!(Echo::parse(&answer.expect(200).body).upstream, "up");
}

/// Another instance holds such a request too: B, which listed the agent at A lately, waits for
/// the name to be announced again after the agent was killed (here by a new one on A).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_at_another_instance_waits_for_a_restarting_agent() {
    let (mut setup, b) = Setup::with_second_instance().await;
    let (client_b, name) = (b.client(), setup.name.clone());
    echo_through(&client_b, &name, "up").await;
    setup.agent.kill();
    wait_agents(&client_b, &name, 0, WAIT, &[&setup.agent]).await;

    let waiting = held_request(&client_b, &name).await;
    setup.agent = Agent::serve(&setup.relay.base, &name, &setup.upstream.url(), None);
    let answer = waiting.await.expect("the request task does not panic");
    assert_eq!(Echo::parse(&answer.expect(200).body).upstream, "up");
}

/// So does an instance that never read the store while the agent was there: A's record names
/// the agent that left it lately.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_that_never_saw_the_agent_waits_for_it_too() {
    let redis = crate::support::shared_redis();
    let mut setup = Setup::start(Store::Redis(redis), &[]).await;
    let name = setup.name.clone();
    setup.agent.kill();
    wait_agents(&setup.client, &name, 0, WAIT, &[&setup.agent]).await;
    let b = Relay::start(Store::Redis(redis), &[]);
    let waiting = held_request(&b.client(), &name).await;
    setup.agent = Agent::serve(&setup.relay.base, &name, &setup.upstream.url(), None);
    let answer = waiting.await.expect("the request task does not panic");
    assert_eq!(Echo::parse(&answer.expect(200).body).upstream, "up");
}

/// A WebSocket connected to `relay` as agent `name`, which the test speaks for, once listed.
async fn raw_agent(
    relay: &Relay,
    name: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let ws = relay.base.replace("http://", "ws://");
    let connect = format!("{ws}/agent/connect?name={name}");
    let (socket, _) = tokio_tungstenite::connect_async(connect)
        .await
        .expect("the relay takes the agent");
    wait_agents(&relay.client(), name, 1, WAIT, &[]).await;
    socket
}

/// `GET /r/{name}/echo` with a 20 s timeout, sent in a task of its own, once the relay counts it
/// among the requests waiting for their agent.
async fn held_request(client: &Client, name: &str) -> tokio::task::JoinHandle<Response> {
    let metrics = client.metrics().expect("the relay has a metrics page");
    let sender = client.clone();
    let request = sender
        .request(Method::GET, &format!("/r/{name}/echo"))
        .header(TIMEOUT, "20s");
    let waiting = tokio::spawn(async move { sender.send(request).await });
    let held = || async { metric(&metrics, "burrow_awaiting_agent").await == 1.0 };
    assert!(
        crate::support::eventually(WAIT, held).await,
        "the request is not held"
    );
    waiting
}

/// With `TUNNEL_ACCESS_TOKEN`, agents need the token to connect and requests need the bearer,
/// which is not passed on; requests for a public name need none and get their own
/// `Authorization` passed through, never the relay's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth() {
    let token = "relay-token-0123";
    let public = tunnel_id("public");
    let relay = Relay::start(
        Store::Memory,
        &[
            ("TUNNEL_ACCESS_TOKEN", token),
            ("TUNNEL_PUBLIC_IDS", &format!("other,{public}")),
        ],
    );
    let client = relay.client();
    let authorized = client.with_bearer(token);
    let upstream = Upstream::start("up").await;

    // The list of agents spans every name: only the token opens it.
    client
        .get("/agents")
        .await
        .expect_error(403, says::ACCESS_DENIED);
    client
        .with_bearer("wrong")
        .get("/agents")
        .await
        .expect_error(403, says::ACCESS_DENIED);
    authorized.get("/agents").await.expect(200);

    // The WebSocket handshake itself is refused without the token.
    let ws = relay.base.replace("http://", "ws://");
    let refused = tokio_tungstenite::connect_async(format!("{ws}/agent/connect?name=raw")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("connecting without the token: {:?}", other.map(|(_, r)| r)),
    }

    // Agents without the token, or with a wrong one, keep being refused and are never listed.
    for agent_token in [None, Some("wrong")] {
        let name = tunnel_id("refused");
        let agent = Agent::serve(&relay.base, &name, &upstream.url(), agent_token);
        let refused = "the relay refused this agent (403 Forbidden): check --token";
        agent.expect_logged(refused).await;
        assert_eq!(agents_named(&authorized, &name).await, 0);
        let response = authorized.get(&format!("/r/{name}/echo")).await;
        response.expect_error(422, &format!("connection for clientID='{name}' not found"));
    }

    let name = tunnel_id("private");
    // Whatever RUST_LOG asks for, the token is not logged (tungstenite traces its handshake).
    let url = upstream.url();
    let args = [
        "--relay",
        &relay.base,
        "--name",
        &name,
        "--upstream",
        &url,
        "--token",
        token,
    ];
    let agent = Agent::start_with(&args, &[("RUST_LOG", "trace".as_ref())]);
    wait_agents(&authorized, &name, 1, RECONNECT, &[&agent]).await;
    assert!(agent.log().contains("TRACE"), "{}", agent.log());
    assert!(!agent.log().contains(token), "{}", agent.log());
    let path = format!("/r/{name}/echo");
    client
        .get(&path)
        .await
        .expect_error(403, says::ACCESS_DENIED);
    let by_header = client
        .request(Method::GET, "/echo")
        .header(CLIENT_ID, &name);
    client
        .send(by_header)
        .await
        .expect_error(403, says::ACCESS_DENIED);
    let wrong = client.with_bearer("wrong");
    wrong
        .get(&path)
        .await
        .expect_error(403, says::ACCESS_DENIED);

    // Browsers send no credentials with a CORS preflight: the relay answers it for a private
    // service, which nobody without the token reaches (connected or not: the answer is the
    // same). Any other OPTIONS, or one carrying a body, needs the token.
    let preflight = |path: &str, body: &'static str| {
        client
            .request(Method::OPTIONS, path)
            .header("Origin", "https://app.example")
            .header("Access-Control-Request-Method", "PUT")
            .body(body)
    };
    let answered = client.send(preflight(&path, "")).await.expect(204);
    let absent = format!("/r/{}/echo", tunnel_id("absent"));
    let answered_absent = client.send(preflight(&absent, "")).await.expect(204);
    // A browser's preflight for a request addressed by the header cannot carry the header: it
    // lands on the service's path, and the relay lets the method asked for through as well.
    let by_header = client.send(preflight("/echo", "")).await.expect(204);
    // The echoing upstream would have answered 200 with what it received.
    // Only one method name is added: a list, or anything else, is not echoed.
    let listed = client
        .request(Method::OPTIONS, "/echo")
        .header("Access-Control-Request-Method", "PUT, DELETE");
    let listed = client.send(listed).await.expect(204);
    let allowed = listed.header("access-control-allow-methods");
    assert_eq!(allowed, Some("GET, POST, DELETE, OPTIONS"));
    for answer in [&answered, &answered_absent, &by_header] {
        let allowed = answer.header("access-control-allow-methods");
        assert_eq!(allowed, Some("GET, POST, DELETE, OPTIONS, PUT"));
        assert!(answer.body.is_empty(), "{answer:?}");
    }
    client
        .send(preflight(&path, "not a preflight"))
        .await
        .expect_error(403, says::ACCESS_DENIED);
    client
        .send(client.request(Method::OPTIONS, &path))
        .await
        .expect_error(403, says::ACCESS_DENIED);
    // Over HTTP/2 a body needs no length header: it is still not a preflight.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("an HTTP/2 client builds");
    let chunks = [Ok::<_, std::io::Error>(bytes::Bytes::from(
        "not a preflight",
    ))];
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let sneaked = h2
        .request(Method::OPTIONS, format!("{}{path}", relay.base))
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "PUT")
        .body(body)
        .send()
        .await
        .expect("the relay answers over HTTP/2");
    assert_eq!(sneaked.status(), 403);
    let response = authorized.get(&path).await.expect(200);
    let echo = Echo::parse(&response.body);
    assert!(
        !echo.has("authorization"),
        "the relay's token reached the upstream: {echo:?}"
    );
    let by_header = authorized
        .request(Method::POST, "/echo?a=b")
        .header(CLIENT_ID, &name)
        .body("x");
    let echo = Echo::parse(&authorized.send(by_header).await.expect(200).body);
    assert_eq!((echo.uri.as_str(), echo.body.as_str()), ("/echo?a=b", "x"));
    assert!(!echo.has("authorization"), "{echo:?}");

    // Serving a public name still takes the token: whoever connected would get its requests.
    let squatter = Agent::serve(&relay.base, &public, &upstream.url(), None);
    let refused = "the relay refused this agent (403 Forbidden)";
    squatter.expect_logged(refused).await;
    drop(squatter);
    // Requests for a public agent need no token and keep their own Authorization, but never
    // pass on the relay's token.
    let public_agent = Agent::serve(&relay.base, &public, &upstream.url(), Some(token));
    wait_agents(&authorized, &public, 1, RECONNECT, &[&public_agent]).await;
    let path = format!("/r/{public}/echo");
    let echo = Echo::parse(&client.get(&path).await.expect(200).body);
    assert!(!echo.has("authorization"), "{echo:?}");
    // A public service answers its own preflights.
    let echo = Echo::parse(&client.send(preflight(&path, "")).await.expect(200).body);
    assert_eq!(
        (echo.method.as_str(), echo.uri.as_str()),
        ("OPTIONS", "/echo")
    );
    assert_eq!(echo.one("access-control-request-method"), "PUT");
    let own = client.with_bearer("upstream-credential");
    let echo = Echo::parse(&own.get(&path).await.expect(200).body);
    assert_eq!(echo.one("authorization"), "Bearer upstream-credential");
    let echo = Echo::parse(&authorized.get(&path).await.expect(200).body);
    assert!(
        !echo.has("authorization"),
        "the relay's token was passed on: {echo:?}"
    );
    let behind_another = client
        .request(Method::GET, &path)
        .header("Authorization", "Bearer upstream-credential")
        .header("Authorization", format!("Bearer {token}"));
    let echo = Echo::parse(&client.send(behind_another).await.expect(200).body);
    assert!(
        !echo.has("authorization"),
        "the relay's token was passed on: {echo:?}"
    );
    // As a proxy joins them, in one header.
    let joined = client.request(Method::GET, &path).header(
        "Authorization",
        format!("Bearer upstream-credential, Bearer {token}"),
    );
    let echo = Echo::parse(&client.send(joined).await.expect(200).body);
    assert!(
        !echo.has("authorization"),
        "the relay's token was passed on: {echo:?}"
    );
}

/// The whole answer to `GET path`, read from a raw connection the relay closes after it.
async fn raw_answer(base: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .expect("the relay accepts");
    let request = format!("GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await.expect("sent");
    let mut answer = Vec::new();
    let read = socket.read_to_end(&mut answer);
    tokio::time::timeout(WAIT, read)
        .await
        .expect("an answer in time")
        .expect("readable");
    String::from_utf8_lossy(&answer).into_owned()
}

/// An HTTP/1.0 client that asks to keep its connection keeps it when the upstream's answer has a
/// length; an answer streamed without one is ended by closing the connection, HTTP/1.0 knowing no
/// chunked coding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_keep_alive_when_the_length_is_known() {
    use crate::support::raw::Connection;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let setup = Setup::start(Store::Memory, &[]).await;
    let name = &setup.name;
    let mut connection = Connection::open(&setup.relay.base).await;
    let request =
        format!("GET /r/{name}/echo HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n");
    // So does an answer of a status without a body.
    let empty = request.replace("\r\n\r\n", "\r\nx-echo-status: 204\r\n\r\n");
    for (sent, status) in [
        (&request, 200),
        (&request, 200),
        (&empty, 204),
        (&request, 200),
    ] {
        let answer = connection.exchange(sent).await;
        assert_eq!(answer.status, status, "{answer:?}");
        assert_eq!(
            answer.header("connection"),
            Some("keep-alive"),
            "{answer:?}"
        );
    }
    let address = setup.relay.base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address)
        .await
        .expect("the relay accepts");
    let streamed =
        format!("GET /r/{name}/blob?bytes=100000 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    socket.write_all(streamed.as_bytes()).await.expect("sent");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, socket.read_to_end(&mut answer)).await;
    read.expect("the body ends with the connection")
        .expect("readable");
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let head = String::from_utf8_lossy(&answer[..split]).to_ascii_lowercase();
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert_eq!(answer[split + 4..], blob(100_000));
}

/// The basic round trip, agent and client on one relay, on each store.
async fn round_trip(backend: Backend) {
    let setup = Setup::on(backend.start(&[])).await;
    let (client, name) = (&setup.client, &setup.name);
    let request = client
        .request(Method::POST, "/items?page=2")
        .header(CLIENT_ID, name.as_str())
        .header("X-A", "1")
        .body("hello");
    let response: Response = client.send(request).await.expect(200);
    let echo = Echo::parse(&response.body);
    assert_eq!(echo.method, "POST");
    assert_eq!(echo.uri, "/items?page=2");
    assert_eq!(echo.body, "hello");
    assert_eq!(echo.one("x-a"), "1");
    assert_eq!(response.header("x-upstream-id"), Some("up"));
    let response = client
        .get(&format!("/r/{name}/r/rest?q=1"))
        .await
        .expect(200);
    assert_eq!(Echo::parse(&response.body).uri, "/r/rest?q=1");
    // Over h2c a request body may end in trailers (not forwarded): the answer still comes back.
    let path = format!("/r/{name}/trailed");
    let (status, body) = h2::with_trailers(client.base(), "POST", &path, &[], "hello").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(Echo::parse(body.as_bytes()).body, "hello");
    let by_header = [(CLIENT_ID, name.as_str())];
    let (status, body) = h2::with_trailers(client.base(), "GET", "/t", &by_header, "").await;
    assert_eq!(
        (status, Echo::parse(body.as_bytes()).uri),
        (200, "/t".to_owned())
    );
    // An HTTP/2 client may send each cookie in a field of its own: the HTTP/1.1 upstream gets
    // one `Cookie` field (RFC 9113 §8.2.3).
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("an h2c client builds");
    let cookies = h2c
        .get(format!("{}/r/{name}/c", client.base()))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .send()
        .await
        .expect("the relay answers over h2c");
    let body = cookies.bytes().await.expect("a body");
    assert_eq!(Echo::parse(&body).one("cookie"), "a=1; b=2");
    // CONNECT asks for a tunnel, which no agent gives: refused with its reason, not sent on.
    let arrived = setup.upstream.arrived.load(Ordering::SeqCst);
    let requests = [
        format!(
            "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n{CLIENT_ID}: {name}\r\n\r\n"
        ),
        format!("CONNECT /r/{name}/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"),
    ];
    for request in requests {
        let mut raw = crate::support::raw::Connection::open(client.base()).await;
        let answer = raw.exchange(&request).await;
        let reason = String::from_utf8_lossy(&answer.body);
        assert_eq!(
            (answer.status, reason.trim_end()),
            (501, "CONNECT is not supported")
        );
    }
    assert_eq!(setup.upstream.arrived.load(Ordering::SeqCst), arrived);
    let missing = tunnel_id("missing");
    client.get(&format!("/r/{missing}/x")).await.expect_error(
        422,
        &format!("connection for clientID='{missing}' not found"),
    );
}

per_store!(shared: [], dedicated: [round_trip]);

/// Pingora settings in `dir` with a grace period of `seconds`; their path.
fn with_grace_period(dir: &tempfile::TempDir, seconds: u64) -> String {
    let conf = dir.path().join("burrow.yaml");
    let sock = dir.path().join("upgrade.sock");
    let settings = format!(
        "---\nversion: 1\nthreads: 2\ngrace_period_seconds: {seconds}\nupgrade_sock: {}\n",
        sock.display()
    );
    std::fs::write(&conf, settings).expect("the settings are written");
    conf.to_str().expect("a UTF-8 path").to_owned()
}

/// A routed download goes on for as long as the relay's grace period, when that is raised past
/// 10 s for long downloads: neither the relay's link nor the agent cut it at 10 s of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_download_lasts_the_raised_grace_period() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let conf = with_grace_period(&dir, 12);
    let setup = Setup::start(Store::Memory, &[("BURROW_CONF", &conf)]).await;
    let url = format!("{}/r/{}/hang-body", setup.relay.base, setup.name);
    let mut download = reqwest::get(url).await.expect("the head comes");
    assert_eq!(download.status(), 200);
    setup.relay.signal("TERM");
    let stopping = Instant::now();
    while let Ok(Some(_)) = download.chunk().await {}
    let lasted = stopping.elapsed();
    assert!(lasted > Duration::from_secs(11), "cut after {lasted:?}");
}

/// A routed `GET /sleep` (two seconds at the upstream), once the upstream has it.
async fn at_the_upstream(setup: &Setup) -> tokio::task::JoinHandle<crate::support::Response> {
    let mut sleeping = setup.upstream.sleeping.subscribe();
    let (client, path) = (setup.client.clone(), format!("/r/{}/sleep", setup.name));
    let request = tokio::spawn(async move { client.get(&path).await });
    sleeping
        .wait_for(|&n| n > 0)
        .await
        .expect("the upstream is reached");
    request
}

/// Stopping, the relay answers a routed request still waiting for its answer with 503 before its
/// grace period (here 1 s, shorter than the upstream's 2 s) ends (the connection was dropped
/// without an answer), and one that comes on a kept-alive connection meanwhile with 503 at once
/// (it was 422: no such agent) — unless another instance sent it, which is told the agent is gone
/// (marked, so that it tries the next one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_routed_requests_in_flight() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let conf = with_grace_period(&dir, 1);
    let setup = Setup::start(Store::Memory, &[("BURROW_CONF", &conf)]).await;
    let request = at_the_upstream(&setup).await;
    let open = || crate::support::raw::Connection::open(&setup.relay.base);
    let (mut probe, mut kept, mut hop) = (open().await, open().await, open().await);
    let mut dialling = open().await;
    let late = format!("GET /r/{}/late HTTP/1.1\r\nHost: relay\r\n\r\n", setup.name);
    assert_eq!(kept.exchange(&late).await.status, 200);
    assert_eq!(hop.exchange(&late).await.status, 200);
    assert_eq!(dialling.exchange(&late).await.status, 200);
    setup.relay.signal("TERM");
    // Served as before until the relay has taken the signal in; an answer already on its way then
    // closes its connection, so the probe is another one than `kept`.
    let taken_in = |answer: &crate::support::raw::Answer| {
        answer.status != 200 || answer.header("connection") == Some("close")
    };
    let mut answer = probe.exchange(&late).await;
    for _ in 0..200 {
        if taken_in(&answer) {
            break;
        }
        answer = probe.exchange(&late).await;
    }
    assert!(taken_in(&answer), "{answer:?}");
    let answer = kept.exchange(&late).await;
    assert_eq!(answer.status, 503, "{answer:?}");
    // An agent connecting now is refused, not taken in and sent away at once (it would dial
    // straight back).
    let connect = "GET /agent/connect?name=late HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade\r\n\
                   Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let answer = dialling.exchange(connect).await;
    assert_eq!(answer.status, 503, "{answer:?}");
    // One sent on by another instance is refused, so that one tries the next with the agent.
    let from_b = late.replace("Host: relay", "Host: relay\r\nx-burrow-hop: b");
    let answer = hop.exchange(&from_b).await;
    assert_eq!(answer.status, 422, "{answer:?}");
    assert_eq!(answer.header("x-burrow-hop"), Some("refused"));
    let answer = request.await.expect("the request task does not panic");
    let answer = answer.expect_error(503, "Relay shutting down, retry");
    assert_eq!(answer.header("retry-after"), Some("1"));
}

/// Stopping with the built-in grace period (8 s), the relay lets a routed request that takes
/// longer than a moment (the upstream's 2 s) finish, and exits as soon as it has, not when the
/// grace period ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_routed_requests_finish_then_exits() {
    let setup = Setup::start(Store::Memory, &[]).await;
    let request = at_the_upstream(&setup).await;
    setup.relay.signal("TERM");
    let answer = request.await.expect("the request task does not panic");
    assert_eq!(answer.expect(200).text(), "late");
    // Well before the grace period's end, 6 s or more from now.
    assert!(
        setup.relay.exits_within(Duration::from_secs(4)).await,
        "the relay still runs with no request in flight"
    );
}

/// The same over HTTP/2, where the connection's own task writes the answers: every stream in
/// flight gets its whole answer before the relay exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_routed_http2_streams_finish() {
    let setup = Setup::start(Store::Memory, &[]).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("an HTTP/2 client builds");
    let mut sleeping = setup.upstream.sleeping.subscribe();
    let url = format!("{}/r/{}/sleep", setup.relay.base, setup.name);
    let mut requests = JoinSet::new();
    const STREAMS: u64 = 20;
    for _ in 0..STREAMS {
        let (h2, url) = (h2.clone(), url.clone());
        requests.spawn(async move {
            let response = h2.get(url).send().await?;
            Ok::<_, reqwest::Error>((response.status(), response.text().await?))
        });
    }
    sleeping
        .wait_for(|&n| n >= STREAMS)
        .await
        .expect("the upstream is reached");
    setup.relay.signal("TERM");
    while let Some(answer) = requests.join_next().await {
        let answer = answer.expect("the request task does not panic");
        let (status, body) = answer.expect("a whole answer");
        assert_eq!((status.as_u16(), body.as_str()), (200, "late"));
    }
    assert!(setup.relay.exits_within(Duration::from_secs(4)).await);
}

/// An HTTP/2 client that never reads (frozen, or gone without a word) holds a stopping relay a
/// moment only, not its whole grace period (8 s): the relay waits for its HTTP/2 connections to
/// close after their last answers, but not for a client that never acknowledges the closing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_a_frozen_http2_client() {
    use tokio::io::AsyncWriteExt;

    let relay = Relay::start(Store::Memory, &[]);
    let mut frozen = tokio::net::TcpStream::connect(("127.0.0.1", relay.port()))
        .await
        .expect("the relay accepts");
    // The preface and an empty SETTINGS frame, then nothing: no acknowledgement, ever.
    let hello = [
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice(),
        &[0, 0, 0, 4, 0, 0, 0, 0, 0],
    ]
    .concat();
    frozen.write_all(&hello).await.expect("the preface is sent");
    relay.client().get("/health").await.expect(200);
    relay.signal("TERM");
    assert!(relay.exits_within(Duration::from_secs(4)).await);
    drop(frozen);
}

/// With the redis store, a stopping relay sends a routed request that comes on a kept-alive
/// connection on to an instance that has an agent of the name (where its own agents go), instead
/// of telling the client to retry (503); but not one whose timeout outlasts the grace period,
/// which could be cut after it was sent on and then told to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_relay_sends_routed_requests_to_the_agents_elsewhere() {
    let (setup, b) = Setup::with_second_instance().await;
    let upstream_b = Upstream::start("at-b").await;
    let at_b = Agent::serve(&b.base, &setup.name, &upstream_b.url(), None);
    wait_agents(&setup.client, &setup.name, 2, WAIT, &[&setup.agent, &at_b]).await;
    let echo = format!("GET /r/{}/echo HTTP/1.1\r\nHost: relay\r\n\r\n", setup.name);
    let mut long = crate::support::raw::Connection::open(&setup.relay.base).await;
    assert_eq!(long.exchange(&echo).await.status, 200);
    let mut kept = kept_through_sigterm(&setup, &echo).await;
    let answer = kept.exchange(&echo).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(Echo::parse(&answer.body).upstream, "at-b");
    assert_eq!(answer.header("connection"), Some("close"));
    let patient = echo.replace("Host: relay", &format!("Host: relay\r\n{TIMEOUT}: 60s"));
    let answer = long.exchange(&patient).await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.header("retry-after"), Some("1"));
}

/// So does a relay restarted in place: the stopping one sends the request to its successor at
/// the same address (it no longer takes connections there itself), once the agent is back there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_relay_sends_routed_requests_to_its_successor() {
    let redis = crate::support::shared_redis();
    let setup = Setup::start(Store::Redis(redis), &[]).await;
    let echo = format!(
        "GET /r/{}/echo HTTP/1.1\r\nHost: relay\r\n{TIMEOUT}: 6s\r\n\r\n",
        setup.name
    );
    let mut kept = kept_through_sigterm(&setup, &echo).await;
    let answer = tokio::spawn(async move { kept.exchange(&echo).await });
    let port = setup.relay.port();
    let closed = || std::future::ready(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    assert!(
        crate::support::eventually(WAIT, closed).await,
        "the stopping relay still listens"
    );
    let successor = Relay::start_on(port, Store::Redis(redis), &[]);
    let answer = answer.await.expect("the request task does not panic");
    assert_eq!(answer.status, 200, "{answer:?}\n{}", successor.output());
    assert_eq!(Echo::parse(&answer.body).upstream, "up");
}

/// A connection to the set-up's relay that `request` was answered on, kept alive while the relay
/// takes a SIGTERM (its agent has been told to go).
async fn kept_through_sigterm(setup: &Setup, request: &str) -> crate::support::raw::Connection {
    let mut kept = crate::support::raw::Connection::open(&setup.relay.base).await;
    assert_eq!(kept.exchange(request).await.status, 200);
    setup.relay.signal("TERM");
    setup.agent.expect_logged("the relay is going away").await;
    kept
}

/// When its relay stops with a request of the agent's still in flight, the agent connects again
/// at once (here to a new relay on the same address, as behind a load balancer) while the old
/// connection finishes that request, so that the name stays reachable; before, it waited for the
/// request (up to the grace period, 8 s) and the name was "not found" meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_connects_again_while_its_stopping_relay_finishes() {
    let setup = Setup::start(Store::Memory, &[]).await;
    let mut hanging = setup.upstream.hanging.subscribe();
    let (client, path) = (setup.client.clone(), format!("/r/{}/hang", setup.name));
    let mut request = tokio::spawn(async move { client.get(&path).await });
    hanging
        .wait_for(|&n| n > 0)
        .await
        .expect("the upstream is reached");
    setup.relay.signal("TERM");
    let port = setup.relay.port();
    let closed = || std::future::ready(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    let closed = crate::support::eventually(WAIT, closed).await;
    assert!(closed, "the stopping relay still listens");
    let b = Relay::start_on(port, Store::Memory, &[]);
    let moved = async {
        while agents_named(&b.client(), &setup.name).await != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        () = moved => {}
        answer = &mut request => panic!("the agent moved only after its request ended: {answer:?}"),
    }
    echo_through(&b.client(), &setup.name, "up").await;
    // The old connection still serves its request, until its timeout (3 s).
    let answer = request.await.expect("the request task does not panic");
    answer.expect_error(504, "agent did not answer in time");
}

/// A graceful upgrade moves the agents at once: the old process tells them (`MOVE`) as it hands
/// its socket over, they connect to the new one while the old one still serves them, and routed
/// requests reaching either process meanwhile are answered. With the memory store, where the new
/// process cannot learn the old one's agents, those reaching it got 422 until the old one's
/// drain, 5 s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_upgrade_moves_the_agents_at_once() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let conf = with_grace_period(&dir, 1);
    let env = [("BURROW_CONF", conf.as_str())];
    let setup = Setup::start(Store::Memory, &env).await;
    let sock = dir.path().join("upgrade.sock");
    let new = Relay::successor(setup.relay.port(), Store::Memory, &env, &sock);
    hand_over(&setup).await;
    // Told once the new process had the socket (and removed its upgrade socket): a dial reaches
    // it from then on. (It looks for the socket once a second.)
    assert!(
        !sock.exists(),
        "MOVE came before the new process had the socket"
    );
    let connected = || setup.agent.log().matches("connected to the relay").count();
    let twice = crate::support::eventually(WAIT, || std::future::ready(connected() == 2)).await;
    assert!(twice, "{}", setup.agent.log());
    // A connection each, so that requests reach both processes.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("a plain HTTP client builds");
    let url = format!("{}/r/{}/echo", setup.relay.base, setup.name);
    for _ in 0..40 {
        let response = http.get(&url).send().await.expect("an answer");
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(status, 200, "{body}");
    }
    let metrics = new.client().metrics().expect("the relay serves metrics");
    let forwarded = "burrow_requests_total{route=\"forward\",status=\"200\"}";
    assert!(
        metric(&metrics, forwarded).await > 0.0,
        "none reached the new process"
    );
    // An agent dialling in now is refused by the old process, to dial again at once (it reaches
    // the new one, which takes it); a connection each, until one reaches the old process.
    let refused = agent_dial_refused(&setup.relay.base).await;
    assert!(refused.contains("\r\nretry-after: 0\r\n"), "{refused}");
    assert!(
        !setup.relay.exits_within(Duration::ZERO).await,
        "the old one had stopped"
    );
}

/// The head of the first 503 an agent handshake to `base` gets, on a connection each (101s, from
/// a process that takes it, are dropped), in lower case.
async fn agent_dial_refused(base: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let handshake = "GET /agent/connect?name=dialling HTTP/1.1\r\nHost: relay\r\n\
                     Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    for _ in 0..40 {
        let address = base.trim_start_matches("http://");
        let mut tcp = tokio::net::TcpStream::connect(address)
            .await
            .expect("accepted");
        tcp.write_all(handshake.as_bytes()).await.expect("sent");
        let head = tokio::time::timeout(WAIT, super::read_head(&mut tcp)).await;
        let head = head.expect("an answer in time").expect("a whole head");
        let head = String::from_utf8_lossy(&head).to_lowercase();
        if head.starts_with("http/1.1 503") {
            return head;
        }
    }
    panic!("no agent handshake was refused");
}

/// Sends the set-up's relay SIGQUIT (a new process waiting), and waits until its agent is told
/// to move.
async fn hand_over(setup: &Setup) {
    setup.relay.signal("QUIT");
    setup
        .agent
        .expect_logged("the relay hands over to a new process")
        .await;
}

/// When the old process of an upgrade drains, 5 s after the SIGQUIT, a routed request on a
/// kept-alive connection to it goes to the new process, where its agents moved (memory store:
/// the address leads there now), instead of 503; so does one that another instance sent there,
/// instead of being refused (which that instance could not retry once it had sent a body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_old_process_sends_routed_requests_to_the_new_one() {
    let dir = tempfile::tempdir().expect("a temp dir");
    // Long enough for the requests' 3 s timeout.
    let conf = with_grace_period(&dir, 5);
    let setup = Setup::start(
        Store::Memory,
        &[("BURROW_CONF", &conf), ("RUST_LOG", "info")],
    )
    .await;
    let sock = dir.path().join("upgrade.sock");
    let _new = Relay::successor(
        setup.relay.port(),
        Store::Memory,
        &[("BURROW_CONF", &conf)],
        &sock,
    );
    let echo = format!("GET /r/{}/echo HTTP/1.1\r\nHost: relay\r\n\r\n", setup.name);
    let mut kept = crate::support::raw::Connection::open(&setup.relay.base).await;
    assert_eq!(kept.exchange(&echo).await.status, 200);
    let mut from_b = crate::support::raw::Connection::open(&setup.relay.base).await;
    let hop = echo.replace("Host: relay", "Host: relay\r\nx-burrow-hop: b");
    assert_eq!(from_b.exchange(&hop).await.status, 200);
    hand_over(&setup).await;
    let draining =
        || std::future::ready(setup.relay.output().contains("Graceful shutdown started"));
    assert!(
        crate::support::eventually(WAIT, draining).await,
        "{}",
        setup.relay.output()
    );
    let answer = kept.exchange(&echo).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("connection"), Some("close"));
    let answer = from_b.exchange(&hop).await;
    assert_eq!(answer.status, 200, "{answer:?}");
}

/// The new process of a graceful upgrade cannot know which agents its predecessor had (memory
/// store): for its first seconds, a request for a name it has no agent of waits for one to
/// connect instead of getting 422 at once, one with a body too (briefly). An agent dialling in
/// meanwhile is refused by the old process (503), which is handing over, and reaches the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successor_waits_for_agents_it_cannot_know() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let conf = with_grace_period(&dir, 1);
    let env = [("BURROW_CONF", conf.as_str())];
    let old = Relay::start(Store::Memory, &env);
    let sock = dir.path().join("upgrade.sock");
    let new = Relay::successor(old.port(), Store::Memory, &env, &sock);
    old.signal("QUIT");
    let new_metrics = new.client().metrics().expect("the relay serves metrics");
    let page = format!("{}/metrics", new_metrics.base());
    let serving = || async { reqwest::get(&page).await.is_ok() };
    assert!(
        crate::support::eventually(WAIT, serving).await,
        "{}",
        new.output()
    );
    // A connection each, until a GET and then a POST reach the new process and wait there; the
    // old process answers those reaching it at once (422: it is not new).
    let name = tunnel_id("later");
    let url = format!("{}/r/{name}/echo", old.base);
    let upstream = Upstream::start("up").await;
    let get = held_at_new_process(&new_metrics, 1.0, || reqwest::Client::new().get(&url)).await;
    let post = || reqwest::Client::new().post(&url).body("a body");
    let post = held_at_new_process(&new_metrics, 2.0, post).await;
    let agent = Agent::serve(&old.base, &name, &upstream.url(), None);
    for waiting in [get, post] {
        let answer = waiting.await.expect("no panic").expect("an answer");
        assert_eq!(answer, 200, "{}", agent.log());
    }
}

/// With redis, while the new process of an upgrade takes over, other instances still send it
/// requests for its predecessor's agents, even once that one is gone, and it waits for them to
/// arrive. Before, its first record (no agents yet) hid its predecessor's, and a POST at another
/// instance got 422 until the agents had moved. (The agent is frozen here, so that it moves only
/// once the request waits for it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_instances_reach_agents_moving_to_a_new_process() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (setup, b) = upgradable_with_second_instance(&dir).await;
    crate::support::process::signal(&setup.agent.child, "STOP");
    let new = upgrade_on_redis(&setup.relay, &dir).await;
    let new_metrics = new.client().metrics().expect("the relay serves metrics");
    let post = reqwest::Client::new()
        .post(format!("{}/r/{}/echo", b.base, setup.name))
        .header(TIMEOUT, "8s")
        .body("a body")
        .send();
    let post = tokio::spawn(async move { post.await.map(|r| r.status().as_u16()) });
    let held = || async {
        post.is_finished() || metric(&new_metrics, "burrow_awaiting_agent").await >= 1.0
    };
    assert!(
        crate::support::eventually(WAIT, held).await,
        "neither answered nor held"
    );
    crate::support::process::signal(&setup.agent.child, "CONT");
    let answer = post.await.expect("no panic").expect("an answer");
    assert_eq!(answer, 200, "{}\n{}", new.output(), setup.agent.log());
}

/// The new process of an upgrade waits for an agent another instance sent it a request for
/// (above), but not when an agent of the name is at another instance: it refuses the request at
/// once, for the sender, whose read of the store was older, to read again and go there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_process_refuses_requests_for_agents_elsewhere() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let conf = with_grace_period(&dir, 1);
    let redis = crate::support::shared_redis();
    let elsewhere = Setup::start(Store::Redis(redis), &[]).await;
    let old = Relay::start(Store::Redis(redis), &[("BURROW_CONF", &conf)]);
    let new = upgrade_on_redis(&old, &dir).await;
    let hop = format!(
        "GET /r/{}/echo HTTP/1.1\r\nHost: relay\r\nx-burrow-hop: b\r\n{TIMEOUT}: 8s\r\n\r\n",
        elsewhere.name
    );
    let mut to_new = crate::support::raw::Connection::open(&new.base).await;
    let asked = Instant::now();
    let answer = to_new.exchange(&hop).await;
    assert_eq!(answer.status, 422, "{answer:?}");
    assert_eq!(answer.header("x-burrow-hop"), Some("refused"));
    let took = asked.elapsed();
    assert!(took < Duration::from_millis(1500), "refused after {took:?}");
}

/// While a new process takes over, other instances send it the requests only for the agents
/// connected to its predecessor (on their way to it), not for those that left that one before
/// the upgrade, which may be gone for good: a POST for one of those is 422 at once (it got 502
/// after the new process's wait, its body gone there). And the new process gives up on an agent
/// that does not come in time for the sending instance to answer: 422 there, not 504 (which would
/// also have that instance try the new process last).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_process_waits_only_for_agents_on_their_way() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (setup, b) = upgradable_with_second_instance(&dir).await;
    let client_b = b.client();
    let left = tunnel_id("left");
    let leaving = Agent::serve(&setup.relay.base, &left, &setup.upstream.url(), None);
    wait_agents(&client_b, &left, 1, WAIT, &[&leaving]).await;
    leaving.terminate();
    wait_agents(&client_b, &left, 0, WAIT, &[&leaving]).await;
    crate::support::process::signal(&setup.agent.child, "STOP");
    let _new = upgrade_on_redis(&setup.relay, &dir).await;
    let Setup { agent, name, .. } = setup;
    // On its way, but it never comes.
    drop(agent);
    let post = client_b.post(&format!("/r/{left}/echo"), "body").await;
    post.expect_one_line_error(422);
    let get = client_b.request(Method::GET, &format!("/r/{name}/echo"));
    let get = client_b.send(get.header(TIMEOUT, "2s")).await;
    get.expect_one_line_error(422);
}

/// Relay A with the set-up's agent, quick to upgrade (1 s of grace, its upgrade socket in `dir`),
/// and relay B listing that agent, on the shared redis.
async fn upgradable_with_second_instance(dir: &tempfile::TempDir) -> (Setup, Relay) {
    let conf = with_grace_period(dir, 1);
    let redis = crate::support::shared_redis();
    let setup = Setup::start(Store::Redis(redis), &[("BURROW_CONF", &conf)]).await;
    let b = Relay::start(Store::Redis(redis), &[]);
    wait_agents(&b.client(), &setup.name, 1, WAIT, &[&setup.agent]).await;
    (setup, b)
}

/// Upgrades relay `old` (on the shared redis, with 1 s of grace and its upgrade socket in `dir`)
/// to a new process, and waits until the old one has handed over, drained and exited: only the
/// new one takes connections then.
async fn upgrade_on_redis(old: &Relay, dir: &tempfile::TempDir) -> Relay {
    let sock = dir.path().join("upgrade.sock");
    let redis = crate::support::shared_redis();
    let conf = with_grace_period(dir, 1);
    let env = [("BURROW_CONF", conf.as_str())];
    let new = Relay::successor(old.port(), Store::Redis(redis), &env, &sock);
    old.signal("QUIT");
    let gone = old.exits_within(Duration::from_secs(9)).await;
    assert!(gone, "{}", old.output());
    new
}

/// Sends requests `request` makes, each on a connection of its own, until one waits at the new
/// process of an upgrade, which then counts `waiting` requests held for their agent; the old
/// process answers the others 422 at once. The task awaiting the one held.
async fn held_at_new_process(
    new_metrics: &Client,
    waiting: f64,
    request: impl Fn() -> reqwest::RequestBuilder,
) -> tokio::task::JoinHandle<reqwest::Result<u16>> {
    let held = || async { metric(new_metrics, "burrow_awaiting_agent").await >= waiting };
    for _ in 0..40 {
        let sent = request().header(TIMEOUT, "8s").send();
        let sent = tokio::spawn(async move { sent.await.map(|r| r.status().as_u16()) });
        let settled = || async { sent.is_finished() || held().await };
        let settled = crate::support::eventually(WAIT, settled).await;
        assert!(settled, "neither answered nor held");
        if !sent.is_finished() {
            return sent;
        }
        let answer = sent.await.expect("no panic").expect("an answer");
        assert_eq!(answer, 422, "the old process does not wait");
    }
    panic!("no request reached the new process");
}

/// B remembers for a moment which instances it found an agent on: its requests to the agent on A
/// read the store once, not once each. When the agent has moved to C meanwhile, A refuses the
/// request and B reads the store again, rather than answer 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_holding_an_agent_are_remembered() {
    let (setup, b) = Setup::with_second_instance().await;
    let Setup {
        relay: _a,
        upstream: _upstream,
        agent: mut a_agent,
        name,
        ..
    } = setup;
    let client_b = b.client();
    let metrics = client_b.metrics().expect("the relay has a metrics page");
    let reads = "burrow_store_duration_seconds_count{op=\"instances\"}";
    let before = metric(&metrics, reads).await;
    for _ in 0..10 {
        echo_through(&client_b, &name, "up").await;
    }
    let read = metric(&metrics, reads).await - before;
    assert!(read <= 2.0, "ten requests read the store {read} times");

    let redis = crate::support::shared_redis();
    let c = Relay::start(Store::Redis(redis), &[]);
    let c_upstream = Upstream::start("c").await;
    // What B remembers now lists A alone.
    echo_through(&client_b, &name, "up").await;
    let c_agent = Agent::serve(&c.base, &name, &c_upstream.url(), None);
    wait_agents(&client_b, &name, 2, WAIT, &[&a_agent, &c_agent]).await;
    a_agent.kill();
    wait_agents(&client_b, &name, 1, WAIT, &[&c_agent]).await;
    echo_through(&client_b, &name, "c").await;
}

/// A third instance C on the shared redis-server with an agent named `name` in front of an
/// upstream `c`, once B (`client_b`) lists it beside the agent on A.
async fn third_instance(
    client_b: &Client,
    name: &str,
    a_agent: &Agent,
) -> (Relay, Upstream, Agent) {
    let c = Relay::start(Store::Redis(crate::support::shared_redis()), &[]);
    let upstream = Upstream::start("c").await;
    let agent = Agent::serve(&c.base, name, &upstream.url(), None);
    wait_agents(client_b, name, 2, WAIT, &[a_agent, &agent]).await;
    (c, upstream, agent)
}

/// Whether `GET /agents` lists an agent named `name` whose `flag` (`silent`, `draining`) is set.
async fn flagged(client: &Client, name: &str, flag: &str) -> bool {
    let agents = client.get("/agents").await.expect(200).json();
    agents["agents"]
        .as_array()
        .expect("/agents has an `agents` array")
        .iter()
        .any(|agent| agent["name"] == name && agent[flag] == true)
}

/// An agent that stops answering (frozen, or cut off without a reset) gets requests last from
/// other instances too: its instance finds it silent and says so in its presence record, and B
/// sends the name's requests to the agent on C instead of timing out half of them. A sends its own
/// requests for the name to C too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_agent_on_another_instance_comes_last() {
    let (setup, b) = Setup::with_second_instance().await;
    let Setup {
        relay: a,
        upstream: _upstream,
        agent: a_agent,
        name,
        ..
    } = setup;
    let client_b = b.client();
    let _c = third_instance(&client_b, &name, &a_agent).await;
    let silent_on_a = || flagged(&client_b, &name, "silent");
    assert!(!silent_on_a().await);

    crate::support::process::signal(&a_agent.child, "STOP");
    let request = a.client().request(Method::GET, &format!("/r/{name}/echo"));
    a.client()
        .send(request.header(TIMEOUT, "1s"))
        .await
        .expect_one_line_error(504);
    // Announced when it falls silent, not at the next 5 s tick.
    assert!(
        crate::support::eventually(Duration::from_secs(3), silent_on_a).await,
        "B did not learn within 3 s that the agent on A is silent"
    );
    // Nor does A send its own clients' requests to it while C's agent answers.
    for client in [&client_b, &a.client()] {
        for _ in 0..10 {
            let request = client.request(Method::GET, &format!("/r/{name}/echo"));
            let answer = client.send(request.header(TIMEOUT, "2s")).await.expect(200);
            assert_eq!(Echo::parse(&answer.body).upstream, "c");
        }
    }
    crate::support::process::signal(&a_agent.child, "CONT");
}

/// An agent that said GOAWAY (stopping, its requests in flight to finish) gets no more requests
/// from other instances: its instance announces it draining at once, and B sends a request with a
/// body to the agent of the name on C rather than to A, which would refuse it (502: a body read
/// cannot be sent twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_agent_gets_no_requests_from_other_instances() {
    let (setup, b) = Setup::with_second_instance().await;
    let Setup {
        relay: a,
        upstream,
        agent: a_agent,
        name,
        ..
    } = setup;
    let client_b = b.client();
    let _c = third_instance(&client_b, &name, &a_agent).await;
    // A request in flight on A keeps its agent connected while it drains.
    let client_a = a.client();
    let path = format!("/r/{name}/hang");
    let _in_flight = tokio::spawn(async move { client_a.get(&path).await });
    let mut hanging = upstream.hanging.subscribe();
    hanging
        .wait_for(|&n| n > 0)
        .await
        .expect("the upstream is reached");
    crate::support::process::signal(&a_agent.child, "TERM");
    let draining_on_a = || flagged(&client_b, &name, "draining");
    let announced = crate::support::eventually(Duration::from_secs(3), draining_on_a).await;
    assert!(
        announced,
        "B did not learn within 3 s that the agent on A drains"
    );
    for _ in 0..10 {
        let answer = client_b.post(&format!("/r/{name}/echo"), "body").await;
        assert_eq!(Echo::parse(&answer.expect(200).body).upstream, "c");
    }
}

/// Requests for a name no instance has, arriving together, share reads of the store rather
/// than each reading every instance's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_of_unknown_names_share_store_reads() {
    let (_setup, b) = Setup::with_second_instance().await;
    let client_b = b.client();
    let metrics = client_b.metrics().expect("the relay has a metrics page");
    let reads = "burrow_store_duration_seconds_count{op=\"instances\"}";
    let before = metric(&metrics, reads).await;
    let mut requests = JoinSet::new();
    for _ in 0..20 {
        let client = client_b.clone();
        requests.spawn(async move { client.get("/r/nobody-has-this-name/x").await });
    }
    while let Some(answer) = requests.join_next().await {
        answer.expect("the request task does not panic").expect(422);
    }
    // Each lookup reads unless it finds a read begun after it; on a loaded machine the requests
    // trickle in, so how many share varies (15 reads were seen), but never all read alone.
    let read = metric(&metrics, reads).await - before;
    assert!(read < 20.0, "20 lookups read the store {read} times");
}

/// Looking for an agent in a hung store is bounded: by the request's timeout (504) when that is
/// shorter than the half second the relay waits for the store, else by that half second (503,
/// with no recent read of the store to make do with), not by the store's own timeout of seconds;
/// for a second after, requests get their 503 without asking the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_store_lookup_is_bounded() {
    let redis = RedisServer::start();
    let relay = Relay::start(Store::Redis(&redis), &[]);
    let pid = redis.pid();
    crate::support::process::signal_pid(pid, "STOP");
    let client = relay.client();
    let request = client.request(Method::GET, "/r/somewhere-else/x");
    let short = client.send(request.header(TIMEOUT, "200ms")).await;
    let asked = Instant::now();
    let request = client.request(Method::GET, "/r/somewhere-else/x");
    let longer = client.send(request.header(TIMEOUT, "10s")).await;
    let took = asked.elapsed();
    crate::support::process::signal_pid(pid, "CONT");
    short.expect_one_line_error(504);
    longer.expect_one_line_error(503);
    assert!(took < Duration::from_secs(2), "503 after {took:?}");
}

/// With the store frozen, an instance still sends requests to the instances it found an agent on
/// lately (records live 15 s anyway) after waiting 0.5 s for it, rather than time them all out;
/// the requests right after do not wait again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_keeps_routing_to_known_instances() {
    let redis = RedisServer::start();
    let setup = Setup::on(Relay::start(Store::Redis(&redis), &[])).await;
    let b = Relay::start(Store::Redis(&redis), &[]);
    let client_b = b.client();
    wait_agents(&client_b, &setup.name, 1, WAIT, &[&setup.agent]).await;
    // Frozen, as a stalled server or a partition leaves it: reads hang rather than fail.
    let pid = redis.pid();
    crate::support::process::signal_pid(pid, "STOP");
    // A request with a body is looked up afresh each time: the store's failure is what it meets.
    let path = format!("/r/{}/echo", setup.name);
    let post = || client_b.post(&path, "body");
    assert_eq!(Echo::parse(&post().await.expect(200).body).upstream, "up");
    // The ones right after it do not wait for the store again (0.5 s each) but make do at once.
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(Echo::parse(&post().await.expect(200).body).upstream, "up");
    }
    let took = started.elapsed();
    crate::support::process::signal_pid(pid, "CONT");
    assert!(
        took < Duration::from_millis(2500),
        "five requests took {took:?}"
    );
}

/// An instance listed with the agent that takes connections and closes them unanswered (a proxy
/// in front of a dying process): a request that may go on (idempotent, nothing of it read) goes
/// to the next instance, and the instance is tried last after, and logged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_that_closes_connections_is_passed_over() {
    let (setup, b) = Setup::with_second_instance().await;
    let closing = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let address = closing.local_addr().expect("a bound address").to_string();
    tokio::spawn(async move {
        while let Ok((stream, _)) = closing.accept().await {
            drop(stream);
        }
    });
    let client_b = b.client();
    list_instance(&client_b, &setup, &address).await;
    for _ in 0..10 {
        echo_through(&client_b, &setup.name, "up").await;
    }
    let log = b.output();
    assert_eq!(log.matches(&address).count(), 1, "{log}");
}

/// An instance whose record still lists the agent after it left (killed, then restarted in place)
/// refuses the name's requests; a request with a body that went there is lost (502), but the
/// next ones try that instance last, instead of half of them failing until the record expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_that_refused_a_name_is_tried_last() {
    let (setup, b) = Setup::with_second_instance().await;
    let c = Relay::start(Store::Redis(crate::support::shared_redis()), &[]);
    let client_b = b.client();
    list_instance(&client_b, &setup, c.base.trim_start_matches("http://")).await;
    let mut lost = 0;
    for _ in 0..10 {
        let answer = client_b
            .post(&format!("/r/{}/echo", setup.name), "body")
            .await;
        match answer.status {
            502 => lost += 1,
            _ => assert_eq!(Echo::parse(&answer.expect(200).body).upstream, "up"),
        }
    }
    assert!(lost <= 1, "{lost} of 10 requests lost");
}

/// Of two records at one address, other instances take the one of the instance that started
/// last (restarted in place, it holds the address now): the older one's agents, gone, are not
/// listed, and a request for them is 422 (once none came back), where a POST got 502 from the
/// restarted instance until the old record expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predecessor_record_is_ignored_by_other_instances() {
    let (setup, b) = Setup::with_second_instance().await;
    let client_b = b.client();
    let gone = tunnel_id("gone");
    record_instance(setup.relay.base.trim_start_matches("http://"), &gone, 0);
    let answer = client_b.post(&format!("/r/{gone}/echo"), "body").await;
    answer.expect_one_line_error(422);
    assert_eq!(agents_named(&client_b, &gone).await, 0);
    assert_eq!(agents_named(&client_b, &setup.name).await, 1);
}

/// An instance whose own agents of a name all refuse (their upstream down) sends requests, with
/// bodies too, to another instance whose agent answers: the refusing agents here could only
/// refuse them, and a body read here could not go on after that (502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_agents_send_requests_to_another_instance() {
    let (setup, b) = Setup::with_second_instance().await;
    let client_b = b.client();
    let closed = format!("http://127.0.0.1:{}", free_port());
    let refusing = Agent::serve(&b.base, &setup.name, &closed, None);
    wait_agents(
        &client_b,
        &setup.name,
        2,
        RECONNECT,
        &[&setup.agent, &refusing],
    )
    .await;
    // The first request finds the agent here refusing; without a body, it goes on to A.
    echo_through(&client_b, &setup.name, "up").await;
    for _ in 0..10 {
        let answer = client_b
            .post(&format!("/r/{}/echo", setup.name), "body")
            .await;
        assert_eq!(Echo::parse(&answer.expect(200).body).upstream, "up");
    }
}

/// A record left at an instance's own address by its predecessor (killed, then restarted in
/// place) is not another instance: a request for a name only that record lists is 422 (once no
/// agent of the name came back), with a body too, where it went to the instance itself, which
/// refused it after its body was read (502 until the record expired); and `GET /agents` does not
/// list the predecessor's agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predecessor_at_own_address_is_not_another_instance() {
    let relay = Relay::start(Store::Redis(crate::support::shared_redis()), &[]);
    let client = relay.client();
    let name = tunnel_id("left-behind");
    record_instance(relay.base.trim_start_matches("http://"), &name, 0);
    let answer = client.post(&format!("/r/{name}/echo"), "body").await;
    let answer = answer.expect_one_line_error(422);
    assert!(answer.text().contains("not found"), "{answer:?}");
    assert_eq!(agents_named(&client, &name).await, 0);
}

/// Its predecessor's agents, though, are waited for: they are dialling this address again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predecessors_agents_are_waited_for() {
    let relay = Relay::start(Store::Redis(crate::support::shared_redis()), &[]);
    let client = relay.client();
    let upstream = Upstream::start("up").await;
    let name = tunnel_id("dialling-back");
    record_instance(relay.base.trim_start_matches("http://"), &name, 0);
    let waiting = held_request(&client, &name).await;
    let _agent = Agent::serve(&relay.base, &name, &upstream.url(), None);
    let answer = waiting.await.expect("the request task does not panic");
    assert_eq!(Echo::parse(&answer.expect(200).body).upstream, "up");
}

/// Lists, in the store, a made-up instance at `address` with an agent of `setup`'s name, as a
/// relay records itself (it lives a minute), and waits until B (`client_b`) lists it beside the
/// agent of `setup`. It started after every other, so that it holds `address` even where a
/// real relay listens (one that restarted and does not know yet that its agent is gone).
async fn list_instance(client_b: &Client, setup: &Setup, address: &str) {
    let name = setup.name.as_str();
    record_instance(address, name, u64::MAX);
    wait_agents(client_b, name, 2, WAIT, &[&setup.agent]).await;
}

/// Writes, in the shared store, the record of a made-up instance at `address` with an agent
/// `name`, started at `started_ms` (Unix ms), as a relay records itself (it lives a minute).
fn record_instance(address: &str, name: &str, started_ms: u64) {
    let instance = tunnel_id("made-up");
    let record = serde_json::json!({
        "instance": instance,
        "address": address,
        "started_ms": started_ms,
        "agents": [{"name": name, "instance": instance}],
    });
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is past 1970")
        + Duration::from_secs(60);
    let redis = crate::support::shared_redis();
    let key = format!("burrow:instance:{instance}");
    redis.command(&["SET", &key, &record.to_string(), "PX", "60000"]);
    let score = expires.as_millis().to_string();
    redis.command(&["ZADD", "burrow:instances", &score, &instance]);
}

/// An instance listed with the agent whose address takes no connection (its node gone without a
/// goodbye: nothing refuses, nothing answers) costs a request a second at most, not its whole
/// timeout: the request, with a body or not, goes on to the next instance, and the next requests
/// try it last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_that_takes_no_connection_is_passed_over() {
    let (setup, b) = Setup::with_second_instance().await;
    // A listening socket whose queue of connections is full: the kernel drops further attempts.
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind("127.0.0.1:0".parse().expect("an address"))
        .expect("a free port");
    let full = socket.listen(0).expect("the socket listens");
    let address = full.local_addr().expect("a bound address").to_string();
    let mut queued = Vec::new();
    while let Ok(Ok(stream)) = tokio::time::timeout(
        Duration::from_millis(300),
        tokio::net::TcpStream::connect(&address),
    )
    .await
    {
        queued.push(stream);
    }
    let client_b = b.client();
    list_instance(&client_b, &setup, &address).await;
    // A request with a body too: nothing of it is read before the other instance takes it.
    for method in [Method::POST, Method::GET] {
        for _ in 0..10 {
            let request = client_b.request(method.clone(), &format!("/r/{}/echo", setup.name));
            let request = request.header(TIMEOUT, "3s").body("body");
            let answer = client_b.send(request).await.expect(200);
            assert_eq!(Echo::parse(&answer.body).upstream, "up");
        }
    }
    let log = b.output();
    assert_eq!(log.matches(&address).count(), 1, "{log}");
}

/// An instance listed with the agent that takes the request and never answers (frozen) times out
/// the request it got; for a while after, the name's requests go to the instances that answer
/// first, instead of each waiting out its timeout there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_that_does_not_answer_is_tried_last() {
    let (setup, b) = Setup::with_second_instance().await;
    let frozen = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let address = frozen.local_addr().expect("a bound address").to_string();
    let client_b = b.client();
    list_instance(&client_b, &setup, &address).await;
    let path = format!("/r/{}/echo", setup.name);
    let get = || client_b.send(client_b.request(Method::GET, &path).header(TIMEOUT, "1s"));
    // Each request goes to A or to the frozen instance at random, until one times out there.
    let mut timed_out = false;
    for _ in 0..30 {
        let answer = get().await;
        if answer.status == 504 {
            timed_out = true;
            break;
        }
        assert_eq!(Echo::parse(&answer.expect(200).body).upstream, "up");
    }
    assert!(timed_out, "no request went to the frozen instance");
    for _ in 0..10 {
        let answer = get().await.expect(200);
        assert_eq!(Echo::parse(&answer.body).upstream, "up");
    }
}

/// Two instances on one redis-server: a request whose only agent on B hung up before taking it
/// goes on to the agent of the name on A (so does one with an empty body); one with a body,
/// which B has read, gets 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_lost_before_taken_goes_to_another_instance() {
    use futures_util::StreamExt;
    let (setup, b) = Setup::with_second_instance().await;
    let (client_b, name) = (b.client(), &setup.name);
    let url = format!("{}/agent/connect?name={name}", b.base.replace("http", "ws"));
    let cases = [
        (Method::GET, None, 200),
        (Method::POST, Some(""), 200),
        (Method::POST, Some("x"), 502),
    ];
    for (method, body, status) in cases {
        // B's own agent, preferred to A's: it hangs up at the first request it is sent.
        let (mut vanishing, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("B accepts the agent");
        wait_agents(&client_b, name, 2, WAIT, &[&setup.agent]).await;
        let hangs_up = tokio::spawn(async move {
            while let Some(Ok(message)) = vanishing.next().await {
                if message.into_data().first() == Some(&1) {
                    return true;
                }
            }
            false
        });
        let request = client_b
            .request(method.clone(), "/lost")
            .header(CLIENT_ID, name.as_str());
        let request = match body {
            // reqwest leaves an empty body unannounced.
            Some("") => request.header("Content-Length", "0"),
            Some(body) => request.body(body),
            None => request,
        };
        let response = client_b.send(request).await;
        assert!(hangs_up.await.expect("no panic"), "B's agent got no HEAD");
        assert_eq!(response.status, status, "{method}: {response:?}");
        if status == 200 {
            assert_eq!(Echo::parse(&response.body).uri, "/lost");
            assert_eq!(response.header("x-upstream-id"), Some("up"));
        }
    }
}

/// Two instances on one redis-server: an agent connected to A serves requests arriving at B (both
/// addressing forms, bodies streamed through both instances), and B lists it in `/agents`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_on_another_instance() {
    let (setup, b) = Setup::with_second_instance().await;
    let (client_b, name) = (b.client(), &setup.name);
    let request = client_b
        .request(Method::PUT, "/upload?via=b")
        .header(CLIENT_ID, name.as_str())
        .header("Host", "public.example")
        .body("0123456789".repeat(30_000));
    let response = client_b.send(request).await.expect(200);
    let echo = Echo::parse(&response.body);
    assert_eq!(
        (echo.method.as_str(), echo.uri.as_str()),
        ("PUT", "/upload?via=b")
    );
    assert_eq!(echo.body, "0123456789".repeat(30_000));
    // The upstream learns what the client asked B for, not B's request to A: the client's host,
    // and its address followed by B's, as behind any chain of proxies.
    assert_eq!(echo.one("x-forwarded-host"), "public.example", "{echo:?}");
    assert_eq!(echo.one("x-forwarded-for"), "127.0.0.1, 127.0.0.1");
    assert_eq!(echo.one("x-forwarded-proto"), "http");
    assert!(!echo.has("x-burrow-hop"), "{echo:?}");
    assert_eq!(response.header("x-upstream-id"), Some("up"));
    // A head with more headers than hyper's default (100) crosses the hop whole too.
    let many = raw_answer(&b.base, &format!("/r/{name}/many-headers")).await;
    assert!(many.starts_with("HTTP/1.1 200"), "{many}");
    assert!(many.contains("x-h-149: 149\r\n"), "{many}");
    // B adds nothing of its own to the request (reqwest added `Accept: */*`).
    let plain = raw_answer(&b.base, &format!("/r/{name}/plain")).await;
    assert!(!plain.contains(r#"["accept","#), "{plain}");
    let path_form = client_b
        .get(&format!("/r/{name}/r/rest?q=1"))
        .await
        .expect(200);
    assert_eq!(Echo::parse(&path_form.body).uri, "/r/rest?q=1");
    // A redirect is the upstream's answer for the client, not one for B to follow.
    let redirect = client_b
        .get(&format!("/r/{name}/redirect"))
        .await
        .expect(302);
    let location = redirect.header("location");
    assert_eq!(location, Some("http://127.0.0.1:9/elsewhere"));
    // Over HTTP/2 too (the request's URI is absolute there).
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("an HTTP/2 client builds");
    let response = h2
        .get(format!("{}/r/{name}/over/h2?q=1", b.base))
        .send()
        .await
        .expect("B answers over HTTP/2");
    assert_eq!(response.status(), 200);
    let echo = Echo::parse(&response.bytes().await.expect("a whole body"));
    assert_eq!(echo.uri, "/over/h2?q=1");
    // The host the client asked B for (`:authority`), not B's request to A.
    let b_address = b.base.trim_start_matches("http://");
    assert_eq!(echo.one("x-forwarded-host"), b_address, "{echo:?}");
    // An HTTP/2 body streamed without Content-Length reaches A whole.
    let chunks =
        ["streamed", " over ", "h2"].map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from(c)));
    let streamed = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let response = h2
        .put(format!("{}/r/{name}/h2/upload", b.base))
        .body(streamed)
        .send()
        .await
        .expect("B answers over HTTP/2");
    let echo = Echo::parse(&response.bytes().await.expect("a whole body"));
    assert_eq!(
        (echo.method.as_str(), echo.body.as_str()),
        ("PUT", "streamed over h2")
    );
    // A chunked body that breaks off on the way to B (one chunk, then the client hangs up) is not
    // passed on to A as a whole, shorter one.
    let head =
        format!("PUT /r/{name}/sha256 HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n");
    let one_chunk = b"a\r\n0123456789\r\n".to_vec();
    let (status, _) = raw_request(&b.base, head, one_chunk, false).await;
    assert!(status >= 400, "a broken body was answered {status}");
    // A request already sent on by another instance is served only with local agents: no loops.
    let hopped = client_b
        .request(Method::GET, &format!("/r/{name}/x"))
        .header("x-burrow-hop", "elsewhere");
    client_b.send(hopped).await.expect(422);
    // The relay's own headers reach A even when the client's `Connection` names them, so that A
    // serves the request as B would have: here it would have answered its own 404.
    let listed = client_b
        .request(Method::GET, "/through-b")
        .header(CLIENT_ID, name.as_str())
        .header("Connection", "x-backstream-client-id");
    let listed = client_b.send(listed).await.expect(200);
    assert_eq!(Echo::parse(&listed.body).uri, "/through-b");
    // The client's credential it meant for the first hop only stays there, as on A.
    let own = client_b
        .request(Method::GET, &format!("/r/{name}/own"))
        .header("Authorization", "Bearer for-the-relay-only")
        .header("Connection", "authorization");
    let own = Echo::parse(&client_b.send(own).await.expect(200).body);
    assert!(!own.has("authorization"), "{own:?}");
    // The mark between instances is the relays' own: a service that sends it is answered as sent.
    let forged = client_b.get(&format!("/r/{name}/forged-mark")).await;
    let forged = forged.expect(422);
    assert_eq!(forged.text(), "the service's own 422");
    assert_eq!(forged.header("x-burrow-hop"), None);
    // A client of B that leaves before the answer ends the exchange on A too.
    let mut hanging = setup.upstream.hanging.subscribe();
    let hang = client_b
        .request(Method::GET, &format!("/r/{name}/hang"))
        .header(TIMEOUT, "1h");
    let left = tokio::spawn(hang.send());
    hanging_at(&mut hanging, 1, "the request reaches the upstream").await;
    left.abort();
    hanging_at(&mut hanging, 0, "the upstream request ends with B's client").await;
    no_exchange_left(&setup.client, name, "the exchange on A outlived B's client").await;
    // C has an agent of the same name too. Once A is killed, it stays listed until its record
    // expires, but B's requests without a body (or with an empty one, as browsers send with a
    // bodiless POST) go on to C, whichever record B reads first.
    let redis = crate::support::shared_redis();
    let c = Relay::start(Store::Redis(redis), &[]);
    let c_upstream = Upstream::start("c").await;
    let c_agent = Agent::serve(&c.base, name, &c_upstream.url(), None);
    wait_agents(&client_b, name, 2, WAIT, &[&setup.agent, &c_agent]).await;
    let (a_address, a_port) = (setup.relay.base.replace("http://", ""), setup.relay.port());
    let name = name.clone();
    drop(setup);
    let empty_post = || {
        let request = client_b.request(Method::POST, &format!("/r/{name}/echo"));
        client_b.send(request.header("Content-Length", "0"))
    };
    for _ in 0..10 {
        echo_through(&client_b, &name, "c").await;
        let answer = empty_post().await.expect(200);
        assert_eq!(Echo::parse(&answer.body).upstream, "c");
    }
    // A new relay at A's address (restarted in place) has no agent for A's record, which is still
    // listed: requests sent there go on to C, from B and from the new relay itself.
    let a = Relay::start_on(a_port, Store::Redis(redis), &[]);
    for _ in 0..10 {
        echo_through(&client_b, &name, "c").await;
        echo_through(&a.client(), &name, "c").await;
    }
    // C gone too: only old A's record lists the name, and the new relay at A's address started
    // after it, so that record no longer counts: not connected anywhere, a request with a body
    // too (it used to go to the new A, which refused it after its body was read: 502).
    drop((c, c_agent));
    let gone = format!("connection for clientID='{name}' not found");
    client_b
        .get(&format!("/r/{name}/x"))
        .await
        .expect_error(422, &gone);
    let response = client_b.post(&format!("/r/{name}/x"), "body").await;
    let text = response.expect_one_line_error(422).text();
    assert!(!text.contains(&a_address), "{text}");
}

/// An instance whose store restarted between two rounds of announcements, without persistence,
/// announces its agents again as soon as it is back, not at its next round (5 s after the last):
/// meanwhile other instances would answer 422 for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcing_again_after_a_store_restart() {
    use std::io::BufRead;

    let mut redis = RedisServer::start();
    let a = Relay::start(Store::Redis(&redis), &[]);
    let upstream = Upstream::start("up").await;
    let name = tunnel_id("restart");
    let agent = Agent::serve(&a.base, &name, &upstream.url(), None);
    wait_agents(&a.client(), &name, 1, RECONNECT, &[&agent]).await;
    // Restarted right after a round, so that the next one is about 5 s away.
    let mut monitor = redis.monitor();
    let round = std::iter::from_fn(|| {
        let mut line = String::new();
        monitor.read_line(&mut line).ok().filter(|&read| read > 0)?;
        Some(line)
    })
    .find(|line| line.contains("burrow:instance:"));
    assert!(round.is_some(), "A announces its agents");
    redis.restart();
    let b = Relay::start(Store::Redis(&redis), &[]);
    wait_agents(&b.client(), &name, 1, Duration::from_secs(3), &[&agent]).await;
}

/// An instance that cannot announce its agents (its store is down) says so once, and announces
/// them as soon as the store is back rather than at its next round (every 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcing_through_a_store_outage() {
    let mut redis = RedisServer::start();
    let a = Relay::start(Store::Redis(&redis), &[("RUST_LOG", "info")]);
    let upstream = Upstream::start("up").await;
    redis.stop();
    let name = tunnel_id("outage");
    let agent = Agent::serve(&a.base, &name, &upstream.url(), None);
    let refused = || a.output().contains("cannot announce");
    assert!(wait_until(WAIT, refused), "{}", a.output());
    redis.restart();
    let b = Relay::start(Store::Redis(&redis), &[]);
    wait_agents(&b.client(), &name, 1, Duration::from_secs(3), &[&agent]).await;
    let output = a.output();
    assert_eq!(output.matches("cannot announce").count(), 1, "{output}");
    assert!(output.contains("announced again"), "{output}");
}
