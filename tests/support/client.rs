//! An HTTP client bound to one relay, and responses read whole so tests can assert on them.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder};

/// Requests to one relay's base URL.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    bearer: Option<String>,
    /// The relay's metrics page (`http://host:port`), when the test harness started it with one.
    metrics: Option<String>,
}

impl Client {
    /// A client for the relay at `base` (`http://host:port`, no trailing slash).
    pub fn new(base: &str) -> Client {
        // Redirects are answers to check, not to follow.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a plain HTTP client builds");
        Client {
            http,
            base: base.trim_end_matches('/').to_owned(),
            bearer: None,
            metrics: None,
        }
    }

    /// The same client, knowing the relay's metrics page at `base`.
    pub fn with_metrics(self, base: &str) -> Client {
        Client {
            metrics: Some(base.to_owned()),
            ..self
        }
    }

    /// A client for the relay's metrics page, if it has one.
    pub fn metrics(&self) -> Option<Client> {
        self.metrics.as_deref().map(Client::new)
    }

    /// The relay's base URL, `http://host:port`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The same client, sending `Authorization: Bearer <token>` with every request.
    pub fn with_bearer(&self, token: &str) -> Client {
        Client {
            bearer: Some(token.to_owned()),
            ..self.clone()
        }
    }

    /// A request builder for `path` (which includes any query), to add headers before [`Client::send`].
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.bearer {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends a request and reads the whole response.
    pub async fn send(&self, request: RequestBuilder) -> Response {
        let response = request.send().await.expect("the relay answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .expect("the relay sends a whole body");
        Response {
            status,
            headers,
            body: body.to_vec(),
        }
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Response {
        self.send(self.request(Method::GET, path)).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Response {
        self.send(self.request(Method::DELETE, path)).await
    }

    /// `POST path` with `body` and no Content-Type.
    pub async fn post(&self, path: &str, body: impl Into<Vec<u8>>) -> Response {
        self.send(self.request(Method::POST, path).body(body.into()))
            .await
    }

    /// `POST path` with `body` of type `content_type`.
    pub async fn post_typed(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<Vec<u8>>,
    ) -> Response {
        let request = self
            .request(Method::POST, path)
            .header("Content-Type", content_type)
            .body(body.into());
        self.send(request).await
    }

    /// Produces `body` (no Content-Type) on `tunnel`, asserts 201 and returns the message id.
    pub async fn produce(&self, tunnel: &str, body: &str) -> String {
        self.post(&format!("/t/{tunnel}"), body)
            .await
            .expect(201)
            .message_id()
    }

    /// Produces `m0`, `m1`… on `tunnel`; returns the ids in order.
    pub async fn produce_numbered(&self, tunnel: &str, count: usize) -> Vec<String> {
        let mut ids = Vec::with_capacity(count);
        for i in 0..count {
            ids.push(self.produce(tunnel, &format!("m{i}")).await);
        }
        ids
    }

    /// `GET /t/{tunnel}{query}` (query like `""`, `"?pending"`, `"/poll?timeout=1"`).
    pub async fn consume(&self, tunnel: &str, query: &str) -> Response {
        self.get(&format!("/t/{tunnel}{query}")).await
    }

    /// The queue size from `GET /t/{tunnel}/len`, asserting 204 and an empty body.
    pub async fn len(&self, tunnel: &str) -> u64 {
        let response = self.get(&format!("/t/{tunnel}/len")).await.expect(204);
        assert!(response.body.is_empty(), "len has a body: {response:?}");
        response.queue_size().expect("len answers X-Queue-Size")
    }

    /// The status code of `GET /t/{tunnel}/{msg}`.
    pub async fn status(&self, tunnel: &str, msg: &str) -> u16 {
        self.get(&format!("/t/{tunnel}/{msg}")).await.status
    }
}

/// A whole HTTP response.
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?} body={:?}",
            self.status,
            self.headers,
            self.text()
        )
    }
}

impl Response {
    /// Asserts the status; the panic shows the whole response.
    #[track_caller]
    pub fn expect(self, status: u16) -> Response {
        assert_eq!(self.status, status, "unexpected status: {self:?}");
        self
    }

    /// Asserts an error: this status and a one-line plain-text body equal to `message`.
    ///
    /// One trailing newline is accepted: the original relay answered with `ngx.say`, which adds it.
    #[track_caller]
    pub fn expect_error(self, status: u16, message: &str) -> Response {
        let response = self.expect_one_line_error(status);
        assert_eq!(
            response.line(),
            message,
            "unexpected error body: {response:?}"
        );
        response
    }

    /// Asserts an error status with a non-empty body of one line of plain text.
    #[track_caller]
    pub fn expect_one_line_error(self, status: u16) -> Response {
        let response = self.expect(status);
        let line = response.line();
        assert!(!line.trim().is_empty(), "error body is empty: {response:?}");
        assert!(
            !line.contains(['\n', '\r']),
            "error body spans lines: {response:?}"
        );
        let content_type = response.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("text/plain"),
            "error body is not text/plain: {response:?}"
        );
        // Errors look alike whoever answered them (the relay, or an agent on its own behalf):
        // readable by a browser's script, and framed by their length.
        assert_eq!(
            response.header("access-control-allow-origin"),
            Some("*"),
            "error without CORS headers: {response:?}"
        );
        let length = response.body.len().to_string();
        assert_eq!(
            response.header("content-length"),
            Some(length.as_str()),
            "error not framed by its length: {response:?}"
        );
        response
    }

    /// Asserts a 204 with an empty body (nothing to hand out).
    #[track_caller]
    pub fn expect_empty(self) -> Response {
        let response = self.expect(204);
        assert!(response.body.is_empty(), "204 with a body: {response:?}");
        response
    }

    /// A header's value, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body without one trailing newline.
    fn line(&self) -> String {
        let text = self.text();
        text.strip_suffix('\n').unwrap_or(&text).to_owned()
    }

    /// The body as JSON.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// `X-Message-Id`, asserted present and of the form `<ms>-<seq>`.
    #[track_caller]
    pub fn message_id(&self) -> String {
        let id = self
            .header("x-message-id")
            .unwrap_or_else(|| panic!("no X-Message-Id: {self:?}"));
        assert!(is_message_id(id), "X-Message-Id {id:?} is not <ms>-<seq>");
        id.to_owned()
    }

    /// `X-Queue-Size` as a number, if present.
    #[track_caller]
    pub fn queue_size(&self) -> Option<u64> {
        self.header("x-queue-size").map(|size| {
            size.parse()
                .unwrap_or_else(|_| panic!("bad X-Queue-Size: {self:?}"))
        })
    }
}

/// Whether `id` matches `^\d{1,16}-\d{1,16}$`.
pub fn is_message_id(id: &str) -> bool {
    let part = |p: &str| (1..=16).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
    id.split_once('-')
        .is_some_and(|(ms, seq)| part(ms) && part(seq))
}

/// A message id as numbers, to compare ids in stream order.
pub fn id_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').expect("a message id has a dash");
    (ms.parse().expect("digits"), seq.parse().expect("digits"))
}
