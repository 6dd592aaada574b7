//! The relay core end to end, without Pingora: `serve` on the accepting end of a real TCP loopback
//! WebSocket, the agent's connection handler on the dialling end, and a real HTTP upstream (hyper)
//! behind the agent.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::routing::head::ResponseHead;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame as BodyFrame, Incoming};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use super::frame::{self, Frame, Kind};
use super::*;
use crate::agent::connection::{self, Ended};
use crate::agent::upstream::Upstream;

const MB: usize = 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(10);

// ---- the upstream service ----

/// The byte at `offset` of every generated body: a pattern that a shifted or dropped chunk breaks.
fn pattern(offset: usize) -> u8 {
    (offset % 251) as u8 ^ (offset / 251) as u8
}

fn pattern_chunk(start: usize, len: usize) -> Bytes {
    (start..start + len)
        .map(pattern)
        .collect::<Vec<u8>>()
        .into()
}

fn pattern_hash(len: usize) -> String {
    let mut hash = Sha256::new();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(64 * 1024);
        hash.update(pattern_chunk(at, n));
        at += n;
    }
    hex::encode(hash.finalize())
}

fn query_number(uri: &hyper::Uri, key: &str) -> usize {
    form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

type Body = BoxBody<Bytes, Infallible>;

/// `/echo`: what arrived, as JSON (body as length and SHA-256); `/download?size=N`: N pattern bytes
/// streamed; `/big-head?kb=N`: six headers of N KiB that are not UTF-8 (`/wide-head`: ASCII);
/// `/sleep?ms=N`: answers
/// after N ms; `/teapot`: 418 with a custom header.
async fn upstream_service(
    tag: &'static str,
    request: hyper::Request<Incoming>,
) -> hyper::Response<Body> {
    let uri = request.uri().clone();
    match uri.path() {
        "/echo" => {
            let method = request.method().to_string();
            let headers: Vec<Value> = request
                .headers()
                .iter()
                .map(|(n, v)| json!([n.as_str(), String::from_utf8_lossy(v.as_bytes())]))
                .collect();
            let mut body = request.into_body();
            let mut hash = Sha256::new();
            let mut len = 0;
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    len += data.len();
                    hash.update(&data);
                }
            }
            let answer = json!({
                "tag": tag, "method": method, "uri": uri.to_string(), "headers": headers,
                "len": len, "sha256": hex::encode(hash.finalize()),
            });
            hyper::Response::builder()
                .header("Content-Type", "application/json")
                .body(Full::new(Bytes::from(answer.to_string())).boxed())
                .expect("a valid response")
        }
        "/download" => {
            let size = query_number(&uri, "size");
            let chunks = futures_util::stream::iter((0..size).step_by(64 * 1024).map(move |at| {
                Ok::<_, Infallible>(BodyFrame::data(pattern_chunk(
                    at,
                    (size - at).min(64 * 1024),
                )))
            }));
            hyper::Response::builder()
                .header("Content-Length", size.to_string())
                .body(BodyExt::boxed(StreamBody::new(chunks)))
                .expect("a valid response")
        }
        "/big-head" | "/wide-head" => {
            // Bytes that are not UTF-8 triple in the head's JSON (U+FFFD).
            let byte = if uri.path() == "/big-head" {
                0xff
            } else {
                b'w'
            };
            let value = vec![byte; query_number(&uri, "kb") * 1024];
            let value = hyper::header::HeaderValue::from_bytes(&value).expect("obs-text");
            let mut response = hyper::Response::new(Full::new(Bytes::new()).boxed());
            for n in 0..6 {
                let name = format!("x-big-{n}");
                let name = hyper::header::HeaderName::from_bytes(name.as_bytes()).unwrap();
                response.headers_mut().insert(name, value.clone());
            }
            response
        }
        "/sleep" => {
            tokio::time::sleep(Duration::from_millis(query_number(&uri, "ms") as u64)).await;
            hyper::Response::new(Full::new(Bytes::from_static(b"slept")).boxed())
        }
        _ => hyper::Response::builder()
            .status(418)
            .header("X-Custom", "short and stout")
            .header("Connection", "close")
            .body(Full::new(Bytes::from_static(b"teapot")).boxed())
            .expect("a valid response"),
    }
}

/// Starts an upstream on a free port; answers its base URL.
async fn start_upstream(tag: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| async move {
                    Ok::<_, Infallible>(upstream_service(tag, request).await)
                });
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

// ---- the relay side and agents ----

/// `serve` behind a TCP listener, as the HTTP layer will run it after the upgrade.
struct Relay {
    agents: Agents,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    /// Set to hand over to a new process (SIGQUIT): agents that understand it are sent `MOVE`.
    handover: watch::Sender<bool>,
}

// The handshake callback's error type is tungstenite's, large as it is.
#[allow(clippy::result_large_err)]
async fn start_relay() -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let agents = Agents::new();
    let (shutdown, watching) = watch::channel(false);
    let (handover, handing_over) = watch::channel(false);
    let registry = agents.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (registry, watching) = (registry.clone(), watching.clone());
            let handing_over = handing_over.clone();
            tokio::spawn(async move {
                let (mut name, mut moves) = (String::new(), false);
                let callback =
                    |request: &tokio_tungstenite::tungstenite::handshake::server::Request,
                     response| {
                        let query = request.uri().query().unwrap_or_default();
                        name = query.trim_start_matches("name=").to_owned();
                        moves = request.headers().contains_key(frame::MOVES_HEADER);
                        Ok(response)
                    };
                if let Ok(socket) = tokio_tungstenite::accept_hdr_async(tcp, callback).await {
                    let handover = moves.then_some(handing_over);
                    serve(socket, name, registry, watching, handover).await;
                }
            });
        }
    });
    Relay {
        agents,
        addr,
        shutdown,
        handover,
    }
}

impl Relay {
    /// Waits until `count` agents named `name` are registered.
    async fn wait_for(&self, name: &str, count: usize) {
        let deadline = Instant::now() + TIMEOUT;
        while self
            .agents
            .names()
            .iter()
            .filter(|a| a.name == name)
            .count()
            != count
        {
            assert!(
                Instant::now() < deadline,
                "{count} agents {name} never registered"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn dial(&self, name: &str) -> tokio_tungstenite::WebSocketStream<TcpStream> {
        self.dial_with(name, &[]).await
    }

    /// Dials as agent `name`, sending `headers` with the handshake.
    async fn dial_with(
        &self,
        name: &str,
        headers: &[(&'static str, &'static str)],
    ) -> tokio_tungstenite::WebSocketStream<TcpStream> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let url = format!("ws://{}/agent/connect?name={name}", self.addr);
        let mut request = url.into_client_request().unwrap();
        for (name, value) in headers {
            request
                .headers_mut()
                .insert(*name, http::HeaderValue::from_static(value));
        }
        tokio_tungstenite::client_async(request, tcp)
            .await
            .unwrap()
            .0
    }
}

/// The agent's connection handler, serving `upstream`.
struct Agent {
    drain: watch::Sender<bool>,
    task: JoinHandle<Ended>,
    /// Told when the relay asks the agent to connect again (nobody dials again here).
    redialled: oneshot::Receiver<connection::Redial>,
}

async fn start_agent(relay: &Relay, name: &str, upstream: &str) -> Agent {
    let socket = relay.dial_with(name, &[(frame::MOVES_HEADER, "1")]).await;
    let url = url::Url::parse(upstream).unwrap();
    let upstream = Arc::new(Upstream::new(&url).unwrap());
    let (drain, watching) = watch::channel(false);
    let (redial, redialled) = oneshot::channel();
    let task = tokio::spawn(connection::serve(
        socket,
        upstream,
        watching,
        Duration::from_secs(10),
        redial,
    ));
    Agent {
        drain,
        task,
        redialled,
    }
}

/// A relay with one agent `name` in front of a fresh upstream.
async fn setup(name: &str) -> (Relay, Agent) {
    let relay = start_relay().await;
    let upstream = start_upstream("a").await;
    let agent = start_agent(&relay, name, &upstream).await;
    relay.wait_for(name, 1).await;
    (relay, agent)
}

fn head(method: &str, path: &str, headers: &[(&str, &str)]) -> RequestHead {
    RequestHead {
        method: method.into(),
        path: path.into(),
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        timeout_ms: None,
    }
}

/// Sends a whole request and collects the whole response.
async fn call(
    agents: &Agents,
    name: &str,
    head: RequestHead,
    body: Bytes,
) -> Result<(ResponseHead, Bytes), RouteError> {
    let mut exchange = agents.forward(name, head, TIMEOUT).await?;
    let mut at = 0;
    while at < body.len() {
        let n = (body.len() - at).min(100_000);
        exchange.send(body.slice(at..at + n)).await?;
        at += n;
    }
    exchange.finish().await?;
    let response = exchange.response().await?;
    let mut collected = Vec::new();
    while let Some(chunk) = exchange.next_chunk().await {
        collected.extend_from_slice(&chunk?);
    }
    Ok((response, collected.into()))
}

fn header<'a>(head: &'a ResponseHead, name: &str) -> Option<&'a str> {
    head.headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

// ---- the scenarios ----

/// Method, path, query and headers (hop-by-hop and Host dropped) reach the upstream; status,
/// headers and body come back; presence lists the agent.
#[tokio::test]
async fn request_and_response_cross() {
    let (relay, _agent) = setup("svc").await;
    let headers = [
        ("X-Test", "one"),
        ("x-test", "two"),
        ("Connection", "X-Hop"),
        ("X-Hop", "1"),
        ("Host", "client.example"),
    ];
    let request = head("PUT", "/echo?x=1&y=two%20words", &headers);
    let (response, body) = call(&relay.agents, "svc", request, Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    let seen: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["uri"], "/echo?x=1&y=two%20words");
    assert_eq!(seen["len"], 5);
    let seen_headers = seen["headers"].as_array().unwrap();
    let values = |name: &str| -> Vec<&str> {
        seen_headers
            .iter()
            .filter(|h| h[0] == name)
            .filter_map(|h| h[1].as_str())
            .collect()
    };
    assert_eq!(values("x-test"), ["one", "two"]);
    assert!(values("x-hop").is_empty() && values("connection").is_empty());
    assert!(values("host")[0].starts_with("127.0.0.1:"));

    let (response, body) = call(
        &relay.agents,
        "svc",
        head("GET", "/teapot", &[]),
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 418);
    assert_eq!(header(&response, "x-custom"), Some("short and stout"));
    assert_eq!(header(&response, "connection"), None);
    assert_eq!(&body[..], b"teapot");

    let present = relay.agents.names();
    assert_eq!(present.len(), 1);
    assert_eq!(present[0].name, "svc");
    assert_eq!(present[0].in_flight, 0);
    assert!(
        present[0].connected_since_ms > 0
            && present[0].last_heartbeat_ms >= present[0].connected_since_ms
    );
}

/// A 20 MB upload and a 20 MB download arrive intact (compared by hash).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_bodies() {
    let (relay, _agent) = setup("big").await;
    let size = 20 * MB;
    let upload: Bytes = (0..size).map(pattern).collect::<Vec<u8>>().into();
    let (response, body) = call(&relay.agents, "big", head("POST", "/echo", &[]), upload)
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    let seen: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["len"], size);
    assert_eq!(seen["sha256"], pattern_hash(size));

    let path = format!("/download?size={size}");
    let (response, body) = call(&relay.agents, "big", head("GET", &path, &[]), Bytes::new())
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(
        header(&response, "content-length"),
        Some(size.to_string().as_str())
    );
    assert_eq!(body.len(), size);
    assert_eq!(hex::encode(Sha256::digest(&body)), pattern_hash(size));
}

/// 100 requests at once over one agent connection all get their own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_concurrent_requests() {
    let (relay, _agent) = setup("many").await;
    let calls: Vec<_> = (0..100)
        .map(|i| {
            let agents = relay.agents.clone();
            tokio::spawn(async move {
                let body = Bytes::from(format!("request {i}").repeat(i * 100 + 1));
                let path = format!("/echo?i={i}");
                let (response, answer) =
                    call(&agents, "many", head("POST", &path, &[]), body.clone())
                        .await
                        .unwrap();
                assert_eq!(response.status, 200);
                let seen: Value = serde_json::from_slice(&answer).unwrap();
                assert_eq!(seen["uri"], path);
                assert_eq!(seen["sha256"], hex::encode(Sha256::digest(&body)));
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    assert_eq!(relay.agents.names()[0].in_flight, 0);
}

/// A response body nobody reads holds back only its own stream: another download on the same
/// connection completes, and the unread one still arrives whole afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_consumer_does_not_stall_others() {
    let (relay, _agent) = setup("slow").await;
    let size = 20 * MB;
    let path = format!("/download?size={size}");
    let mut stalled = relay
        .agents
        .forward("slow", head("GET", &path, &[]), TIMEOUT)
        .await
        .unwrap();
    stalled.finish().await.unwrap();
    assert_eq!(stalled.response().await.unwrap().status, 200);
    // Give the agent time to fill the stalled stream's window.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let other = format!("/download?size={}", 5 * MB);
    let (_, body) = tokio::time::timeout(
        TIMEOUT,
        call(
            &relay.agents,
            "slow",
            head("GET", &other, &[]),
            Bytes::new(),
        ),
    )
    .await
    .expect("the other stream was stalled")
    .unwrap();
    assert_eq!(body.len(), 5 * MB);
    assert!(started.elapsed() < Duration::from_secs(5));

    let mut hash = Sha256::new();
    let mut len = 0;
    while let Some(chunk) = stalled.next_chunk().await {
        let chunk = chunk.unwrap();
        len += chunk.len();
        hash.update(&chunk);
    }
    assert_eq!(len, size);
    assert_eq!(hex::encode(hash.finalize()), pattern_hash(size));
}

/// Two agents of one name share the requests.
#[tokio::test]
async fn one_name_many_agents() {
    let relay = start_relay().await;
    let (a, b) = (start_upstream("a").await, start_upstream("b").await);
    let _agents = (
        start_agent(&relay, "pair", &a).await,
        start_agent(&relay, "pair", &b).await,
    );
    relay.wait_for("pair", 2).await;
    let mut tags = Vec::new();
    for _ in 0..10 {
        let (_, body) = call(
            &relay.agents,
            "pair",
            head("GET", "/echo", &[]),
            Bytes::new(),
        )
        .await
        .unwrap();
        let seen: Value = serde_json::from_slice(&body).unwrap();
        tags.push(seen["tag"].as_str().unwrap().to_owned());
    }
    assert!(
        tags.contains(&"a".to_owned()) && tags.contains(&"b".to_owned()),
        "{tags:?}"
    );
}

/// A request sent to an agent that hangs up before taking it is replayed (body included) on
/// another agent of the same name.
#[tokio::test]
async fn retried_when_agent_vanishes_before_taking() {
    let relay = start_relay().await;
    let upstream = start_upstream("real").await;
    let _real = start_agent(&relay, "flaky", &upstream).await;
    // An agent that hangs up as soon as a request arrives.
    let mut vanishing = relay.dial("flaky").await;
    let (got_head, head_seen) = oneshot::channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = vanishing.next().await {
            if let Message::Binary(bytes) = message {
                if Frame::decode(bytes).is_ok_and(|f| f.kind == Kind::Head) {
                    let _ = got_head.send(());
                    let _ = vanishing.close(None).await;
                    return;
                }
            }
        }
    });
    relay.wait_for("flaky", 2).await;
    // Equally idle links take turns, so one of two requests goes to the vanishing agent.
    two_posts_answered_by_real(&relay, "flaky", 200_000).await;
    head_seen.await.expect("the vanishing agent got a request");
    relay.wait_for("flaky", 1).await;
}

/// Two POSTs of `len` bytes to agents `name`, each answered by the upstream tagged "real" with the
/// whole body.
async fn two_posts_answered_by_real(relay: &Relay, name: &str, len: usize) {
    let body: Bytes = (0..len).map(pattern).collect::<Vec<u8>>().into();
    for _ in 0..2 {
        let post = head("POST", "/echo", &[]);
        let (response, answer) = call(&relay.agents, name, post, body.clone()).await.unwrap();
        assert_eq!(response.status, 200);
        let seen: Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(seen["tag"], "real");
        assert_eq!(seen["sha256"], pattern_hash(len));
    }
}

/// An agent that has sent no frame for a second since it was sent a request (frozen, say) is
/// passed over while another agent of the name answers; it would otherwise get its share of
/// requests, each timing out, until its heartbeat expires (30 s). Pongs are no answer.
#[tokio::test]
async fn silent_agent_is_passed_over() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let relay = start_relay().await;
    // Connected, reading nothing from now on, and sending pongs (its heartbeat runs on).
    let mut frozen = relay.dial("frozen").await;
    relay.wait_for("frozen", 1).await;
    let _pongs = tokio::spawn(async move {
        while frozen.send(Message::Pong(Bytes::new())).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // `GET /echo` to "frozen", answered within 1.5 s.
    let get = || async {
        let short = Duration::from_millis(1500);
        let head = head("GET", "/echo", &[]);
        let mut exchange = relay.agents.forward("frozen", head, short).await.unwrap();
        exchange.finish().await.unwrap();
        let status = exchange.response().await.map(|head| head.status);
        while let Some(chunk) = exchange.next_chunk().await {
            chunk.unwrap();
        }
        // Over, the exchange leaves its agent with no request in flight.
        status
    };
    assert_eq!(get().await, Err(RouteError::Timeout));

    let upstream = start_upstream("real").await;
    let _real = start_agent(&relay, "frozen", &upstream).await;
    relay.wait_for("frozen", 2).await;
    for _ in 0..6 {
        assert_eq!(get().await, Ok(200));
    }
}

/// An agent that has answered no request for 30 s, though it sends pongs, is let go while a
/// request waits for it: its name is free for others, and a `burrow agent` stuck so reconnects.
/// One whose unanswered request is over (reset before a sound agent could acknowledge it, say)
/// stays.
#[tokio::test]
async fn unanswering_agent_is_let_go() {
    let relay = start_relay().await;
    let (_idle, _idle_pongs) = mute_agent(&relay, "idle").await;
    let short = Duration::from_millis(1500);
    let mut over = relay
        .agents
        .forward("idle", head("GET", "/", &[]), short)
        .await
        .unwrap();
    over.finish().await.unwrap();
    assert_eq!(over.response().await.err(), Some(RouteError::Timeout));
    drop(over);

    let (mut mute, _pongs) = mute_agent(&relay, "mute").await;
    let long = Duration::from_secs(60);
    let mut waiting = relay
        .agents
        .forward("mute", head("GET", "/", &[]), long)
        .await
        .unwrap();
    waiting.finish().await.unwrap();
    // Read (pings, the request's frames) until the relay closes the connection.
    let limit = HEARTBEAT_TIMEOUT + Duration::from_secs(5);
    let closed = tokio::time::timeout(limit, async {
        while let Some(Ok(message)) = mute.next().await {
            if let Message::Close(_) = message {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the mute agent is still connected");
    relay.wait_for("mute", 0).await;
    // "idle" went unanswered 1.5 s longer than "mute", with no request waiting.
    relay.wait_for("idle", 1).await;
}

/// Dials as agent `name` that answers no request but sends a pong every 100 ms; answers its
/// reading half and the task sending the pongs.
async fn mute_agent(
    relay: &Relay,
    name: &str,
) -> (
    futures_util::stream::SplitStream<tokio_tungstenite::WebSocketStream<TcpStream>>,
    JoinHandle<()>,
) {
    use futures_util::SinkExt;
    let (mut pongs, reading) = relay.dial(name).await.split();
    relay.wait_for(name, 1).await;
    let sending = tokio::spawn(async move {
        while pongs.send(Message::Pong(Bytes::new())).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (reading, sending)
}

/// No agent of that name: `NoAgent`, with the message backstream gives.
#[tokio::test]
async fn no_agent() {
    let (relay, _agent) = setup("here").await;
    let err = relay
        .agents
        .forward("absent", head("GET", "/", &[]), TIMEOUT)
        .await
        .err()
        .unwrap();
    assert_eq!(err, RouteError::NoAgent("absent".into()));
    assert_eq!(
        err.to_string(),
        "connection for clientID='absent' not found"
    );
}

/// No response head within the timeout: `Timeout`, and the stream is reset at the agent.
#[tokio::test]
async fn timeout() {
    let (relay, _agent) = setup("late").await;
    let started = Instant::now();
    let mut exchange = relay
        .agents
        .forward(
            "late",
            head("GET", "/sleep?ms=5000", &[]),
            Duration::from_millis(300),
        )
        .await
        .unwrap();
    exchange.finish().await.unwrap();
    assert_eq!(exchange.response().await.err(), Some(RouteError::Timeout));
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(exchange);
    let deadline = Instant::now() + TIMEOUT;
    while relay.agents.names()[0].in_flight != 0 {
        assert!(
            Instant::now() < deadline,
            "the timed-out stream stayed open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An agent that cannot reach its upstream refuses the request before taking it: with no other
/// agent of the name, the request is not taken, for the reason the agent gave.
#[tokio::test]
async fn upstream_unreachable() {
    let relay = start_relay().await;
    let _agent = start_agent(&relay, "down", &closed_upstream().await).await;
    relay.wait_for("down", 1).await;
    let err = call(&relay.agents, "down", head("GET", "/", &[]), Bytes::new())
        .await
        .err();
    let Some(RouteError::NotTaken(reason)) = err else {
        panic!("{err:?}");
    };
    assert!(reason.starts_with("upstream unreachable: "), "{reason}");
}

/// Of two agents of one name, the one that cannot reach its upstream refuses what it is sent,
/// which the other answers (bodies replayed); and for a second after a refusal it is picked
/// after the other, so most requests do not go its way first.
#[tokio::test]
async fn agent_with_unreachable_upstream_is_passed_over() {
    let relay = start_relay().await;
    let upstream = start_upstream("real").await;
    let _down = start_agent(&relay, "pair", &closed_upstream().await).await;
    let _real = start_agent(&relay, "pair", &upstream).await;
    relay.wait_for("pair", 2).await;
    // Equally idle links take turns, so one of two requests goes to the refusing agent first.
    two_posts_answered_by_real(&relay, "pair", 100_000).await;
    let first = relay.agents.pick("pair", &[]).unwrap();
    let second = relay.agents.pick("pair", &[first.id]).unwrap();
    assert!(!first.refusing() && second.refusing());
    for _ in 0..4 {
        assert_eq!(relay.agents.pick("pair", &[]).unwrap().id, first.id);
    }
}

/// An agent whose upstream cannot be connected to (SYNs dropped) refuses a request within half
/// the time the relay waits for it, so another agent of the name answers it in time; with only
/// its own connect timeout (5 s), the relay's 2 s would run out first.
#[tokio::test]
async fn agent_refuses_in_time_when_connecting_hangs() {
    let relay = start_relay().await;
    let upstream = start_upstream("real").await;
    let (hole, _held) = black_hole().await;
    let _stuck = start_agent(&relay, "pair", &hole).await;
    let _real = start_agent(&relay, "pair", &upstream).await;
    relay.wait_for("pair", 2).await;
    // Equally idle links take turns, so one of two requests goes to the stuck agent first.
    for _ in 0..2 {
        let mut exchange = relay
            .agents
            .forward("pair", head("GET", "/echo", &[]), Duration::from_secs(2))
            .await
            .unwrap();
        exchange.finish().await.unwrap();
        assert_eq!(exchange.response().await.map(|head| head.status), Ok(200));
        let mut body = Vec::new();
        while let Some(chunk) = exchange.next_chunk().await {
            body.extend_from_slice(&chunk.unwrap());
        }
        let seen: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["tag"], "real");
    }
}

/// An `http://` URL where connecting hangs, as behind a firewall that drops SYNs: a listener
/// whose accept queue is full. It lasts as long as the connections returned with it.
async fn black_hole() -> (String, (TcpListener, Vec<TcpStream>)) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let address = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    loop {
        let connecting = TcpStream::connect(address);
        match tokio::time::timeout(Duration::from_millis(300), connecting).await {
            Ok(stream) => queued.push(stream.unwrap()),
            Err(_) => return (format!("http://{address}"), (listener, queued)),
        }
    }
}

/// An `http://` URL where nothing listens.
async fn closed_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

/// A draining agent says GOAWAY (no new requests reach it), finishes the request in flight, and
/// its connection ends as drained.
#[tokio::test]
async fn agent_drains() {
    let (relay, agent) = setup("drain").await;
    let agents = relay.agents.clone();
    let in_flight = tokio::spawn(async move {
        call(
            &agents,
            "drain",
            head("GET", "/sleep?ms=500", &[]),
            Bytes::new(),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    agent.drain.send_replace(true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = relay
        .agents
        .forward("drain", head("GET", "/", &[]), TIMEOUT)
        .await
        .err();
    assert_eq!(refused, Some(RouteError::NoAgent("drain".into())));
    let (response, body) = in_flight.await.unwrap().unwrap();
    assert_eq!((response.status, &body[..]), (200, &b"slept"[..]));
    assert_eq!(agent.task.await.unwrap(), Ended::Drained);
    relay.wait_for("drain", 0).await;
}

/// At a hand-over (SIGQUIT) the relay sends `MOVE` to the agents that said they understand it,
/// and to no other (an unknown frame type would end their connection). The agent is told to
/// connect again, and its connection goes on taking requests until the shutdown that follows.
#[tokio::test]
async fn handover_moves_the_agents_that_understand_it() {
    let (relay, mut agent) = setup("moving").await;
    let mut older = relay.dial("older").await;
    relay.wait_for("older", 1).await;
    relay.handover.send_replace(true);
    let told = tokio::time::timeout(TIMEOUT, &mut agent.redialled).await;
    assert_eq!(
        told.ok().and_then(Result::ok),
        Some(connection::Redial::Moving)
    );
    let (response, _) = call(
        &relay.agents,
        "moving",
        head("GET", "/teapot", &[]),
        Bytes::new(),
    )
    .await
    .expect("the moved connection still serves");
    assert_eq!(response.status, 418);
    relay.shutdown.send_replace(true);
    let first = loop {
        match older.next().await {
            Some(Ok(Message::Binary(bytes))) => break bytes,
            Some(Ok(_)) => continue,
            other => panic!("the older agent's connection ended: {other:?}"),
        }
    };
    assert_eq!(&first[..], [Kind::GoAway as u8, 0, 0, 0, 0]);
    let ended = tokio::time::timeout(TIMEOUT, agent.task).await;
    assert!(matches!(ended, Ok(Ok(Ended::Lost(_)))), "{ended:?}");
}

/// Dropping an exchange mid-response resets the stream; the link stays usable.
#[tokio::test]
async fn dropped_exchange_resets() {
    let (relay, _agent) = setup("drop").await;
    let path = format!("/download?size={}", 10 * MB);
    let mut exchange = relay
        .agents
        .forward("drop", head("GET", &path, &[]), TIMEOUT)
        .await
        .unwrap();
    exchange.finish().await.unwrap();
    exchange.response().await.unwrap();
    let _ = exchange.next_chunk().await;
    drop(exchange);
    let (response, _) = call(
        &relay.agents,
        "drop",
        head("GET", "/teapot", &[]),
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 418);
    let deadline = Instant::now() + TIMEOUT;
    while relay.agents.names()[0].in_flight != 0 {
        assert!(Instant::now() < deadline, "the dropped stream stayed open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An agent may send one `RESPONSE` and one `END` per stream, and `DATA` within its window: a
/// repeated frame resets the stream (its inbox once grew without bound on a stalled client), and
/// empty `DATA` frames are dropped. The link stays up for the next request.
#[tokio::test]
async fn repeated_frames_reset_the_stream() {
    use futures_util::SinkExt;
    let relay = start_relay().await;
    let mut agent = relay.dial("repeats").await;
    relay.wait_for("repeats", 1).await;
    let answer = ResponseHead {
        status: 200,
        headers: Vec::new(),
    };
    let answer = Bytes::from(serde_json::to_vec(&answer).unwrap());
    for repeated in [Kind::Response, Kind::End] {
        let agents = relay.agents.clone();
        let client = tokio::spawn(async move {
            let mut exchange = agents
                .forward("repeats", head("GET", "/", &[]), TIMEOUT)
                .await
                .unwrap();
            exchange.finish().await.unwrap();
            exchange.response().await.unwrap();
            let mut chunks = Vec::new();
            while let Some(chunk) = exchange.next_chunk().await {
                chunks.push(chunk);
            }
            chunks
        });
        let stream = loop {
            let message = agent.next().await.unwrap().unwrap();
            if let Message::Binary(bytes) = message {
                let frame = Frame::decode(bytes).unwrap();
                if frame.kind == Kind::Head {
                    break frame.stream;
                }
            }
        };
        let mut frames = vec![Frame::new(Kind::Response, stream, answer.clone())];
        frames.extend((0..3).map(|_| Frame::new(Kind::Data, stream, Bytes::new())));
        frames.push(Frame::new(Kind::Data, stream, Bytes::from_static(b"body")));
        if repeated == Kind::End {
            frames.push(Frame::new(Kind::End, stream, Bytes::new()));
        }
        frames.push(Frame::new(repeated, stream, answer.clone()));
        for frame in frames {
            agent.send(Message::Binary(frame.encode())).await.unwrap();
        }
        let reset = async {
            loop {
                let message = agent.next().await.unwrap().unwrap();
                if let Message::Binary(bytes) = message {
                    let frame = Frame::decode(bytes).unwrap();
                    if frame.kind == Kind::Reset && frame.stream == stream {
                        return frame.reason();
                    }
                }
            }
        };
        let reset = tokio::time::timeout(TIMEOUT, reset).await.expect("a RESET");
        let expected = match repeated {
            Kind::Response => "RESPONSE sent twice",
            _ => "END sent twice",
        };
        assert_eq!(reset, expected);
        let chunks = client.await.unwrap();
        assert_eq!(
            chunks[0].as_deref().ok(),
            Some(b"body".as_slice()),
            "{chunks:?}"
        );
    }
}

/// The agent refuses a path that would climb out of its upstream's path (400), however encoded.
#[tokio::test]
async fn dot_segments_are_refused() {
    let (relay, _agent) = setup("dots").await;
    for path in ["/../echo", "/a/%2e%2e/echo", "/a\\..\\echo", "/a/..;/echo"] {
        let (response, body) = call(&relay.agents, "dots", head("GET", path, &[]), Bytes::new())
            .await
            .unwrap();
        assert_eq!(response.status, 400, "{path}");
        assert!(String::from_utf8_lossy(&body).contains("`..`"), "{path}");
    }
}

/// An upstream head too big for one frame is a 502 for its request alone: it once cost the relay
/// the whole connection, and every other request on it.
#[tokio::test]
async fn oversized_response_head_fails_alone() {
    let (relay, _agent) = setup("big-head").await;
    let big = head("GET", "/big-head?kb=60", &[]);
    let (response, body) = call(&relay.agents, "big-head", big, Bytes::new())
        .await
        .unwrap();
    assert_eq!(response.status, 502);
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.starts_with("agent failed: upstream response head too large"),
        "{body}"
    );
    // Under the frame's size, a head passes, also past hyper's adaptive ~400 KB (it once passed
    // or failed at random between the two).
    let wide = head("GET", "/wide-head?kb=120", &[]);
    let (response, _) = call(&relay.agents, "big-head", wide, Bytes::new())
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    let wide = response
        .headers
        .iter()
        .filter(|(name, value)| name.starts_with("x-big-") && value.len() == 120 * 1024);
    assert_eq!(wide.count(), 6);
    let (response, _) = call(
        &relay.agents,
        "big-head",
        head("GET", "/teapot", &[]),
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 418);
}
