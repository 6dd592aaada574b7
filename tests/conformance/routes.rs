//! URLs, methods, `/health` and `/demo/`, CORS and error bodies.

use std::time::{Duration, Instant};

use reqwest::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::raw::Connection;
use crate::support::says::{FULL, LIMIT_TOO_BIG, MALFORMED};
use crate::support::{tunnel_id, wait_until, Backend, Client, Response};

/// A tunnel id of 1024 characters works; 1025 characters is 400 `Malformed url`.
pub(super) async fn tunnel_id_length_limit(api: &Client) {
    let mut t = tunnel_id("long");
    t.extend(std::iter::repeat_n('x', 1024 - t.len()));
    api.produce(&t, "long").await;
    assert_eq!(api.consume(&t, "").await.expect(200).text(), "long");
    t.push('x');
    api.post(&format!("/t/{t}"), "too long")
        .await
        .expect_error(400, MALFORMED);
    api.consume(&t, "").await.expect_error(400, MALFORMED);
}

/// Paths under `/t/` that match no route are 400 `Malformed url`.
pub(super) async fn malformed_urls_are_400(api: &Client) {
    let cases = [
        (Method::GET, "/t/a.b"),
        (Method::POST, "/t/a.b"),
        (Method::GET, "/t/a%20b"),
        (Method::GET, "/t/a/b"),
        (Method::DELETE, "/t/a/b"),
        (Method::GET, "/t/"),
        (Method::GET, "/t/a/1-0/x"),
        (Method::GET, "/t/a/1-0/reply/x"),
        (Method::GET, "/t/a/12345678901234567-0"),
    ];
    for (method, path) in cases {
        let response = api.send(api.request(method.clone(), path)).await;
        assert_eq!(response.status, 400, "{method} {path}: {response:?}");
        response.expect_error(400, MALFORMED);
    }
}

/// A trailing slash is accepted on every route the protocol marks `[/]`.
pub(super) async fn trailing_slash_is_accepted(api: &Client) {
    let t = tunnel_id("slash");
    let acked = api
        .post(&format!("/t/{t}/"), "one")
        .await
        .expect(201)
        .message_id();
    assert_eq!(api.get(&format!("/t/{t}/{acked}/")).await.status, 201);
    assert_eq!(
        api.get(&format!("/t/{t}/?pending"))
            .await
            .expect(200)
            .message_id(),
        acked
    );
    api.delete(&format!("/t/{t}/{acked}/")).await.expect_empty();
    assert_eq!(api.status(&t, &acked).await, 204);

    let replied = api.produce(&t, "two").await;
    api.consume(&t, "?pending").await.expect(200);
    api.get(&format!("/t/{t}/{replied}/reply/poll/?timeout=0"))
        .await
        .expect_empty();
    api.post(&format!("/t/{t}/{replied}/reply/"), "answer")
        .await
        .expect(201);
    let read = api
        .get(&format!("/t/{t}/{replied}/reply/"))
        .await
        .expect(200);
    assert_eq!(read.text(), "answer");

    let polled = api.produce(&t, "three").await;
    api.consume(&t, "?pending").await.expect(200);
    api.post(&format!("/t/{t}/{polled}/reply"), "polled")
        .await
        .expect(201);
    let read = api
        .get(&format!("/t/{t}/{polled}/reply/poll/?timeout=1"))
        .await
        .expect(200);
    assert_eq!(read.text(), "polled");
}

/// A run of slashes counts as one, as the original's nginx read paths: a client whose base URL
/// ends in `/` reaches the same tunnel.
pub(super) async fn repeated_slashes_count_as_one(api: &Client) {
    let t = tunnel_id("slashes");
    api.post(&format!("//t/{t}"), "merged").await.expect(201);
    let read = api.get(&format!("/t//{t}//?pending")).await.expect(200);
    assert_eq!(read.text(), "merged");
    let id = read.message_id();
    assert_eq!(api.get(&format!("//t/{t}//{id}")).await.status, 202);
}

/// `poll`, `len` and `all` are routes in the second segment and plain tunnel ids in the first.
pub(super) async fn fixed_words_are_routes_or_tunnels(api: &Client) {
    let t = tunnel_id("words");
    api.produce(&t, "queued").await;
    assert_eq!(
        api.get(&format!("/t/{t}/len"))
            .await
            .expect(204)
            .queue_size(),
        Some(1)
    );
    assert_eq!(
        api.get(&format!("/t/{t}/poll?timeout=0"))
            .await
            .expect(200)
            .text(),
        "queued"
    );
    for word in ["poll", "len", "all"] {
        let id = api.produce(word, "in a tunnel named after a route").await;
        assert_eq!(api.status(word, &id).await, 201, "tunnel {word}");
        api.delete(&format!("/t/{word}/{id}")).await.expect_empty();
    }
}

/// Tunnel ids are case-sensitive: `X` and `x` are two tunnels.
pub(super) async fn tunnel_ids_are_case_sensitive(api: &Client) {
    let t = tunnel_id("Case");
    api.produce(&t, "upper").await;
    api.consume(&t.to_lowercase(), "").await.expect_empty();
    assert_eq!(api.consume(&t, "").await.expect(200).text(), "upper");
}

/// A known route with a method it does not serve is 405 with an `Allow` header naming those it does.
pub(super) async fn wrong_method_is_405(api: &Client) {
    let t = tunnel_id("methods");
    let cases = [
        (Method::PUT, format!("/t/{t}"), &["GET", "POST"][..]),
        (Method::POST, format!("/t/{t}/poll"), &["GET"][..]),
        (Method::DELETE, format!("/t/{t}/len"), &["GET"][..]),
        (Method::GET, format!("/t/{t}/all"), &["DELETE"][..]),
        (Method::PUT, format!("/t/{t}/1-0"), &["GET", "DELETE"][..]),
        (
            Method::DELETE,
            format!("/t/{t}/1-0/reply"),
            &["GET", "POST"][..],
        ),
    ];
    for (method, path, allowed) in cases {
        let response = api.send(api.request(method.clone(), &path)).await;
        let response = response.expect_one_line_error(405);
        let allow = response.header("allow").unwrap_or_default().to_owned();
        for served in allowed {
            assert!(
                allow.contains(served),
                "{method} {path}: Allow {allow:?} lacks {served}"
            );
        }
    }
}

/// `/health` answers `OK` as text/plain, `/demo/` is an HTML page using `fetch(`, `/nope` is 404.
pub(super) async fn health_demo_and_not_found(api: &Client) {
    let health = api.get("/health").await.expect(200);
    assert_eq!(health.text().trim_end_matches('\n'), "OK");
    // A prefix, as the original's nginx location was: probes set up at `/healthz` keep passing.
    assert_eq!(api.get("/healthz").await.expect(200).text(), health.text());
    assert!(
        content_type(&health).starts_with("text/plain"),
        "{health:?}"
    );
    let demo = api.get("/demo/").await.expect(200);
    assert!(content_type(&demo).starts_with("text/html"), "{demo:?}");
    assert!(
        demo.text().contains("fetch("),
        "the demo page does not call fetch"
    );
    api.get("/nope").await.expect(404);
}

/// Every response carries the CORS headers: 200, 201, 204, 400, 404, 405 and 507.
pub(super) async fn cors_headers_on_every_response(api: &Client) {
    let t = tunnel_id("cors");
    let responses = [
        api.post(&format!("/t/{t}?limit=1"), "one")
            .await
            .expect(201),
        api.post(&format!("/t/{t}?limit=1"), "two")
            .await
            .expect(507),
        api.consume(&t, "").await.expect(200),
        api.consume(&t, "").await.expect(204),
        api.get("/t/a.b").await.expect(400),
        api.get("/nope").await.expect(404),
        api.get(&format!("/t/{t}/all")).await.expect(405),
        api.get("/health").await.expect(200),
    ];
    for response in &responses {
        assert_cors(response);
    }
}

/// `OPTIONS` on a tunnel answers 204 with `Max-Age: 3600` and the requested headers allowed; so
/// does one on any other path, as a browser sends before a request addressed to an agent by
/// `x-backstream-client-id`.
pub(super) async fn preflight_allows_requested_headers(api: &Client) {
    let t = tunnel_id("preflight");
    for path in [
        format!("/t/{t}"),
        format!("/t/{t}/poll"),
        format!("/t/{t}/1-0/reply"),
        "/api/items?page=2".to_owned(),
    ] {
        let preflight = api
            .request(Method::OPTIONS, &path)
            .header("Origin", "https://example.org")
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization, content-type",
            );
        let response = api.send(preflight).await.expect(204);
        assert_preflight(&response);
    }
}

/// Error bodies are one line of plain text saying what was wrong.
pub(super) async fn error_bodies_are_one_line(api: &Client) {
    let t = tunnel_id("errors");
    api.get("/t/a.b").await.expect_one_line_error(400);
    api.post(&format!("/t/{t}?limit=1001"), "x")
        .await
        .expect_error(400, LIMIT_TOO_BIG);
    api.post(&format!("/t/{t}?limit=abc"), "x")
        .await
        .expect_one_line_error(400);
    api.consume(&t, "/poll?timeout=abc")
        .await
        .expect_one_line_error(400);
    api.consume(&t, "?pending=abc")
        .await
        .expect_one_line_error(400);
    api.get(&format!("/t/{t}/all"))
        .await
        .expect_one_line_error(405);
    api.get("/nope").await.expect_one_line_error(404);
    api.post(&format!("/t/{t}?limit=1"), "x").await.expect(201);
    api.post(&format!("/t/{t}?limit=1"), "x")
        .await
        .expect_error(507, FULL);
}

/// Asserts the three CORS headers every response carries.
#[track_caller]
pub(super) fn assert_cors(response: &Response) {
    let expected = [
        ("access-control-allow-origin", "*"),
        ("access-control-allow-methods", "GET, POST, DELETE, OPTIONS"),
        (
            "access-control-expose-headers",
            "*, X-Message-Id, X-Queue-Size",
        ),
    ];
    for (name, value) in expected {
        assert_eq!(response.header(name), Some(value), "{name}: {response:?}");
    }
}

/// Asserts a preflight answer for `Access-Control-Request-Headers: authorization, content-type`.
#[track_caller]
pub(super) fn assert_preflight(response: &Response) {
    assert_cors(response);
    assert_eq!(
        response.header("access-control-max-age"),
        Some("3600"),
        "{response:?}"
    );
    let allowed = response
        .header("access-control-allow-headers")
        .unwrap_or_default()
        .to_lowercase();
    for requested in ["authorization", "content-type"] {
        assert!(
            allowed.contains(requested),
            "Allow-Headers {allowed:?} lacks {requested}"
        );
    }
}

fn content_type(response: &Response) -> &str {
    response.header("content-type").unwrap_or_default()
}

/// Burrow: a whole HTTP/1.0 request shorter than HTTP/2's 24-byte preface (HAProxy's default
/// health check, `OPTIONS / HTTP/1.0`, is 22 bytes) is answered at once, not held while the
/// relay waits for bytes that tell HTTP/2 from HTTP/1. HTTP/2 without TLS still works
/// (`h2c_poll_wakes_on_produce`).
pub(super) async fn short_requests_are_answered(backend: Backend) {
    let relay = backend.shared();
    for (request, status) in [
        ("OPTIONS / HTTP/1.0\r\n\r\n", 204),
        ("GET /t/x HTTP/1.0\r\n\r\n", 204),
        ("GET /demo HTTP/1.0\r\n\r\n", 200),
    ] {
        assert!(
            request.len() < 24,
            "{request:?} is not shorter than the preface"
        );
        let mut connection = Connection::open(&relay.base).await;
        let asked = Instant::now();
        let answer = connection.exchange(request).await;
        assert_eq!(answer.status, status, "{request:?}");
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{request:?} answered after {:?}",
            asked.elapsed()
        );
    }
}

/// Burrow: `HEAD /health` (some load balancers' health check) and `HEAD /demo/` (uptime checks)
/// are 200 without a body, and the connection stays usable for the next request; a HEAD that
/// would hand something out is 405. Over h2c as well.
pub(super) async fn head_health(backend: Backend) {
    let api = backend.shared().client();
    for path in ["/health", "/demo/"] {
        let head = api.send(api.request(Method::HEAD, path)).await;
        assert_eq!(head.status, 200, "{path}");
        assert!(head.body.is_empty(), "{head:?}");
        assert_eq!(api.get("/health").await.expect(200).text(), "OK");
    }
    api.send(api.request(Method::HEAD, "/t/x"))
        .await
        .expect(405);
    // Over h2c too, where a body sent after the head is a protocol error to the client.
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("an h2c client builds");
    for (path, status) in [
        ("/health", 200),
        ("/agents", 200),
        ("/demo/", 200),
        ("/t/x", 405),
    ] {
        let url = format!("{}{path}", api.base());
        let head = h2c.head(url).send().await.expect("an answer over h2c");
        assert_eq!(head.status().as_u16(), status, "{path}");
        let body = head.bytes().await.expect("a whole answer over h2c");
        assert!(body.is_empty(), "{path}: {body:?}");
    }
}

/// Burrow: a chunked body that does not parse is 400 with a plain reason (not the HTTP library's
/// wording), and nothing is stored.
pub(super) async fn malformed_bodies_get_400(backend: Backend) {
    let relay = backend.shared();
    let t = tunnel_id("badchunk");
    let mut connection = Connection::open(&relay.base).await;
    let request = format!(
        "POST /t/{t} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n0\r\n\r\n"
    );
    let answer = connection.exchange(&request).await;
    assert_eq!(answer.status, 400);
    assert_eq!(
        String::from_utf8_lossy(&answer.body),
        "Could not read the request: the body is malformed"
    );
    // What followed the broken body cannot be told from a next request: the connection closes.
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(connection.closed().await);
    assert_eq!(relay.client().len(&t).await, 0);
}

/// Burrow: a request head still incomplete `BURROW_HEADER_TIMEOUT` after its first byte (a client
/// trickling it, as slowloris does) is answered 408 and its connection closed, however often
/// bytes arrive; a kept-alive connection may still stay idle longer than that between requests.
pub(super) async fn slow_heads_get_408(backend: Backend) {
    let relay = backend.start(&[("BURROW_HEADER_TIMEOUT", "1")]);
    let health = "GET /health HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut idle = Connection::open(&relay.base).await;
    assert_eq!(idle.exchange(health).await.status, 200);
    let idle_since = Instant::now();

    let address = relay.base.trim_start_matches("http://");
    let mut slow = TcpStream::connect(address)
        .await
        .expect("the relay accepts");
    let (mut reader, mut writer) = slow.split();
    writer
        .write_all(b"GET /health HTTP/1.1\r\n")
        .await
        .expect("sent");
    let trickle = async {
        // A header line every 200 ms, for up to ten times the timeout.
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if writer.write_all(b"X-Slow: 1\r\n").await.is_err() {
                break;
            }
        }
    };
    let mut answer = Vec::new();
    tokio::select! {
        _ = trickle => panic!("a trickled head was never cut off"),
        read = reader.read_to_end(&mut answer) => read.expect("the answer, then the close"),
    };
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\nRequest head not complete within 1 s"),
        "{answer}"
    );
    // A head whose first byte could begin HTTP/2's preface (`P`) has no more time: the timeout
    // runs from that byte, not again once the next one tells HTTP/1.
    let mut slow = TcpStream::connect(address)
        .await
        .expect("the relay accepts");
    slow.write_all(b"P").await.expect("sent");
    let began = Instant::now();
    tokio::time::sleep(Duration::from_millis(700)).await;
    slow.write_all(b"OST /t/x HTTP/1.1\r\n")
        .await
        .expect("sent");
    let mut answer = Vec::new();
    slow.read_to_end(&mut answer)
        .await
        .expect("the answer, then the close");
    let took = began.elapsed();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408 "));
    assert!(took < Duration::from_millis(1500), "408 after {took:?}");

    // Longer than the header timeout: idle time between requests is not head time, also after a
    // long-poll that waited (and so was answered outside Pingora's session).
    tokio::time::sleep_until((idle_since + Duration::from_millis(1500)).into()).await;
    assert_eq!(idle.exchange(health).await.status, 200);
    let poll = format!(
        "GET /t/{}/poll?timeout=1 HTTP/1.1\r\nHost: a\r\n\r\n",
        tunnel_id("idlepoll")
    );
    assert_eq!(idle.exchange(&poll).await.status, 204);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(idle.exchange(health).await.status, 200);

    // A first byte that could start the HTTP/2 preface, and nothing more: closed at the deadline
    // too, not after the minute a silent connection may wait.
    let mut preface = TcpStream::connect(address)
        .await
        .expect("the relay accepts");
    preface.write_all(b"P").await.expect("sent");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), preface.read_to_end(&mut rest));
    assert!(
        matches!(closed.await, Ok(Ok(0))),
        "still open or answered: {rest:?}"
    );
}

/// Burrow: a client that hangs up in the middle of a request head is dropped quietly: no answer,
/// no panic in the relay, which goes on serving.
pub(super) async fn hung_up_heads_are_dropped(backend: Backend) {
    let relay = backend.start(&[("RUST_LOG", "warn,burrow=debug")]);
    let address = relay.base.trim_start_matches("http://");
    for _ in 0..3 {
        let mut socket = TcpStream::connect(address)
            .await
            .expect("the relay accepts");
        socket
            .write_all(b"GET /health HTTP/1.1\r\nHo")
            .await
            .expect("sent");
    }
    // The event to wait for: the relay noticed each of them (its debug line).
    let noticed = wait_until(Duration::from_secs(10), || {
        relay.output().matches("could not read a request").count() >= 3
    });
    assert!(noticed, "{}", relay.output());
    relay.client().get("/health").await.expect(200);
    // A panic would follow its debug line within microseconds.
    let panicked = wait_until(Duration::from_millis(500), || {
        relay.output().contains("panicked")
    });
    assert!(!panicked, "{}", relay.output());
}

/// Burrow: a request head that does not parse (unknown HTTP version, a NUL in a header, two
/// different Content-Lengths) is answered 400, one over 64 KiB or with more than 256 fields 431
/// (414 when its request line alone is over 64 KiB), with a one-line body, not dropped, and the
/// relay goes on serving.
pub(super) async fn malformed_heads_are_refused(backend: Backend) {
    let relay = backend.shared();
    for request in [
        "GET /health HTTP/9.9\r\nHost: a\r\n\r\n".to_owned(),
        "GET /health HTTP/1.1\r\nHost: a\r\nX-Bad: a\0b\r\n\r\n".to_owned(),
        "POST /t/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx"
            .to_owned(),
    ] {
        let mut connection = Connection::open(&relay.base).await;
        let answer = connection.exchange(&request).await;
        assert_eq!(
            answer.status,
            400,
            "{:?}",
            &request[..40.min(request.len())]
        );
        let body = String::from_utf8_lossy(&answer.body);
        assert_eq!(body.trim_end(), "Malformed request head");
    }
    // More fields than Pingora reads: 431 too (RFC 6585: too large collectively); 256 pass.
    for (fields, status) in [(255, 200), (300, 431)] {
        let headers: String = (0..fields).map(|i| format!("X-{i}: v\r\n")).collect();
        let request = format!("GET /health HTTP/1.1\r\nHost: a\r\n{headers}\r\n");
        let answer = Connection::open(&relay.base).await.exchange(&request).await;
        assert_eq!(answer.status, status, "{fields} fields");
        if status == 431 {
            let body = String::from_utf8_lossy(&answer.body);
            assert_eq!(body.trim_end(), "Too many header fields: the limit is 256");
        }
    }
    // Over h2c the same (HTTP/2 itself limits only the head's size).
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("an h2c client builds");
    for (fields, status) in [(255, 200), (300, 431)] {
        let mut request = h2c.get(format!("{}/health", relay.base));
        for i in 0..fields {
            request = request.header(format!("x-{i}"), "v");
        }
        let answer = request.send().await.expect("an answer over h2c");
        assert_eq!(answer.status().as_u16(), status, "{fields} fields over h2c");
    }
    // A head over 64 KiB is 431 as soon as that much has come, the rest unread: in a header, or
    // without its end ever sent; 414 when the request line alone is over it (as nginx answers).
    let long_path = "a".repeat(100_000);
    let path_60k = "a".repeat(60_000);
    let long_value = "v".repeat(70_000);
    let value_10k = "v".repeat(10_000);
    let line = (414, "Request line too long: the limit is 65536 bytes");
    let head = (431, "Request head too large: the limit is 65536 bytes");
    for (request, (status, text)) in [
        (
            format!("GET /{long_path} HTTP/1.1\r\nHost: a\r\n\r\n"),
            line,
        ),
        (format!("GET /{long_path}"), line),
        (
            format!("GET /health HTTP/1.1\r\nHost: a\r\nX-Long: {long_value}\r\n\r\n"),
            head,
        ),
        (
            format!("GET /health HTTP/1.1\r\nHost: a\r\nX-Long: {long_value}"),
            head,
        ),
        (
            format!("GET /{path_60k} HTTP/1.1\r\nHost: a\r\nX-Long: {value_10k}\r\n\r\n"),
            head,
        ),
        // Empty lines before the request line are skipped, not taken for the head's end.
        (
            format!("\r\n\r\nGET /health HTTP/1.1\r\nHost: a\r\nX-Long: {long_value}\r\n\r\n"),
            head,
        ),
    ] {
        let mut connection = Connection::open(&relay.base).await;
        let answer = connection.exchange(&request).await;
        assert_eq!(answer.status, status, "{:?}", &request[..40]);
        let body = String::from_utf8_lossy(&answer.body);
        assert_eq!(body.trim_end(), text);
        assert!(connection.closed().await);
    }
    relay.client().get("/health").await.expect(200);
}

/// Heads whose body two parties could frame differently (request smuggling), other transfer
/// codings and a missing or malformed `Host` are refused with their one line, the connection is
/// closed (so bytes behind them are never served as a request), and nothing is stored.
pub(super) async fn ambiguous_heads_are_refused(backend: Backend) {
    let relay = backend.shared();
    let t = tunnel_id("smuggle");
    let smuggled = format!("GET /t/{t}/len HTTP/1.1\r\nHost: a\r\n\r\n");
    let post = |headers: &str, body: &str| {
        format!("POST /t/{t} HTTP/1.1\r\n{headers}\r\n{body}{smuggled}")
    };
    for (request, status, says) in [
        (
            post(
                "Host: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
            400,
            "Content-Length and Transfer-Encoding together",
        ),
        (
            post(
                "Host: a\r\nConnection: close\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n",
                "0\r\n\r\n",
            ),
            400,
            "Content-Length and Transfer-Encoding together",
        ),
        (
            format!(
                "\r\n\r\n{}",
                post(
                    "Host: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                    "0\r\n\r\n"
                )
            ),
            400,
            "Content-Length and Transfer-Encoding together",
        ),
        (
            format!("POST /t/{t} x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx{smuggled}"),
            400,
            "Malformed request line",
        ),
        (
            post("Host: a\r\nContent-Length: 1, 1\r\n", "x"),
            400,
            "Malformed Content-Length",
        ),
        (
            post(
                "Host: a\r\nTransfer-Encoding: gzip, chunked\r\n",
                "1\r\nx\r\n0\r\n\r\n",
            ),
            501,
            "Transfer-Encoding not supported",
        ),
        (
            post("Content-Length: 1\r\n", "x"),
            400,
            "Missing Host header",
        ),
        (
            post("Host: a b\r\nContent-Length: 1\r\n", "x"),
            400,
            "Malformed Host header",
        ),
        (
            format!("DELETE t/{t}?force=1 HTTP/1.1\r\nHost: a\r\nx-backstream-client-id: svc\r\n\r\n"),
            400,
            "Malformed request target",
        ),
    ] {
        let mut connection = Connection::open(&relay.base).await;
        let answer = connection.exchange(&request).await;
        assert_eq!(answer.status, status, "{request:?}");
        assert_eq!(String::from_utf8_lossy(&answer.body).trim_end(), says);
        assert!(connection.closed().await, "served on after: {request:?}");
    }
    assert_eq!(relay.client().len(&t).await, 0, "nothing stored");
}
