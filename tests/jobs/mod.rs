//! PROTOCOL.md part 2: jobs triggered over HTTP or a WebSocket, done by a worker through the
//! tunnel API, on both stores and across two relay instances.
//!
//! The worker here is the protocol itself (a pending long-poll and a reply), so these tests pin
//! the relay's side; `burrow worker` has tests of its own.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{assert_close_answered, assert_closed_for, shared_redis, tunnel_id};
use crate::support::{let_polls_start, spawn_get};
use crate::support::{Backend, Client};
use crate::support::{RedisServer, Relay, Store, WebSocket};

type Socket = WebSocket;

/// Triggers `fields` on `queue`; asserts the 202 answer and returns the job id.
async fn trigger(api: &Client, queue: &str, fields: Value) -> String {
    let response = api
        .post_typed(
            &format!("/trigger?queue={queue}"),
            "application/json",
            fields.to_string(),
        )
        .await
        .expect(202);
    let job = response.json();
    let id = job["id"].as_str().expect("the job has an id").to_owned();
    assert_eq!(
        response.header("location"),
        Some(format!("/done/{id}").as_str())
    );
    let mut expected = fields;
    expected["id"] = json!(id);
    expected["status"] = json!("Processing");
    assert_eq!(job, expected);
    id
}

/// Takes one job from `queue` as a worker does and replies `(content_type, body)`; returns the
/// job's fields.
async fn work(api: &Client, queue: &str, content_type: &str, body: &str) -> Value {
    let job = api
        .get(&format!("/t/{queue}/poll?pending=30&timeout=10"))
        .await
        .expect(200);
    let msg = job.message_id();
    api.post_typed(
        &format!("/t/{queue}/{msg}/reply"),
        content_type,
        body.to_owned(),
    )
    .await
    .expect(201);
    job.json()
}

/// The JSON of `GET /done/{id}{query}` with status `status`.
async fn done(api: &Client, id: &str, query: &str, status: u16) -> Value {
    api.get(&format!("/done/{id}{query}"))
        .await
        .expect(status)
        .json()
}

/// Trigger, poll while processing, a worker's JSON result, Done once, then Unknown.
async fn trigger_work_and_collect(api: &Client) {
    let queue = tunnel_id("jobs");
    let id = trigger(api, &queue, json!({"text": "hello david"})).await;
    let processing = done(api, &id, "", 200).await;
    assert_eq!(
        processing,
        json!({"id": id, "text": "hello david", "status": "Processing"})
    );
    let fields = work(
        api,
        &queue,
        "application/json",
        r#"{"upper":"HELLO DAVID"}"#,
    )
    .await;
    assert_eq!(fields, json!({"text": "hello david"}));
    let finished = done(api, &id, "", 200).await;
    let expected = json!({"id": id, "text": "hello david", "status": "Done",
        "result": {"upper": "HELLO DAVID"}});
    assert_eq!(finished, expected);
    assert_eq!(
        done(api, &id, "", 404).await,
        json!({"id": id, "status": "Unknown"})
    );
}

/// `?wait=` answers as soon as the worker replies; text results are strings; failures carry the
/// worker's error.
async fn wait_text_and_failure(api: &Client) {
    let queue = tunnel_id("jobs-wait");
    let id = trigger(api, &queue, json!({"n": 1})).await;
    let waiting = {
        let (api, id) = (api.clone(), id.clone());
        tokio::spawn(async move { done(&api, &id, "?wait=10", 200).await })
    };
    work(api, &queue, "text/plain", "plain result").await;
    let replied = Instant::now();
    let finished = waiting.await.expect("the waiting task does not panic");
    assert!(replied.elapsed() < Duration::from_millis(500), "woke late");
    assert_eq!(finished["status"], "Done");
    assert_eq!(finished["result"], "plain result");

    let id = trigger(api, &queue, json!({"n": 2})).await;
    let problem = r#"{"title":"job failed","detail":"exit status 3: boom"}"#;
    work(api, &queue, "application/problem+json", problem).await;
    let failed = done(api, &id, "?wait=1", 200).await;
    assert_eq!(
        failed,
        json!({"id": id, "n": 2, "status": "Failed", "error": "exit status 3: boom"})
    );
}

/// Several `?wait`s on one job: the first to take the result gets it, and the others learn at
/// once that it is gone (404), rather than at the end of their wait.
async fn racing_waits_end_with_the_result(api: &Client) {
    let queue = tunnel_id("jobs-race");
    let id = trigger(api, &queue, json!({"n": 1})).await;
    let waits: Vec<_> = (0..3)
        .map(|_| spawn_get(api, format!("/done/{id}?wait=30")))
        .collect();
    let_polls_start(api, 3).await;
    work(api, &queue, "text/plain", "once").await;
    let mut statuses = Vec::new();
    for wait in waits {
        let (answer, waited) = wait.await.expect("the waiting task does not panic");
        assert!(
            waited < Duration::from_secs(20),
            "waited out its time: {waited:?}"
        );
        statuses.push(answer.status);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 404, 404]);
}

/// Bodies that are not a JSON object are 400; unknown ids 404 `Unknown`; wrong methods 405.
async fn bad_requests(api: &Client) {
    for body in ["not json", "[1,2]", "\"text\"", ""] {
        api.post("/trigger", body).await.expect_one_line_error(400);
    }
    for id in ["jobs.1-0", "nope", "a.b.c"] {
        assert_eq!(
            done(api, id, "", 404).await,
            json!({"id": id, "status": "Unknown"})
        );
    }
    api.get("/trigger").await.expect(405);
    // Browsers ask before a JSON POST or a GET with Authorization: a preflight, no credentials.
    for path in ["/trigger", "/done/jobs.1-0", "/e/topic", "/agents"] {
        let preflight = api
            .request(Method::OPTIONS, path)
            .header("Origin", "https://example.org")
            .header(
                "Access-Control-Request-Headers",
                "authorization, content-type",
            );
        let response = api.send(preflight).await.expect(204);
        assert_eq!(response.header("access-control-allow-origin"), Some("*"));
        assert_eq!(
            response.header("access-control-allow-headers"),
            Some("authorization, content-type"),
            "{path}"
        );
    }
    api.post("/trigger?queue=bad.queue", "{}")
        .await
        .expect_one_line_error(400);
    // A WebSocket handshake needs `Connection: Upgrade`, over HTTP/1.1 (RFC 6455 §4.2.1).
    let handshake = || {
        api.request(Method::GET, "/ws")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
    };
    api.send(handshake()).await.expect_one_line_error(426);
    let http10 = handshake()
        .version(reqwest::Version::HTTP_10)
        .header("Connection", "Upgrade");
    api.send(http10).await.expect_one_line_error(426);
    // One asked for with a key that is no 16-byte nonce is malformed: 400 (§4.2.1).
    let bad_key = api
        .request(Method::GET, "/ws")
        .header("Upgrade", "websocket")
        .header("Connection", "Upgrade")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "short");
    let refused = api.send(bad_key).await.expect_one_line_error(400);
    assert_eq!(
        refused.text().trim_end(),
        "Sec-WebSocket-Key is not 16 bytes in base64"
    );
    api.get("/done/jobs.1-0?wait=soon")
        .await
        .expect_one_line_error(400);
}

/// Opens the jobs WebSocket at `path` (`/ws…`), with `Authorization: Bearer token` if given.
async fn socket(api: &Client, path: &str, token: Option<&str>) -> Socket {
    let url = format!("{}{path}", api.base().replacen("http", "ws", 1));
    let mut request = url.into_client_request().expect("a valid WebSocket URL");
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().expect("a valid header");
        request.headers_mut().insert("Authorization", value);
    }
    let (socket, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the relay accepts the WebSocket");
    assert_eq!(response.status().as_u16(), 101);
    socket
}

/// The next text frame as JSON (pongs and pings skipped), within 10 s.
async fn next_json(socket: &mut Socket) -> Value {
    let read = async {
        loop {
            match socket
                .next()
                .await
                .expect("the socket stays open")
                .expect("a frame")
            {
                Message::Text(text) => return serde_json::from_str(&text).expect("JSON frames"),
                Message::Pong(_) | Message::Ping(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a frame within 10 s")
}

/// Sends `value` as a text frame.
async fn send_json(socket: &mut Socket, value: &Value) {
    socket
        .send(Message::text(value.to_string()))
        .await
        .expect("the socket takes a frame");
}

/// Over a WebSocket: `started` at once, then the result pushed when the worker replies; a bad
/// frame gets an error object and the socket stays usable; pings are answered, and so is Close.
async fn websocket_round_trip(api: &Client) {
    let queue = tunnel_id("ws");
    let mut ws = socket(api, &format!("/ws/0?queue={queue}"), None).await;
    ws.send(Message::Ping("are you there".into()))
        .await
        .expect("ping sent");
    let pong = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    let pong = pong
        .expect("a pong within 5 s")
        .expect("the socket stays open");
    assert_eq!(
        pong.expect("a frame"),
        Message::Pong("are you there".into())
    );
    send_json(&mut ws, &json!(["not", "an", "object"])).await;
    let error = next_json(&mut ws).await;
    assert_eq!(error["status"], "Error");
    assert!(error["error"].as_str().is_some_and(|e| !e.is_empty()));
    send_json(&mut ws, &json!({"text": "over the socket"})).await;
    let started = next_json(&mut ws).await;
    assert_eq!(started["status"], "started");
    let id = started["id"].as_str().expect("an id").to_owned();
    work(api, &queue, "application/json", r#"{"ok":true}"#).await;
    let finished = next_json(&mut ws).await;
    let expected =
        json!({"id": id, "text": "over the socket", "status": "Done", "result": {"ok": true}});
    assert_eq!(finished, expected);
    // The socket took the result before pushing it: the push was the one hand-out.
    assert_eq!(done(api, &id, "", 404).await["status"], "Unknown");
    // Frames sent back to back are answered in the order sent, refusals included.
    for frame in [json!([1]), json!({"n": 1}), json!("x"), json!({"n": 2})] {
        send_json(&mut ws, &frame).await;
    }
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(next_json(&mut ws).await["status"].clone());
    }
    assert_eq!(answers, ["Error", "started", "Error", "started"]);
    assert_close_answered(&mut ws).await;
    // A broken frame (RSV1 set, no extension agreed; masked, as from a client) closes with 1002.
    let broken = [0xc1, 0x80, 1, 2, 3, 4];
    assert_closed_for(&mut socket(api, "/ws", None).await, &broken, 1002).await;
}

/// A job frame sent in the same write as the handshake, before the 101 (which RFC 6455 asks
/// clients to wait for, and some do not), is read like any other, not dropped with the head.
async fn frames_behind_the_handshake_are_read(api: &Client) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;
    let queue = tunnel_id("early");
    let address = api.base().trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&address)
        .await
        .expect("the relay accepts");
    let mut bytes = format!(
        "GET /ws?queue={queue} HTTP/1.1\r\nHost: relay\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .into_bytes();
    // One masked text frame: FIN + text, the mask bit and length, the mask, the masked payload.
    let (job, mask) = (br#"{"early":true}"#, [1u8, 2, 3, 4]);
    bytes.extend([0x81, 0x80 | job.len() as u8]);
    bytes.extend(mask);
    bytes.extend(job.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    tcp.write_all(&bytes).await.expect("sent");
    // The head byte by byte, so that no frame behind it is read with it.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.expect("the head"));
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let plain = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
    let mut ws = Socket::from_raw_socket(plain, Role::Client, None).await;
    assert_eq!(next_json(&mut ws).await["status"], "started");
    let job = api.get(&format!("/t/{queue}")).await.expect(200);
    assert_eq!(job.json(), json!({"early": true}));
}

/// The largest frame a socket may have to push arrives whole: a job of the largest size whose
/// numbers grow when written again, with the largest result of control bytes, each escaped.
async fn largest_frames_are_pushed(api: &Client) {
    let queue = tunnel_id("wsbig");
    let mut ws = socket(api, &format!("/ws?queue={queue}"), None).await;
    // Written short here, as a client may: serde_json would write each in full.
    let job = format!(r#"{{"a":[{}]}}"#, ["9e15"; 26_200].join(","));
    assert!(job.len() <= 131_072, "a job within the default limit");
    ws.send(Message::text(job.clone()))
        .await
        .expect("the job goes out");
    assert_eq!(next_json(&mut ws).await["status"], "started");
    let job: Value = serde_json::from_str(&job).expect("the job is JSON");
    let result = "\u{1}".repeat(131_072);
    work(api, &queue, "text/plain", &result).await;
    let finished = next_json(&mut ws).await;
    assert_eq!(finished["status"], "Done");
    assert_eq!(finished["result"], result.as_str());
    assert_eq!(finished["a"], job["a"]);
}

/// 50 jobs in flight on one socket: each is answered once, with its own result.
async fn many_jobs_on_one_socket(api: &Client) {
    let queue = tunnel_id("ws-many");
    let mut ws = socket(api, &format!("/ws?queue={queue}"), None).await;
    for n in 0..50 {
        send_json(&mut ws, &json!({"n": n})).await;
    }
    let mut started = std::collections::HashMap::new();
    for _ in 0..50 {
        let frame = next_json(&mut ws).await;
        assert_eq!(frame["status"], "started");
        started.insert(frame["id"].as_str().expect("an id").to_owned(), ());
    }
    assert_eq!(started.len(), 50, "every job has an id of its own");
    for _ in 0..50 {
        let job = api
            .get(&format!("/t/{queue}/poll?pending=30&timeout=10"))
            .await
            .expect(200);
        let n = job.json()["n"].as_i64().expect("the job's field");
        let msg = job.message_id();
        let result = json!({"double": n * 2}).to_string();
        api.post_typed(
            &format!("/t/{queue}/{msg}/reply"),
            "application/json",
            result,
        )
        .await
        .expect(201);
    }
    for _ in 0..50 {
        let frame = next_json(&mut ws).await;
        assert_eq!(frame["status"], "Done");
        let id = frame["id"].as_str().expect("an id");
        assert!(
            started.remove(id).is_some(),
            "job {id} answered twice or never started"
        );
        assert_eq!(
            frame["result"]["double"],
            frame["n"].as_i64().expect("n") * 2
        );
    }
    assert!(started.is_empty());
}

/// A socket closed while results arrive loses none: each job's result is either pushed before
/// the relay's Close or left for `/done`.
async fn closing_leaves_results_for_done(api: &Client) {
    const JOBS: usize = 200;
    let queue = tunnel_id("ws-close");
    let mut ws = socket(api, &format!("/ws?queue={queue}"), None).await;
    for n in 0..JOBS {
        send_json(&mut ws, &json!({"n": n})).await;
    }
    let mut ids = Vec::new();
    for _ in 0..JOBS {
        let frame = next_json(&mut ws).await;
        ids.push(frame["id"].as_str().expect("an id").to_owned());
    }
    let mut msgs = Vec::new();
    for _ in 0..JOBS {
        let job = api.get(&format!("/t/{queue}?pending=60")).await.expect(200);
        msgs.push(job.message_id());
    }
    // The results arrive while the client closes.
    let replies: Vec<_> = msgs
        .into_iter()
        .map(|msg| {
            let (api, reply) = (api.clone(), format!("/t/{queue}/{msg}/reply"));
            tokio::spawn(async move { api.post(&reply, "result").await.expect(201) })
        })
        .collect();
    let mut replies = replies.into_iter();
    for reply in replies.by_ref().take(JOBS / 2) {
        reply.await.expect("the reply task does not panic");
    }
    ws.send(Message::Close(None)).await.expect("Close sent");
    for reply in replies {
        reply.await.expect("the reply task does not panic");
    }
    let mut pushed = std::collections::HashSet::new();
    let drained = async {
        while let Some(Ok(frame)) = ws.next().await {
            if let Message::Text(text) = frame {
                let frame: Value = serde_json::from_str(&text).expect("JSON frames");
                assert_eq!(frame["status"], "Done", "{frame}");
                pushed.insert(frame["id"].as_str().expect("an id").to_owned());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), drained)
        .await
        .expect("the socket closes within 10 s");
    for id in ids.iter().filter(|id| !pushed.contains(*id)) {
        let job = done(api, id, "", 200).await;
        assert_eq!(
            (job["status"].as_str(), job["result"].as_str()),
            (Some("Done"), Some("result"))
        );
    }
}

/// A socket whose client stops reading is dropped once a result cannot be written for 30 s, and
/// the result it was writing stays for `/done`: handed out once, to `/done`, not to the socket.
async fn stuck_socket_leaves_its_result_for_done(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_MAX_MESSAGE_SIZE", "16777216")]);
    let api = relay.client();
    let (mut ws, id, result) = stuck_socket(&api).await;
    // Taken while its frame is written: unknown to `/done` until the relay gives up on the socket.
    let collected = given_back(&api, &id, Duration::from_secs(60)).await;
    assert_eq!(
        collected["result"].as_str().map(str::len),
        Some(result.len())
    );
    // What the relay wrote before dropping the socket is no whole frame.
    while let Some(Ok(frame)) = ws.next().await {
        assert!(!frame.is_text(), "the result reached the socket as well");
    }
}

/// A relay stopped while a socket that reads nothing holds a result gives the result back before
/// it exits (it was lost with the relay): another instance answers it through `/done`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_socket_at_shutdown_gives_its_result_back() {
    let big = [("TUNNEL_MAX_MESSAGE_SIZE", "16777216")];
    let stopping = Relay::start(Store::Redis(shared_redis()), &big);
    let (_ws, id, result) = stuck_socket(&stopping.client()).await;
    stopping.signal("TERM");
    let other = Relay::start(Store::Redis(shared_redis()), &big);
    let collected = given_back(&other.client(), &id, Duration::from_secs(10)).await;
    assert_eq!(
        collected["result"].as_str().map(str::len),
        Some(result.len())
    );
}

/// A jobs socket with a 4 KiB receive buffer that reads nothing once its job started, and the id
/// and result of that job, whose frame the relay has begun to write (so it has taken the result).
async fn stuck_socket(api: &Client) -> (Socket, String, String) {
    let queue = tunnel_id("stuck");
    let mut ws = small_socket(api, &queue).await;
    send_json(&mut ws, &json!({"n": 1})).await;
    let id = next_json(&mut ws).await["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let result = "r".repeat(8 << 20);
    work(api, &queue, "text/plain", &result).await;
    // The frame's first bytes arrive once the socket has taken the result.
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = ws.get_ref() else {
        unreachable!("a plain connection")
    };
    tcp.peek(&mut [0; 1]).await.expect("the frame begins");
    (ws, id, result)
}

/// A jobs socket for `queue` with a 4 KiB receive buffer, so that results outgrow every buffer
/// on their way once it stops reading.
async fn small_socket(api: &Client, queue: &str) -> Socket {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF set");
    let address = api
        .base()
        .trim_start_matches("http://")
        .parse()
        .expect("an address");
    let stream = socket.connect(address).await.expect("connected");
    let url = format!("ws://{address}/ws?queue={queue}");
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (ws, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("the relay accepts the WebSocket");
    ws
}

/// Results whose frames were written whole to a socket that stopped reading, but which its
/// client never received (they were still in the kernel's buffers when the relay gave up on the
/// socket, and went with its connection), are given back for `/done` as well, not only the one
/// whose frame was being written (probe AX: 21 of 22 results were lost).
async fn results_queued_for_a_stuck_socket_are_given_back(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_MAX_MESSAGE_SIZE", "16777216")]);
    let api = relay.client();
    let queue = tunnel_id("queued");
    // 8 MiB: twice what the relay's send buffer may grow to, so that its writes stall.
    let (ws, ids, result) = finished_on_small_socket(&api, &queue, 32, 256 << 10).await;
    for id in &ids {
        let collected = given_back(&api, id, Duration::from_secs(60)).await;
        assert_eq!(
            collected["result"].as_str().map(str::len),
            Some(result.len())
        );
    }
    drop(ws);
}

/// Results whose frames wait in the kernel's buffers when the client closes its socket properly
/// (a Close frame, then reading to the end) go either to the client or back to `/done`, never to
/// both (probe AY: given back, they were still delivered by the closing connection). (`/done`
/// cannot tell when the socket has taken them all: it would take those it found first.)
async fn results_in_flight_at_a_close_are_handed_out_once(backend: Backend) {
    let relay = backend.start(&[]);
    let api = relay.client();
    let queue = tunnel_id("closing");
    // 1 MiB: more than the client's buffer, less than the relay's, so that every frame is
    // written while the client reads nothing.
    let (mut ws, ids, _) = finished_on_small_socket(&api, &queue, 16, 64 << 10).await;
    ws.send(Message::Close(None))
        .await
        .expect("the Close goes out");
    let mut received = BTreeSet::new();
    while let Some(Ok(frame)) = ws.next().await {
        if let Message::Text(text) = frame {
            let job: Value = serde_json::from_str(&text).expect("JSON");
            received.insert(job["id"].as_str().expect("an id").to_owned());
        }
    }
    // Given back in the order they were written, after the connection is reset: once the
    // results the client missed are back, one it received would be too.
    let (got, missed): (Vec<&String>, Vec<&String>) =
        ids.iter().partition(|id| received.contains(*id));
    for id in missed {
        given_back(&api, id, Duration::from_secs(10)).await;
    }
    for id in got {
        let status = api.get(&format!("/done/{id}")).await.status;
        assert_eq!(status, 404, "job {id} was received, and given back as well");
    }
}

/// `count` jobs sent on a [`small_socket`] that reads nothing once they started, and finished
/// by a worker with a result of `size` bytes: the socket, the jobs' ids and the result.
async fn finished_on_small_socket(
    api: &Client,
    queue: &str,
    count: u32,
    size: usize,
) -> (Socket, Vec<String>, String) {
    let mut ws = small_socket(api, queue).await;
    let mut ids = Vec::new();
    for n in 0..count {
        send_json(&mut ws, &json!({ "n": n })).await;
        let started = next_json(&mut ws).await;
        ids.push(started["id"].as_str().expect("an id").to_owned());
    }
    let result = "r".repeat(size);
    for _ in &ids {
        work(api, queue, "text/plain", &result).await;
    }
    (ws, ids, result)
}

/// Job `id` as `/done` answers it once its result is given back, within `limit`: until then
/// `/done` knows it not (404).
async fn given_back(api: &Client, id: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let answer = api.get(&format!("/done/{id}")).await;
        if answer.status == 200 {
            let job = answer.json();
            assert_eq!(job["status"], "Done");
            return job;
        }
        assert_eq!(answer.status, 404, "taken, then given back");
        assert!(
            Instant::now() < deadline,
            "the result is back within {limit:?}"
        );
        // Nothing to wait on: the relay gives the result back without telling anyone.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Backpressure applies to jobs (507), and the body limit (413).
async fn limits(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_MAXLEN", "1"), ("TUNNEL_MAX_MESSAGE_SIZE", "64")]);
    let api = relay.client();
    let queue = tunnel_id("full");
    trigger(&api, &queue, json!({"a": 1})).await;
    let full = api
        .post(&format!("/trigger?queue={queue}"), "{}")
        .await
        .expect(507);
    assert_eq!(full.queue_size(), Some(1));
    let big = json!({"pad": "x".repeat(100)}).to_string();
    api.post("/trigger", big.clone()).await.expect(413);
    // Over the WebSocket, too big a job closes it with 1009 and says why.
    let mut ws = socket(&api, "/ws", None).await;
    ws.send(Message::text(big))
        .await
        .expect("the frame goes out");
    let closing = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("an answer within 10 s");
    match closing {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1009);
            assert_eq!(frame.reason.as_str(), "a job is limited to 64 bytes");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// `limit` works on `/trigger` and `/ws` as on a produce: backpressure at that many jobs, none
/// with 0, 400 when it does not parse.
async fn limit_parameter(backend: Backend) {
    let relay = backend.start(&[]);
    let api = relay.client();
    let queue = tunnel_id("limited");
    let limited = format!("/trigger?queue={queue}&limit=2");
    for _ in 0..2 {
        api.post(&limited, "{}").await.expect(202);
    }
    let full = api.post(&limited, "{}").await.expect(507);
    assert_eq!(full.queue_size(), Some(2));
    let unlimited = format!("/trigger?queue={queue}&limit=0");
    api.post(&unlimited, "{}").await.expect(202);
    let bad = format!("/trigger?queue={queue}&limit=abc");
    api.post(&bad, "{}").await.expect_one_line_error(400);
    assert_eq!(api.len(&queue).await, 3);
    // A limit no job could be queued under is refused before the socket opens.
    let over = format!("{}/ws?limit=1001", api.base().replacen("http", "ws", 1));
    match tokio_tungstenite::connect_async(over).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 400);
        }
        other => panic!("expected 400, got {other:?}"),
    }
    let mut ws = socket(&api, &format!("/ws?queue={queue}&limit=3"), None).await;
    ws.send(Message::text("{}"))
        .await
        .expect("the frame goes out");
    let refused = next_json(&mut ws).await;
    assert_eq!(refused["status"], "Error", "{refused}");
    assert_eq!(api.len(&queue).await, 3);
}

/// Jobs waited on over a WebSocket do not depend on the long-poll limit: with
/// `TUNNEL_MAX_POLL_TIMEOUT=0` a waiting job once spun its thread, and the relay stopped answering.
async fn socket_jobs_without_long_polls(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_MAX_POLL_TIMEOUT", "0")]);
    let api = relay.client();
    let queue = tunnel_id("nopoll");
    let mut ws = socket(&api, &format!("/ws?queue={queue}"), None).await;
    send_json(&mut ws, &json!({"n": 1})).await;
    assert_eq!(next_json(&mut ws).await["status"], "started");
    for _ in 0..20 {
        api.get("/health").await.expect(200);
    }
    let job = api.get(&format!("/t/{queue}?pending=60")).await.expect(200);
    let reply = format!("/t/{queue}/{}/reply", job.message_id());
    api.post(&reply, "fine").await.expect(201);
    assert_eq!(next_json(&mut ws).await["result"], "fine");
}

/// A job that leaves its queue without a result (the queue cleared) fails instead of reading
/// Processing until its record expires; its record is then forgotten.
async fn removed_jobs_fail(api: &Client) {
    let queue = tunnel_id("cleared");
    let id = trigger(api, &queue, json!({"n": 1})).await;
    let raced = trigger(api, &queue, json!({"n": 2})).await;
    assert_eq!(done(api, &id, "", 200).await["status"], "Processing");
    api.delete(&format!("/t/{queue}/all")).await.expect(204);
    let failed = done(api, &id, "", 200).await;
    assert_eq!(failed["status"], "Failed", "{failed}");
    assert!(failed["error"]
        .as_str()
        .is_some_and(|e| e.contains("left its queue")));
    assert_eq!(done(api, &id, "", 404).await["status"], "Unknown");
    // Collected by four at once, it fails once; the others find it unknown.
    let collectors: Vec<_> = (0..4)
        .map(|_| {
            let (api, path) = (api.clone(), format!("/done/{raced}"));
            tokio::spawn(async move { api.get(&path).await.status })
        })
        .collect();
    let mut statuses = Vec::new();
    for collector in collectors {
        statuses.push(collector.await.expect("the collector does not panic"));
    }
    statuses.sort();
    assert_eq!(statuses, [200, 404, 404, 404]);
}

/// A job's record outlives `TUNNEL_REPLY_TTL` while the job waits (`BURROW_JOB_TTL`), and once
/// the job is done it is kept as long as the result.
async fn job_records_last_as_long_as_the_job(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_REPLY_TTL", "1"), ("BURROW_JOB_TTL", "600")]);
    let api = relay.client();
    let queue = tunnel_id("slowjob");
    let id = trigger(&api, &queue, json!({"n": 1})).await;
    // Inherent wait: the reply TTL has to pass.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(done(&api, &id, "", 200).await["status"], "Processing");
    work(&api, &queue, "text/plain", "late but done").await;
    let id2 = trigger(&api, &queue, json!({"n": 2})).await;
    work(&api, &queue, "text/plain", "never collected").await;
    assert_eq!(done(&api, &id, "", 200).await["result"], "late but done");
    // Uncollected, the result and the record expire together with the reply TTL.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(done(&api, &id2, "", 404).await["status"], "Unknown");

    // A job that outlived BURROW_JOB_TTL stays unknown, even if a worker replies afterwards; so
    // does one that outlives it while a client waits for it (not Processing at the wait's end).
    let relay = backend.start(&[("BURROW_JOB_TTL", "1")]);
    let api = relay.client();
    let id = trigger(&api, &queue, json!({"n": 3})).await;
    assert_eq!(done(&api, &id, "?wait=2", 404).await["status"], "Unknown");
    let job = api.get(&format!("/t/{queue}?pending=60")).await.expect(200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(done(&api, &id, "", 404).await["status"], "Unknown");
    let reply = format!("/t/{queue}/{}/reply", job.message_id());
    api.post(&reply, "too late").await.expect(201);
    assert_eq!(done(&api, &id, "", 404).await["status"], "Unknown");
}

/// With a token set, /trigger, /done and /ws need it.
async fn auth(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_ACCESS_TOKEN", "tok")]);
    let api = relay.client();
    api.post("/trigger", "{}")
        .await
        .expect_error(403, "Access denied");
    let authorized = api.with_bearer("tok");
    let queue = tunnel_id("auth");
    let id = trigger(&authorized, &queue, json!({})).await;
    api.get(&format!("/done/{id}"))
        .await
        .expect_error(403, "Access denied");
    done(&authorized, &id, "", 200).await;
    let url = format!("{}/ws", api.base().replacen("http", "ws", 1));
    let refused = tokio_tungstenite::connect_async(url).await;
    assert!(refused.is_err(), "a WebSocket without the token is refused");
    let mut ws = socket(&authorized, "/ws", Some("tok")).await;
    send_json(&mut ws, &json!({"x": 1})).await;
    assert_eq!(next_json(&mut ws).await["status"], "started");
}

per_store! {
    shared: [
        trigger_work_and_collect,
        wait_text_and_failure,
        largest_frames_are_pushed,
        racing_waits_end_with_the_result,
        frames_behind_the_handshake_are_read,
        bad_requests,
        websocket_round_trip,
        many_jobs_on_one_socket,
        closing_leaves_results_for_done,
        removed_jobs_fail,
    ],
    dedicated: [
        limits,
        limit_parameter,
        stuck_socket_leaves_its_result_for_done,
        results_queued_for_a_stuck_socket_are_given_back,
        results_in_flight_at_a_close_are_handed_out_once,
        auth,
        socket_jobs_without_long_polls,
        job_records_last_as_long_as_the_job,
    ],
}

/// Two instances on one redis-server: trigger and WebSocket on A, the worker on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_cross_instances() {
    let a = Relay::start(Store::Redis(shared_redis()), &[]);
    let b = Relay::start(Store::Redis(shared_redis()), &[]);
    let (api_a, api_b) = (a.client(), b.client());
    let queue = tunnel_id("cross");
    let mut ws = socket(&api_a, &format!("/ws?queue={queue}"), None).await;
    send_json(&mut ws, &json!({"via": "socket"})).await;
    let id = next_json(&mut ws).await["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let polled = trigger(&api_a, &queue, json!({"via": "http"})).await;
    work(&api_b, &queue, "text/plain", "from b").await;
    let replied = Instant::now();
    let pushed = next_json(&mut ws).await;
    assert!(
        replied.elapsed() < Duration::from_millis(500),
        "the socket woke late"
    );
    assert_eq!(
        (pushed["id"].as_str(), pushed["result"].as_str()),
        (Some(id.as_str()), Some("from b"))
    );
    work(&api_b, &queue, "text/plain", "also from b").await;
    assert_eq!(
        done(&api_a, &polled, "?wait=5", 200).await["result"],
        "also from b"
    );
}

/// A job sent on a socket while the store is down gets an error object that says so in the
/// words an HTTP answer uses, without the store's own message, and the socket stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_hides_store_trouble() {
    let mut redis = RedisServer::start();
    let relay = Relay::start(Store::Redis(&redis), &[]);
    let api = relay.client();
    let mut ws = socket(&api, "/ws", None).await;
    redis.stop();
    for _ in 0..2 {
        send_json(&mut ws, &json!({"n": 1})).await;
        assert_eq!(
            next_json(&mut ws).await,
            json!({"status": "Error", "error": "Store unavailable, retry later"})
        );
    }
}

/// A job's result and its record go in one step: when the store refuses to forget the record
/// (`DEL` denied to the relay's user), `/done` fails and the result stays, handed out once the
/// store allows it. (Taken first and forgotten after, a failure between the two left a record
/// without a result.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_survives_a_failed_forget() {
    let redis = RedisServer::start();
    let user = [
        "ACL", "SETUSER", "relay", "on", ">secret", "~*", "&*", "+@all", "-del",
    ];
    redis.command(&user);
    let url = redis.url().replacen("redis://", "redis://relay:secret@", 1);
    let relay = Relay::start(Store::Redis(&redis), &[("REDIS_URL", &url)]);
    let api = relay.client();
    let queue = tunnel_id("forgetfail");
    let id = trigger(&api, &queue, json!({"n": 1})).await;
    let taken = api.consume(&queue, "?pending").await.expect(200);
    let reply = format!("/t/{queue}/{}/reply", taken.message_id());
    api.post(&reply, "done").await.expect(201);
    api.get(&format!("/done/{id}"))
        .await
        .expect_one_line_error(500);
    redis.command(&["ACL", "SETUSER", "relay", "+del"]);
    let done = api.get(&format!("/done/{id}")).await.expect(200).json();
    assert_eq!(
        (done["status"].as_str(), done["result"].as_str()),
        (Some("Done"), Some("done"))
    );
    assert_eq!(api.get(&format!("/done/{id}")).await.status, 404);
}
