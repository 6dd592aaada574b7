//! Forwards one stream's request to the upstream service and streams the answer back, both
//! bodies within the stream's flow control.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::BodyExt;

use super::client::{Client, ClientError, RequestBody};
use crate::access_log::{shown, SHOWN_METHOD};
use crate::cors;
use crate::error::error_chain;
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

    /// Serves one stream: takes the request once the upstream can be reached (else refuses it,
    /// and the relay replays it on another agent of the name), forwards it, answers, and logs
    /// one line.
    pub async fn forward(&self, mut head: RequestHead, writer: BodyWriter, reader: BodyReader) {
        let started = Instant::now();
        let outcome = tokio::select! {
            outcome = self.exchange(&mut head, &writer, reader) => outcome,
            reason = writer.closed() => Outcome::Reset(reason),
        };
        let path = shown(head.path.split('?').next().unwrap_or_default(), SHOWN_PATH);
        let method = shown(&head.method, SHOWN_METHOD);
        let duration = started.elapsed().as_secs_f64();
        match outcome {
            Outcome::Answered(status) => {
                log::info!("{method} {path} status={status} duration={duration:.3}s")
            }
            Outcome::Failed(status, why) => {
                log::info!("{method} {path} status={status} duration={duration:.3}s error={why}")
            }
            Outcome::Refused(why) => {
                log::info!("{method} {path} status=refused duration={duration:.3}s error={why}")
            }
            Outcome::Reset(why) => {
                log::info!("{method} {path} status=reset duration={duration:.3}s reason={why}")
            }
        }
    }

    async fn exchange(
        &self,
        head: &mut RequestHead,
        writer: &BodyWriter,
        reader: BodyReader,
    ) -> Outcome {
        let (method, uri) = match self.target(head) {
            Ok(target) => target,
            Err(why) => {
                writer.grant(0);
                return answer_error(writer, 400, why).await;
            }
        };
        // Refused before it is taken, a request goes to another agent of the name, whose
        // upstream may be up; answered here, it could only fail. Half the relay's patience is
        // left for that other agent.
        let patience = head
            .timeout_ms
            .map_or(Duration::MAX, |ms| Duration::from_millis(ms / 2));
        let connection = match self.client.connection(patience).await {
            Ok(connection) => connection,
            Err(err) => {
                let why = format!("upstream unreachable: {}", error_chain(&err));
                writer.reset(&why);
                return Outcome::Refused(why);
            }
        };
        // Tells the relay the request is taken: from now on it will not be retried elsewhere.
        writer.grant(0);
        // hyper sends a body of declared length without asking for its end.
        let length = head
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, value)| value.trim().parse().ok());
        let body = match request_body(reader, length).await {
            Ok(body) => body,
            Err(outcome) => return outcome,
        };
        let body_sent = body.sent();
        let head_only = method == http::Method::HEAD;
        let mut request = http::Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        // The headers go upstream; the log line needs only the method and the path.
        *request.headers_mut() = upstream_headers(std::mem::take(&mut head.headers));
        let (response, connection) = match self.client.send(connection, request).await {
            Ok(sent) => sent,
            Err(err) => {
                let what = match err {
                    ClientError::Http(_) => "upstream answered badly",
                    ClientError::Connect(..) | ClientError::ConnectTimeout(..) => {
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
        let headers = match response_headers(status, response.headers(), head_only) {
            Ok(headers) => headers,
            Err(why) => return answer_error(writer, 502, why).await,
        };
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
        // An upstream that answered without reading the whole body may never read the rest:
        // its connection is closed, which drops the body, so that the relay is granted credit
        // for it and passes the answer on.
        self.client.release(connection, body_sent.all());
        match writer.end().await {
            Ok(()) => Outcome::Answered(status),
            Err(reason) => Outcome::Reset(reason),
        }
    }

    /// The request's method and upstream URI; `Err` (a 400's reason) for an invalid method, or
    /// a path that climbs out of the upstream's.
    fn target(&self, head: &RequestHead) -> Result<(http::Method, http::Uri), String> {
        let method = http::Method::from_bytes(head.method.as_bytes()).map_err(|_| {
            let method = shown(&head.method, SHOWN_METHOD);
            format!("invalid method {method:?}")
        })?;
        // `--upstream http://host/api` exposes `/api` and below, not its parent.
        if has_dot_segment(&head.path) {
            let why = "a path with `.` or `..` segments (or one still encoded after 8 decodings, \
                       or expanded past three times its length by NFKD)";
            return Err(format!("{why} is refused"));
        }
        let target = format!("{}{}", self.prefix, head.path);
        let uri = http::Uri::try_from(target).map_err(|err| format!("invalid path: {err}"))?;
        Ok((method, uri))
    }
}

/// The request body as it comes from the relay: none if the stream's first item is `END`.
async fn request_body(mut reader: BodyReader, length: Option<u64>) -> Result<RequestBody, Outcome> {
    match reader.next().await {
        Inbound::End => Ok(RequestBody::empty()),
        Inbound::Data(first) => Ok(RequestBody::streaming(first, reader, length)),
        Inbound::Reset(reason) => Err(Outcome::Reset(reason)),
        Inbound::Response(_) => Err(Outcome::Reset("a RESPONSE from the relay".into())),
    }
}

/// How a request ended, for its log line.
enum Outcome {
    Answered(u16),
    Failed(u16, String),
    /// Not taken: the relay replays it on another agent.
    Refused(String),
    Reset(String),
}

/// A response's headers as the client is to get them: hop-by-hop ones dropped (the relay frames
/// the body anew), and a `Content-Length` that does not frame the body read — beside a
/// `Transfer-Encoding` (RFC 9112 §6.3), or on a 1xx or 204 (RFC 9110 §8.6) — dropped; a list of
/// one length repeated (`2, 2`, or in several fields) made one. `Err` (the 502's reason) for a
/// transfer coding besides `chunked` on a body, whose bytes would reach the client still coded and
/// unlabelled (`head`: the answer to a `HEAD`, which has none).
fn response_headers(status: u16, map: &HeaderMap, head: bool) -> Result<Headers, String> {
    let mut codings = Vec::new();
    for value in map.get_all(http::header::TRANSFER_ENCODING) {
        let value = String::from_utf8_lossy(value.as_bytes()).to_ascii_lowercase();
        codings.extend(value.split(',').map(|c| c.trim().to_owned()));
    }
    let coded = !codings.is_empty();
    codings.retain(|coding| !coding.is_empty());
    if coded && codings != ["chunked"] && !head {
        let codings = codings.join(", ");
        let codings = shown(&codings, SHOWN_PATH);
        return Err(format!(
            "upstream used transfer coding {codings:?}, which cannot cross the relay"
        ));
    }
    let unframed = coded || (100..200).contains(&status) || status == 204;
    let mut headers: Headers = Vec::with_capacity(map.len());
    let mut length_given = false;
    for (name, value) in map {
        let mut value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        if name == http::header::CONTENT_LENGTH {
            if unframed || std::mem::replace(&mut length_given, true) {
                continue;
            }
            // hyper read the body by it, so a list (or several fields) holds one length.
            if let Some((length, _)) = value.split_once(',') {
                value = length.trim().to_owned();
            }
        }
        headers.push((name.as_str().to_owned(), value));
    }
    strip_hop_by_hop(&mut headers);
    Ok(headers)
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
/// which would resolve it against the path before it. The path is read as
/// [`as_upstreams_may_read`] says, then each segment (split at `/` or `\`, as WHATWG URL parsers
/// and IIS do) is cut at `;` parameters (Tomcat, Jetty) or a NUL (C): dots alone are refused,
/// also with spaces among or after them (Windows drops trailing dots and spaces, and reads `...`
/// as `..`). A decoded `?` or
/// `#` that a decoder splits at again ends the path there, so dots alone before it are refused
/// when they climb (`..`); `.#notes` stays a file name.
fn has_dot_segment(path: &str) -> bool {
    // A fragment never reaches the upstream: `http::Uri` drops it, dots before it included.
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let Some(read) = as_upstreams_may_read(path) else {
        return true;
    };
    let read = String::from_utf8_lossy(&read);
    let dots = |text: &str| text.starts_with('.') && text.chars().all(|c| matches!(c, '.' | ' '));
    read.split(['/', '\\']).any(|segment| {
        let cut = |at: &[char]| segment.split(at).next().unwrap_or_default();
        let before_split = cut(&[';', '\0', '?', '#']);
        dots(cut(&[';', '\0'])) || (dots(before_split) && before_split.starts_with(".."))
    })
}

/// How many times a path is decoded before the check gives up on it (four decode a
/// `%2525252e`): no client has a reason to send more, and each round costs a pass over the path.
const MAX_DECODINGS: usize = 8;

/// How many bytes, per byte of the path, the passes of NFKD that change it may produce together
/// (plus 1 KiB, so that no path of ordinary length is ever refused for it). A real name takes one
/// pass, at most about three times its length (a Hangul syllable is three letters); NFKD is the
/// costly step, expands a character elevenfold (U+FDFA), and a path could ask for a pass per
/// decoding.
const READING_BUDGET: usize = 3;

/// `path` as upstreams may read it, over again until nothing changes: percent-decoded (also IIS's
/// `%u002e`) without ASCII tabs and newlines (WHATWG URL parsers drop them anywhere), to the end;
/// then with overlong UTF-8 read as the ASCII it encodes (decoders older than the rule against
/// it) and in NFKD (`‥` as `..`, `／` as `/`, `％２e` as `%2e`), which may make new escapes to
/// decode (`%252e`, `％2e`, `%c0%25ae`). NFKD decomposes and never composes: composing can only
/// hide an ASCII letter (the `f` of a `%2f` before a combining mark) from an upstream that does not
/// compose, never make one. Dots and slashes, once there, stay whatever comes after, so this order
/// finds what any other would. `None` when it is still encoded after [`MAX_DECODINGS`] decodings,
/// or its passes of NFKD outgrow [`READING_BUDGET`].
fn as_upstreams_may_read(path: &str) -> Option<Vec<u8>> {
    let mut budget = READING_BUDGET * path.len() + 1024;
    let mut read = path.as_bytes().to_vec();
    let mut decodings = 0;
    let mut normalized = false;
    loop {
        let mut decoded_now = false;
        loop {
            let mut decoded = without_u_escapes(percent_encoding::percent_decode(&read).collect());
            decoded.retain(|b| !matches!(b, b'\t' | b'\n' | b'\r'));
            if decoded == read {
                break;
            }
            decodings += 1;
            if decodings > MAX_DECODINGS {
                return None;
            }
            (read, decoded_now) = (decoded, true);
        }
        // ASCII is its own NFKD; and what a pass of NFKD gave, if decoding left it as it was, a
        // second pass would too (overlong forms were read before it, and it never starts a
        // sequence with a continuation byte, so the bytes it carried stay as they were).
        if read.is_ascii() || (normalized && !decoded_now) {
            return Some(read);
        }
        let next = nfkd(&without_overlong(&read), budget)?;
        if next == read {
            return Some(read);
        }
        budget = budget.checked_sub(next.len())?;
        (read, normalized) = (next, true);
    }
}

/// `bytes` with IIS's `%uXXXX` escapes (a UTF-16 code unit in four hex digits) read as the
/// characters they stand for.
fn without_u_escapes(bytes: Vec<u8>) -> Vec<u8> {
    if !bytes
        .windows(2)
        .any(|pair| matches!(pair, [b'%', b'u' | b'U']))
    {
        return bytes;
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match u_escape(&bytes[i..]) {
            Some(c) => {
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                i += 6;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

/// The character of the `%uXXXX` escape `rest` starts with (none for a lone surrogate).
fn u_escape(rest: &[u8]) -> Option<char> {
    let [b'%', b'u' | b'U', hex @ ..] = rest.get(..6)? else {
        return None;
    };
    let hex = std::str::from_utf8(hex).ok()?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    char::from_u32(u32::from_str_radix(hex, 16).ok()?)
}

/// `bytes` in NFKD where they are UTF-8, or `None` if that is longer than `limit` (the
/// normalizer stops there). Bytes that are not UTF-8 stay as they are: decoding them again may
/// complete a sequence (`c0` then `%ae`).
fn nfkd(bytes: &[u8], limit: usize) -> Option<Vec<u8>> {
    let normalizer = icu_normalizer::DecomposingNormalizerBorrowed::new_nfkd();
    let mut out = Bounded {
        bytes: Vec::with_capacity(bytes.len()),
        limit,
    };
    for chunk in bytes.utf8_chunks() {
        // ASCII is its own NFKD: not worth a call per chunk when invalid bytes cut a path into
        // thousands of them.
        match chunk.valid() {
            ascii if ascii.is_ascii() => out.push(ascii.as_bytes()).ok()?,
            text => normalizer.normalize_to(text, &mut out).ok()?,
        }
        out.push(chunk.invalid()).ok()?;
    }
    Some(out.bytes)
}

/// Bytes that refuse to grow past a limit.
struct Bounded {
    bytes: Vec<u8>,
    limit: usize,
}

impl Bounded {
    fn push(&mut self, more: &[u8]) -> std::fmt::Result {
        if self.bytes.len() + more.len() > self.limit {
            return Err(std::fmt::Error);
        }
        self.bytes.extend_from_slice(more);
        Ok(())
    }
}

impl std::fmt::Write for Bounded {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.push(text.as_bytes())
    }
}

/// `bytes` with every overlong UTF-8 sequence of an ASCII character (`c0 ae` for `.`, `e0 80
/// af` for `/`, up to the six-byte forms of the first UTF-8) replaced by that character, as
/// decoders written before overlong forms were forbidden read them.
fn without_overlong(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match overlong_ascii(&bytes[i..]) {
            Some((len, ascii)) => {
                out.push(ascii);
                i += len;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

/// The length and character of the overlong sequence of an ASCII character `rest` starts with.
fn overlong_ascii(rest: &[u8]) -> Option<(usize, u8)> {
    let len = match rest.first()? {
        0xc0 | 0xc1 => 2,
        0xe0 => 3,
        0xf0 => 4,
        0xf8 => 5,
        0xfc => 6,
        _ => return None,
    };
    let (lead, tail) = rest.get(..len)?.split_first()?;
    if !tail.iter().all(|b| b & 0xc0 == 0x80) {
        return None;
    }
    let value = tail
        .iter()
        .fold(u32::from(lead & (0x7f >> len)), |value, b| {
            value << 6 | u32::from(b & 0x3f)
        });
    let ascii = u8::try_from(value).ok().filter(u8::is_ascii)?;
    Some((len, ascii))
}

/// How many characters of a path a log line shows: a client may send up to the relay's 64 KiB
/// head, and one line per request must stay short.
const SHOWN_PATH: usize = 256;

/// Answers `status` with a one-line text body saying why, as the relay's own errors are: framed,
/// with CORS headers, no trailing newline, and a 502 begun as the relay begins one (`agent
/// failed: `), so that a client tells every 502 of Burrow's own the same way.
async fn answer_error(writer: &BodyWriter, status: u16, why: String) -> Outcome {
    let body = match status {
        502 => Bytes::from(format!("agent failed: {why}")),
        _ => Bytes::from(why.clone()),
    };
    let mut headers: Headers = vec![
        ("Content-Type".into(), "text/plain".into()),
        ("Content-Length".into(), body.len().to_string()),
    ];
    headers.extend(
        cors::HEADERS
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned())),
    );
    let head = ResponseHead { status, headers };
    let sent = async {
        writer.send(Kind::Response, head.to_json()).await?;
        writer.write(body).await?;
        writer.end().await
    };
    match sent.await {
        Ok(()) => Outcome::Failed(status, why),
        Err(reason) => Outcome::Reset(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Content-Length` that does not frame the body is dropped, a repeated one made one, and a
    /// transfer coding the client would get still applied is refused.
    #[test]
    fn response_lengths_and_codings() {
        let map_of = |pairs: &[(&str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            map
        };
        let headers =
            |status: u16, pairs: &[(&str, &str)]| response_headers(status, &map_of(pairs), false);
        let length = |status, pairs: &[(&str, &str)]| {
            let headers = headers(status, pairs).expect("passed on");
            let found = headers.iter().find(|(name, _)| name == "content-length");
            found.map(|(_, value)| value.clone())
        };
        let chunked = ("transfer-encoding", "chunked");
        assert_eq!(length(200, &[("content-length", "5")]), Some("5".into()));
        assert_eq!(length(200, &[("content-length", "2, 2")]), Some("2".into()));
        assert_eq!(length(200, &[("content-length", "3"), chunked]), None);
        assert_eq!(length(200, &[chunked, ("content-length", "3")]), None);
        assert_eq!(length(204, &[("content-length", "5")]), None);
        assert_eq!(length(304, &[("content-length", "5")]), Some("5".into()));
        let te = headers(200, &[chunked]).expect("passed on");
        assert!(te.iter().all(|(name, _)| name != "transfer-encoding"));
        let refused = headers(200, &[("transfer-encoding", "gzip, chunked")]);
        let why = refused.expect_err("gzip would reach the client undecoded");
        assert!(why.contains("\"gzip, chunked\""), "{why}");
        assert!(headers(200, &[("transfer-encoding", "gzip")]).is_err());
        let twice = [chunked, ("transfer-encoding", "Chunked")];
        assert!(headers(200, &twice).is_err(), "chunked twice");
        let fields = [("content-length", "2"), ("content-length", "2")];
        let one = headers(200, &fields).expect("passed on");
        assert_eq!(one, [("content-length".to_owned(), "2".to_owned())]);
        let gzip = [("transfer-encoding", "gzip, chunked")];
        let head = response_headers(200, &map_of(&gzip), true);
        assert!(head.is_ok(), "no body crosses in answer to a HEAD");
    }

    /// The path goes upstream as the client wrote it, empty segments included, after the
    /// upstream URL's own path.
    #[test]
    fn target_keeps_the_path() {
        let upstream = |url: &str| Upstream::new(&url::Url::parse(url).unwrap()).unwrap();
        let head = |path: &str| RequestHead {
            method: "GET".into(),
            path: path.into(),
            headers: Vec::new(),
            timeout_ms: None,
        };
        let target = |url: &str, path: &str| upstream(url).target(&head(path)).unwrap().1;
        assert_eq!(target("http://u", "//x?a=1").to_string(), "//x?a=1");
        assert_eq!(target("http://u/api/", "/a//b").to_string(), "/api/a//b");
        assert!(upstream("http://u").target(&head("/a b")).is_err());
    }

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
            "/..%09/x",
            "/.. ./x",
            "/.%09%20./x",
            // Tabs and newlines, which WHATWG URL parsers drop anywhere.
            "/.%0a./x",
            "/..%0d/x",
            "/%09../x",
            "/%0a../%0d../etc/passwd",
            "/.%u000a./x",
            "/.../x",
            "/%ef%bc%8e%ef%bc%8e/x",
            // A fragment is dropped before the path goes upstream.
            "/..#x",
            // Split again at a decoded `?` or `#`.
            "/..%23/x",
            "/..%3f/x",
            // Compatibility forms: fullwidth `/`, dot leaders, the small full stop.
            "/%ef%bc%8e%ef%bc%8e%ef%bc%8fx",
            "/..%ef%bc%8fx",
            "/\u{2025}/x",
            "/\u{2024}\u{2024}/x",
            "/\u{FE52}\u{FE52}/x",
            // Overlong `/`, and `.` in three, four and six bytes.
            "/..%c0%afx",
            "/%e0%80%ae%e0%80%ae/x",
            "/%f0%80%80%ae./x",
            "/%fc%80%80%80%80%ae./x",
            // NFKD forms of space, `;`, `?`, `#`, and of `%`, decoded again; an overlong `%`.
            "/..%C2%A0/x",
            "/..%E3%80%80/x",
            "/..%EF%BC%9B/x",
            "/..%CD%BE/x",
            "/..%EF%BC%9F/x",
            "/..%EF%BC%83/x",
            "/..\u{2048}/x",
            "/%EF%BC%852e%EF%BC%852e/x",
            "/%c0%a52e%c0%a52e/x",
            // Sequences completed by a later decoding; full NFKD, then decoded again.
            "/.%c0%25ae/x",
            "/%e2%80%25a5/x",
            "/..%ef%bc%258f..%ef%bc%258fx",
            "/%ef%bc%85%ef%bc%92e%ef%bc%85%ef%bc%92e/x",
            // A `\` or `/` still encoded when a combining mark follows it: composing its `c` or
            // `f` with the mark would hide it from the check, not from an upstream that decodes
            // without composing (the mark decoded first, or later, or with `％` forms).
            "/\u{2026}%255c\u{301}x",
            "/%2525252e%2525252e%255c\u{301}x",
            "/..%EF%BC%85%EF%BC%92%EF%BD%86%25CC%2587x",
            "/..%EF%BC%85%EF%BC%95%EF%BD%83%25CC%2581x",
            "/..%c0%a52f%CC%87x",
            "/..%EF%BC%85%EF%BC%92%EF%BD%86%CC%87x",
            "/..\u{FF05}\u{FF12}\u{FF46}%CC%87x",
            // IIS's `%u` escapes, also of `/` and of a fullwidth dot, and percent-encoded.
            "/%u002e%U002E/x",
            "/..%u002fx",
            "/%uff0e%uff0e/x",
            "/%25u002e%25u002e/x",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        // Encoded more often than any client has a reason to: given up on, whatever it hides.
        // (`%2525…41` takes one round per `25`, then one for `%41`.)
        let deep = format!("/%{}41", "25".repeat(MAX_DECODINGS));
        assert!(has_dot_segment(&deep));
        let shallow = format!("/%{}41", "25".repeat(MAX_DECODINGS - 1));
        assert!(!has_dot_segment(&shallow));
        // Grown past its budget by NFKD (U+FDFA is eleven times longer): given up on, rather
        // than read again in every round.
        let swollen = format!("/{}/x", "\u{FDFA}".repeat(1000));
        assert!(has_dot_segment(&swollen));
        assert!(!has_dot_segment("/\u{FDFA}/\u{3300}\u{3301}/x"));
        // Long real names pass: percent-encoded (9 KB), raw with a character NFKD expands, raw
        // Hangul (three letters a syllable, 30 KB), and encoded seven deep after 8 KB of ASCII.
        assert!(!has_dot_segment(&format!(
            "/{}",
            "\u{D55C}\u{AE00}".repeat(5000)
        )));
        let deep_after_long = format!("/{}/%{}41", "a".repeat(8192), "25".repeat(6));
        assert!(!has_dot_segment(&deep_after_long));
        let deep_after_accents = format!("/café/{}/%{}41", "é".repeat(16_000), "25".repeat(6));
        assert!(!has_dot_segment(&deep_after_accents));
        assert!(!has_dot_segment(&format!(
            "/{}",
            "%E6%96%87%E6%9B%B8".repeat(500)
        )));
        assert!(!has_dot_segment(&format!(
            "/{}/x",
            "資料\u{337F}".repeat(300)
        )));
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
            "/a/.%20b",
            "/%20../x",
            "/a%09b/.%0ab",
            "/a;b=1/c",
            "/a%2Fb",
            "/search/what%3F",
            "/100%25",
            "/a/\u{2025}b",
            "/\u{2100}/x",
            // Overlong forms of what is not ASCII are not read as ASCII.
            "/%e0%82%ae%e0%82%ae/x",
            // One dot before a decoded `#` or `?` does not climb: an Emacs lock file's name.
            "/files/.%23notes.txt",
            "/f/.%3Fx",
            "/a/%E2%80%A6b",
            "/Loading%E2%80%A6",
            "/%EF%BC%8Ea",
            // Not four hex digits, or a lone surrogate: not an escape.
            "/%u+02e%u+02e/x",
            "/%u02e/x",
            "/%ud800%ud800/x",
        ] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }
}
