//! Prometheus metrics, served by Pingora's Prometheus service on `BURROW_METRICS_LISTEN`.
//!
//! The metrics are process-wide statics in the default registry, which is what that service
//! reports; the rest of Burrow records through the small functions below.

use std::future::Future;
use std::sync::LazyLock;
use std::time::Instant;

use pingora_prometheus::prometheus::{
    register_histogram_vec, register_int_counter_vec, register_int_gauge, register_int_gauge_vec,
    HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
};

// Registration fails only for a duplicate or malformed name, which these constants are not.
static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "burrow_requests_total",
        "HTTP requests answered, by route and status",
        &["route", "status"]
    )
    .expect("metric definition is valid")
});

static REQUEST_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "burrow_request_duration_seconds",
        "Time from a parsed request to its written response, by route",
        &["route"],
        vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0, 30.0, 60.0]
    )
    .expect("metric definition is valid")
});

static WAITING: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("burrow_waiting_polls", "Long-polls waiting right now")
        .expect("metric definition is valid")
});

static AWAITING_AGENT: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "burrow_awaiting_agent",
        "Routed requests waiting for an agent of their name to come back"
    )
    .expect("metric definition is valid")
});

static OPEN: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "burrow_open",
        "Long-lived connections open right now: agents, event subscribers, job sockets",
        &["kind"]
    )
    .expect("metric definition is valid")
});

static STORE_UP: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "burrow_store_up",
        "1 while the store answers (always, for the memory store)"
    )
    .expect("metric definition is valid")
});

static MESSAGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "burrow_messages_total",
        "Messages produced, consumed, acknowledged, replied to, or rejected by backpressure",
        &["event"]
    )
    .expect("metric definition is valid")
});

static STORE_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "burrow_store_errors_total",
        "Failed store operations, by operation",
        &["op"]
    )
    .expect("metric definition is valid")
});

static STORE_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "burrow_store_duration_seconds",
        "Store operation latency, by operation",
        &["op"],
        vec![0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 3.0]
    )
    .expect("metric definition is valid")
});

/// What happened to a message, for `burrow_messages_total`.
#[derive(Debug, Clone, Copy)]
pub enum MessageEvent {
    Produced,
    Consumed,
    Acknowledged,
    Replied,
    Rejected,
}

/// A store operation, for `burrow_store_duration_seconds` and `burrow_store_errors_total`.
#[derive(Debug, Clone, Copy)]
pub enum StoreOp {
    Produce,
    Consume,
    Ack,
    Reply,
    TakeReply,
    Status,
    Len,
    Clear,
    /// Reading every instance's presence record (`GET /agents`, finding an agent elsewhere).
    Instances,
}

impl StoreOp {
    const ALL: [StoreOp; 9] = [
        StoreOp::Produce,
        StoreOp::Consume,
        StoreOp::Ack,
        StoreOp::Reply,
        StoreOp::TakeReply,
        StoreOp::Status,
        StoreOp::Len,
        StoreOp::Clear,
        StoreOp::Instances,
    ];

    fn label(self) -> &'static str {
        match self {
            StoreOp::Produce => "produce",
            StoreOp::Consume => "consume",
            StoreOp::Ack => "ack",
            StoreOp::Reply => "reply",
            StoreOp::TakeReply => "take_reply",
            StoreOp::Status => "status",
            StoreOp::Len => "len",
            StoreOp::Clear => "clear",
            StoreOp::Instances => "instances",
        }
    }
}

impl MessageEvent {
    const ALL: [MessageEvent; 5] = [
        MessageEvent::Produced,
        MessageEvent::Consumed,
        MessageEvent::Acknowledged,
        MessageEvent::Replied,
        MessageEvent::Rejected,
    ];

    fn label(self) -> &'static str {
        match self {
            MessageEvent::Produced => "produced",
            MessageEvent::Consumed => "consumed",
            MessageEvent::Acknowledged => "acknowledged",
            MessageEvent::Replied => "replied",
            MessageEvent::Rejected => "rejected",
        }
    }
}

/// A long-lived connection, for `burrow_open`.
#[derive(Debug, Clone, Copy)]
pub enum Open {
    /// An agent's link (`/agent/connect`).
    Agent,
    /// An events subscriber, over server-sent events or a WebSocket.
    Subscriber,
    /// A jobs WebSocket (`/ws`).
    JobSocket,
}

impl Open {
    const ALL: [Open; 3] = [Open::Agent, Open::Subscriber, Open::JobSocket];

    fn label(self) -> &'static str {
        match self {
            Open::Agent => "agent",
            Open::Subscriber => "subscriber",
            Open::JobSocket => "job_socket",
        }
    }
}

/// Counts one open connection of a kind for as long as it lives.
#[derive(Debug)]
pub struct Opened(Open);

impl Opened {
    /// Starts counting one `kind` of connection.
    pub fn start(kind: Open) -> Opened {
        OPEN.with_label_values(&[kind.label()]).inc();
        Opened(kind)
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        OPEN.with_label_values(&[self.0.label()]).dec();
    }
}

/// Records whether the store answers: its connection came up, or an operation was answered
/// (1); its connection failed, or an operation found it unreachable or unanswering (0).
pub fn store_up(up: bool) {
    // Read first: every store operation reports, and a write on each would bounce the gauge's
    // cache line between threads.
    if STORE_UP.get() != i64::from(up) {
        STORE_UP.set(i64::from(up));
    }
}

/// Creates every series whose labels are known in advance at zero, so that dashboards and
/// alerts (`rate()`, `absent()`) see them from the start, not from their first event.
pub fn init() {
    LazyLock::force(&WAITING);
    LazyLock::force(&AWAITING_AGENT);
    LazyLock::force(&STORE_UP);
    for kind in Open::ALL {
        OPEN.with_label_values(&[kind.label()]);
    }
    for event in MessageEvent::ALL {
        MESSAGES.with_label_values(&[event.label()]);
    }
    for op in StoreOp::ALL {
        STORE_ERRORS.with_label_values(&[op.label()]);
        STORE_SECONDS.with_label_values(&[op.label()]);
    }
}

/// Records one answered request.
pub fn request(route: &str, status: u16, started: Instant) {
    // `StatusCode::as_str` reads a static table: no allocation per request on this hot path.
    let code = labelled(status);
    let label = code.as_ref().map_or("other", http::StatusCode::as_str);
    REQUESTS.with_label_values(&[route, label]).inc();
    REQUEST_SECONDS
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
}

/// The status a request is counted under, if it has a label of its own: a registered one, or
/// nginx's 499 (client closed request). Any other (an agent's upstream may answer with any of
/// 800) is counted as `other`, so that the series stay few.
fn labelled(status: u16) -> Option<http::StatusCode> {
    let code = http::StatusCode::from_u16(status).ok()?;
    (code.canonical_reason().is_some() || status == 499).then_some(code)
}

/// Records a message event.
pub fn message(event: MessageEvent) {
    MESSAGES.with_label_values(&[event.label()]).inc();
}

/// Runs a store operation, recording its latency and whether it failed.
pub async fn store_op<T, E>(op: StoreOp, call: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    let started = Instant::now();
    let result = call.await;
    STORE_SECONDS
        .with_label_values(&[op.label()])
        .observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        STORE_ERRORS.with_label_values(&[op.label()]).inc();
    }
    result
}

/// Counts a waiting request for as long as it lives.
pub struct Waiting(&'static IntGauge);

impl Waiting {
    /// Starts counting one waiting long-poll.
    pub fn poll() -> Waiting {
        Waiting::on(&WAITING)
    }

    /// Starts counting one routed request waiting for its agent to come back.
    pub fn for_agent() -> Waiting {
        Waiting::on(&AWAITING_AGENT)
    }

    fn on(gauge: &'static IntGauge) -> Waiting {
        gauge.inc();
        Waiting(gauge)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Registered statuses and 499 are their own labels; any other is `other`.
    #[test]
    fn status_labels() {
        let label = |status| labelled(status).map(|code| code.as_u16());
        assert_eq!(label(200), Some(200));
        assert_eq!(label(507), Some(507));
        assert_eq!(label(499), Some(499));
        assert_eq!(label(299), None);
        assert_eq!(label(999), None);
        assert_eq!(label(42), None);
    }
}
