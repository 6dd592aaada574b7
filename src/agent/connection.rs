//! One connection of the agent to the relay: reads frames, starts a task per request (`HEAD`),
//! and drains on shutdown. The relay pings; a relay silent for three heartbeats counts as gone.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::upstream::Upstream;
use crate::routing::frame::{Frame, Kind};
use crate::routing::head::RequestHead;
use crate::routing::stream::{Outbound, Reason, Side, Streams};
use crate::routing::writer::write_frames;
use crate::routing::HEARTBEAT_TIMEOUT;

/// How often the reader checks heartbeats and drain progress.
const CHECK_EVERY: Duration = Duration::from_millis(200);

/// How long requests cut off when a connection ends have to log their line and stop.
const FINISH_WITHIN: Duration = Duration::from_secs(1);

/// Why the relay wants the agent to connect again while this connection finishes its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redial {
    /// The relay is stopping (`GOAWAY`): no new requests come on this connection.
    Stopping,
    /// The relay process hands its address over to a new one (`MOVE`): this connection takes
    /// requests until that process says `GOAWAY`.
    Moving,
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Shutdown was asked for and the requests in flight are done (or their grace ran out).
    Drained,
    /// The connection failed or the relay closed it: reconnect.
    Lost(Reason),
}

/// Serves one connection until it is lost, or until `drain` turns true and the requests in flight
/// have finished (at most `grace` later). While draining, the agent has said `GOAWAY` and refuses
/// new requests with `RESET`, which the relay retries on another agent. The first `GOAWAY` or
/// `MOVE` from the relay is told to `redial`, so that the agent connects again at once while this
/// connection finishes its requests (after `MOVE`, also takes new ones).
pub async fn serve<S>(
    socket: WebSocketStream<S>,
    upstream: Arc<Upstream>,
    mut drain: watch::Receiver<bool>,
    grace: Duration,
    redial: oneshot::Sender<Redial>,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, mut incoming) = socket.split();
    let (out, queues) = Outbound::new();
    let streams = Streams::new(out, Side::Answers);
    let (stop, stopped) = oneshot::channel();
    let writer = tokio::spawn(write_frames(sink, queues, None, stopped));
    let mut requests = JoinSet::new();
    let mut last_heard = Instant::now();
    let mut drain_until: Option<Instant> = None;
    let mut drain_open = true;
    let mut check = tokio::time::interval(CHECK_EVERY);
    let mut redial = Some(redial);
    // The relay said GOAWAY: its grace period, not the agent's, bounds the requests in flight.
    let mut relay_left = false;

    let ended = loop {
        if drain_until.is_none() && *drain.borrow() {
            streams
                .out()
                .control(Frame::new(Kind::GoAway, 0, Default::default()));
            drain_until = Some(Instant::now() + grace);
        }
        // Frames already read are handled without touching the socket, where tokio would make
        // the task yield: a relay sending frames without end must not starve the upstream work.
        tokio::task::coop::consume_budget().await;
        tokio::select! {
            message = incoming.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    last_heard = Instant::now();
                    let frame = match Frame::decode(bytes) {
                        Ok(frame) => frame,
                        Err(err) => break Ended::Lost(format!("protocol error: {err}")),
                    };
                    match frame.kind {
                        Kind::Head => start(&streams, frame, &upstream, drain_until.is_some() || relay_left, &mut requests),
                        // The relay is going away: finish what is in flight here, while the
                        // agent connects again (to another instance behind the same address).
                        Kind::GoAway => {
                            relay_left = true;
                            if let Some(redial) = redial.take() {
                                let _ = redial.send(Redial::Stopping);
                            }
                        }
                        // Its successor takes new connections at the same address; this one
                        // serves meanwhile.
                        Kind::Move => {
                            if let Some(redial) = redial.take() {
                                let _ = redial.send(Redial::Moving);
                            }
                        }
                        _ => streams.dispatch(frame),
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                    last_heard = Instant::now();
                }
                Some(Ok(Message::Text(_))) => break Ended::Lost("protocol error: text message".into()),
                Some(Ok(Message::Close(_))) | None => break Ended::Lost("closed by the relay".into()),
                Some(Err(err)) => break Ended::Lost(format!("connection failed: {err}")),
            },
            Some(_) = requests.join_next() => {}
            _ = check.tick() => {
                if last_heard.elapsed() > HEARTBEAT_TIMEOUT {
                    break Ended::Lost("no heartbeat from the relay for 30 s".into());
                }
                if let Some(until) = drain_until {
                    if requests.is_empty() || Instant::now() > until {
                        break Ended::Drained;
                    }
                }
                if relay_left && requests.is_empty() {
                    break Ended::Lost("the relay said GOAWAY".into());
                }
            }
            changed = drain.changed(), if drain_until.is_none() && drain_open => {
                // Nobody can ask for a drain any more once the sender is gone; keep serving.
                drain_open = changed.is_ok();
            }
        }
    };
    // Requests still running (past the grace period, or on a lost connection) end as reset, each
    // logging its line; one that does not end at once is then abandoned.
    streams.close_all(match &ended {
        Ended::Drained => "the agent stopped: its grace period ended",
        Ended::Lost(_) => "agent connection closed",
    });
    let finishing = async { while requests.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(FINISH_WITHIN, finishing).await;
    requests.shutdown().await;
    let _ = stop.send(());
    let _ = writer.await;
    ended
}

/// Starts the task serving a `HEAD`, or refuses it.
fn start(
    streams: &Arc<Streams>,
    frame: Frame,
    upstream: &Arc<Upstream>,
    draining: bool,
    requests: &mut JoinSet<()>,
) {
    let id = frame.stream;
    if draining {
        streams
            .out()
            .control(Frame::reset(id, "agent is shutting down"));
        return;
    }
    let head = match RequestHead::from_json(&frame.payload) {
        Ok(head) => head,
        Err(err) => {
            streams
                .out()
                .control(Frame::reset(id, &format!("bad HEAD: {err}")));
            return;
        }
    };
    match streams.open(id) {
        Ok((writer, reader)) => {
            let upstream = upstream.clone();
            requests.spawn(async move { upstream.forward(head, writer, reader).await });
        }
        Err(reason) => streams.out().control(Frame::reset(id, &reason)),
    }
}
