//! The relay's tunnel API as a worker uses it: take a job (a long-poll in pending mode with a
//! visibility timeout) and hand in its result (a reply), riding out relay outages with back-off.
//!
//! Outages are logged once, not once per attempt: every polling loop shares one [`Outage`], which
//! logs when the relay first fails and again when it answers well.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;

use crate::tunnel::{MessageId, TunnelId};

/// How long one take waits at the relay (`timeout=` of the poll); the relay may cap it lower.
const POLL_TIMEOUT: Duration = Duration::from_secs(30);

/// How much longer than the poll itself a poll request may take before it counts as lost.
const POLL_MARGIN: Duration = Duration::from_secs(15);

/// The longest a reply request may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A poll answered "nothing" sooner than this did not wait (the relay is shutting down or caps
/// polls at 0 s): pause briefly before the next, so the loop cannot spin.
const EARLY_ANSWER: Duration = Duration::from_millis(500);

/// The first retry delay after a failure; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How far apart a reply's last tries come, as its deadline nears.
const LAST_TRIES_APART: Duration = Duration::from_millis(50);

/// A job taken from the queue: the message in pending mode.
#[derive(Debug)]
pub struct Job {
    /// The message id, which the reply names.
    pub id: MessageId,
    /// The job's JSON, exactly as produced.
    pub body: Bytes,
    /// When the relay's answer arrived: its visibility timeout started just before, when the
    /// relay handed the job out (not when the poll was sent, which may have waited long).
    pub taken: Instant,
}

/// A job's result as handed to the relay.
#[derive(Debug, Clone)]
pub struct Reply {
    /// `application/json`, `text/plain; charset=utf-8`… or `application/problem+json` for failures.
    pub content_type: &'static str,
    /// The reply body.
    pub body: Bytes,
}

/// What became of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// 201: the relay stored the result and acknowledged the job.
    Accepted,
    /// 204: the job was no longer pending (redelivered after its visibility timeout, or
    /// acknowledged), so the relay dropped this result.
    NotPending,
    /// 204 after an earlier attempt that got no clear answer (a 5xx, a timeout, a cut
    /// connection): that attempt may have delivered the result, or the job was no longer pending.
    MaybeEarlier,
    /// 413: the result is larger than the relay's `TUNNEL_MAX_MESSAGE_SIZE`.
    TooLarge,
    /// The relay could not be reached before the job's visibility timeout; another worker will get
    /// the job.
    GaveUp,
}

/// Why one request to the relay did not get a usable answer.
#[derive(Debug, thiserror::Error)]
pub enum Fault {
    /// No answer: connection refused or reset, DNS, TLS, timeout.
    #[error("cannot reach the relay: {}", crate::error::error_chain(.0))]
    Unreachable(#[source] reqwest::Error),
    /// An answer the protocol does not expect here (403, 5xx…).
    #[error("the relay answered {status}: {text}")]
    Status { status: StatusCode, text: String },
    /// A 200 to a poll without a usable message id.
    #[error("the relay handed out a job without a valid X-Message-Id")]
    NoMessageId,
}

impl Fault {
    /// A 4xx is a misconfiguration (a wrong token, a wrong URL) that waiting alone will not cure.
    fn level(&self) -> log::Level {
        match self {
            Fault::Status { status, .. } if status.is_client_error() => log::Level::Error,
            _ => log::Level::Warn,
        }
    }
}

/// Builds the HTTP client every request of a worker goes through.
pub fn http_client(token: Option<&str>) -> Result<reqwest::Client, reqwest::Error> {
    let mut headers = HeaderMap::new();
    if let Some(token) = token {
        if let Ok(mut value) = HeaderValue::from_str(&format!("Bearer {token}")) {
            // Keeps the token out of reqwest's debug output.
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .user_agent(concat!("burrow-worker/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(5))
        .build()
}

/// One job queue on one relay.
pub struct Relay {
    http: reqwest::Client,
    /// `{relay}/t/{queue}`.
    queue_url: String,
    /// The visibility timeout asked for, in seconds.
    visibility: u64,
    outage: Outage,
}

impl Relay {
    /// The queue `queue` on the relay at `base` (`http[s]://host[:port][/prefix]`).
    pub fn new(http: reqwest::Client, base: &str, queue: &TunnelId, visibility: u64) -> Relay {
        Relay {
            http,
            queue_url: format!("{}/t/{queue}", base.trim_end_matches('/')),
            visibility,
            outage: Outage::default(),
        }
    }

    /// Waits for the next job, retrying through outages for as long as it takes.
    ///
    /// Cancel-safe in the sense that matters: dropping the future only abandons a waiting poll,
    /// and a job the relay handed out just then stays pending and is redelivered after its
    /// visibility timeout.
    pub async fn take(&self) -> Job {
        let mut backoff = Backoff::default();
        loop {
            let asked = Instant::now();
            match self.poll_once().await {
                Ok(Some(job)) => {
                    self.outage.over();
                    return job;
                }
                Ok(None) => {
                    self.outage.over();
                    backoff = Backoff::default();
                    if asked.elapsed() < EARLY_ANSWER {
                        tokio::time::sleep(jitter(FIRST_BACKOFF)).await;
                    }
                }
                Err(fault) => {
                    self.outage.begun("taking a job", &fault);
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// One long-poll: a job, nothing (204), or why not.
    async fn poll_once(&self) -> Result<Option<Job>, Fault> {
        let response = self
            .http
            .get(format!("{}/poll", self.queue_url))
            .query(&[
                ("pending", self.visibility),
                ("timeout", POLL_TIMEOUT.as_secs()),
            ])
            .timeout(POLL_TIMEOUT + POLL_MARGIN)
            .send()
            .await
            .map_err(Fault::Unreachable)?;
        match response.status() {
            StatusCode::OK => {
                let taken = Instant::now();
                let id = response
                    .headers()
                    .get("x-message-id")
                    .and_then(|id| id.to_str().ok())
                    .and_then(|id| id.parse::<MessageId>().ok())
                    .ok_or(Fault::NoMessageId)?;
                let body = response.bytes().await.map_err(Fault::Unreachable)?;
                Ok(Some(Job { id, body, taken }))
            }
            StatusCode::NO_CONTENT => Ok(None),
            _ => Err(unexpected(response).await),
        }
    }

    /// Hands in `reply` for `job`, retrying through outages until `deadline` (when the job's
    /// visibility timeout would have expired and another worker may have it).
    pub async fn reply(&self, job: &Job, reply: &Reply, deadline: Instant) -> Delivery {
        let mut backoff = Backoff::default();
        let mut unclear = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Delivery::GaveUp;
            }
            match self
                .reply_once(job.id, reply, left.min(REPLY_TIMEOUT))
                .await
            {
                Ok(delivery) => {
                    self.outage.over();
                    return match delivery {
                        Delivery::NotPending if unclear => Delivery::MaybeEarlier,
                        delivery => delivery,
                    };
                }
                Err(fault) => {
                    unclear = true;
                    self.outage
                        .begun(&format!("handing in job {}", job.id), &fault);
                    // Tried again before the deadline, however long the back-off has grown: a
                    // relay back by then takes the reply, and the job does not run twice.
                    let left = deadline.saturating_duration_since(Instant::now());
                    let delay = backoff.next_delay().min(left / 2).max(LAST_TRIES_APART);
                    if delay >= left {
                        return Delivery::GaveUp;
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One reply request.
    async fn reply_once(
        &self,
        id: MessageId,
        reply: &Reply,
        timeout: Duration,
    ) -> Result<Delivery, Fault> {
        let response = self
            .http
            .post(format!("{}/{id}/reply", self.queue_url))
            .header(CONTENT_TYPE, reply.content_type)
            .body(reply.body.clone())
            .timeout(timeout)
            .send()
            .await
            .map_err(Fault::Unreachable)?;
        match response.status() {
            StatusCode::CREATED => Ok(Delivery::Accepted),
            StatusCode::NO_CONTENT => Ok(Delivery::NotPending),
            StatusCode::PAYLOAD_TOO_LARGE => Ok(Delivery::TooLarge),
            _ => Err(unexpected(response).await),
        }
    }
}

/// A [`Fault::Status`] with the first line of the relay's (one-line, plain-text) error body.
async fn unexpected(response: reqwest::Response) -> Fault {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let text: String = body
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    Fault::Status { status, text }
}

/// Whether the relay is failing right now, shared by all polling loops so that an outage is logged
/// once when it begins and once when it ends.
#[derive(Default)]
struct Outage {
    on: AtomicBool,
}

impl Outage {
    fn begun(&self, doing: &str, fault: &Fault) {
        if self.on.swap(true, Ordering::Relaxed) {
            log::debug!("{doing}: {fault}; still retrying");
        } else {
            log::log!(
                fault.level(),
                "{doing}: {fault}; retrying with back-off until it answers"
            );
        }
    }

    fn over(&self) {
        if self.on.swap(false, Ordering::Relaxed) {
            log::info!("the relay answers again");
        }
    }
}

/// Exponential back-off: 100 ms doubling to 10 s, each delay jittered so that many workers
/// recovering from one outage do not hit the relay in step.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            next: FIRST_BACKOFF,
        }
    }
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let delay = jitter(self.next);
        self.next = (self.next * 2).min(MAX_BACKOFF);
        delay
    }
}

/// A random delay between half of `base` and `base` ("equal jitter": never much shorter than
/// planned, yet spread out).
fn jitter(base: Duration) -> Duration {
    let half = base / 2;
    let spread = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
    half + Duration::from_millis(fastrand::u64(0..=spread))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delays double from 100 ms to 10 s and stay within their jitter band.
    #[test]
    fn backoff_doubles_to_ten_seconds() {
        let mut backoff = Backoff::default();
        let mut base = FIRST_BACKOFF;
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(delay >= base / 2 && delay <= base, "{delay:?} for {base:?}");
            base = (base * 2).min(MAX_BACKOFF);
        }
        assert_eq!(backoff.next, MAX_BACKOFF);
    }

    /// A reply the relay does not take is tried until shortly before its deadline, however long
    /// the back-off has grown (it gave up with up to half of its time left: probe AD).
    #[tokio::test]
    async fn reply_is_tried_until_its_deadline() {
        // A port nothing listens at: every try is refused at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("an address").port();
        drop(listener);
        let queue = TunnelId::parse("jobs").expect("a valid id");
        let base = format!("http://127.0.0.1:{port}");
        let relay = Relay::new(reqwest::Client::new(), &base, &queue, 10);
        let job = Job {
            id: "1-0".parse().expect("a valid id"),
            body: Bytes::new(),
            taken: Instant::now(),
        };
        let reply = Reply {
            content_type: "text/plain",
            body: Bytes::from_static(b"done"),
        };
        let deadline = Instant::now() + Duration::from_secs(4);
        assert_eq!(relay.reply(&job, &reply, deadline).await, Delivery::GaveUp);
        let late = deadline - 4 * LAST_TRIES_APART;
        let given_up = Instant::now();
        assert!(given_up >= late, "gave up {:?} early", deadline - given_up);
    }
}
