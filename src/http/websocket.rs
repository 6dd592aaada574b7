//! The relay's WebSockets, framed by tungstenite over Pingora's upgraded stream:
//! - jobs (`/ws[/{tag}]`): each text frame a client sends is a job; the relay answers
//!   `{"id", "status": "started"}` at once and pushes the job's final state on the same socket when
//!   a worker finishes it. Many jobs may be in flight per socket. A waiting job holds no store
//!   connection: it waits on the same wake-ups as a long-poll;
//! - events (`/ws/e/{topic}`): every event published on the topic, pushed as a frame;
//! - agents (`/agent/connect`): the handshake and the socket's settings; `routing` carries it.

use std::collections::VecDeque;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use pingora_core::protocols::Stream;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::error::Error;
use crate::events::{Received, Subscription};
use crate::jobs::{Collected, JobId, JobState, Jobs};
use crate::metrics::{Open, Opened};
use crate::routing::frame::MAX_MESSAGE;
use crate::tunnel::{stopping, Limit, Shutdown, TunnelId};

use super::app::log_store_failure;
use super::response::{client_text, Response};
use super::watched::{unless_stalled, Progress, Socket, Watched};
use super::KEEPALIVE;

/// The largest frame an event subscriber may send (it has nothing to say beyond pings).
const SUBSCRIBER_FRAME_LIMIT: usize = 4096;

/// Room in a socket's write buffer beyond its largest frame: a frame head and a few queued
/// control frames (pongs, a Close).
const CONTROL_ROOM: usize = 4096;

/// How much a client's socket reads at a time, allocated up front for each socket. Subscribers
/// and job clients send little: tungstenite's default (128 KiB) made most of what each idle
/// socket cost, and 8 KiB still a third of it; a bigger frame takes more reads.
const READ_BUFFER: usize = 2 * 1024;

/// The same for an agent's link. The default made three quarters of an idle link (165 KiB);
/// 16 KiB reads about one frame of body (`DATA_PIECE`) at a time: 4 KiB reads cost downloads
/// ~20 % more relay CPU (docs/PERFORMANCE.md "Session 25").
const AGENT_READ_BUFFER: usize = 16 * 1024;

/// How much of an agent's link's frames are gathered before a write to its socket. The buffer
/// keeps the room it once took for the link's life: with tungstenite's default (128 KiB), a
/// link that once carried a request body held 256 KiB more from then on. Small frames batched
/// for one flush (a few hundred bytes per request) still go out in one write.
const AGENT_WRITE_BUFFER: usize = 16 * 1024;

/// How much bigger than the largest message a job's JSON frame may be: its result, escaped, up
/// to six times (control bytes are written `\u0001`), and its fields, written again, up to four
/// and a half times (`9e15` is written `9000000000000000.0`).
const JOB_FRAME_GROWTH: usize = 11;

/// How long to wait before asking the store again after it failed while a job was waited on.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long a closing jobs socket waits at most for its client to acknowledge the results
/// written to it ([`Unconfirmed::settle`]).
const SETTLE_MOST: Duration = Duration::from_secs(2);

/// How long a client acknowledging nothing more counts as having stopped reading: longer than
/// a delayed ACK (40 ms on Linux, 200 ms at most).
const SETTLE_STILL: Duration = Duration::from_millis(250);

/// How often a closing socket looks at what its client acknowledged.
const SETTLE_LOOK: Duration = Duration::from_millis(10);

/// How long a job is waited on before checking that it may still finish (not collected through
/// `/done`, not expired, still in its queue).
const JOB_WAIT_SLICE: Duration = Duration::from_secs(30);

/// What a WebSocket handshake request says (RFC 6455 §4.2.1).
pub struct Handshake<'a> {
    /// Whether it is HTTP/1.1: HTTP/1.0 cannot upgrade a connection.
    pub http11: bool,
    /// Every `Connection` header value.
    pub connection: Vec<&'a [u8]>,
    /// Every `Upgrade` header value.
    pub upgrade: Vec<&'a [u8]>,
    /// `Sec-WebSocket-Version`.
    pub version: Option<&'a [u8]>,
    /// `Sec-WebSocket-Key`.
    pub key: Option<&'a [u8]>,
}

/// Whether a comma-separated header's `values` list `token` (for `Upgrade`, a protocol with any
/// version: `websocket/13`).
fn lists(values: &[&[u8]], token: &str) -> bool {
    values
        .iter()
        .flat_map(|value| value.split(|&b| b == b','))
        .map(|item| item.split(|&b| b == b'/').next().unwrap_or_default())
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The `101 Switching Protocols` answer to a valid handshake (RFC 6455 §4.2).
pub fn accept(handshake: &Handshake<'_>) -> Result<Response, Error> {
    if !handshake.http11 {
        return Err(Error::NotWebSocket("WebSockets need HTTP/1.1"));
    }
    if !lists(&handshake.upgrade, "websocket") {
        return Err(Error::NotWebSocket("no `Upgrade: websocket` header"));
    }
    if !lists(&handshake.connection, "upgrade") {
        return Err(Error::NotWebSocket("no `Connection: Upgrade` header"));
    }
    let (version, key) = (handshake.version, handshake.key);
    if version != Some(b"13".as_slice()) {
        return Err(Error::NotWebSocket(
            "only Sec-WebSocket-Version 13 is spoken",
        ));
    }
    // An upgrade asked for with a broken handshake is malformed (RFC 6455 §4.2.1: 400), not one
    // that was never asked for (426).
    let key = key.ok_or(Error::BadHandshake("no Sec-WebSocket-Key header"))?;
    // A nonce of 16 bytes in base64 (RFC 6455 §4.1): anything else is no WebSocket client.
    let nonce = base64::engine::general_purpose::STANDARD.decode(key.trim_ascii());
    if nonce.map_or(true, |nonce| nonce.len() != 16) {
        return Err(Error::BadHandshake(
            "Sec-WebSocket-Key is not 16 bytes in base64",
        ));
    }
    Ok(Response::empty(101)
        .header("Upgrade", "websocket")
        .header("Connection", "Upgrade")
        .header("Sec-WebSocket-Accept", derive_accept_key(key)))
}

/// Serves one upgraded jobs connection until the client closes it or the relay shuts down.
///
/// A job's result is taken from the store when its frame is about to be written, and given back
/// if the frame cannot be written (the client read nothing for [`super::SEND_TIMEOUT`]), or was
/// written but not acknowledged by the client's TCP stack when the socket ends
/// ([`Unconfirmed`]): the tasks waiting for jobs only learn that one has finished. A socket that
/// closes, resets or stops reading, or a relay that stops, while results arrive leaves them for
/// `/done` instead of dropping them.
pub async fn serve_jobs(
    stream: Stream,
    jobs: Jobs,
    (queue, limit): (TunnelId, Limit),
    max_message: usize,
    mut shutdown: Shutdown,
) {
    let _open = Opened::start(Open::JobSocket);
    let config = settings(max_message, max_message.saturating_mul(JOB_FRAME_GROWTH));
    let socket = Socket::of_stream(&stream);
    let mut unconfirmed = Unconfirmed::on(socket.clone());
    let (mut outgoing, mut incoming) = Pusher::open(stream, socket, config).await;
    let mut keepalive = keepalive();
    let (finished, mut done) = mpsc::unbounded_channel::<JobId>();
    let mut waiters = Waiters {
        tasks: JoinSet::new(),
        finished,
        jobs: jobs.clone(),
        shutdown: shutdown.clone(),
    };
    loop {
        // As in an agent's link: a client sending tiny frames without end must not keep the
        // thread (see `routing::link`).
        tokio::task::coop::consume_budget().await;
        let reply = tokio::select! {
            frame = incoming.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let body = Bytes::copy_from_slice(text.as_bytes());
                    match jobs.trigger(&queue, body, limit).await {
                        Ok(job) => {
                            waiters.wait(job.id.clone(), Duration::ZERO);
                            json!({"id": job.id.to_string(), "status": "started"})
                        }
                        Err(e) => {
                            if let Error::Store(store) = &e {
                                log_store_failure("job socket", store);
                            }
                            json!({"status": "Error", "error": client_text(&e)})
                        }
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    json!({"status": "Error", "error": "send each job as a text frame holding a JSON object"})
                }
                // Pings are answered by tungstenite itself; pongs and raw frames need nothing.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                // Too big a job: the client learns why the socket closes (1009, RFC 6455 §7.4.1).
                Some(Err(WsError::Capacity(_))) => {
                    let why = format!("a job is limited to {max_message} bytes");
                    let frame = CloseFrame { code: CloseCode::Size, reason: why.into() };
                    let _ = outgoing.send(Message::Close(Some(frame))).await;
                    break;
                }
                ended => {
                    close_after(&mut outgoing.outgoing, ended).await;
                    break;
                }
            },
            Some(id) = done.recv() => match jobs.collect(&id, None, &mut shutdown.clone()).await {
                Ok(Some(collected)) if collected.job.state != JobState::Processing => {
                    // Taken before its frame is written, so that it is handed out once; a frame
                    // that cannot be written, or is still being written when the relay stops,
                    // leaves it for `/done`.
                    let mut stops = shutdown.clone();
                    let pushed = tokio::select! {
                        pushed = outgoing.send_text(collected.job.to_json()) => pushed,
                        () = stopping(&mut stops) => false,
                    };
                    if !pushed {
                        give_back(&jobs, collected).await;
                        break;
                    }
                    unconfirmed.pushed(collected);
                    continue;
                }
                Ok(None) => json!({"id": id.to_string(), "status": "Unknown"}),
                // Not finished after all, or the store failed: wait again.
                Ok(Some(_)) => {
                    waiters.wait(id, Duration::ZERO);
                    continue;
                }
                Err(e) => {
                    log::debug!("collecting job {id}: {e}");
                    waiters.wait(id, RETRY_AFTER);
                    continue;
                }
            },
            Some(_) = waiters.tasks.join_next() => continue,
            _ = keepalive.tick() => {
                unconfirmed.confirm();
                if !outgoing.send(Message::Ping(Bytes::new())).await {
                    break;
                }
                continue;
            }
            _ = shutdown.changed() => {
                let _ = outgoing.send(going_away()).await;
                break;
            }
        };
        if !outgoing.send_text(reply).await {
            break;
        }
    }
    unconfirmed.settle().await;
    // SAFETY: the connection is still open: its halves are dropped only below.
    let unacknowledged = unsafe { unconfirmed.unacknowledged() };
    drop((outgoing, incoming));
    for collected in unacknowledged {
        give_back(&jobs, collected).await;
    }
}

/// Gives a result back to the store, for `/done`.
async fn give_back(jobs: &Jobs, collected: Collected) {
    let id = collected.job.id.clone();
    if let Err(e) = jobs.give_back(collected).await {
        log::warn!("job {id}: a result the socket could not deliver is lost: {e}");
    }
}

/// Results written to a jobs socket that its client's TCP stack has not acknowledged yet. The
/// kernel still holds them for the client; were the connection to close now (the client let go
/// for reading nothing, or gone), they would be lost with it, so they are given back instead.
/// Where the system does not tell what was acknowledged, a result written counts as delivered.
struct Unconfirmed {
    socket: Socket,
    /// Each result with the connection's byte count at the end of its frame, oldest first.
    pushed: VecDeque<(u64, Collected)>,
}

impl Unconfirmed {
    fn on(socket: Socket) -> Unconfirmed {
        let pushed = VecDeque::new();
        Unconfirmed { socket, pushed }
    }

    /// Notes a result whose frame was just written out whole.
    fn pushed(&mut self, collected: Collected) {
        if let Some(end) = self.socket.written() {
            self.pushed.push_back((end, collected));
            self.confirm();
        }
    }

    /// Forgets the results the client's TCP stack has acknowledged.
    fn confirm(&mut self) {
        if self.pushed.is_empty() {
            return;
        }
        let Some(acked) = self.socket.acked() else {
            return;
        };
        while self.pushed.front().is_some_and(|(end, _)| *end <= acked) {
            self.pushed.pop_front();
        }
    }

    /// Waits, while the client's TCP stack goes on acknowledging, until it has acknowledged
    /// every result written, for at most [`SETTLE_MOST`]; gives up once it acknowledged nothing
    /// more for [`SETTLE_STILL`] (a client that stopped reading). A client that closed its socket
    /// properly still reads what was written before its Close: decided at once, results it was
    /// receiving but had not acknowledged yet (a delayed ACK) would have gone back as well, and
    /// reached it anyway. The system tells acknowledgements only when asked: hence the looks.
    async fn settle(&mut self) {
        let started = tokio::time::Instant::now();
        let (mut acked, mut moved) = (self.socket.acked(), started);
        loop {
            self.confirm();
            let now = tokio::time::Instant::now();
            if self.pushed.is_empty() || now - started >= SETTLE_MOST || now - moved >= SETTLE_STILL
            {
                return;
            }
            tokio::time::sleep(SETTLE_LOOK).await;
            let now_acked = self.socket.acked();
            if now_acked != acked {
                (acked, moved) = (now_acked, tokio::time::Instant::now());
            }
        }
    }

    /// The results not acknowledged yet, to give back: the connection is made to reset when it
    /// closes, or the kernel would still deliver them after they went back to `/done` (a client
    /// that closes its socket properly, or a relay that stops, would get them twice).
    ///
    /// # Safety
    /// The connection must still be open: its stream must outlive the call.
    unsafe fn unacknowledged(mut self) -> Vec<Collected> {
        self.confirm();
        if !self.pushed.is_empty() {
            // SAFETY: the caller keeps the connection open.
            unsafe { self.socket.reset_when_closed() };
        }
        self.pushed
            .into_iter()
            .map(|(_, collected)| collected)
            .collect()
    }
}

/// The sending half of a jobs or events socket: frames go out as long as the client reads.
struct Pusher<S = Stream> {
    outgoing: SplitSink<WebSocketStream<Watched<S>>, Message>,
    progress: Progress,
}

/// The receiving half of a jobs or events socket.
type Incoming<S = Stream> = SplitStream<WebSocketStream<Watched<S>>>;

impl<S: AsyncRead + AsyncWrite + Unpin> Pusher<S> {
    /// The two halves of an upgraded connection speaking WebSocket with `config`.
    async fn open(stream: S, socket: Socket, config: WebSocketConfig) -> (Pusher<S>, Incoming<S>) {
        let (stream, progress) = Watched::new(stream, socket);
        let socket = WebSocketStream::from_raw_socket(stream, Role::Server, Some(config)).await;
        let (outgoing, incoming) = socket.split();
        (Pusher { outgoing, progress }, incoming)
    }

    /// Sends `value` as a text frame; whether it went out (see [`Pusher::send`]).
    async fn send_text(&mut self, value: serde_json::Value) -> bool {
        self.send(Message::text(value.to_string())).await
    }

    /// Sends `message`, flushed; whether it went out. Given up once the client has taken no byte
    /// for [`super::SEND_TIMEOUT`] (its connection's buffers full), however long a big frame takes to a
    /// slow but steady reader.
    async fn send(&mut self, message: Message) -> bool {
        let Pusher { outgoing, progress } = self;
        let sent = unless_stalled(progress, outgoing.send(message)).await;
        matches!(sent, Some(Ok(())))
    }
}

/// A socket's settings: messages from the client up to `incoming` bytes, and a write buffer that
/// holds one frame of up to `outgoing` bytes beyond tungstenite's own, no more: a client that
/// stops reading (while it sends pings, say) cannot make the relay queue without end.
fn settings(incoming: usize, outgoing: usize) -> WebSocketConfig {
    limited(
        WebSocketConfig::default().read_buffer_size(READ_BUFFER),
        incoming,
        outgoing,
    )
}

/// `config` with the limits of [`settings`].
fn limited(config: WebSocketConfig, incoming: usize, outgoing: usize) -> WebSocketConfig {
    let config = config
        .max_message_size(Some(incoming))
        .max_frame_size(Some(incoming));
    let most = config.write_buffer_size.saturating_add(outgoing);
    config.max_write_buffer_size(most.saturating_add(CONTROL_ROOM))
}

/// The Close a socket gets when the relay shuts down: 1001, so that clients reconnect.
fn going_away() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "relay shutting down".into(),
    }))
}

/// Ticks every [`KEEPALIVE`], the first after one period.
fn keepalive() -> tokio::time::Interval {
    tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE)
}

/// Pushes a topic's events on an upgraded connection (text frames, or binary for bodies that are
/// not UTF-8) until the client closes it or the relay shuts down.
pub async fn serve_events(
    stream: Stream,
    mut events: Subscription,
    max_event: usize,
    mut shutdown: Shutdown,
) {
    // A subscriber has nothing to send but control frames: anything bigger closes the socket
    // instead of being buffered.
    let config = settings(SUBSCRIBER_FRAME_LIMIT, max_event);
    let socket = Socket::of_stream(&stream);
    let (mut outgoing, mut incoming) = Pusher::open(stream, socket, config).await;
    let mut keepalive = keepalive();
    loop {
        // Pings without end must not keep the thread (see `routing::link`).
        tokio::task::coop::consume_budget().await;
        let frame = tokio::select! {
            received = events.next() => match frame_of(received) {
                Some(frame) => frame,
                None => continue,
            },
            frame = incoming.next() => match frame {
                // Pings are answered by tungstenite; a subscriber has nothing else to say.
                Some(Ok(message)) if !message.is_close() => continue,
                ended => {
                    close_after(&mut outgoing.outgoing, ended).await;
                    break;
                }
            },
            _ = keepalive.tick() => Message::Ping(Bytes::new()),
            _ = shutdown.changed() => {
                // What was published to this subscriber before the relay began to stop still
                // goes out: its publisher was told it reached it.
                for frame in events.take_queued().into_iter().filter_map(frame_of) {
                    if !outgoing.send(frame).await {
                        return;
                    }
                }
                going_away()
            }
        };
        let closing = matches!(frame, Message::Close(_));
        if !outgoing.send(frame).await || closing {
            break;
        }
    }
}

/// The frame an event subscriber gets of what it received: text, or binary when the event is
/// not UTF-8; none for a gap (every frame is an event).
fn frame_of(received: Received) -> Option<Message> {
    match received {
        Received::Event(body) => Some(match String::from_utf8(body.to_vec()) {
            Ok(text) => Message::text(text),
            Err(_) => Message::binary(body),
        }),
        Received::Skipped(_) => None,
    }
}

/// Ends a socket after what ended it arrived: a client's Close is answered with a Close; a broken
/// frame gets the status that says what was wrong (RFC 6455 §7.4.1): 1002 for a protocol error,
/// 1007 for text that is not UTF-8, 1009 for too big a frame; a connection that failed or ended
/// is just dropped.
async fn close_after<S>(outgoing: &mut S, ended: Option<Result<Message, WsError>>)
where
    S: futures_util::Sink<Message> + Unpin,
{
    let error = match ended {
        Some(Ok(Message::Close(_))) => return close_answered(outgoing).await,
        Some(Err(error)) => error,
        _ => return,
    };
    let (code, reason) = match error {
        WsError::Protocol(e) => (CloseCode::Protocol, e.to_string()),
        // tungstenite reports a Close frame's reason that is not UTF-8 so too.
        WsError::Utf8(_) => (CloseCode::Invalid, "text must be UTF-8".to_owned()),
        WsError::Capacity(e) => (CloseCode::Size, e.to_string()),
        _ => return,
    };
    // A Close frame's reason is at most 123 bytes.
    let mut reason = reason;
    if let Some(cut) = (0..=123).rev().find(|&at| reason.is_char_boundary(at)) {
        reason.truncate(cut);
    }
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = outgoing.send(Message::Close(Some(frame))).await;
}

/// Sends the answer to a client's Close frame (queued by tungstenite when it read the frame), so
/// that the socket closes cleanly (RFC 6455 §5.5.1) rather than with a dropped connection.
async fn close_answered<S>(outgoing: &mut S)
where
    S: futures_util::Sink<Message> + Unpin,
{
    let _ = outgoing.close().await;
}

/// The WebSocket of an agent dialling in; its frames (up to 1 MiB) carry the agent protocol.
pub async fn agent_socket(stream: Stream) -> WebSocketStream<Stream> {
    let buffers = WebSocketConfig::default()
        .read_buffer_size(AGENT_READ_BUFFER)
        .write_buffer_size(AGENT_WRITE_BUFFER);
    let config = limited(buffers, MAX_MESSAGE, MAX_MESSAGE);
    WebSocketStream::from_raw_socket(stream, Role::Server, Some(config)).await
}

/// The tasks of one jobs socket that wait for its jobs to finish, each sending its job's id to
/// `finished` when it has.
struct Waiters {
    tasks: JoinSet<()>,
    finished: mpsc::UnboundedSender<JobId>,
    jobs: Jobs,
    shutdown: Shutdown,
}

impl Waiters {
    /// Waits for job `id`, starting after `delay`.
    fn wait(&mut self, id: JobId, delay: Duration) {
        let task = wait_for(self.jobs.clone(), id, delay, self.shutdown.clone());
        let finished = self.finished.clone();
        self.tasks.spawn(async move {
            if let Some(id) = task.await {
                let _ = finished.send(id);
            }
        });
    }
}

/// Waits, after `delay`, until job `id` has finished or never will (collected through `/done`,
/// expired, or gone from its queue), and returns its id to collect; `None` on shutdown.
async fn wait_for(jobs: Jobs, id: JobId, delay: Duration, mut shutdown: Shutdown) -> Option<JobId> {
    let mut delay = delay;
    loop {
        if !delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return None,
            }
        }
        if *shutdown.borrow() {
            return None;
        }
        delay = Duration::ZERO;
        match jobs
            .await_finished(&id, JOB_WAIT_SLICE, &mut shutdown)
            .await
        {
            Ok(true) => return Some(id),
            Ok(false) => match jobs.unfinished(&id).await {
                Ok(true) => {}
                Ok(false) => return Some(id),
                Err(_) => delay = RETRY_AFTER,
            },
            Err(e) => {
                log::debug!("waiting for job {id}: {e}");
                delay = RETRY_AFTER;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::SEND_TIMEOUT;
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A push waits for a client that takes its bytes slowly but steadily, however long the frame
    /// takes, and gives up on one that has taken nothing for 30 s. (Paused time: the clock jumps
    /// to the next timer whenever every task waits.)
    #[tokio::test(start_paused = true)]
    async fn pushes_wait_for_slow_readers_not_for_stopped_ones() {
        let frame = || Message::binary(vec![7; 2 << 20]);
        let config = || settings(SUBSCRIBER_FRAME_LIMIT, 4 << 20);
        // 16 KiB every 10 s: the 2 MiB frame takes over 20 minutes.
        let (relay, mut client) = tokio::io::duplex(16 * 1024);
        let (mut pusher, _incoming) = Pusher::open(relay, Socket::default(), config()).await;
        let reader = tokio::spawn(async move {
            let mut chunk = vec![0; 16 * 1024];
            let mut read = 0;
            while read < 2 << 20 {
                tokio::time::sleep(Duration::from_secs(10)).await;
                read += client.read(&mut chunk).await.expect("readable");
            }
            // Kept open: the frame's last bytes fit in the pipe.
            client
        });
        let started = tokio::time::Instant::now();
        assert!(pusher.send(frame()).await, "a slow but steady reader");
        assert!(started.elapsed() > Duration::from_secs(1200));
        reader.await.expect("the reader does not panic");
        // A client that reads nothing.
        let (relay, _client) = tokio::io::duplex(16 * 1024);
        let (mut pusher, _incoming) = Pusher::open(relay, Socket::default(), config()).await;
        let started = tokio::time::Instant::now();
        assert!(!pusher.send(frame()).await, "a client that stopped reading");
        let waited = started.elapsed();
        assert!(
            waited >= SEND_TIMEOUT && waited < SEND_TIMEOUT * 2,
            "{waited:?}"
        );
    }

    fn valid() -> Handshake<'static> {
        Handshake {
            http11: true,
            connection: vec![b"keep-alive, Upgrade"],
            upgrade: vec![b"WebSocket"],
            version: Some(b"13"),
            key: Some(b"dGhlIHNhbXBsZSBub25jZQ=="),
        }
    }

    /// The accept key is RFC 6455's example; `Connection` and `Upgrade` are token lists.
    #[test]
    fn handshake() {
        let accepted = accept(&valid()).unwrap();
        assert_eq!(accepted.status, 101);
        let expected = (
            "Sec-WebSocket-Accept".into(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".to_string(),
        );
        assert!(accepted.headers.contains(&expected));
        let listed = Handshake {
            connection: vec![b"keep-alive", b"upgrade"],
            upgrade: vec![b"h2c, websocket/13"],
            ..valid()
        };
        assert!(accept(&listed).is_ok());
    }

    /// A request without any of the headers, of HTTP/1.0, of another version, or whose key is
    /// not 16 bytes in base64 (here 5 characters, and 17 bytes) is refused.
    #[test]
    fn refused_handshakes() {
        let refused = [
            Handshake {
                http11: false,
                ..valid()
            },
            Handshake {
                upgrade: Vec::new(),
                ..valid()
            },
            Handshake {
                upgrade: vec![b"h2c"],
                ..valid()
            },
            Handshake {
                connection: Vec::new(),
                ..valid()
            },
            Handshake {
                connection: vec![b"keep-alive"],
                ..valid()
            },
            Handshake {
                version: Some(b"8"),
                ..valid()
            },
            Handshake {
                key: None,
                ..valid()
            },
            Handshake {
                key: Some(b"short"),
                ..valid()
            },
            Handshake {
                key: Some(b"dGhlIHNhbXBsZSBub25jZSE="),
                ..valid()
            },
        ];
        for handshake in refused {
            assert!(accept(&handshake).is_err());
        }
    }
}
