//! Streams multiplexed on one agent connection, with per-stream flow control; shared by the relay
//! (`link`) and the agent.
//!
//! Frames leave through an [`Outbound`]: an ordered, bounded queue for `HEAD`, `RESPONSE`, `DATA`
//! and `END` (a stream's frames must not overtake each other, and a slow socket should hold back
//! senders), and an unbounded one for `WINDOW` and `RESET`, which are small, at most a few per
//! stream, and must never wait behind body data (a grant stuck behind data could deadlock both
//! sides).
//!
//! Arriving frames go to their stream through [`Streams::dispatch`], which never waits: each
//! stream's inbox is unbounded, but the peer may only send as many `DATA` bytes as it was granted,
//! one `RESPONSE` and one `END`, so an inbox never holds more than one window (empty `DATA`
//! frames are dropped). A peer that overruns its credit or repeats a frame has its stream reset.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};

use super::frame::{Frame, Kind, DATA_PIECE, INITIAL_WINDOW};

/// How many frames the ordered queue holds before senders wait: 32 × 16 KiB of body at most
/// ([`DATA_PIECE`]).
const ORDERED_CAPACITY: usize = 32;

/// Consumed bytes are granted back in batches of at least this many, to keep `WINDOW` frames few.
const GRANT_BATCH: u32 = INITIAL_WINDOW / 4;

/// The reason a stream ended abnormally: a `RESET`'s payload, or why the connection went.
pub type Reason = String;

/// The sending side of a connection, cheap to clone.
#[derive(Clone)]
pub struct Outbound {
    ordered: mpsc::Sender<Frame>,
    control: mpsc::UnboundedSender<Frame>,
}

/// What the connection's writer drains, control frames first.
pub struct OutboundQueues {
    /// `HEAD`, `RESPONSE`, `DATA` and `END`, in the order streams sent them.
    pub ordered: mpsc::Receiver<Frame>,
    /// `WINDOW`, `RESET` and `GOAWAY`, which go first.
    pub control: mpsc::UnboundedReceiver<Frame>,
}

impl Outbound {
    /// A connection's sending side and the queues its writer drains.
    pub fn new() -> (Outbound, OutboundQueues) {
        let (ordered, ordered_rx) = mpsc::channel(ORDERED_CAPACITY);
        let (control, control_rx) = mpsc::unbounded_channel();
        let queues = OutboundQueues {
            ordered: ordered_rx,
            control: control_rx,
        };
        (Outbound { ordered, control }, queues)
    }

    /// Queues a frame behind the stream's earlier ones; waits while the queue is full.
    pub async fn send(&self, frame: Frame) -> Result<(), Reason> {
        self.ordered
            .send(frame)
            .await
            .map_err(|_| Reason::from("agent connection closed"))
    }

    /// Queues a `WINDOW`, `RESET` or `GOAWAY` ahead of body data; never waits. A closed
    /// connection drops it, which is what it would have done anyway.
    pub fn control(&self, frame: Frame) {
        let _ = self.control.send(frame);
    }
}

/// What arrives for a stream, in order.
#[derive(Debug)]
pub enum Inbound {
    /// A `RESPONSE` payload (only the relay expects these).
    Response(Bytes),
    /// A body chunk.
    Data(Bytes),
    /// The peer's body is complete.
    End,
    /// The peer reset the stream, or the connection went.
    Reset(Reason),
}

/// Flow-control and lifecycle state of one stream, shared by its handles and the reader.
#[derive(Debug)]
struct Flow {
    /// `DATA` bytes this side may still send.
    send_credit: u64,
    /// `DATA` bytes the peer may still send before it overruns its credit.
    recv_allowed: u64,
    /// The peer has sent something on this stream other than `RESET`: for the relay, the agent
    /// has taken the request, which may then no longer be retried elsewhere.
    taken: bool,
    sent_end: bool,
    recv_end: bool,
    /// What has arrived for the stream, to refuse what may arrive once only, or not after `END`:
    /// the inbox then holds one `RESPONSE`, one `END` and one window of `DATA` at most.
    arrived: Arrived,
    /// Set once the stream is reset either way or its connection is gone.
    closed: Option<Reason>,
}

/// Which of the frames a stream may receive once have arrived.
#[derive(Debug, Default)]
struct Arrived {
    response: bool,
    end: bool,
}

#[derive(Debug)]
struct StreamState {
    flow: Mutex<Flow>,
    /// Woken when credit arrives or the stream closes.
    changed: Notify,
}

impl StreamState {
    fn new() -> StreamState {
        StreamState {
            flow: Mutex::new(Flow {
                send_credit: u64::from(INITIAL_WINDOW),
                recv_allowed: u64::from(INITIAL_WINDOW),
                taken: false,
                sent_end: false,
                recv_end: false,
                arrived: Arrived::default(),
                closed: None,
            }),
            changed: Notify::new(),
        }
    }

    /// The flow state; a poisoned lock only means another handle panicked mid-update of plain
    /// counters, which stay usable.
    fn flow(&self) -> MutexGuard<'_, Flow> {
        self.flow.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the stream closed; answers whether it was open until now.
    fn close(&self, reason: &str) -> bool {
        let opened = {
            let mut flow = self.flow();
            let open = flow.closed.is_none();
            if open {
                flow.closed = Some(reason.to_owned());
            }
            open
        };
        self.changed.notify_waiters();
        opened
    }
}

/// One stream in the connection's table.
struct Entry {
    state: Arc<StreamState>,
    inbox: mpsc::UnboundedSender<Inbound>,
}

struct Table {
    entries: HashMap<u32, Entry>,
    /// Set when the connection is gone: no stream opens any more.
    closed: Option<Reason>,
}

/// Which end of the connection this is, which decides what dropping an unfinished stream means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The relay: it sends requests. A stream it drops before the answer ended was abandoned
    /// (its client left, or it timed out), and the agent is told to drop the upstream request.
    Asks,
    /// The agent: it answers. A stream it drops once its answer is sent is finished, even if the
    /// request body was not read to its end.
    Answers,
}

/// The streams of one connection. The reader dispatches into it; handles open and leave it.
pub struct Streams {
    table: Mutex<Table>,
    out: Outbound,
    side: Side,
}

impl Streams {
    /// An empty table for the `side` of a connection that sends through `out`.
    pub fn new(out: Outbound, side: Side) -> Arc<Streams> {
        Arc::new(Streams {
            side,
            table: Mutex::new(Table {
                entries: HashMap::new(),
                closed: None,
            }),
            out,
        })
    }

    /// The connection's sending side.
    pub fn out(&self) -> &Outbound {
        &self.out
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // Poisoning only means a panic elsewhere mid-insert or remove; the map is still sound.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Streams open now: the requests in flight.
    pub fn len(&self) -> usize {
        self.table().entries.len()
    }

    /// Registers stream `id`; `Err` when the connection is gone or the id is taken.
    pub fn open(self: &Arc<Self>, id: u32) -> Result<(BodyWriter, BodyReader), Reason> {
        let state = Arc::new(StreamState::new());
        let (inbox, inbox_rx) = mpsc::unbounded_channel();
        {
            let mut table = self.table();
            if let Some(reason) = &table.closed {
                return Err(reason.clone());
            }
            if table.entries.contains_key(&id) {
                return Err(format!("stream {id} is already open"));
            }
            let entry = Entry {
                state: state.clone(),
                inbox,
            };
            table.entries.insert(id, entry);
        }
        let guard = Arc::new(Guard {
            id,
            state,
            streams: self.clone(),
        });
        let writer = BodyWriter {
            guard: guard.clone(),
        };
        let reader = BodyReader {
            guard,
            inbox: inbox_rx,
            ungranted: 0,
        };
        Ok((writer, reader))
    }

    /// Hands an arriving stream frame (`DATA`, `END`, `RESPONSE`, `RESET`, `WINDOW`) to its
    /// stream. Never waits. Frames for streams no longer open are dropped: they were in flight when
    /// this side let the stream go.
    pub fn dispatch(&self, frame: Frame) {
        let mut table = self.table();
        let Some(entry) = table.entries.get(&frame.stream) else {
            return;
        };
        let state = entry.state.clone();
        let item = {
            let mut flow = state.flow();
            if flow.closed.is_some() {
                return;
            }
            if frame.kind != Kind::Reset {
                flow.taken = true;
            }
            match frame.kind {
                Kind::Window => {
                    flow.send_credit = flow.send_credit.saturating_add(frame.credit().into());
                    drop(flow);
                    state.changed.notify_waiters();
                    return;
                }
                // Carries nothing, and would cost nothing against the window.
                Kind::Data if frame.payload.is_empty() => return,
                Kind::Data => {
                    let len = frame.payload.len() as u64;
                    if len > flow.recv_allowed || flow.arrived.end {
                        drop(flow);
                        let reason = "flow control violated: DATA beyond the granted window";
                        return self.refuse(&mut table, &frame, &state, reason);
                    }
                    flow.recv_allowed -= len;
                    Inbound::Data(frame.payload)
                }
                Kind::End if flow.arrived.end => {
                    drop(flow);
                    return self.refuse(&mut table, &frame, &state, "END sent twice");
                }
                Kind::End => {
                    flow.arrived.end = true;
                    Inbound::End
                }
                Kind::Response if flow.arrived.response => {
                    drop(flow);
                    return self.refuse(&mut table, &frame, &state, "RESPONSE sent twice");
                }
                Kind::Response => {
                    flow.arrived.response = true;
                    Inbound::Response(frame.payload)
                }
                Kind::Reset => Inbound::Reset(frame.reason()),
                Kind::Head | Kind::GoAway | Kind::Move => return,
            }
        };
        let reset = matches!(item, Inbound::Reset(_));
        if let Inbound::Reset(reason) = &item {
            state.close(reason);
        }
        let _ = entry.inbox.send(item);
        if reset {
            table.entries.remove(&frame.stream);
        }
    }

    /// Resets the stream of `frame`, which broke the protocol: both sides learn `reason`.
    fn refuse(&self, table: &mut Table, frame: &Frame, state: &StreamState, reason: &str) {
        self.out.control(Frame::reset(frame.stream, reason));
        state.close(reason);
        if let Some(entry) = table.entries.remove(&frame.stream) {
            let _ = entry.inbox.send(Inbound::Reset(reason.into()));
        }
    }

    /// The connection is gone: every open stream ends with `reason`, and none opens any more.
    pub fn close_all(&self, reason: &str) {
        let entries = {
            let mut table = self.table();
            table.closed = Some(reason.to_owned());
            std::mem::take(&mut table.entries)
        };
        for (_, entry) in entries {
            entry.state.close(reason);
            let _ = entry.inbox.send(Inbound::Reset(reason.to_owned()));
        }
    }

    /// Lets stream `id` go, unless its id already names a newer stream (a peer may reuse the id
    /// of a stream it reset).
    fn remove(&self, id: u32, state: &Arc<StreamState>) {
        let mut table = self.table();
        if table
            .entries
            .get(&id)
            .is_some_and(|entry| Arc::ptr_eq(&entry.state, state))
        {
            table.entries.remove(&id);
        }
    }
}

/// Shared by a stream's two halves; when both are gone the stream leaves the table, reset if it
/// did not complete both ways.
struct Guard {
    id: u32,
    state: Arc<StreamState>,
    streams: Arc<Streams>,
}

impl Guard {
    fn reset(&self, reason: &str) {
        if self.state.close(reason) {
            self.streams.out.control(Frame::reset(self.id, reason));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let (sent_end, recv_end, closed) = {
            let flow = self.state.flow();
            (flow.sent_end, flow.recv_end, flow.closed.is_some())
        };
        if sent_end && !recv_end && self.streams.side == Side::Answers {
            // Everything this side sends is already queued, in order; a RESET would go out ahead
            // of it and cut the answer short (an upstream may answer before reading the whole
            // request body). Instead the peer gets credit enough never to wait on this stream,
            // and whatever it still sends is dropped as belonging to no stream — unless the
            // stream was reset meanwhile: then the peer sends nothing more on it, and its id
            // may already name a newer stream.
            if !closed {
                self.streams.out.control(Frame::window(self.id, u32::MAX));
            }
        } else if !(sent_end && recv_end) {
            self.reset("stream abandoned");
        }
        self.streams.remove(self.id, &self.state);
    }
}

/// The sending half of a stream: frames in order, body bytes within credit.
pub struct BodyWriter {
    guard: Arc<Guard>,
}

impl BodyWriter {
    /// Whether the peer has sent anything but a `RESET` on this stream.
    pub fn taken(&self) -> bool {
        self.guard.state.flow().taken
    }

    /// Sends a non-body frame (`HEAD`, `RESPONSE`) in order with the stream's data.
    pub async fn send(&self, kind: Kind, payload: Bytes) -> Result<(), Reason> {
        self.check_open()?;
        let frame = Frame::new(kind, self.guard.id, payload);
        self.guard.streams.out.send(frame).await
    }

    /// Grants the peer `credit` more bytes out of band (0 acknowledges a `HEAD`).
    pub fn grant(&self, credit: u32) {
        self.guard
            .streams
            .out
            .control(Frame::window(self.guard.id, credit));
    }

    /// Sends `chunk` as `DATA` frames of at most [`DATA_PIECE`] bytes, each waiting for credit.
    pub async fn write(&self, mut chunk: Bytes) -> Result<(), Reason> {
        while !chunk.is_empty() {
            let allowed = self.reserve(chunk.len().min(DATA_PIECE)).await?;
            let piece = chunk.split_to(allowed);
            let frame = Frame::new(Kind::Data, self.guard.id, piece);
            self.guard.streams.out.send(frame).await?;
        }
        Ok(())
    }

    /// Sends `END`: this side's body is complete.
    pub async fn end(&self) -> Result<(), Reason> {
        self.check_open()?;
        self.guard.state.flow().sent_end = true;
        let frame = Frame::new(Kind::End, self.guard.id, Bytes::new());
        self.guard.streams.out.send(frame).await
    }

    /// Abandons the stream, telling the peer why (unless it is already closed).
    pub fn reset(&self, reason: &str) {
        self.guard.reset(reason);
    }

    /// Resolves with the reason once the stream is reset or its connection is gone.
    pub async fn closed(&self) -> Reason {
        let state = &self.guard.state;
        loop {
            let notified = state.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(reason) = &state.flow().closed {
                return reason.clone();
            }
            notified.await;
        }
    }

    fn check_open(&self) -> Result<(), Reason> {
        match &self.guard.state.flow().closed {
            Some(reason) => Err(reason.clone()),
            None => Ok(()),
        }
    }

    /// Waits for credit and takes up to `wanted` bytes of it (at least 1).
    async fn reserve(&self, wanted: usize) -> Result<usize, Reason> {
        let state = &self.guard.state;
        loop {
            let notified = state.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut flow = state.flow();
                if let Some(reason) = &flow.closed {
                    return Err(reason.clone());
                }
                if flow.send_credit > 0 {
                    let allowed = flow.send_credit.min(wanted as u64);
                    flow.send_credit -= allowed;
                    // `allowed` ≤ `wanted`, a usize.
                    return Ok(allowed as usize);
                }
            }
            notified.await;
        }
    }
}

/// The receiving half of a stream: what the peer sent, in order, granting credit back as body
/// chunks are taken.
pub struct BodyReader {
    guard: Arc<Guard>,
    inbox: mpsc::UnboundedReceiver<Inbound>,
    ungranted: u32,
}

impl BodyReader {
    /// The next item; a gone connection reads as a `Reset`.
    pub async fn next(&mut self) -> Inbound {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Poll form of [`next`](Self::next), for body streams handed to an HTTP client.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Inbound> {
        let item = match self.inbox.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(item)) => item,
            Poll::Ready(None) => Inbound::Reset(
                self.guard
                    .state
                    .flow()
                    .closed
                    .clone()
                    .unwrap_or_else(|| "agent connection closed".into()),
            ),
        };
        match &item {
            Inbound::Data(chunk) => self.consumed(chunk.len()),
            Inbound::End => self.guard.state.flow().recv_end = true,
            _ => {}
        }
        Poll::Ready(item)
    }

    /// Grants back what the consumer took, in batches.
    fn consumed(&mut self, len: usize) {
        // A chunk is at most 64 KiB (`Frame::decode`), so this cannot overflow a u32.
        self.ungranted += len as u32;
        if self.ungranted >= GRANT_BATCH {
            let credit = std::mem::take(&mut self.ungranted);
            {
                let mut flow = self.guard.state.flow();
                if flow.closed.is_some() || flow.recv_end {
                    return;
                }
                flow.recv_allowed += u64::from(credit);
            }
            self.guard
                .streams
                .out
                .control(Frame::window(self.guard.id, credit));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::frame::MAX_DATA;

    fn data(stream: u32, len: usize) -> Frame {
        Frame::new(Kind::Data, stream, Bytes::from(vec![7; len]))
    }

    /// A body chunk goes in frames of at most `DATA_PIECE` bytes, in order, whole.
    #[tokio::test]
    async fn bodies_go_in_pieces() {
        let (out, mut queues) = Outbound::new();
        let streams = Streams::new(out, Side::Answers);
        let (writer, _reader) = streams.open(1).unwrap();
        let body: Vec<u8> = (0..40 * 1024).map(|i| (i % 251) as u8).collect();
        writer.write(Bytes::from(body.clone())).await.unwrap();
        let mut pieces = Vec::new();
        while let Ok(frame) = queues.ordered.try_recv() {
            pieces.push(frame.payload);
        }
        let sizes: Vec<usize> = pieces.iter().map(Bytes::len).collect();
        assert_eq!(sizes, [DATA_PIECE, DATA_PIECE, 40 * 1024 - 2 * DATA_PIECE]);
        assert_eq!(pieces.concat(), body);
    }

    /// A writer sends no more than its credit and resumes when a WINDOW arrives.
    #[tokio::test]
    async fn credit_limits_sending() {
        let (out, mut queues) = Outbound::new();
        let streams = Streams::new(out, Side::Answers);
        let (writer, _reader) = streams.open(1).unwrap();
        let body = Bytes::from(vec![1; INITIAL_WINDOW as usize + 1000]);
        let sending = tokio::spawn(async move {
            writer.write(body).await.unwrap();
            writer
        });
        let mut sent = 0;
        while sent < INITIAL_WINDOW as usize {
            sent += queues.ordered.recv().await.unwrap().payload.len();
        }
        assert_eq!(sent, INITIAL_WINDOW as usize);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(queues.ordered.try_recv().is_err(), "sent beyond its credit");
        streams.dispatch(Frame::window(1, 500));
        assert_eq!(queues.ordered.recv().await.unwrap().payload.len(), 500);
        streams.dispatch(Frame::window(1, 5000));
        assert_eq!(queues.ordered.recv().await.unwrap().payload.len(), 500);
        let writer = sending.await.unwrap();
        assert!(writer.taken());
    }

    /// Taking chunks grants credit back in batches; overrunning the window resets the stream.
    #[tokio::test]
    async fn grants_and_overrun() {
        let (out, mut queues) = Outbound::new();
        let streams = Streams::new(out, Side::Answers);
        let (_writer, mut reader) = streams.open(1).unwrap();
        for _ in 0..4 {
            streams.dispatch(data(1, MAX_DATA));
        }
        for _ in 0..4 {
            assert!(matches!(reader.next().await, Inbound::Data(_)));
        }
        let mut granted = 0;
        while let Ok(grant) = queues.control.try_recv() {
            assert_eq!(grant.kind, Kind::Window);
            granted += grant.credit() as usize;
        }
        assert_eq!(granted, 4 * MAX_DATA);
        // The full window again is fine; one byte more is an overrun.
        for _ in 0..4 {
            streams.dispatch(data(1, MAX_DATA));
        }
        streams.dispatch(data(1, 1));
        let reset = queues.control.recv().await.unwrap();
        assert_eq!(reset.kind, Kind::Reset);
        for _ in 0..4 {
            assert!(matches!(reader.next().await, Inbound::Data(_)));
        }
        assert!(matches!(reader.next().await, Inbound::Reset(_)));
    }

    /// Dropping an unfinished stream resets it and frees its slot; a finished one just leaves.
    #[tokio::test]
    async fn drop_resets_unfinished() {
        let (out, mut queues) = Outbound::new();
        let streams = Streams::new(out, Side::Answers);
        let (writer, reader) = streams.open(1).unwrap();
        assert!(streams.open(1).is_err());
        drop((writer, reader));
        assert_eq!(streams.len(), 0);
        assert_eq!(queues.control.recv().await.unwrap().kind, Kind::Reset);

        let (writer, mut reader) = streams.open(3).unwrap();
        streams.dispatch(Frame::new(Kind::End, 3, Bytes::new()));
        assert!(matches!(reader.next().await, Inbound::End));
        writer.end().await.unwrap();
        drop((writer, reader));
        assert_eq!(queues.ordered.recv().await.unwrap().kind, Kind::End);
        assert!(queues.control.try_recv().is_err());
    }

    /// An id the peer reset and opened again names the new stream: the old one's leaving does
    /// not take it out of the table.
    #[tokio::test]
    async fn reused_id_belongs_to_the_newer_stream() {
        let (out, mut queues) = Outbound::new();
        let streams = Streams::new(out, Side::Answers);
        let (old_writer, old_reader) = streams.open(1).unwrap();
        // Its answer sent, its request body not read to the end: leaving would grant credit.
        old_writer.end().await.unwrap();
        streams.dispatch(Frame::reset(1, "peer reset"));
        let (_writer, mut reader) = streams.open(1).unwrap();
        drop((old_writer, old_reader));
        assert_eq!(streams.len(), 1);
        assert!(
            queues.control.try_recv().is_err(),
            "a frame for the newer stream"
        );
        streams.dispatch(data(1, 3));
        assert!(matches!(reader.next().await, Inbound::Data(chunk) if chunk.len() == 3));
    }

    /// Closing the connection ends every stream and refuses new ones.
    #[tokio::test]
    async fn close_all() {
        let (out, _queues) = Outbound::new();
        let streams = Streams::new(out, Side::Answers);
        let (writer, mut reader) = streams.open(1).unwrap();
        streams.close_all("gone");
        assert!(matches!(reader.next().await, Inbound::Reset(r) if r == "gone"));
        assert_eq!(
            writer.write(Bytes::from_static(b"x")).await,
            Err("gone".into())
        );
        assert_eq!(writer.closed().await, "gone");
        assert!(streams.open(3).is_err());
    }
}
