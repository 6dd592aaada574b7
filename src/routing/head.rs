//! The request and response heads that `HEAD` and `RESPONSE` frames carry as JSON, and the
//! hop-by-hop headers that never cross the relay (RFC 9110 §7.6.1).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Header names and values in order, repeated names kept (`Set-Cookie`); in JSON a list of
/// `[name, value]` pairs. Values are text: a non-UTF-8 byte is replaced (U+FFFD) where headers
/// enter the protocol.
pub type Headers = Vec<(String, String)>;

/// The headers only meaningful on one connection, dropped before a head crosses the relay.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` (lower case) is a hop-by-hop header.
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// A request as the agent sends it upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHead {
    /// `GET`, `POST`…
    pub method: String,
    /// Path and query as sent upstream (`/items?page=2`).
    pub path: String,
    /// The client's headers, hop-by-hop ones removed and `X-Forwarded-*` added.
    #[serde(default)]
    pub headers: Headers,
    /// How long the relay waits for the response head from when it sent this, in milliseconds
    /// (absent: not said). An agent that cannot reach its upstream within half of it refuses the
    /// request, which leaves the relay time to send it to another agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// The most headers an upstream response may carry (hyper's default is 100; nginx sets no count,
/// only a size, which the agent's frames bound).
pub const MAX_RESPONSE_HEADERS: usize = 1000;

/// How many bytes an HTTP client of the relay or the agent may buffer for a response head: past
/// hyper's adaptive ~400 KB, so that what decides is one rule, the size of the `RESPONSE` frame.
pub const MAX_RESPONSE_HEAD_BYTES: usize = super::frame::MAX_MESSAGE + 64 * 1024;

/// The upstream's answer as the relay passes it to the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHead {
    /// A final status, 200 to 999.
    pub status: u16,
    /// The upstream's headers, hop-by-hop ones removed.
    #[serde(default)]
    pub headers: Headers,
}

/// Why a head's JSON is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("head is not valid JSON of its kind: {0}")]
    Json(String),
    #[error("head field {0:?} is missing or of the wrong type")]
    Field(&'static str),
    #[error("status {0} is not a final HTTP status (200-999)")]
    Status(u16),
    #[error("header {0:?} is not a valid HTTP header")]
    Header(String),
    #[error("{0} headers are more than the {MAX_RESPONSE_HEADERS} a response may carry")]
    TooManyHeaders(usize),
}

impl RequestHead {
    /// The `HEAD` frame payload.
    pub fn to_json(&self) -> Bytes {
        to_json(self)
    }

    /// Parses a `HEAD` frame payload.
    pub fn from_json(bytes: &[u8]) -> Result<RequestHead, HeadError> {
        let head: RequestHead = from_json(bytes)?;
        if head.method.is_empty() {
            return Err(HeadError::Field("method"));
        }
        if !head.path.starts_with('/') {
            return Err(HeadError::Field("path"));
        }
        Ok(head)
    }
}

impl ResponseHead {
    /// The `RESPONSE` frame payload.
    pub fn to_json(&self) -> Bytes {
        to_json(self)
    }

    /// Parses a `RESPONSE` frame payload, checking what the relay will write to its client: a
    /// final status (interim ones and upgrades do not cross the relay) and valid headers. The
    /// agent strips hop-by-hop headers, but it is a remote peer: they are stripped here again.
    pub fn from_json(bytes: &[u8]) -> Result<ResponseHead, HeadError> {
        let mut head: ResponseHead = from_json(bytes)?;
        strip_hop_by_hop(&mut head.headers);
        if !(200..=999).contains(&head.status) {
            return Err(HeadError::Status(head.status));
        }
        if head.headers.len() > MAX_RESPONSE_HEADERS {
            return Err(HeadError::TooManyHeaders(head.headers.len()));
        }
        let mut length = None;
        for (name, value) in &head.headers {
            let valid = http::HeaderName::from_bytes(name.as_bytes()).is_ok()
                && http::HeaderValue::from_str(value).is_ok();
            if !valid {
                return Err(HeadError::Header(name.clone()));
            }
            // One body length, or the client could not tell where the body ends.
            if name.eq_ignore_ascii_case("content-length") {
                // Digits only (RFC 9110 §8.6): Rust's parse would also take `+3`.
                let digits = trim_ows(value);
                let this = digits.parse::<u64>().ok();
                let this = this.filter(|_| digits.bytes().all(|b| b.is_ascii_digit()));
                if this.is_none() || length.is_some_and(|first| Some(first) != this) {
                    return Err(HeadError::Header(name.clone()));
                }
                length = this;
            }
        }
        Ok(head)
    }
}

fn to_json(head: &impl Serialize) -> Bytes {
    // Strings, a number and lists of them: serialising cannot fail.
    Bytes::from(serde_json::to_vec(head).unwrap_or_default())
}

fn from_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, HeadError> {
    serde_json::from_slice(bytes).map_err(|err| HeadError::Json(err.to_string()))
}

/// `value` without the spaces and tabs HTTP allows around it (RFC 9110 §5.6.3), and nothing
/// else: `str::trim` would also take Unicode spaces, and read `5` in `5\u{a0}`, which Pingora,
/// framing a body from it, does not.
pub(crate) fn trim_ows(value: &str) -> &str {
    value.trim_matches([' ', '\t'])
}

/// Removes the hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut Headers) {
    strip_hop_by_hop_keeping(headers, &[]);
}

/// Removes the hop-by-hop headers, including those the `Connection` header names, except the
/// `kept` ones (lower case) it names; answers those.
pub(crate) fn strip_hop_by_hop_keeping(
    headers: &mut Headers,
    kept: &[&'static str],
) -> Vec<&'static str> {
    let (spared, named): (Vec<String>, Vec<String>) = headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, value)| value.split(','))
        .map(|token| trim_ows(token).to_ascii_lowercase())
        .filter(|token| !token.is_empty())
        .partition(|token| kept.contains(&token.as_str()));
    headers.retain(|(name, _)| {
        let is = |other: &str| name.eq_ignore_ascii_case(other);
        !HOP_BY_HOP.iter().copied().any(is) && !named.iter().any(|other| is(other))
    });
    let spared = kept.iter().filter(|k| spared.iter().any(|s| s == *k));
    spared.copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Headers {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// Heads round-trip through JSON with repeated headers in order.
    #[test]
    fn round_trip() {
        let request = RequestHead {
            method: "POST".into(),
            path: "/a/b?x=1&y=%20".into(),
            headers: pairs(&[("X-A", "1"), ("x-a", "2")]),
            timeout_ms: Some(2500),
        };
        assert_eq!(RequestHead::from_json(&request.to_json()).unwrap(), request);
        // A relay that says no timeout sends no field, and an agent reads its absence as none.
        let untimed = RequestHead {
            timeout_ms: None,
            ..request
        };
        let json = untimed.to_json();
        assert!(!String::from_utf8_lossy(&json).contains("timeout_ms"));
        assert_eq!(RequestHead::from_json(&json).unwrap(), untimed);
        let response = ResponseHead {
            status: 201,
            headers: pairs(&[("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]),
        };
        assert_eq!(
            ResponseHead::from_json(&response.to_json()).unwrap(),
            response
        );
    }

    /// Bad JSON, missing fields and impossible statuses are typed errors.
    #[test]
    fn malformed() {
        assert!(matches!(
            RequestHead::from_json(b"{"),
            Err(HeadError::Json(_))
        ));
        let missing = RequestHead::from_json(br#"{"method":"GET"}"#).unwrap_err();
        assert!(missing.to_string().contains("`path`"), "{missing}");
        assert_eq!(
            RequestHead::from_json(br#"{"method":"GET","path":"x"}"#),
            Err(HeadError::Field("path"))
        );
        assert!(matches!(
            RequestHead::from_json(br#"{"method":"GET","path":"/","headers":[["a"]]}"#),
            Err(HeadError::Json(_))
        ));
        assert!(matches!(
            ResponseHead::from_json(br#"{"status":70000}"#),
            Err(HeadError::Json(_))
        ));
        assert_eq!(
            ResponseHead::from_json(br#"{"status":99}"#),
            Err(HeadError::Status(99))
        );
        // Interim statuses and upgrades cannot be relayed as a final answer.
        assert_eq!(
            ResponseHead::from_json(br#"{"status":101}"#),
            Err(HeadError::Status(101))
        );
        // The relay would fail to write these to its client, or the client to read the body.
        let lengths = [("Content-Length", "3"), ("content-length", "5")];
        let json = serde_json::json!({"status": 200, "headers": lengths});
        assert_eq!(
            ResponseHead::from_json(json.to_string().as_bytes()),
            Err(HeadError::Header("content-length".into()))
        );
        // Hop-by-hop headers an agent should not have sent do not reach the client.
        let hop = serde_json::json!({"status": 200, "headers": [["Connection", "close, X-Private"], ["X-Private", "1"], ["X-Kept", "2"]]});
        let parsed = ResponseHead::from_json(hop.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.headers, pairs(&[("X-Kept", "2")]));
        let many: Vec<_> = (0..=MAX_RESPONSE_HEADERS)
            .map(|n| [format!("x-{n}"), "v".into()])
            .collect();
        let json = serde_json::json!({"status": 200, "headers": many});
        assert_eq!(
            ResponseHead::from_json(json.to_string().as_bytes()),
            Err(HeadError::TooManyHeaders(MAX_RESPONSE_HEADERS + 1))
        );
        let same = serde_json::json!({"status": 200, "headers": [["content-length", "3"], ["Content-Length", "3"]]});
        assert!(ResponseHead::from_json(same.to_string().as_bytes()).is_ok());
        for (name, value) in [
            ("bad name", "v"),
            ("x", "line\nbreak"),
            ("", "v"),
            ("content-length", "-1"),
            ("content-length", "+3"),
            ("content-length", "5\u{a0}"),
            ("content-length", "\u{85}5"),
        ] {
            let json = serde_json::json!({"status": 200, "headers": [[name, value]]});
            assert_eq!(
                ResponseHead::from_json(json.to_string().as_bytes()),
                Err(HeadError::Header(name.into())),
                "{name:?}: {value:?}"
            );
        }
    }

    /// Hop-by-hop headers and those `Connection` names go; the rest stay in order.
    #[test]
    fn hop_by_hop() {
        let mut headers = pairs(&[
            ("Host", "h"),
            ("Connection", "keep-alive,\tX-Private "),
            ("Connection", "x-kept\u{a0}"),
            ("x-kept", "k"),
            ("Keep-Alive", "5"),
            ("x-private", "p"),
            ("Transfer-Encoding", "chunked"),
            ("TE", "trailers"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "x"),
            ("Accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut headers);
        // Only spaces and tabs are trimmed from a token: `x-kept\u{a0}` names no header here.
        assert_eq!(
            headers,
            pairs(&[("Host", "h"), ("x-kept", "k"), ("Accept", "*/*")])
        );
    }
}
