//! PROTOCOL.md part 3, events: `POST /e/{topic}` reaches every server-sent-event and WebSocket
//! subscriber of the topic, on every instance of one store.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{
    assert_close_answered, assert_closed_for, shared_redis, skipped_events, small_window, tunnel_id,
};
use crate::support::{Backend, Client};
use crate::support::{Relay, Store, WebSocket};

/// A server-sent-event subscription, read chunk by chunk.
pub(crate) struct Sse {
    response: reqwest::Response,
    buffered: String,
}

impl Sse {
    /// Subscribes to `topic` and waits for the relay's first comment, so events published after
    /// this returns are delivered.
    pub(crate) async fn open(api: &Client, topic: &str) -> Sse {
        let response = api
            .request(reqwest::Method::GET, &format!("/e/{topic}"))
            .send()
            .await
            .expect("the relay answers");
        assert_eq!(response.status().as_u16(), 200);
        let content_type = response.headers()["content-type"].to_str().expect("ASCII");
        assert_eq!(content_type, "text/event-stream");
        let mut sse = Sse {
            response,
            buffered: String::new(),
        };
        assert_eq!(sse.next_block().await, ": subscribed");
        sse
    }

    /// The next block (up to a blank line), within 5 s.
    async fn next_block(&mut self) -> String {
        let read = async {
            loop {
                if let Some(end) = self.buffered.find("\n\n") {
                    let block = self.buffered[..end].to_owned();
                    self.buffered.drain(..end + 2);
                    return block;
                }
                let chunk = self.response.chunk().await.expect("the stream stays open");
                let chunk = chunk.expect("the stream does not end");
                self.buffered.push_str(&String::from_utf8_lossy(&chunk));
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("an event within 5 s")
    }

    /// The next event's data (its `data:` lines joined by newlines), skipping comments.
    pub(crate) async fn next_event(&mut self) -> String {
        loop {
            let block = self.next_block().await;
            if block.starts_with(':') {
                continue;
            }
            let lines: Vec<&str> = block
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            return lines.join("\n");
        }
    }
}

type Socket = WebSocket;

/// Subscribes to `topic` over a WebSocket.
async fn ws(api: &Client, topic: &str) -> Socket {
    let url = format!("{}/ws/e/{topic}", api.base().replacen("http", "ws", 1));
    let (socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("the relay accepts the WebSocket");
    socket
}

/// The next text frame, within 5 s.
async fn next_text(socket: &mut Socket) -> String {
    let read = async {
        loop {
            match socket.next().await.expect("open").expect("a frame") {
                Message::Text(text) => return text.to_string(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("a frame within 5 s")
}

/// Publishes `body` on `topic`; returns `X-Subscribers`.
async fn publish(api: &Client, topic: &str, body: &str) -> u64 {
    let response = api.post(&format!("/e/{topic}"), body).await.expect(202);
    response
        .header("x-subscribers")
        .expect("X-Subscribers")
        .parse()
        .expect("a count")
}

/// Every SSE and WebSocket subscriber gets each event, multi-line bodies included, and
/// `X-Subscribers` counts them; events of other topics do not leak.
async fn subscribers_get_every_event(api: &Client) {
    let topic = tunnel_id("news");
    let mut sse = Sse::open(api, &topic).await;
    let mut socket = ws(api, &topic).await;
    // The WebSocket is subscribed before its 101 is written: both count from here on.
    assert_eq!(publish(api, &topic, "first").await, 2);
    assert_eq!(sse.next_event().await, "first");
    assert_eq!(next_text(&mut socket).await, "first");
    publish(api, &tunnel_id("other"), "elsewhere").await;
    publish(api, &topic, "two\nlines").await;
    assert_eq!(sse.next_event().await, "two\nlines");
    assert_eq!(next_text(&mut socket).await, "two\nlines");
    drop(sse);
    drop(socket);
    assert_eq!(publish(api, &tunnel_id("empty"), "nobody").await, 0);
}

/// A server-sent-event subscriber that closes its side is let go at once, not at the next
/// keep-alive write 15 s later: its stream ends and `X-Subscribers` no longer counts it.
async fn closed_subscribers_are_let_go(api: &Client) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let topic = tunnel_id("leaving");
    let mut socket = raw_subscriber(api, &format!("GET /e/{topic} HTTP/1.1\r\nHost: relay")).await;
    let mut seen = Vec::new();
    read_until(&mut socket, &mut seen, "subscribed").await;
    assert_eq!(publish(api, &topic, "one").await, 1);
    socket.shutdown().await.expect("the write side closes");
    let ended = async {
        let mut chunk = [0u8; 4096];
        while socket.read(&mut chunk).await.is_ok_and(|n| n > 0) {}
    };
    tokio::time::timeout(Duration::from_secs(5), ended)
        .await
        .expect("the relay ends the stream within 5 s");
    assert_eq!(publish(api, &topic, "anyone?").await, 0);
}

/// A subscriber's Close is answered with a Close (a clean close, not a dropped connection), and a
/// subscriber that sends more than a control frame's worth is closed rather than buffered. A
/// broken frame (RSV1 set, no extension agreed) is closed with 1002, text that is not UTF-8 with
/// 1007.
async fn subscriber_sockets_close_cleanly(api: &Client) {
    let topic = tunnel_id("closing");
    assert_close_answered(&mut ws(api, &topic).await).await;
    // Masked frames, as from a client: FIN + RSV1 + text, empty; then FIN + text, 0xff.
    let broken = [0xc1, 0x80, 1, 2, 3, 4];
    assert_closed_for(&mut ws(api, &topic).await, &broken, 1002).await;
    let not_utf8 = [0x81, 0x81, 0, 0, 0, 0, 0xff];
    assert_closed_for(&mut ws(api, &topic).await, &not_utf8, 1007).await;

    let mut socket = ws(api, &topic).await;
    let sent = socket.send(Message::binary(vec![0u8; 100_000])).await;
    sent.expect("the frame goes out");
    let ended = tokio::time::timeout(Duration::from_secs(5), socket.next()).await;
    match ended.expect("the socket is closed within 5 s") {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1009),
        other => panic!("no Close frame with status 1009: {other:?}"),
    }
}

/// An HTTP/1.0 subscriber, which knows no chunked encoding, gets the event stream as it is, ended
/// by closing the connection (`Connection: close`, no `Transfer-Encoding`).
async fn http10_subscribers_get_a_plain_stream(api: &Client) {
    let topic = tunnel_id("http10");
    let head = format!("GET /e/{topic} HTTP/1.0\r\nConnection: keep-alive");
    let mut socket = raw_subscriber(api, &head).await;
    let mut seen = Vec::new();
    // The head, then the stream's first comment: the subscription is in place.
    read_until(&mut socket, &mut seen, "\r\n\r\n:").await;
    publish(api, &topic, "plain").await;
    read_until(&mut socket, &mut seen, "data: plain\n\n").await;
    let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(body.starts_with(':'), "not the bare stream: {body:?}");
}

/// A raw connection to the relay on which request `head` (without its final blank line) is sent.
async fn raw_subscriber(api: &Client, head: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let address = api.base().trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address)
        .await
        .expect("the relay accepts");
    let request = format!("{head}\r\n\r\n");
    socket.write_all(request.as_bytes()).await.expect("sent");
    socket
}

/// Reads from `socket` into `seen` until it holds `end`, within 5 s.
async fn read_until(socket: &mut tokio::net::TcpStream, seen: &mut Vec<u8>, end: &str) {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(seen).contains(end) {
            let n = socket.read(&mut chunk).await.expect("readable");
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(seen));
            seen.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no {end:?} within 5 s in {:?}",
                String::from_utf8_lossy(seen)
            )
        });
}

/// With a token set, publishing and subscribing need it.
async fn events_need_auth(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_ACCESS_TOKEN", "tok")]);
    let api = relay.client();
    api.post("/e/t", "x")
        .await
        .expect_error(403, "Access denied");
    api.get("/e/t").await.expect_error(403, "Access denied");
    assert_eq!(publish(&api.with_bearer("tok"), "t", "x").await, 0);
}

per_store! {
    shared: [
        subscribers_get_every_event,
        closed_subscribers_are_let_go,
        subscriber_sockets_close_cleanly,
        http10_subscribers_get_a_plain_stream,
    ],
    dedicated: [events_need_auth],
}

/// An SSE subscription to `topic` on a connection with a small window, subscribed (its first
/// comment read), for a test to leave unread.
async fn unread_sse(api: &Client, topic: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut sse = small_window(api).await;
    let request = format!("GET /e/{topic} HTTP/1.1\r\nHost: relay\r\n\r\n");
    sse.write_all(request.as_bytes()).await.expect("sent");
    read_until(&mut sse, &mut Vec::new(), ": subscribed").await;
    sse
}

/// Sends a WebSocket handshake for `path` on `socket` and reads the 101.
async fn handshake(socket: &mut tokio::net::TcpStream, path: &str) {
    use tokio::io::AsyncWriteExt;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).await.expect("sent");
    let mut seen = Vec::new();
    read_until(socket, &mut seen, "\r\n\r\n").await;
    assert!(
        seen.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
}

/// A subscriber that falls more than 256 events behind skips what it missed, and its SSE stream
/// says how many (`: skipped N events`, a comment EventSource ignores), so that a reader can
/// tell a gap from a quiet topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipped_events_are_counted() {
    use tokio::io::AsyncReadExt;
    let api = Backend::Memory.shared().client();
    let topic = tunnel_id("gap");
    let mut sse = unread_sse(&api, &topic).await;
    // 15 MB of events, unread meanwhile: more than the connection's buffers and the 256 events
    // the relay keeps for a subscriber.
    let event = "e".repeat(10_000);
    let published = 1500;
    for _ in 0..published {
        assert_eq!(publish(&api, &topic, &event).await, 1);
    }
    publish(&api, &topic, "last").await;
    let mut seen = Vec::new();
    let read_all = async {
        let mut chunk = vec![0u8; 64 * 1024];
        // Each event is a chunk of its own (the stream is chunked).
        while !seen.ends_with(b"data: last\n\n\r\n") {
            let n = sse.read(&mut chunk).await.expect("readable");
            assert!(n > 0, "the stream ended early");
            seen.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read_all)
        .await
        .expect("the stream within 30 s");
    let text = String::from_utf8_lossy(&seen);
    let skipped = skipped_events(&text);
    let delivered = text.matches(&format!("data: {event}\n")).count() as u64;
    assert!(skipped > 0, "no gap reported");
    assert_eq!(delivered + skipped, published);
}

/// A client that sends pings and reads nothing cannot make the relay queue pongs without end (it
/// once grew by a GiB in seconds): a socket holds one unsent pong at most, on the events and the
/// jobs socket alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_floods_do_not_grow_the_relay() {
    use tokio::io::AsyncWriteExt;
    let relay = Relay::start(Store::Memory, &[]);
    let api = relay.client();
    // Masked pings of 125 bytes, a thousand to a write.
    let ping = [[0x89, 0x80 | 125, 0, 0, 0, 0].as_slice(), &[b'p'; 125]].concat();
    let batch = ping.repeat(1000);
    let before = relay.resident_bytes();
    let mut flooded = Vec::new();
    for path in [format!("/ws/e/{}", tunnel_id("flood")), "/ws".to_owned()] {
        let mut socket = small_window(&api).await;
        handshake(&mut socket, &path).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut sent = 0;
        while sent < 64 << 20 && tokio::time::Instant::now() < deadline {
            // A write that stalls means the relay reads nothing for now: try again.
            match tokio::time::timeout(Duration::from_secs(1), socket.write_all(&batch)).await {
                Ok(Ok(())) => sent += batch.len(),
                Ok(Err(_closed)) => break,
                Err(_) => {}
            }
        }
        flooded.push(socket);
    }
    let grown = relay.resident_bytes().saturating_sub(before);
    assert!(grown < 32 << 20, "the relay grew by {} MiB", grown >> 20);
    drop(flooded);
}

/// Quiet WebSockets, a subscription and a jobs socket, are pinged every 15 s (as the SSE stream
/// gets a comment), so that proxies keep them and a client vanished without closing is noticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_sockets_are_pinged() {
    let api = Backend::Memory.shared().client();
    let jobs = format!("{}/ws", api.base().replacen("http", "ws", 1));
    let (jobs, _) = tokio_tungstenite::connect_async(jobs)
        .await
        .expect("the relay accepts the WebSocket");
    let pinged = |mut socket: Socket| async move {
        let frame = tokio::time::timeout(Duration::from_secs(20), socket.next()).await;
        let frame = frame.expect("a frame within 20 s").expect("open");
        assert!(matches!(frame, Ok(Message::Ping(_))), "{frame:?}");
    };
    let subscription = ws(&api, &tunnel_id("quiet")).await;
    tokio::join!(pinged(subscription), pinged(jobs));
}

/// Subscribers that stop reading are dropped once an event could not be written to them for
/// 30 s (their connections' buffers full), so that they no longer hold the topic's events nor
/// count in `X-Subscribers`; publishers are not slowed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_subscribers_are_dropped() {
    let api = Backend::Memory.shared().client();
    let topic = tunnel_id("stuck");
    let sse = unread_sse(&api, &topic).await;
    let mut ws = small_window(&api).await;
    handshake(&mut ws, &format!("/ws/e/{topic}")).await;
    // 10 MB of events: more than both connections' buffers hold.
    let event = "e".repeat(100_000);
    for _ in 0..100 {
        assert_eq!(publish(&api, &topic, &event).await, 2);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while publish(&api, &topic, "any news?").await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "stuck subscribers still counted after 60 s"
        );
        // Nothing to wait on: the relay drops a stuck subscriber without telling anyone.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop((sse, ws));
}

/// Over h2c a subscriber whose stream stopped taking events (its window used up, never granted
/// again) is dropped as any other, while another stream of its connection goes on reading
/// (probe AZ: what the connection's other streams took kept it for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_h2_stream_is_dropped_while_its_connection_moves() {
    let api = Backend::Memory.shared().client();
    let topic = tunnel_id("h2stall");
    let socket = tokio::net::TcpStream::connect(api.base().trim_start_matches("http://"))
        .await
        .expect("the relay accepts");
    let (mut client, connection) = h2::client::Builder::new()
        .initial_window_size(64 * 1024)
        .initial_connection_window_size(64 << 20)
        .handshake::<_, bytes::Bytes>(socket)
        .await
        .expect("an h2c handshake");
    tokio::spawn(connection);
    let url = format!("{}/e/{topic}", api.base());
    let mut subscribe = || {
        let request = http::Request::get(&url).body(()).expect("a request");
        let (response, _) = client.send_request(request, true).expect("sent");
        response
    };
    let (stalled, moving) = (subscribe(), subscribe());
    let stalled = stalled.await.expect("an answer").into_body();
    let mut moving = moving.await.expect("an answer").into_body();
    let reader = tokio::spawn(async move {
        while let Some(Ok(chunk)) = moving.data().await {
            let _ = moving.flow_control().release_capacity(chunk.len());
        }
    });
    let event = "e".repeat(16 << 10);
    let deadline = std::time::Instant::now() + Duration::from_secs(50);
    let mut both = false;
    loop {
        match publish(&api, &topic, &event).await {
            2 => both = true,
            1 if both => break,
            _ => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a stalled h2 stream still subscribed after 50 s (both subscribed: {both})"
        );
        // Events keep the connection moving; nothing tells when the stream is dropped.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!reader.is_finished(), "the moving stream was dropped too");
    drop(stalled);
}

/// Subscribers on two instances of one redis-server each get every event published on either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_cross_instances() {
    let a = Relay::start(Store::Redis(shared_redis()), &[]);
    let b = Relay::start(Store::Redis(shared_redis()), &[]);
    let (api_a, api_b) = (a.client(), b.client());
    let topic = tunnel_id("fleet");
    let mut sse_a = Sse::open(&api_a, &topic).await;
    let mut sse_b = Sse::open(&api_b, &topic).await;
    let mut ws_a = ws(&api_a, &topic).await;
    let mut ws_b = ws(&api_b, &topic).await;
    assert_eq!(
        publish(&api_a, &topic, "from a").await,
        2,
        "A's own subscribers"
    );
    assert_eq!(
        publish(&api_b, &topic, "from b").await,
        2,
        "B's own subscribers"
    );
    for expected in ["from a", "from b"] {
        assert_eq!(sse_a.next_event().await, expected);
        assert_eq!(sse_b.next_event().await, expected);
        assert_eq!(next_text(&mut ws_a).await, expected);
        assert_eq!(next_text(&mut ws_b).await, expected);
    }
}
