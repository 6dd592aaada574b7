//! One request forwarded to an agent, relay side: the request body going out, the response
//! coming back, and the retry on another agent when the first one vanished before taking it.
//!
//! An agent has taken a request once it sent anything but `RESET` on its stream (it acknowledges
//! each `HEAD` with `WINDOW 0`). Until then the request may be replayed elsewhere, so the body
//! chunks sent so far are kept; there are at most one window of them (256 KiB), because the agent
//! grants no more credit before taking the request.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::agents::Agents;
use super::frame::Kind;
use super::head::{RequestHead, ResponseHead};
use super::link::Link;
use super::stream::{BodyReader, BodyWriter, Inbound, Reason};

/// Why a request did not get through; the HTTP layer maps each to a status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No agent of that name is connected (422).
    #[error("connection for clientID='{0}' not found")]
    NoAgent(String),
    /// The agent failed, reset the request or hung up mid-request (502).
    #[error("agent failed: {0}")]
    AgentFailed(String),
    /// Every agent of the name here lost the request before taking it (502, unless another
    /// relay instance has one: then the request may go there).
    #[error("agent failed: {0}")]
    NotTaken(String),
    /// No response head within the timeout (504).
    #[error("agent did not answer in time")]
    Timeout,
    /// A request another relay instance sent here for an agent this instance does not have (any
    /// more), failing as the inner error says: answered as that one is, with a mark on which the
    /// sending instance tries the next instance listed with the name.
    #[error(transparent)]
    Refused(Box<RouteError>),
}

/// Where the response side stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingHead,
    Body,
    Done,
}

/// A request in flight to an agent.
///
/// Use it in order: [`send`](Self::send) the body chunks, [`finish`](Self::finish), then
/// [`response`](Self::response) and [`next_chunk`](Self::next_chunk) until `None`. The timeout
/// given to `forward` bounds everything up to the response head (body sends included); the
/// response body then streams without a deadline. If `send` fails, still call `response`: an
/// upstream may answer without reading the whole body. Dropping an unfinished exchange resets the
/// stream, which aborts the upstream request.
pub struct Exchange {
    agents: Agents,
    name: String,
    head: RequestHead,
    deadline: Instant,
    /// Links tried so far, so that a retry goes elsewhere.
    tried: Vec<u64>,
    /// When the request was sent to the current link.
    sent_at: Instant,
    link: Arc<Link>,
    writer: BodyWriter,
    reader: BodyReader,
    /// Body chunks sent but not yet taken; `None` once the agent took the request.
    replay: Option<Vec<Bytes>>,
    finished: bool,
    phase: Phase,
    /// Why the exchange failed, once it has: what `response` answers after a failed `send`.
    failure: Option<RouteError>,
}

impl Exchange {
    /// Sends `head` to the least busy agent named `name` (see [`Agents::forward`]).
    pub(crate) async fn start(
        agents: Agents,
        name: &str,
        mut head: RequestHead,
        timeout: Duration,
    ) -> Result<Exchange, RouteError> {
        let deadline = Instant::now() + timeout;
        head.timeout_ms = Some(millis_until(deadline));
        let mut tried = Vec::new();
        let attempt = connect(&agents, name, &head, &mut tried, &[], false, None);
        let (link, writer, reader) = tokio::time::timeout_at(deadline, attempt)
            .await
            .map_err(|_| RouteError::Timeout)??;
        Ok(Exchange {
            agents,
            name: name.to_owned(),
            head,
            deadline,
            tried,
            sent_at: Instant::now(),
            link,
            writer,
            reader,
            replay: Some(Vec::new()),
            finished: false,
            phase: Phase::AwaitingHead,
            failure: None,
        })
    }

    /// Sends one request body chunk (any size; split into frames within the agent's credit).
    pub async fn send(&mut self, chunk: Bytes) -> Result<(), RouteError> {
        if self.finished {
            return Err(RouteError::AgentFailed(
                "request body already finished".into(),
            ));
        }
        loop {
            let deadline = self.head_deadline();
            let Some(outcome) = within(deadline, self.writer.write(chunk.clone())).await else {
                return Err(self.timed_out());
            };
            match outcome {
                Ok(()) => {
                    self.note_sent(chunk);
                    return Ok(());
                }
                Err(reason) => self.retry(reason).await?,
            }
        }
    }

    /// Ends the request body.
    pub async fn finish(&mut self) -> Result<(), RouteError> {
        if self.finished {
            return Ok(());
        }
        loop {
            let deadline = self.head_deadline();
            let Some(outcome) = within(deadline, self.writer.end()).await else {
                return Err(self.timed_out());
            };
            match outcome {
                Ok(()) => {
                    self.finished = true;
                    return Ok(());
                }
                Err(reason) => self.retry(reason).await?,
            }
        }
    }

    /// Waits for the response head (within the timeout).
    pub async fn response(&mut self) -> Result<ResponseHead, RouteError> {
        if self.phase != Phase::AwaitingHead {
            return Err(self
                .failure
                .clone()
                .unwrap_or_else(|| RouteError::AgentFailed("response head already taken".into())));
        }
        loop {
            let deadline = self.head_deadline();
            let Some(item) = within(deadline, self.reader.next()).await else {
                return Err(self.timed_out());
            };
            match item {
                Inbound::Response(payload) => {
                    self.replay = None;
                    self.link.took();
                    return match ResponseHead::from_json(&payload) {
                        Ok(head) => {
                            self.phase = Phase::Body;
                            Ok(head)
                        }
                        Err(err) => Err(self.fail(format!("bad RESPONSE from the agent: {err}"))),
                    };
                }
                Inbound::Reset(reason) => self.retry(reason).await?,
                Inbound::Data(_) | Inbound::End => {
                    return Err(self.fail("the agent sent a body before its response head".into()))
                }
            }
        }
    }

    /// The next response body chunk; `None` once the body is complete.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, RouteError>> {
        if self.phase != Phase::Body {
            return None;
        }
        match self.reader.next().await {
            Inbound::Data(chunk) => Some(Ok(chunk)),
            Inbound::End => {
                self.phase = Phase::Done;
                if !self.finished {
                    // The upstream answered without the rest of the request body; the stream is
                    // complete from the client's side.
                    self.writer.reset("response complete");
                }
                None
            }
            Inbound::Reset(reason) => Some(Err(self.fail(reason))),
            Inbound::Response(_) => Some(Err(self.fail("a second RESPONSE".into()))),
        }
    }

    /// Runs `work` (reading the client's body, say) within the response head's deadline: a
    /// request body slower than the timeout fails the exchange as a late answer would (504).
    pub async fn within_deadline<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, RouteError> {
        match within(self.head_deadline(), work).await {
            Some(done) => Ok(done),
            None => Err(self.timed_out()),
        }
    }

    /// The deadline while no response head has arrived; none after.
    fn head_deadline(&self) -> Option<Instant> {
        (self.phase == Phase::AwaitingHead).then_some(self.deadline)
    }

    /// Ends the exchange because its client left, which the agent logs as the reason (dropping
    /// it ends it too, as abandoned).
    pub fn client_left(&self) {
        self.writer.reset("client left");
    }

    /// The client's body broke off, or is malformed: the stream is reset, which aborts the
    /// upstream request, with `why` for the agent's log.
    pub fn body_failed(&self, why: &str) {
        self.writer.reset(&format!("client body failed: {why}"));
    }

    /// The deadline passed: the stream is reset, which aborts the upstream request.
    fn timed_out(&mut self) -> RouteError {
        self.writer.reset("timeout");
        self.end_with(RouteError::Timeout)
    }

    /// Keeps a sent chunk for replay until the agent has taken the request.
    fn note_sent(&mut self, chunk: Bytes) {
        if self.writer.taken() {
            self.replay = None;
        } else if let Some(replay) = &mut self.replay {
            replay.push(chunk);
        }
    }

    /// The stream failed with `reason`: replays the request on another link if the agent never
    /// took it, else fails.
    async fn retry(&mut self, reason: Reason) -> Result<(), RouteError> {
        let Some(replay) = self.replay.as_ref().filter(|_| !self.writer.taken()) else {
            return Err(self.fail(reason));
        };
        self.link.refused(self.sent_at.elapsed());
        self.head.timeout_ms = Some(millis_until(self.deadline));
        log::debug!(
            "agent {} link {} lost a request before taking it ({reason}); retrying",
            self.name,
            self.link.id
        );
        let attempt = connect(
            &self.agents,
            &self.name,
            &self.head,
            &mut self.tried,
            replay,
            self.finished,
            Some(reason),
        );
        let (link, writer, reader) = match tokio::time::timeout_at(self.deadline, attempt).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(err)) => return Err(self.end_with(err)),
            Err(_) => return Err(self.end_with(RouteError::Timeout)),
        };
        self.link = link;
        self.writer = writer;
        self.reader = reader;
        self.sent_at = Instant::now();
        Ok(())
    }

    fn fail(&mut self, reason: Reason) -> RouteError {
        self.writer.reset(&reason);
        self.end_with(RouteError::AgentFailed(reason))
    }

    /// Ends the exchange with `failure`, which later calls answer too.
    fn end_with(&mut self, failure: RouteError) -> RouteError {
        self.phase = Phase::Done;
        self.failure = Some(failure.clone());
        failure
    }
}

/// The whole milliseconds from now until `deadline` (0 once it has passed).
fn millis_until(deadline: Instant) -> u64 {
    let left = deadline.saturating_duration_since(Instant::now());
    u64::try_from(left.as_millis()).unwrap_or(u64::MAX)
}

/// Runs `work` until `deadline` if there is one; `None` when the deadline passed first.
async fn within<T>(
    deadline: Option<Instant>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, work).await.ok(),
        None => Some(work.await),
    }
}

/// Opens a stream for `head` on the least busy untried link of `name` and sends the head, the
/// body chunks sent so far and, if `finished`, the end; tries the next link when one fails.
async fn connect(
    agents: &Agents,
    name: &str,
    head: &RequestHead,
    tried: &mut Vec<u64>,
    replay: &[Bytes],
    finished: bool,
    mut failure: Option<Reason>,
) -> Result<(Arc<Link>, BodyWriter, BodyReader), RouteError> {
    loop {
        let Some(link) = agents.pick(name, tried) else {
            return Err(match failure {
                None => RouteError::NoAgent(name.to_owned()),
                Some(reason) => RouteError::NotTaken(reason),
            });
        };
        tried.push(link.id);
        match send_request(&link, head, replay, finished).await {
            Ok((writer, reader)) => return Ok((link, writer, reader)),
            Err(reason) => failure = Some(reason),
        }
    }
}

async fn send_request(
    link: &Link,
    head: &RequestHead,
    replay: &[Bytes],
    finished: bool,
) -> Result<(BodyWriter, BodyReader), Reason> {
    let (writer, reader) = link.open()?;
    writer.send(Kind::Head, head.to_json()).await?;
    for chunk in replay {
        writer.write(chunk.clone()).await?;
    }
    if finished {
        writer.end().await?;
    }
    Ok((writer, reader))
}
