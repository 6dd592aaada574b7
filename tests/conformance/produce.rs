//! Produce (route 1): ids, Content-Type, bodies, `limit`, backpressure and the size limit.

use crate::support::client::id_order;
use crate::support::raw::Connection;
use crate::support::says::{FULL, LIMIT_TOO_BIG};
use crate::support::{tunnel_id, Backend, Client};
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use reqwest::Method;

/// Produce answers 201 with an empty body, an `X-Message-Id` and the queue size after it.
pub(super) async fn produce_answers_201_with_id(api: &Client) {
    let t = tunnel_id("produce");
    for size in 1..=2 {
        let response = api.post(&format!("/t/{t}"), "hello").await.expect(201);
        assert!(response.body.is_empty(), "201 with a body: {response:?}");
        response.message_id();
        assert_eq!(response.queue_size(), Some(size), "{response:?}");
    }
}

/// Message ids of one tunnel increase strictly, even within one millisecond.
pub(super) async fn message_ids_strictly_increase(api: &Client) {
    let t = tunnel_id("ids");
    let ids = api.produce_numbered(&t, 20).await;
    for pair in ids.windows(2) {
        assert!(
            id_order(&pair[0]) < id_order(&pair[1]),
            "ids out of order: {ids:?}"
        );
    }
}

/// A consumed message has the produced body, Content-Type, id and a matching `Content-Length`.
pub(super) async fn produce_then_consume(api: &Client) {
    let t = tunnel_id("roundtrip");
    let body = r#"{"hello":"world"}"#;
    let produced = api
        .post_typed(&format!("/t/{t}"), "application/json", body)
        .await;
    let id = produced.expect(201).message_id();
    let consumed = api.consume(&t, "").await.expect(200);
    assert_eq!(consumed.text(), body);
    assert_eq!(consumed.header("content-type"), Some("application/json"));
    assert_eq!(consumed.message_id(), id);
    assert_eq!(
        consumed.header("content-length"),
        Some(body.len().to_string().as_str())
    );
}

/// A message produced without Content-Type is handed out as `text/plain`.
pub(super) async fn missing_content_type_gets_default(api: &Client) {
    let t = tunnel_id("untyped");
    api.produce(&t, "plain").await;
    let consumed = api.consume(&t, "").await.expect(200);
    assert_eq!(consumed.header("content-type"), Some("text/plain"));
    assert_eq!(consumed.text(), "plain");

    // An empty Content-Type is none, on a message and on a reply.
    api.post_typed(&format!("/t/{t}"), "", "empty")
        .await
        .expect(201);
    let consumed = api.consume(&t, "?pending").await.expect(200);
    assert_eq!(consumed.header("content-type"), Some("text/plain"));
    let reply = format!("/t/{t}/{}/reply", consumed.message_id());
    api.post_typed(&reply, "", "answer").await.expect(201);
    let answer = api.get(&reply).await.expect(200);
    assert_eq!(answer.header("content-type"), Some("text/plain"));
}

/// A Content-Type in UTF-8 comes back byte for byte, on a message and on a reply; one that is not
/// UTF-8 is refused (400) with nothing stored, rather than stored without it.
pub(super) async fn content_type_round_trips_or_is_refused(api: &Client) {
    let t = tunnel_id("typed");
    let path = format!("/t/{t}");
    let typed = |path: &str, content_type: &[u8]| {
        let value = HeaderValue::from_bytes(content_type).expect("a header value");
        api.request(Method::POST, path)
            .header(CONTENT_TYPE, value)
            .body("body")
    };
    // A Unicode space at either end is part of the type, not HTTP's whitespace.
    let unicode_space = "text/x\u{a0}".as_bytes();
    api.send(typed(&path, unicode_space)).await.expect(201);
    let consumed = api.consume(&t, "").await.expect(200);
    assert_eq!(consumed.headers[CONTENT_TYPE].as_bytes(), unicode_space);
    let utf8 = "text/plain; name=\"café\"".as_bytes();
    api.send(typed(&path, utf8)).await.expect(201);
    let consumed = api.consume(&t, "?pending").await.expect(200);
    assert_eq!(consumed.headers[CONTENT_TYPE].as_bytes(), utf8);
    let reply = format!("/t/{t}/{}/reply", consumed.message_id());
    api.send(typed(&reply, utf8)).await.expect(201);
    let answer = api.get(&reply).await.expect(200);
    assert_eq!(answer.headers[CONTENT_TYPE].as_bytes(), utf8);

    let latin1 = b"text/plain; name=\"caf\xe9\"";
    let refused = api.send(typed(&path, latin1)).await;
    refused.expect_error(400, "Content-Type is not UTF-8 text");
    assert_eq!(api.len(&t).await, 0);
    api.produce(&t, "pending").await;
    let pending = api.consume(&t, "?pending").await.expect(200);
    let reply = format!("/t/{t}/{}/reply", pending.message_id());
    let refused = api.send(typed(&reply, latin1)).await;
    refused.expect_error(400, "Content-Type is not UTF-8 text");
    // Still pending: the refused reply did not acknowledge it.
    let status = api.get(&format!("/t/{t}/{}", pending.message_id())).await;
    assert_eq!(status.status, 202, "{status:?}");
}

/// Every byte value 0..=255 survives the round trip unchanged.
pub(super) async fn binary_body_round_trips(api: &Client) {
    let t = tunnel_id("binary");
    let body: Vec<u8> = (0..=255).collect();
    let path = format!("/t/{t}");
    api.post_typed(&path, "application/octet-stream", body.clone())
        .await
        .expect(201);
    let consumed = api.consume(&t, "").await.expect(200);
    assert_eq!(consumed.body, body);
    assert_eq!(consumed.header("content-length"), Some("256"));
    assert_eq!(
        consumed.header("content-type"),
        Some("application/octet-stream")
    );
}

/// `limit=2`: two messages fit, the third is 507 with `X-Queue-Size: 2` and is not stored.
pub(super) async fn limit_refuses_when_full(api: &Client) {
    let t = tunnel_id("limit");
    let path = format!("/t/{t}?limit=2");
    for size in 1..=2 {
        let response = api.post(&path, "fits").await.expect(201);
        assert_eq!(response.queue_size(), Some(size), "{response:?}");
    }
    let refused = api.post(&path, "too many").await.expect_error(507, FULL);
    assert_eq!(refused.queue_size(), Some(2), "{refused:?}");
    assert_eq!(api.len(&t).await, 2);
}

/// `limit=0` and `limit=-1` switch backpressure off: 201 with an id and no `X-Queue-Size`.
pub(super) async fn limit_zero_or_negative_disables_backpressure(api: &Client) {
    let t = tunnel_id("nolimit");
    for limit in ["0", "-1"] {
        let response = api
            .post(&format!("/t/{t}?limit={limit}"), "free")
            .await
            .expect(201);
        response.message_id();
        assert_eq!(response.queue_size(), None, "limit={limit}: {response:?}");
    }
    assert_eq!(api.len(&t).await, 2);
}

/// A limit above TUNNEL_MAXLEN (1000) is 400 and stores nothing; a limit equal to it is fine.
pub(super) async fn limit_above_maxlen_is_400(api: &Client) {
    let t = tunnel_id("biglimit");
    api.post(&format!("/t/{t}?limit=1001"), "no")
        .await
        .expect_error(400, LIMIT_TOO_BIG);
    assert_eq!(api.len(&t).await, 0);
    api.post(&format!("/t/{t}?limit=1000"), "yes")
        .await
        .expect(201);
}

/// A limit that is not an integer is 400 and stores nothing.
pub(super) async fn limit_not_integer_is_400(api: &Client) {
    let t = tunnel_id("badlimit");
    for limit in ["abc", "1.5"] {
        api.post(&format!("/t/{t}?limit={limit}"), "no")
            .await
            .expect_one_line_error(400);
    }
    assert_eq!(api.len(&t).await, 0);
}

/// With TUNNEL_MAXLEN=3 and no `limit`, the fourth produce is 507 with `X-Queue-Size: 3`.
pub(super) async fn default_limit_is_maxlen(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_MAXLEN", "3")]);
    let api = relay.client();
    let t = tunnel_id("maxlen");
    api.produce_numbered(&t, 3).await;
    let refused = api
        .post(&format!("/t/{t}"), "fourth")
        .await
        .expect_error(507, FULL);
    assert_eq!(refused.queue_size(), Some(3), "{refused:?}");
    assert_eq!(api.len(&t).await, 3);
}

/// Without backpressure a tunnel keeps the newest TUNNEL_MAXLEN messages; a limit above it is 400.
pub(super) async fn unlimited_produce_trims_to_maxlen(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_MAXLEN", "3")]);
    let api = relay.client();
    let t = tunnel_id("trim");
    for (i, limit) in ["0", "-1", "0", "-1", "0"].iter().enumerate() {
        let response = api
            .post(&format!("/t/{t}?limit={limit}"), format!("m{i}"))
            .await;
        assert_eq!(response.expect(201).queue_size(), None);
    }
    assert_eq!(api.len(&t).await, 3);
    assert_eq!(api.consume(&t, "").await.expect(200).text(), "m2");
    api.post(&format!("/t/{t}?limit=4"), "no")
        .await
        .expect_error(400, LIMIT_TOO_BIG);
}

/// TUNNEL_BACKPRESSURE=0: produce without `limit` never answers 507 nor `X-Queue-Size`; `limit` still works.
pub(super) async fn backpressure_off_setting(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_MAXLEN", "3"), ("TUNNEL_BACKPRESSURE", "0")]);
    let api = relay.client();
    let t = tunnel_id("nobackpressure");
    for i in 0..5 {
        let response = api
            .post(&format!("/t/{t}"), format!("m{i}"))
            .await
            .expect(201);
        assert_eq!(response.queue_size(), None, "{response:?}");
    }
    assert_eq!(api.len(&t).await, 3);
    api.post(&format!("/t/{t}?limit=3"), "full")
        .await
        .expect_error(507, FULL);
}

/// TUNNEL_DEFAULT_CONTENT_TYPE is the type of untyped messages and replies.
pub(super) async fn default_content_type_setting(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_DEFAULT_CONTENT_TYPE", "application/x-burrow")]);
    let api = relay.client();
    let t = tunnel_id("defaulttype");
    let id = api.produce(&t, "untyped").await;
    let consumed = api.consume(&t, "?pending").await.expect(200);
    assert_eq!(
        consumed.header("content-type"),
        Some("application/x-burrow")
    );
    api.post(&format!("/t/{t}/{id}/reply"), "answer")
        .await
        .expect(201);
    let reply = api.get(&format!("/t/{t}/{id}/reply")).await.expect(200);
    assert_eq!(reply.header("content-type"), Some("application/x-burrow"));
}

/// TUNNEL_MAX_MESSAGE_SIZE=1024: 1024 bytes pass; 1025 are 413 and stored nowhere, message or reply.
pub(super) async fn oversize_is_413(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_MAX_MESSAGE_SIZE", "1024")]);
    let api = relay.client();
    let t = tunnel_id("size");
    let path = format!("/t/{t}");
    api.post(&path, vec![b'a'; 1024]).await.expect(201);
    api.post(&path, vec![b'b'; 1025])
        .await
        .expect_one_line_error(413);
    assert_eq!(api.len(&t).await, 1);

    let id = api.consume(&t, "?pending").await.expect(200).message_id();
    let reply = format!("/t/{t}/{id}/reply");
    api.post(&reply, vec![b'c'; 1025])
        .await
        .expect_one_line_error(413);
    api.get(&reply).await.expect_empty();
    assert_eq!(
        api.status(&t, &id).await,
        202,
        "an oversize reply must not acknowledge"
    );
    api.post(&reply, vec![b'd'; 1024]).await.expect(201);
    assert_eq!(api.get(&reply).await.expect(200).body, vec![b'd'; 1024]);
}

/// `Expect: 100-continue` gets a `100 Continue` before the body on HTTP/1.1, and is ignored on
/// HTTP/1.0 (RFC 9110 10.1.1), whose clients would take the `100` for the answer.
pub(super) async fn expect_continue_is_http11s(api: &Client) {
    let t = tunnel_id("continue");
    let head = |version: &str| {
        format!(
            "POST /t/{t} HTTP/{version}\r\nHost: relay\r\nContent-Length: 2\r\n\
             Expect: 100-continue\r\n\r\n"
        )
    };
    let mut connection = Connection::open(api.base()).await;
    assert_eq!(connection.exchange(&head("1.1")).await.status, 100);
    assert_eq!(connection.exchange("m1").await.status, 201);
    let mut connection = Connection::open(api.base()).await;
    let answer = connection.exchange(&(head("1.0") + "m2")).await;
    assert_eq!(answer.status, 201, "{answer:?}");
    assert_eq!(api.consume(&t, "").await.expect(200).text(), "m1");
    assert_eq!(api.consume(&t, "").await.expect(200).text(), "m2");
}
