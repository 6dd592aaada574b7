//! Forwards one stream's request to the upstream service and streams the answer back, both
//! bodies within the stream's flow control.

use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::BodyExt;

use super::client::{Client, ClientError, RequestBody};
use crate::routing::frame::{Kind, HEADER_LEN, MAX_MESSAGE};
use crate::routing::head::{strip_hop_by_hop, Headers, RequestHead, ResponseHead};
use crate::routing::stream::{BodyReader, BodyWriter, Inbound};

/// The upstream service every request goes to.
pub struct Upstream {
    client: Client,
    /// The upstream URL's path without a trailing slash (often empty); the request's path is
    /// appended.
    prefix: String,
}

impl Upstream {
    /// An upstream at `url` (`http(s)://`, without query).
    pub fn new(url: &url::Url) -> Result<Upstream, String> {
        Ok(Upstream {
            client: Client::new(url)?,
            prefix: url.path().trim_end_matches('/').to_owned(),
        })
    }

    /// Serves one stream: acknowledges the request, forwards it, answers, and logs one line.
    pub async fn forward(&self, mut head: RequestHead, writer: BodyWriter, reader: BodyReader) {
        let started = Instant::now();
        // Tells the relay the request is taken: from now on it will not be retried elsewhere.
        writer.grant(0);
        let outcome = tokio::select! {
            outcome = self.exchange(&mut head, &writer, reader) => outcome,
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
        head: &mut RequestHead,
        writer: &BodyWriter,
        reader: BodyReader,
    ) -> Outcome {
        let request = match self.request(head, reader).await {
            Ok(request) => request,
            Err(Outcome::Failed(status, why)) => return answer_error(writer, status, why).await,
            Err(outcome) => return outcome,
        };
        let (response, connection) = match self.client.send(request).await {
            Ok(sent) => sent,
            Err(err) => {
                let what = match err {
                    ClientError::Http(_) => "upstream answered badly",
                    ClientError::Connect(..) | ClientError::ConnectTimeout(_) => {
                        "upstream unreachable"
                    }
                };
                let why = format!("{what}: {}", error_chain(&err));
                return answer_error(writer, 502, why).await;
            }
        };
        let status = response.status().as_u16();
        // The relay refuses a switch of protocols (the agent asked for none: `Upgrade` is
        // hop-by-hop); said here, the log line tells what the client got.
        if status == 101 {
            let why = "upstream switched protocols, which cannot cross the relay".into();
            return answer_error(writer, 502, why).await;
        }
        let mut headers: Headers = response
            .headers()
            .iter()
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), value)
            })
            .collect();
        strip_hop_by_hop(&mut headers);
        let head = ResponseHead { status, headers }.to_json();
        // Too big a frame would cost the relay the whole connection, not just this request.
        if head.len() > MAX_MESSAGE - HEADER_LEN {
            let why = format!("upstream response head too large: {} bytes", head.len());
            return answer_error(writer, 502, why).await;
        }
        if let Err(reason) = writer.send(Kind::Response, head).await {
            return Outcome::Reset(reason);
        }
        let mut body = response.into_body();
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    let Ok(chunk) = frame.into_data() else {
                        continue; // trailers are not relayed
                    };
                    if let Err(reason) = writer.write(chunk).await {
                        return Outcome::Reset(reason);
                    }
                }
                None => break,
                Some(Err(err)) => {
                    let why = format!("upstream body failed: {}", error_chain(&err));
                    writer.reset(&why);
                    return Outcome::Reset(why);
                }
            }
        }
        self.client.release(connection);
        match writer.end().await {
            Ok(()) => Outcome::Answered(status),
            Err(reason) => Outcome::Reset(reason),
        }
    }

    /// Builds the upstream request. The body starts streaming only if the relay sends one: a
    /// request whose first item is `END` goes without a body.
    async fn request(
        &self,
        head: &mut RequestHead,
        mut reader: BodyReader,
    ) -> Result<http::Request<RequestBody>, Outcome> {
        let method = http::Method::from_bytes(head.method.as_bytes())
            .map_err(|_| Outcome::Failed(400, format!("invalid method {:?}", head.method)))?;
        // `--upstream http://host/api` exposes `/api` and below, not its parent.
        if has_dot_segment(&head.path) {
            let why = "a path with `.` or `..` segments is refused".to_owned();
            return Err(Outcome::Failed(400, why));
        }
        let target = format!("{}{}", self.prefix, head.path);
        let uri = http::Uri::try_from(target)
            .map_err(|err| Outcome::Failed(400, format!("invalid path: {err}")))?;
        let body = match reader.next().await {
            Inbound::End => RequestBody::empty(),
            Inbound::Data(first) => RequestBody::streaming(first, reader),
            Inbound::Reset(reason) => return Err(Outcome::Reset(reason)),
            Inbound::Response(_) => return Err(Outcome::Reset("a RESPONSE from the relay".into())),
        };
        let mut request = http::Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        // The headers go upstream; the log line needs only the method and the path.
        *request.headers_mut() = upstream_headers(std::mem::take(&mut head.headers));
        Ok(request)
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
fn upstream_headers(mut headers: Headers) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("host") {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::try_from(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// Whether `path` (before its query) has a segment of dots however an upstream may read it,
/// which would resolve it against the path before it: percent-decoded as often as it decodes
/// (`%252e`), with `\` as `/` (WHATWG URL parsers, IIS), a segment's `;` parameters dropped
/// (Tomcat, Jetty), cut at a NUL (C), trailing spaces dropped and `...` read as `..` (Windows),
/// and the overlong and fullwidth forms of `.` taken for it (old Java decoders, NFKC).
fn has_dot_segment(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or_default();
    let mut decoded = path.as_bytes().to_vec();
    // Each round that changes anything makes the path shorter: this ends.
    loop {
        let next: Vec<u8> = percent_encoding::percent_decode(&decoded).collect();
        if next == decoded {
            break;
        }
        decoded = next;
    }
    let dotted = String::from_utf8_lossy(&decoded).replace('\u{FF0E}', ".");
    let overlong = decoded.windows(2).any(|pair| pair == [0xc0, 0xae]);
    overlong
        || dotted.split(['/', '\\']).any(|segment| {
            let segment = segment.split([';', '\0']).next().unwrap_or_default();
            let segment = segment.trim_end_matches(' ');
            !segment.is_empty() && segment.chars().all(|c| c == '.')
        })
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

/// An error with its sources, on one line (hyper's own message hides the cause); a cause that
/// its error already printed is not repeated.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `.` and `..` segments are found however they are written; dots elsewhere are fine.
    #[test]
    fn dot_segments() {
        for path in [
            "/..",
            "/../etc",
            "/a/./b",
            "/a/%2e%2E/b",
            "/a/.%2e",
            "/%2e/",
            "/a\\..\\b",
            "/a/..;/b",
            "/a/..%3b/b",
            "/a/%252e%252e/b",
            "/a/..%2fb",
            "/a/%2e%2e%2fb",
            "/a/%5c..%5cb",
            "/%2525252e%2525252e/x",
            "/%c0%ae%c0%ae/x",
            "/..%00/x",
            "/..%20/x",
            "/.../x",
            "/%ef%bc%8e%ef%bc%8e/x",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in [
            "/",
            "/a.b/c",
            "/a/..b",
            "/a../b",
            "/caf%C3%A9/%E2%82%AC",
            "/x?p=/../",
            "/.well-known/x",
            "/file.tar.gz",
            "/a/.hidden",
            "/a;b=1/c",
            "/a%2Fb",
        ] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }
}
