//! Forwards one stream's request to the upstream service with reqwest and streams the answer
//! back, both bodies within the stream's flow control.

use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::routing::frame::Kind;
use crate::routing::head::{strip_hop_by_hop, Headers, RequestHead, ResponseHead};
use crate::routing::stream::{BodyReader, BodyWriter, Inbound};

/// The upstream service every request goes to.
pub struct Upstream {
    client: reqwest::Client,
    /// `http://host:port[/prefix]`, without a trailing slash; the request's path is appended.
    base: String,
}

impl Upstream {
    /// An upstream at `base` (an `http(s)://` URL without query).
    pub fn new(base: &str) -> Result<Upstream, reqwest::Error> {
        let client = reqwest::Client::builder()
            // The client's redirects and proxies are the client's business, not the agent's.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Upstream {
            client,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// Serves one stream: acknowledges the request, forwards it, answers, and logs one line.
    pub async fn forward(&self, head: RequestHead, writer: BodyWriter, reader: BodyReader) {
        let started = Instant::now();
        // Tells the relay the request is taken: from now on it will not be retried elsewhere.
        writer.grant(0);
        let outcome = tokio::select! {
            outcome = self.exchange(&head, &writer, reader) => outcome,
            reason = writer.closed() => Outcome::Reset(reason),
        };
        let path = head.path.split('?').next().unwrap_or_default();
        let duration = started.elapsed().as_secs_f64();
        match outcome {
            Outcome::Answered(status) => {
                log::info!(
                    "{} {path} status={status} duration={duration:.3}s",
                    head.method
                )
            }
            Outcome::Failed(status, why) => log::info!(
                "{} {path} status={status} duration={duration:.3}s error={why}",
                head.method
            ),
            Outcome::Reset(why) => log::info!(
                "{} {path} status=reset duration={duration:.3}s reason={why}",
                head.method
            ),
        }
    }

    async fn exchange(
        &self,
        head: &RequestHead,
        writer: &BodyWriter,
        reader: BodyReader,
    ) -> Outcome {
        let request = match self.request(head, reader).await {
            Ok(request) => request,
            Err(Outcome::Failed(status, why)) => return answer_error(writer, status, why).await,
            Err(outcome) => return outcome,
        };
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(err) => {
                let why = format!("upstream unreachable: {}", error_chain(&err));
                return answer_error(writer, 502, why).await;
            }
        };
        let status = response.status().as_u16();
        let mut headers: Headers = response
            .headers()
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), value)
            })
            .collect();
        strip_hop_by_hop(&mut headers);
        let head = ResponseHead { status, headers };
        if let Err(reason) = writer.send(Kind::Response, head.to_json()).await {
            return Outcome::Reset(reason);
        }
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if let Err(reason) = writer.write(chunk).await {
                        return Outcome::Reset(reason);
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    let why = format!("upstream body failed: {}", error_chain(&err));
                    writer.reset(&why);
                    return Outcome::Reset(why);
                }
            }
        }
        match writer.end().await {
            Ok(()) => Outcome::Answered(status),
            Err(reason) => Outcome::Reset(reason),
        }
    }

    /// Builds the upstream request. The body starts streaming only if the relay sends one: a
    /// request whose first item is `END` goes without a body.
    async fn request(
        &self,
        head: &RequestHead,
        mut reader: BodyReader,
    ) -> Result<reqwest::RequestBuilder, Outcome> {
        let method = reqwest::Method::from_bytes(head.method.as_bytes())
            .map_err(|_| Outcome::Failed(400, format!("invalid method {:?}", head.method)))?;
        let url = format!("{}{}", self.base, head.path);
        let builder = self
            .client
            .request(method, url)
            .headers(upstream_headers(&head.headers));
        match reader.next().await {
            Inbound::End => Ok(builder),
            Inbound::Data(first) => Ok(builder.body(body_stream(first, reader))),
            Inbound::Reset(reason) => Err(Outcome::Reset(reason)),
            Inbound::Response(_) => Err(Outcome::Reset("a RESPONSE from the relay".into())),
        }
    }
}

/// How a request ended, for its log line.
enum Outcome {
    Answered(u16),
    Failed(u16, String),
    Reset(String),
}

/// The request's headers for the upstream: hop-by-hop ones and `Host` dropped (the upstream's
/// own host is sent; the relay passes the client's in `X-Forwarded-Host`), unusable ones skipped.
fn upstream_headers(headers: &Headers) -> HeaderMap {
    let mut headers = headers.clone();
    strip_hop_by_hop(&mut headers);
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("host") {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// The request body as reqwest streams it: `first`, then what the relay sends until `END`.
fn body_stream(first: Bytes, mut reader: BodyReader) -> reqwest::Body {
    let mut first = Some(first);
    let mut ended = false;
    let stream = futures_util::stream::poll_fn(move |cx| {
        if let Some(chunk) = first.take() {
            return std::task::Poll::Ready(Some(Ok(chunk)));
        }
        if ended {
            return std::task::Poll::Ready(None);
        }
        reader.poll_next(cx).map(|item| match item {
            Inbound::Data(chunk) => Some(Ok(chunk)),
            Inbound::End => {
                ended = true;
                None
            }
            Inbound::Reset(reason) => Some(Err(std::io::Error::other(reason))),
            Inbound::Response(_) => Some(Err(std::io::Error::other("a RESPONSE from the relay"))),
        })
    });
    reqwest::Body::wrap_stream(stream)
}

/// Answers `status` with a one-line text body saying why.
async fn answer_error(writer: &BodyWriter, status: u16, why: String) -> Outcome {
    let head = ResponseHead {
        status,
        headers: vec![("Content-Type".into(), "text/plain; charset=utf-8".into())],
    };
    let sent = async {
        writer.send(Kind::Response, head.to_json()).await?;
        writer.write(Bytes::from(format!("{why}\n"))).await?;
        writer.end().await
    };
    match sent.await {
        Ok(()) => Outcome::Failed(status, why),
        Err(reason) => Outcome::Reset(reason),
    }
}

/// An error with its sources, on one line (reqwest's own message hides the cause).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
