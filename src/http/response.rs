//! Responses: what a handler answers, the CORS headers every response carries, and the one
//! place where an [`Error`] becomes a status.

use std::borrow::Cow;

use bytes::Bytes;
use pingora_http::ResponseHeader;

use super::forward::{HOP_HEADER, HOP_REFUSED};
use crate::cors;
use crate::error::Error;
use crate::routing::RouteError;
use crate::store::StoreError;

/// A complete response, built by a handler and written by the app.
#[derive(Debug)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// Headers beyond Content-Length and CORS.
    pub headers: Vec<(Cow<'static, str>, String)>,
    /// The body, possibly empty.
    pub body: Bytes,
    /// Whether the body follows as a stream after the head, with no Content-Length of ours.
    pub streamed: bool,
    /// Whether the relay's CORS headers are added (not to an upstream's response).
    pub cors: bool,
}

impl Response {
    /// An empty response with `status`.
    pub fn empty(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            streamed: false,
            cors: true,
        }
    }

    /// The head of an upstream's response, passed on as it is; its body follows as a stream
    /// (chunked, unless the upstream gave a length).
    pub fn forwarded(status: u16, headers: Vec<(String, String)>) -> Response {
        Response {
            headers: headers
                .into_iter()
                .map(|(name, value)| (Cow::Owned(name), value))
                .collect(),
            cors: false,
            ..Response::streaming(status)
        }
    }

    /// The head of a response whose body is streamed afterwards (server-sent events).
    pub fn streaming(status: u16) -> Response {
        Response {
            streamed: true,
            ..Response::empty(status)
        }
    }

    /// A one-line plain-text response, without a trailing newline, as the original wrote them.
    pub fn text(status: u16, text: impl Into<String>) -> Response {
        Response::empty(status)
            .header("Content-Type", "text/plain")
            .body(text.into())
    }

    /// A JSON response.
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response::empty(status)
            .header("Content-Type", "application/json")
            .body(value.to_string())
    }

    /// Adds a header.
    pub fn header(mut self, name: &'static str, value: impl ToString) -> Response {
        self.headers.push((Cow::Borrowed(name), value.to_string()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Response {
        self.body = body.into();
        self
    }

    /// The header block to write: status, own headers, Content-Length and CORS.
    pub fn head(&self) -> pingora_error::Result<ResponseHeader> {
        let mut head = ResponseHeader::build(self.status, Some(self.headers.len() + 4))?;
        for (name, value) in &self.headers {
            // A header that cannot be written (a stored Content-Type from elsewhere, say) is left
            // out rather than the whole answer, which may carry a message already taken.
            if let Err(e) = head.append_header(name.to_string(), value.as_str()) {
                log::warn!("left out a response header {name:?}: {e}");
            }
        }
        // RFC 9110 forbids Content-Length on 1xx, 204 and 304.
        if self.status >= 200 && self.status != 204 && self.status != 304 && !self.streamed {
            head.insert_header("Content-Length", self.body.len())?;
        }
        let has_body = self.status >= 200 && self.status != 204 && self.status != 304;
        if self.streamed && has_body && head.headers.get("Content-Length").is_none() {
            head.insert_header("Transfer-Encoding", "chunked")?;
        }
        if !self.cors {
            return Ok(head);
        }
        for (name, value) in cors::HEADERS {
            // A preflight the relay answers for an agent's service sets the methods itself (the
            // one it asked for added).
            if head.headers.get(name).is_none() {
                head.insert_header(name, value)?;
            }
        }
        Ok(head)
    }
}

/// What a client is told of `error` (in a response body or a WebSocket message): its message,
/// except for store trouble, whose cause stays in the log.
pub fn client_text(error: &Error) -> String {
    match error {
        Error::Store(StoreError::Unavailable(_)) => "Store unavailable, retry later".into(),
        Error::Store(StoreError::Internal(_)) => "Internal store error".into(),
        other => other.to_string(),
    }
}

impl From<Error> for Response {
    /// The one mapping from errors to statuses.
    fn from(error: Error) -> Response {
        if let Error::UnknownJob(id) = &error {
            // highway's shape: clients of /done read JSON whatever the outcome.
            return Response::json(404, &serde_json::json!({"id": id, "status": "Unknown"}));
        }
        let status = match &error {
            Error::MalformedUrl
            | Error::BadParameter(_)
            | Error::BadRequest(_)
            | Error::MalformedHead(_)
            | Error::BadHandshake(_)
            | Error::InvalidBody(_)
            | Error::ContentTypeNotText => 400,
            Error::UnsupportedCoding | Error::Connect => 501,
            Error::HeadTooSlow(_) | Error::BodyStalled => 408,
            Error::RequestLineTooLong { .. } => 414,
            Error::HeadTooLarge { .. } | Error::TooManyHeaderFields { .. } => 431,
            Error::UnknownJob(_) => 404,
            Error::NotWebSocket(_) => 426,
            Error::ClientGone => 499,
            Error::AccessDenied => 403,
            Error::NotFound => 404,
            Error::MethodNotAllowed { .. } => 405,
            Error::TooLarge { .. } => 413,
            Error::QueueFull { .. } => 507,
            Error::Route(route) => route_status(route),
            Error::Store(StoreError::Unavailable(_)) | Error::ShuttingDown | Error::HandingOver => {
                503
            }
            Error::Store(StoreError::Internal(_)) => 500,
        };
        let response = Response::text(status, client_text(&error));
        match error {
            Error::MethodNotAllowed { allow } => response.header("Allow", allow),
            Error::QueueFull { size } => response.header("X-Queue-Size", size),
            Error::Store(StoreError::Unavailable(_)) | Error::ShuttingDown => {
                response.header("Retry-After", 1)
            }
            Error::HandingOver => response.header("Retry-After", 0),
            // RFC 6455 §4.4: a refused handshake names the version the server speaks.
            Error::NotWebSocket(_) => response
                .header("Upgrade", "websocket")
                .header("Sec-WebSocket-Version", 13),
            Error::Route(RouteError::Refused(_)) => response.header(HOP_HEADER, HOP_REFUSED),
            _ => response,
        }
    }
}

/// The status of a request for an agent that could not be served.
fn route_status(error: &RouteError) -> u16 {
    match error {
        RouteError::NoAgent(_) => 422,
        RouteError::AgentFailed(_) | RouteError::NotTaken(_) => 502,
        RouteError::Timeout => 504,
        RouteError::Refused(inner) => route_status(inner),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Errors carry the status and headers the protocol names.
    #[test]
    fn error_statuses() {
        let r = Response::from(Error::QueueFull { size: 3 });
        assert_eq!(r.status, 507);
        assert!(r.headers.contains(&("X-Queue-Size".into(), "3".into())));
        assert_eq!(
            &r.body[..],
            b"Queue limit reached, consumers are not keeping up"
        );
        let r = Response::from(Error::Store(StoreError::Unavailable("down".into())));
        assert_eq!(r.status, 503);
        assert!(r.headers.contains(&("Retry-After".into(), "1".into())));
        let r = Response::from(Error::HandingOver);
        assert_eq!(r.status, 503);
        assert!(r.headers.contains(&("Retry-After".into(), "0".into())));
        let r = Response::from(Error::MethodNotAllowed { allow: "GET" });
        assert!(r.headers.contains(&("Allow".into(), "GET".into())));
        let r = Response::from(Error::NotWebSocket("no `Upgrade: websocket` header"));
        assert_eq!(r.status, 426);
        assert!(r.headers.contains(&("Upgrade".into(), "websocket".into())));
        assert!(r
            .headers
            .contains(&("Sec-WebSocket-Version".into(), "13".into())));
    }

    /// Every head carries CORS; a 204 carries no Content-Length.
    #[test]
    fn heads() {
        let head = Response::empty(204).head().unwrap();
        assert!(head.headers.get("Content-Length").is_none());
        assert_eq!(head.headers["Access-Control-Allow-Origin"], "*");
        let head = Response::text(400, "x").head().unwrap();
        assert_eq!(head.headers["Content-Length"], "1");
        // A header that cannot be written is left out, not the answer.
        let bad = Response::empty(200)
            .header("Content-Type", "text/plain\r")
            .body("message");
        let head = bad.head().unwrap();
        assert!(head.headers.get("Content-Type").is_none());
        assert_eq!(head.headers["Content-Length"], "7");
    }
}
