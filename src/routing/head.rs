//! The request and response heads that `HEAD` and `RESPONSE` frames carry as JSON, and the
//! hop-by-hop headers that never cross the relay (RFC 9110 §7.6.1).

use bytes::Bytes;
use serde_json::{json, Value};

/// Header names and values in order, repeated names kept (`Set-Cookie`). Values are text: a
/// non-UTF-8 byte is replaced (U+FFFD) where headers enter the protocol.
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

/// A request as the agent sends it upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// `GET`, `POST`…
    pub method: String,
    /// Path and query as sent upstream (`/items?page=2`).
    pub path: String,
    pub headers: Headers,
}

/// The upstream's answer as the relay passes it to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Headers,
}

/// Why a head's JSON is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("head is not JSON: {0}")]
    Json(String),
    #[error("head field {0:?} is missing or of the wrong type")]
    Field(&'static str),
    #[error("status {0} is not an HTTP status (100-999)")]
    Status(u64),
}

impl RequestHead {
    /// The `HEAD` frame payload.
    pub fn to_json(&self) -> Bytes {
        let value = json!({
            "method": self.method,
            "path": self.path,
            "headers": headers_json(&self.headers),
        });
        Bytes::from(value.to_string())
    }

    /// Parses a `HEAD` frame payload.
    pub fn from_json(bytes: &[u8]) -> Result<RequestHead, HeadError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|err| HeadError::Json(err.to_string()))?;
        let method = text_field(&value, "method")?;
        let path = text_field(&value, "path")?;
        if method.is_empty() || !path.starts_with('/') {
            return Err(HeadError::Field(if method.is_empty() {
                "method"
            } else {
                "path"
            }));
        }
        Ok(RequestHead {
            method,
            path,
            headers: headers_from(&value)?,
        })
    }
}

impl ResponseHead {
    /// The `RESPONSE` frame payload.
    pub fn to_json(&self) -> Bytes {
        let value = json!({"status": self.status, "headers": headers_json(&self.headers)});
        Bytes::from(value.to_string())
    }

    /// Parses a `RESPONSE` frame payload.
    pub fn from_json(bytes: &[u8]) -> Result<ResponseHead, HeadError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|err| HeadError::Json(err.to_string()))?;
        let status = value
            .get("status")
            .and_then(Value::as_u64)
            .ok_or(HeadError::Field("status"))?;
        let status = u16::try_from(status)
            .ok()
            .filter(|s| (100..=999).contains(s))
            .ok_or(HeadError::Status(status))?;
        Ok(ResponseHead {
            status,
            headers: headers_from(&value)?,
        })
    }
}

/// Removes the hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut Headers) {
    let named: Vec<String> = headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, value)| value.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
        .collect();
    headers.retain(|(name, _)| {
        let name = name.to_ascii_lowercase();
        !HOP_BY_HOP.contains(&name.as_str()) && !named.contains(&name)
    });
}

fn headers_json(headers: &Headers) -> Value {
    Value::Array(
        headers
            .iter()
            .map(|(name, value)| json!([name, value]))
            .collect(),
    )
}

fn text_field(value: &Value, field: &'static str) -> Result<String, HeadError> {
    value
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or(HeadError::Field(field))
}

fn headers_from(value: &Value) -> Result<Headers, HeadError> {
    let Some(list) = value.get("headers") else {
        return Ok(Vec::new());
    };
    let list = list.as_array().ok_or(HeadError::Field("headers"))?;
    list.iter()
        .map(|pair| match pair.as_array().map(Vec::as_slice) {
            Some([Value::String(name), Value::String(value)]) => Ok((name.clone(), value.clone())),
            _ => Err(HeadError::Field("headers")),
        })
        .collect()
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
        };
        assert_eq!(RequestHead::from_json(&request.to_json()).unwrap(), request);
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
        assert_eq!(
            RequestHead::from_json(br#"{"method":"GET"}"#),
            Err(HeadError::Field("path"))
        );
        assert_eq!(
            RequestHead::from_json(br#"{"method":"GET","path":"x"}"#),
            Err(HeadError::Field("path"))
        );
        assert_eq!(
            RequestHead::from_json(br#"{"method":"GET","path":"/","headers":[["a"]]}"#),
            Err(HeadError::Field("headers"))
        );
        assert_eq!(
            ResponseHead::from_json(br#"{"status":70000}"#),
            Err(HeadError::Status(70000))
        );
    }

    /// Hop-by-hop headers and those `Connection` names go; the rest stay in order.
    #[test]
    fn hop_by_hop() {
        let mut headers = pairs(&[
            ("Host", "h"),
            ("Connection", "keep-alive, X-Private"),
            ("Keep-Alive", "5"),
            ("x-private", "p"),
            ("Transfer-Encoding", "chunked"),
            ("TE", "trailers"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "x"),
            ("Accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, pairs(&[("Host", "h"), ("Accept", "*/*")]));
    }
}
