//! The one task that writes a connection's WebSocket: it drains the control queue before the
//! ordered one (grants and resets must not wait behind body data), sends heartbeat pings on the
//! relay side, and closes the socket when told to stop.

use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::stream::OutboundQueues;

/// How long a closing handshake may take before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The most frames written with one flush.
const BATCH: usize = 64;

/// The write half of a connection's WebSocket.
pub type Sink<S> = SplitSink<WebSocketStream<S>, Message>;

/// Writes frames until `stop` fires (or its sender is dropped) or the socket fails, then closes
/// the WebSocket. `ping_every` sends a heartbeat ping at that interval.
pub async fn write_frames<S>(
    mut sink: Sink<S>,
    mut queues: OutboundQueues,
    ping_every: Option<Duration>,
    mut stop: oneshot::Receiver<()>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut ping = ping_every.map(|every| {
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    });
    loop {
        let message = tokio::select! {
            biased;
            _ = &mut stop => break,
            Some(frame) = queues.control.recv() => Message::Binary(frame.encode()),
            Some(frame) = queues.ordered.recv() => Message::Binary(frame.encode()),
            _ = tick(&mut ping) => Message::Ping(Default::default()),
            else => break,
        };
        // A write that never finishes (a peer that stopped reading) is cut short by `stop`: the
        // reader notices the missing heartbeats and ends the connection.
        tokio::select! {
            biased;
            _ = &mut stop => break,
            sent = write_batch(&mut sink, &mut queues, message) => if sent.is_err() { break },
        }
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.close()).await;
}

/// Writes `first` and the frames already queued behind it (at most [`BATCH`]) with one flush: a
/// small request or response is several frames (head, data, end), and many requests share a
/// connection, so one socket write carries many frames.
async fn write_batch<S>(
    sink: &mut Sink<S>,
    queues: &mut OutboundQueues,
    first: Message,
) -> Result<(), tokio_tungstenite::tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    sink.feed(first).await?;
    for _ in 1..BATCH {
        let Ok(frame) = queues
            .control
            .try_recv()
            .or_else(|_| queues.ordered.try_recv())
        else {
            break;
        };
        sink.feed(Message::Binary(frame.encode())).await?;
    }
    sink.flush().await
}

async fn tick(timer: &mut Option<tokio::time::Interval>) {
    match timer {
        Some(timer) => {
            timer.tick().await;
        }
        None => std::future::pending().await,
    }
}
