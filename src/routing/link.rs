//! One connected agent, relay side: [`serve`] runs its WebSocket from registration to goodbye.
//!
//! The reader (this task) dispatches frames to streams and watches heartbeats; one writer task
//! (`writer`) sends frames and pings. Requests reach the agent through [`Link::open`], called by
//! `Exchange`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::agents::{unix_ms, Agents};
use super::frame::{Frame, Kind};
use super::stream::{BodyReader, BodyWriter, Reason, Side, Streams};
use super::writer::write_frames;
use crate::metrics::{Open, Opened};

/// How often the relay pings an agent.
pub const PING_EVERY: Duration = Duration::from_secs(10);

/// Silence after which an agent counts as gone: three missed heartbeats.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an agent may say nothing after being sent a request before [`Link::silent`] holds.
const SILENT_AFTER: Duration = Duration::from_secs(1);

/// How long an agent that refused a request (its upstream unreachable) is picked after the others
/// of its name: a second, then it gets its share again, in case its upstream is back. Each
/// refusal in a row doubles it, up to [`MAX_REFUSING_FOR`]; and it is never shorter than the
/// refusal took (an upstream that drops connections costs the request that finds out).
const REFUSING_FOR: Duration = Duration::from_secs(1);

/// The longest an agent that keeps refusing is picked last before it is tried again.
const MAX_REFUSING_FOR: Duration = Duration::from_secs(30);

/// How often the reader checks heartbeats and drain progress.
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// A connected agent as the registry and exchanges see it.
pub struct Link {
    /// Unique within this process, so that a retry can avoid links it already tried.
    pub id: u64,
    /// The name it registered.
    pub name: String,
    /// When it connected, in Unix milliseconds.
    pub connected_since_ms: u64,
    last_heartbeat_ms: AtomicU64,
    /// Since when a request sent here waits for the agent to say anything (it acknowledges each
    /// at once), in Unix milliseconds; 0 while nothing does.
    unanswered_since_ms: AtomicU64,
    /// Until when the agent is picked last for refusing, in Unix milliseconds; 0 never.
    refusing_until_ms: AtomicU64,
    /// Refusals since the agent last took a request.
    refusals: AtomicU32,
    /// The next stream id: odd, increasing.
    next_stream: AtomicU32,
    /// Set once either side said GOAWAY: no new requests go to this link.
    draining: AtomicBool,
    streams: Arc<Streams>,
}

impl Link {
    /// Requests in flight on this link.
    pub fn in_flight(&self) -> usize {
        self.streams.len()
    }

    /// When anything was last heard from the agent, in Unix milliseconds.
    pub fn last_heartbeat_ms(&self) -> u64 {
        self.last_heartbeat_ms.load(Ordering::Relaxed)
    }

    /// Whether the agent has sent no frame for [`SILENT_AFTER`] since it was sent a request (a
    /// ping or pong is no answer): it is frozen or cut off, though its heartbeat has not expired
    /// yet. Other agents of the name are picked first.
    pub fn silent(&self) -> bool {
        self.unanswered_for() > SILENT_AFTER
    }

    /// How long a request sent here has waited for the agent to send any frame; zero while none
    /// waits.
    fn unanswered_for(&self) -> Duration {
        match self.unanswered_since_ms.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => Duration::from_millis(unix_ms().saturating_sub(since)),
        }
    }

    /// Whether the agent refused a request lately (see [`REFUSING_FOR`]; it does so when it
    /// cannot reach its upstream). Other agents of the name are picked first.
    pub fn refusing(&self) -> bool {
        unix_ms() < self.refusing_until_ms.load(Ordering::Relaxed)
    }

    /// Notes that the agent refused a request (reset it before taking it) after `took`.
    pub(crate) fn refused(&self, took: Duration) {
        let before = self.refusals.fetch_add(1, Ordering::Relaxed);
        let span = refusing_span(before, took);
        let until = unix_ms().saturating_add(span.as_millis() as u64);
        self.refusing_until_ms.store(until, Ordering::Relaxed);
    }

    /// Notes that the agent took a request: its next refusal counts from one again.
    pub(crate) fn took(&self) {
        if self.refusals.load(Ordering::Relaxed) != 0 {
            self.refusals.store(0, Ordering::Relaxed);
        }
    }

    /// Whether new requests may be sent here.
    pub fn accepting(&self) -> bool {
        !self.draining.load(Ordering::Relaxed)
    }

    /// Opens a new stream for a request; `Err` when the connection is gone or out of ids.
    pub fn open(&self) -> Result<(BodyWriter, BodyReader), Reason> {
        let id = self.next_stream.fetch_add(2, Ordering::Relaxed);
        if id > u32::MAX - 2 {
            // After two billion requests: let this connection go so that the agent reconnects.
            self.draining.store(true, Ordering::Relaxed);
            return Err("agent connection ran out of stream ids".into());
        }
        let opened = self.streams.open(id)?;
        if self.unanswered_since_ms.load(Ordering::Relaxed) == 0 {
            self.unanswered_since_ms.store(unix_ms(), Ordering::Relaxed);
        }
        Ok(opened)
    }

    /// Notes that the agent was heard from: by a frame (`answering`) or a control message.
    fn heard(&self, answering: bool) {
        self.last_heartbeat_ms.store(unix_ms(), Ordering::Relaxed);
        if answering {
            self.unanswered_since_ms.store(0, Ordering::Relaxed);
        }
    }
}

/// How long an agent is picked last after a refusal that took `took`, with `before` refusals in a
/// row ahead of it (see [`REFUSING_FOR`]).
fn refusing_span(before: u32, took: Duration) -> Duration {
    let doubled = REFUSING_FOR.saturating_mul(2u32.saturating_pow(before));
    doubled.min(MAX_REFUSING_FOR).max(took)
}

/// Runs one agent's connection until it closes, stops heart-beating or the relay shuts down:
/// registers it under `name` in `registry`, carries its streams, and unregisters it.
///
/// `socket` is the already upgraded WebSocket (for Pingora, built with
/// `WebSocketStream::from_raw_socket(stream, Role::Server, config)`). When `shutdown` turns true
/// the relay sends `GOAWAY`, lets requests in flight finish (within its grace period, which ends
/// the process), and closes. When `handover` is given (the agent understands `MOVE`) and turns
/// true, the relay sends `MOVE` and goes on serving: the agent connects to the process taking
/// this one's address over, and this connection serves until the shutdown that follows.
pub async fn serve<S>(
    socket: WebSocketStream<S>,
    name: String,
    registry: Agents,
    mut shutdown: watch::Receiver<bool>,
    handover: Option<watch::Receiver<bool>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, mut incoming) = socket.split();
    let (out, queues) = super::stream::Outbound::new();
    let now = unix_ms();
    let link = Arc::new(Link {
        id: registry.next_link_id(),
        name,
        connected_since_ms: now,
        last_heartbeat_ms: AtomicU64::new(now),
        unanswered_since_ms: AtomicU64::new(0),
        refusing_until_ms: AtomicU64::new(0),
        refusals: AtomicU32::new(0),
        next_stream: AtomicU32::new(1),
        draining: AtomicBool::new(false),
        streams: Streams::new(out, Side::Asks),
    });
    let (stop, stopped) = oneshot::channel();
    let writer = tokio::spawn(write_frames(sink, queues, Some(PING_EVERY), stopped));
    registry.insert(link.clone());
    let _open = Opened::start(Open::Agent);
    log::info!("agent connected: name={} link={}", link.name, link.id);

    let mut last_heard = Instant::now();
    // A relay already shutting down takes no agents: it drains at once. Draining, the link
    // closes once its requests are done; the relay's grace period, which ends the process,
    // bounds how long that may take.
    let mut draining = *shutdown.borrow();
    if draining {
        begin_drain(&link);
    }
    let mut check = tokio::time::interval(CHECK_EVERY);
    let mut silent = false;
    let handed_over = handed_over(handover);
    tokio::pin!(handed_over);
    let mut moved = false;
    let reason: Reason = loop {
        // Frames already read are handled without touching the socket, which is where tokio
        // would make the task yield: an agent sending tiny frames without end kept the thread,
        // and every connection on it, waiting for seconds.
        tokio::task::coop::consume_budget().await;
        tokio::select! {
            message = incoming.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    last_heard = Instant::now();
                    link.heard(true);
                    let accepting = link.accepting();
                    if let Err(reason) = receive(&link, bytes) {
                        break reason;
                    }
                    if link.accepting() != accepting {
                        registry.state_changed();
                    }
                }
                // tungstenite answers pings itself. An agent that reads nothing may still send
                // these (its heartbeat task runs on): alive, but answering no request.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                    last_heard = Instant::now();
                    link.heard(false);
                }
                Some(Ok(Message::Text(_))) => break "protocol error: text message".into(),
                Some(Ok(Message::Close(_))) | None => break "closed by the agent".into(),
                Some(Err(err)) => break format!("connection failed: {err}"),
            },
            _ = check.tick() => {
                if last_heard.elapsed() > HEARTBEAT_TIMEOUT {
                    break "no heartbeat for 30 s".into();
                }
                // Alive but answering nothing (its pongs run on, its reading does not): let it
                // go, so that it reconnects or stops holding its name. Only with a request still
                // waiting: a request reset before the agent acknowledged it may never be answered
                // by a sound agent, which would then be let go once idle for 30 s.
                if link.in_flight() > 0 && link.unanswered_for() > HEARTBEAT_TIMEOUT {
                    break "no answer to a request for 30 s".into();
                }
                if draining && link.in_flight() == 0 {
                    break "relay shutting down".into();
                }
                if link.silent() != silent {
                    silent = !silent;
                    registry.state_changed();
                }
            }
            () = &mut handed_over, if !moved => {
                moved = true;
                link.streams
                    .out()
                    .control(Frame::new(Kind::Move, 0, Default::default()));
            }
            changed = shutdown.changed(), if !draining => {
                if changed.is_err() || *shutdown.borrow() {
                    draining = true;
                    begin_drain(&link);
                }
            }
        }
    };

    registry.remove(&link);
    link.streams
        .close_all(&format!("agent connection lost: {reason}"));
    let _ = stop.send(());
    let _ = writer.await;
    log::info!(
        "agent disconnected: name={} link={} reason={reason}",
        link.name,
        link.id
    );
}

/// Resolves once `handover` is true: this process is handing its address over to a new one.
/// Never without a watch, or once nobody can set it.
async fn handed_over(handover: Option<watch::Receiver<bool>>) {
    if let Some(mut handover) = handover {
        if handover.wait_for(|handing| *handing).await.is_ok() {
            return;
        }
    }
    std::future::pending::<()>().await;
}

/// Stops new requests to `link` and tells the agent (GOAWAY).
fn begin_drain(link: &Link) {
    link.draining.store(true, Ordering::Relaxed);
    link.streams
        .out()
        .control(Frame::new(Kind::GoAway, 0, Default::default()));
}

/// Handles one binary message from the agent; `Err` ends the connection.
fn receive(link: &Link, bytes: bytes::Bytes) -> Result<(), Reason> {
    let frame = Frame::decode(bytes).map_err(|err| format!("protocol error: {err}"))?;
    match frame.kind {
        Kind::GoAway => {
            link.draining.store(true, Ordering::Relaxed);
            Ok(())
        }
        Kind::Head => Err("protocol error: an agent sent HEAD".into()),
        Kind::Move => Err("protocol error: an agent sent MOVE".into()),
        _ => {
            link.streams.dispatch(frame);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second, doubling with each refusal in a row up to 30 s, and never shorter than the
    /// refusal took.
    #[test]
    fn refusals_in_a_row_keep_an_agent_last_longer() {
        let quick = Duration::from_millis(2);
        let spans: Vec<u64> = (0..7).map(|n| refusing_span(n, quick).as_secs()).collect();
        assert_eq!(spans, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(refusing_span(u32::MAX, quick), MAX_REFUSING_FOR);
        let slow = Duration::from_millis(1500);
        assert_eq!(refusing_span(0, slow), slow);
    }
}
