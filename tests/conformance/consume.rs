//! Consume (routes 2 and 3): delivery, order and long-polls.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::support::h2;
use crate::support::raw::Connection;
use crate::support::{assert_prompt_wake, let_polls_start, spawn_get, tunnel_id, Backend, Client};

/// A consumed message is gone: the next consume is 204 with an empty body, its status 204, len 0.
pub(super) async fn consume_removes_message(api: &Client) {
    let t = tunnel_id("consume");
    let id = api.produce(&t, "once").await;
    assert_eq!(api.consume(&t, "").await.expect(200).text(), "once");
    api.consume(&t, "").await.expect_empty();
    assert_eq!(api.status(&t, &id).await, 204);
    assert_eq!(api.len(&t).await, 0);
}

/// Messages are handed out in the order they were produced.
pub(super) async fn consume_is_fifo(api: &Client) {
    let t = tunnel_id("fifo");
    let ids = api.produce_numbered(&t, 3).await;
    for (i, id) in ids.iter().enumerate() {
        let consumed = api.consume(&t, "").await.expect(200);
        assert_eq!(
            (consumed.text(), consumed.message_id()),
            (format!("m{i}"), id.clone())
        );
    }
}

/// Consuming a tunnel that never held anything answers 204 with an empty body.
pub(super) async fn empty_tunnel_is_204(api: &Client) {
    api.consume(&tunnel_id("empty"), "").await.expect_empty();
}

/// `timeout=0` on an empty tunnel answers 204 at once.
pub(super) async fn poll_timeout_zero_answers_at_once(api: &Client) {
    let started = Instant::now();
    api.consume(&tunnel_id("poll0"), "/poll?timeout=0")
        .await
        .expect_empty();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );
}

/// `timeout=1` on an empty tunnel answers 204 after about one second.
pub(super) async fn poll_times_out_with_204(api: &Client) {
    let started = Instant::now();
    api.consume(&tunnel_id("poll1"), "/poll?timeout=1")
        .await
        .expect_empty();
    assert_waited(started.elapsed(), 1);
}

/// A poll on a tunnel that holds a message answers at once with it.
pub(super) async fn poll_takes_queued_message_at_once(api: &Client) {
    let t = tunnel_id("pollready");
    let id = api.produce(&t, "ready").await;
    let started = Instant::now();
    let consumed = api.consume(&t, "/poll?timeout=10").await.expect(200);
    assert_eq!(
        (consumed.text(), consumed.message_id()),
        ("ready".to_owned(), id)
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
}

/// A waiting poll gets a message produced meanwhile, promptly rather than at its timeout.
pub(super) async fn poll_wakes_on_produce(api: &Client) {
    let t = tunnel_id("pollwake");
    let poll = spawn_get(api, format!("/t/{t}/poll?timeout=10"));
    let_polls_start(api, 1).await;
    let id = api.produce(&t, "wake up").await;
    let produced = Instant::now();
    let (consumed, _) = poll.await.expect("the poll task does not panic");
    let consumed = consumed.expect(200);
    assert_eq!(
        (consumed.text(), consumed.message_id()),
        ("wake up".to_owned(), id)
    );
    assert_prompt_wake(produced);
}

/// A `timeout` that is not a whole number of seconds is 400, on polls and reply polls.
pub(super) async fn bad_poll_timeout_is_400(api: &Client) {
    let t = tunnel_id("badtimeout");
    for timeout in ["abc", "-1", "1.5"] {
        for route in ["poll", "1-0/reply/poll"] {
            let path = format!("/t/{t}/{route}?timeout={timeout}");
            api.get(&path).await.expect_one_line_error(400);
        }
    }
}

/// Three polls wait, two messages arrive: two polls get one distinct message each, one times out.
pub(super) async fn polls_share_messages(api: &Client) {
    let t = tunnel_id("pollshare");
    let polls: Vec<_> = (0..3)
        .map(|_| spawn_get(api, format!("/t/{t}/poll?timeout=2")))
        .collect();
    let_polls_start(api, 3).await;
    api.produce_numbered(&t, 2).await;
    let mut delivered = BTreeSet::new();
    let mut timed_out = 0;
    for poll in polls {
        let (response, waited) = poll.await.expect("the poll task does not panic");
        match response.status {
            200 => assert!(
                delivered.insert(response.text()),
                "delivered twice: {response:?}"
            ),
            204 => {
                assert_waited(waited, 2);
                timed_out += 1;
            }
            _ => panic!("unexpected poll answer: {response:?}"),
        }
    }
    assert_eq!(
        delivered,
        BTreeSet::from(["m0".to_owned(), "m1".to_owned()])
    );
    assert_eq!(timed_out, 1);
}

/// TUNNEL_MAX_POLL_TIMEOUT=1 caps `timeout=30`, for polls and reply polls.
pub(super) async fn max_poll_timeout_caps_timeout(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_MAX_POLL_TIMEOUT", "1")]);
    let api = relay.client();
    let t = tunnel_id("maxpoll");
    for route in ["poll", "1-0/reply/poll"] {
        let started = Instant::now();
        api.get(&format!("/t/{t}/{route}?timeout=30"))
            .await
            .expect_empty();
        assert_waited(started.elapsed(), 1);
    }
}

/// TUNNEL_DEFAULT_POLL_TIMEOUT=1 is the timeout of a poll that names none.
pub(super) async fn default_poll_timeout_setting(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_DEFAULT_POLL_TIMEOUT", "1")]);
    let api = relay.client();
    let started = Instant::now();
    api.consume(&tunnel_id("defaultpoll"), "/poll")
        .await
        .expect_empty();
    assert_waited(started.elapsed(), 1);
}

/// Asserts that a poll with a `seconds` timeout waited for it, and not much longer.
#[track_caller]
pub(super) fn assert_waited(waited: Duration, seconds: u64) {
    let timeout = Duration::from_secs(seconds);
    assert!(
        waited >= timeout - Duration::from_millis(100) && waited < timeout + Duration::from_secs(3),
        "a {seconds} s poll answered after {waited:?}"
    );
}

/// A long-poll leaves its connection open for the client's next requests, whether it timed out
/// or took a message, as an HTTP/1.1 client expects.
pub(super) async fn poll_keeps_the_connection(api: &Client) {
    let t = tunnel_id("pollkeep");
    let mut connection = Connection::open(api.base()).await;
    let poll = format!("GET /t/{t}/poll?timeout=1 HTTP/1.1\r\nHost: relay\r\n\r\n");
    let timed_out = connection.exchange(&poll).await;
    assert_eq!(
        (timed_out.status, timed_out.header("connection")),
        (204, Some("keep-alive"))
    );
    let produce = format!("POST /t/{t} HTTP/1.1\r\nHost: relay\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(connection.exchange(&produce).await.status, 201);
    let taken = connection.exchange(&poll).await;
    assert_eq!((taken.status, taken.body.as_slice()), (200, &b"hello"[..]));
    let health = connection
        .exchange("GET /health HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await;
    assert_eq!(health.status, 200);
}

/// A client that shuts its sending side after its request (a half-close) still reads: a poll
/// that finds a message, or a reply, hands it over (the relay took it mid-way as the client's
/// end of input came, and lost it); one that finds nothing takes nothing, and ends without an
/// answer, as for a client that hung up.
pub(super) async fn half_closed_polls_lose_nothing(api: &Client) {
    let t = tunnel_id("halfclosed");
    let poll = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n");
    let half_closed = |path: String| async move {
        let connection = Connection::open(api.base()).await;
        connection.half_closed(&poll(&path)).await
    };
    api.post(&format!("/t/{t}"), "first").await.expect(201);
    let taken = half_closed(format!("/t/{t}/poll?timeout=3")).await;
    let taken = taken.expect("the message is answered");
    assert_eq!((taken.status, taken.body.as_slice()), (200, &b"first"[..]));
    let none = half_closed(format!("/t/{t}/poll?timeout=3")).await;
    assert!(none.is_none(), "{none:?}");
    api.post(&format!("/t/{t}"), "second").await.expect(201);
    let pending = api.get(&format!("/t/{t}?pending=60")).await.expect(200);
    assert_eq!(pending.text(), "second");
    let reply = format!("/t/{t}/{}/reply", pending.message_id());
    api.post(&reply, "answer").await.expect(201);
    let replied = half_closed(format!("{reply}/poll?timeout=3")).await;
    let replied = replied.expect("the reply is answered");
    assert_eq!(
        (replied.status, replied.body.as_slice()),
        (200, &b"answer"[..])
    );
}

/// Requests sent together before any answer (HTTP/1.1 pipelining) are all answered, in order,
/// a long-poll that waits among them too.
pub(super) async fn pipelined_requests_are_answered_in_order(api: &Client) {
    let t = tunnel_id("pipelined");
    let mut connection = Connection::open(api.base()).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n");
    let post = |body: &str| {
        let length = body.len();
        format!(
            "POST /t/{t}?limit=0 HTTP/1.1\r\nHost: relay\r\nContent-Length: {length}\r\n\r\n{body}"
        )
    };
    let answers = connection
        .pipeline(&[
            get(&format!("/t/{t}/poll?timeout=1")),
            post("m1"),
            post("m2"),
            get(&format!("/t/{t}")),
            get(&format!("/t/{t}/poll?timeout=5")),
        ])
        .await;
    let seen: Vec<(u16, &[u8])> = answers
        .iter()
        .map(|a| (a.status, a.body.as_slice()))
        .collect();
    assert_eq!(
        seen,
        [
            (204, &b""[..]),
            (201, b""),
            (201, b""),
            (200, b"m1"),
            (200, b"m2")
        ]
    );
}

/// A request, a long-poll as any other, closes its connection after answering when the client
/// asks for that (`Connection: close`, or HTTP/1.0 without keep-alive), and an HTTP/1.0 client
/// that asked for keep-alive keeps it.
pub(super) async fn requests_close_when_asked(api: &Client) {
    let t = tunnel_id("plainclose");
    for request in [
        format!("GET /t/{t}/poll?timeout=0 HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"),
        format!("GET /t/{t}/poll?timeout=0 HTTP/1.0\r\n\r\n"),
        format!("GET /t/{t} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"),
        format!("GET /t/{t} HTTP/1.0\r\n\r\n"),
        format!("GET /t/{t}/len HTTP/1.0\r\nHost: relay\r\n\r\n"),
    ] {
        let mut connection = Connection::open(api.base()).await;
        let answer = connection.exchange(&request).await;
        assert_eq!(
            (answer.status, answer.header("connection")),
            (204, Some("close")),
            "{request:?}"
        );
        assert!(connection.closed().await, "still open after {request:?}");
    }
    let mut connection = Connection::open(api.base()).await;
    for _ in 0..2 {
        let request = format!("GET /t/{t} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        let answer = connection.exchange(&request).await;
        assert_eq!(
            answer.status, 204,
            "the connection was kept for a second request"
        );
    }
}

/// Burrow: a body sent with a long-poll is not read, so the connection is closed after the answer
/// rather than left for the next request to trip on.
pub(super) async fn poll_with_a_body_closes_after_answering(backend: Backend) {
    let api = backend.shared().client();
    let t = tunnel_id("pollbody");
    let mut connection = Connection::open(api.base()).await;
    let poll = format!(
        "GET /t/{t}/poll?timeout=0 HTTP/1.1\r\nHost: relay\r\nContent-Length: 3\r\n\r\nabc"
    );
    let answer = connection.exchange(&poll).await;
    assert_eq!(
        (answer.status, answer.header("connection")),
        (204, Some("close"))
    );
    assert!(
        connection.closed().await,
        "still open after a poll with a body"
    );
}

/// Burrow: over h2c (HTTP/2 without TLS, streams sharing one connection) a long-poll waits in
/// place instead of leaving the session, and is woken like any other.
pub(super) async fn h2c_poll_wakes_on_produce(backend: Backend) {
    let api = backend.shared().client();
    let t = tunnel_id("h2cpoll");
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("an h2c client builds");
    let url = format!("{}/t/{t}/poll?timeout=10", api.base());
    let poll = tokio::spawn(async move { h2c.get(url).send().await });
    let_polls_start(&api, 1).await;
    api.produce(&t, "over h2c").await;
    let produced = Instant::now();
    let response = poll
        .await
        .expect("the poll task does not panic")
        .expect("the relay answers over h2c");
    assert_eq!(
        (response.version(), response.status().as_u16()),
        (reqwest::Version::HTTP_2, 200)
    );
    assert_eq!(response.text().await.expect("a body"), "over h2c");
    assert_prompt_wake(produced);
}

/// Burrow: an HTTP/2 request body may end in trailers (ignored) rather than an empty end of
/// stream: a produce so sent is stored, and a long-poll so sent waits and answers as any other
/// (it answered never, its thread spinning).
pub(super) async fn h2c_trailers_end_a_request(backend: Backend) {
    let relay = backend.shared();
    let t = tunnel_id("h2trailers");
    let content = [("content-type", "text/plain")];
    let base = relay.base.as_str();
    let produced = h2::with_trailers(base, "POST", &format!("/t/{t}"), &content, "trailed").await;
    assert_eq!(produced.0, 201, "{produced:?}");
    let poll = format!("/t/{t}/poll?timeout=1");
    let taken = h2::with_trailers(base, "GET", &poll, &[], "").await;
    assert_eq!(taken, (200, "trailed".to_owned()));
    let timed_out = h2::with_trailers(base, "GET", &poll, &[], "").await;
    assert_eq!(timed_out.0, 204, "{timed_out:?}");
    assert_eq!(relay.client().get("/health").await.expect(200).text(), "OK");
}
