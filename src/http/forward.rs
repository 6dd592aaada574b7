//! Forwarding a client's request to an agent (PROTOCOL.md part 3): the request head goes out with
//! hop-by-hop headers removed and `X-Forwarded-*` added, then its body and the agent's response
//! are streamed through the agent's connection, never held whole. A request for an agent
//! connected to another instance is sent on to that instance, as it came, with a hop marker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use pingora_core::protocols::http::ServerSession;

use super::app::{client_gone, continue_if_expected, unreadable};
use super::response::Response;
use super::watched::{write_pieces, Progress, Socket};
use super::SEND_TIMEOUT;
use crate::error::Error;
use crate::routing::head::{is_hop_by_hop, strip_hop_by_hop_keeping};
use crate::routing::head::{MAX_RESPONSE_HEADERS, MAX_RESPONSE_HEAD_BYTES};
use crate::routing::{strip_hop_by_hop, Agents, Exchange, Headers, RequestHead};
use crate::tunnel::TunnelId;

/// Marks a request one relay instance sent to another, which then serves it only with its own
/// agents: requests never loop between instances.
pub const HOP_HEADER: &str = "x-burrow-hop";

/// The value of [`HOP_HEADER`] on the answer of an instance that has no agent (any more) for a
/// request sent to it: its record outlived its agent, or it is a new process at the address of
/// one that died. The sending instance tries the next one.
pub const HOP_REFUSED: &str = "refused";

/// How long connecting to another instance may take: one whose address no longer answers (a
/// node gone without a goodbye) must not hold requests until their timeout, which another
/// instance with the agent could serve.
const HOP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The pooled HTTP/1.1 client that sends requests on to other instances.
pub type HopClient =
    hyper_util::client::legacy::Client<HttpConnector, BoxBody<Bytes, std::io::Error>>;

/// A client for requests to other instances: plain HTTP, pooled, no proxy of the environment, no
/// redirect followed (a redirect is the upstream's answer for the client), and room for every
/// header an upstream may answer with, plus the few the other instance adds.
pub fn hop_client() -> HopClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(HOP_CONNECT_TIMEOUT));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http1_max_headers(MAX_RESPONSE_HEADERS + 16)
        .http1_max_buf_size(MAX_RESPONSE_HEAD_BYTES)
        .build(connector)
}

/// The header bounding a routed request's round trip (a Go duration).
pub const TIMEOUT_HEADER: &str = "x-backstream-request-timeout";

/// Headers meant for the relay, not for the service behind the agent.
const RELAY_HEADERS: [&str; 3] = ["x-backstream-client-id", TIMEOUT_HEADER, HOP_HEADER];

/// What the instance with the agent acts on: it goes on to it even when the client's
/// `Connection` names it, so that the request is served there as it would be here.
const ACTED_ON: [&str; 3] = ["x-backstream-client-id", TIMEOUT_HEADER, "authorization"];

/// Sends the request to an agent named `agent` as `path`, streams the request body to it, and
/// returns the head of the agent's answer with the exchange whose body follows. The
/// `Authorization` header is withheld when it was the relay's own credential.
pub async fn open(
    session: &mut ServerSession,
    agents: &Agents,
    agent: &TunnelId,
    path: String,
    timeout: Duration,
    withhold_authorization: bool,
) -> Result<(Response, Exchange), Error> {
    let head = request_head(session, path, withhold_authorization);
    let mut exchange = agents.forward(agent.as_str(), head, timeout).await?;
    continue_if_expected(session).await?;
    // An upstream may answer before it has read the whole body: the response still counts, so a
    // failed send is not an answer yet (if the exchange itself failed, `response` says why).
    // A client body that broke off is: dropping the exchange aborts the upstream request.
    match send_body(session, &mut exchange).await {
        Err(Error::ClientGone) => {
            exchange.client_left();
            return Err(Error::ClientGone);
        }
        Err(err @ (Error::BadRequest(_) | Error::BodyStalled)) => {
            exchange.body_failed(&err.to_string());
            return Err(err);
        }
        _ => {}
    }
    // A client that leaves meanwhile ends the exchange: dropping it aborts the upstream request.
    let answer = tokio::select! {
        answer = exchange.response() => Some(answer?),
        () = client_gone(session) => None,
    };
    let Some(answer) = answer else {
        exchange.client_left();
        return Err(Error::ClientGone);
    };
    let mut headers = answer.headers;
    // The relay's own mark between instances: an upstream cannot send it in the relay's name.
    headers.retain(|(name, _)| !name.eq_ignore_ascii_case(HOP_HEADER));
    Ok((Response::forwarded(answer.status, headers), exchange))
}

/// Streams the request body to the agent, chunk by chunk, within the request's timeout.
async fn send_body(session: &mut ServerSession, exchange: &mut Exchange) -> Result<(), Error> {
    loop {
        let read = exchange
            .within_deadline(session.read_request_body())
            .await?;
        let Some(chunk) = read.map_err(|e| unreadable(&e))? else {
            break;
        };
        exchange.send(chunk).await?;
    }
    exchange.finish().await?;
    Ok(())
}

/// How long the client of a routed response may take nothing of it. Another instance passes the
/// body on to its own client as that client takes it, and lets that client go itself; it reads
/// here only as its own writes finish, which with a slow but steady client behind a big send
/// buffer may take minutes.
fn send_patience(session: &ServerSession) -> Duration {
    match from_another_instance(session) {
        true => HOP_SEND_TIMEOUT,
        false => SEND_TIMEOUT,
    }
}

/// Whether the request was sent on by another instance (it carries [`HOP_HEADER`]).
pub fn from_another_instance(session: &ServerSession) -> bool {
    session.get_header(HOP_HEADER).is_some()
}

/// Whether the client's request comes with a body (perhaps an empty one).
pub fn carries_body(session: &mut ServerSession) -> bool {
    let headers = &session.req_header().headers;
    // An HTTP/2 body may come with neither header: only the stream's end tells.
    headers.contains_key("content-length")
        || headers.contains_key("transfer-encoding")
        || (session.is_http2() && !session.is_body_empty())
}

/// Whether the request can still be sent whole to another instance: it has no body, or one read
/// to its end that was empty (`Content-Length: 0`, an empty chunked body).
pub fn sendable_again(session: &mut ServerSession) -> bool {
    !carries_body(session) || (session.is_body_done() && session.body_bytes_read() == 0)
}

/// How a request sent on to another instance fared.
pub enum Hop {
    /// The head of the instance's answer, and the response whose body follows.
    Answered(Response, hyper::Response<Incoming>),
    /// The instance no longer has the agent, or its agents of the name all refused the request
    /// before taking it (`failed`, why: their upstream is down, say). The request can go to
    /// another (`again`) unless part of its body is gone with this one.
    Refused { again: bool, failed: Option<String> },
    /// The instance could not be reached, or failed before answering (why). The request can go
    /// to another (`again`) when nothing of its body was read and, unless the instance never got
    /// it (no connection), its method is idempotent.
    Failed { why: String, again: bool },
    /// The instance took the request but gave no answer within the timeout (504).
    TimedOut,
}

/// Sends the request as it came to the relay instance at `address`, which has the agent. The
/// request body is streamed to it while the request is sent.
pub async fn proxy(
    session: &mut ServerSession,
    client: &HopClient,
    address: &str,
    instance: &str,
    timeout: Duration,
) -> Result<Hop, Error> {
    let request = session.req_header();
    // Over HTTP/2 the URI is absolute: only its path and query go on.
    let target = request
        .uri
        .path_and_query()
        .map_or("/", |target| target.as_str());
    let url = format!("http://{address}{target}");
    let method = request.method.clone();
    let mut headers = header_list(&request.headers);
    // This instance answers `Expect: 100-continue` itself, below.
    headers.retain(|(name, _)| name != "host" && name != "expect");
    // Still named in a `Connection` of their own, so that the instance with the agent drops them
    // before the upstream as this one would have (the client's `Authorization`, say).
    let spared = strip_hop_by_hop_keeping(&mut headers, &ACTED_ON);
    if !spared.is_empty() {
        headers.push(("connection".into(), spared.join(", ")));
    }
    // The instance with the agent keeps these: the upstream learns the client's address and the
    // host it asked for, not this instance's.
    add_forwarded(&mut headers, client_address(session), host(session));
    headers.push((HOP_HEADER.into(), instance.into()));
    // The instance with the agent answers within the time left here, not the client's whole
    // timeout: else this one would time out first (504), and try that one last for a while.
    headers.retain(|(name, _)| name != TIMEOUT_HEADER);
    let left = format!("{}ms", timeout.as_millis().max(1));
    headers.push((TIMEOUT_HEADER.into(), left));
    let has_body = carries_body(session);
    let mut builder = http::Request::builder().method(method).uri(url);
    for (name, value) in &headers {
        builder = builder.header(name, value);
    }
    let (chunks, body) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    // The body is read from the client only once the other instance takes it, that is once
    // connected: a request whose instance cannot be reached has lost nothing and can go on to the
    // next (and `Expect: 100-continue` is answered only then).
    let (wanted, asked) = tokio::sync::oneshot::channel::<()>();
    let body = if has_body {
        let first = Some(wanted);
        let body = futures_util::stream::unfold((body, first), |(mut body, first)| async move {
            if let Some(wanted) = first {
                let _ = wanted.send(());
            }
            let chunk = body.recv().await?;
            Some((chunk.map(Frame::data), (body, None)))
        });
        BodyExt::boxed(StreamBody::new(body))
    } else {
        Empty::new().map_err(|never| match never {}).boxed()
    };
    let hop = builder
        .body(body)
        .map_err(|e| Error::BadRequest(e.to_string()))?;
    let started = AtomicBool::new(false);
    // Streams the body once asked for, then watches for the client leaving (resolving only then);
    // resolves at once with why a body that breaks off did (a client that closed its side may
    // still read its 400).
    let pump = async {
        if has_body && asked.await.is_ok() {
            started.store(true, Ordering::Relaxed);
            if continue_if_expected(session).await.is_err() {
                return Error::ClientGone;
            }
            loop {
                match session.read_request_body().await {
                    Ok(Some(chunk)) => {
                        if chunks.send(Ok(chunk)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    // The other instance must not take a body cut short for a whole one.
                    Err(e) => {
                        let _ = chunks.send(Err(std::io::Error::other(e.to_string()))).await;
                        return unreadable(&e);
                    }
                }
            }
        }
        drop(chunks);
        client_gone(session).await;
        Error::ClientGone
    };
    let sent = tokio::select! {
        sent = tokio::time::timeout(timeout, client.request(hop)) => sent,
        failed = pump => return Err(failed),
    };
    let untouched = !started.load(Ordering::Relaxed) || sendable_again(session);
    let response = match sent {
        Err(_) => return Ok(Hop::TimedOut),
        Ok(Err(e)) => {
            let idempotent = session.req_header().method.is_idempotent();
            let again = untouched && (e.is_connect() || idempotent);
            let why = crate::error::error_chain(&e);
            return Ok(Hop::Failed { why, again });
        }
        Ok(Ok(response)) => response,
    };
    // Only the relay's own 422 and 502 carry it: an upstream's header of that name is removed
    // before its answer leaves the instance with the agent.
    let refused = response.headers().get(HOP_HEADER);
    let status = response.status().as_u16();
    if matches!(status, 422 | 502) && refused.is_some_and(|mark| mark == HOP_REFUSED) {
        let failed = match status {
            502 => Some(refusal(response).await),
            _ => None,
        };
        return Ok(Hop::Refused {
            again: untouched,
            failed,
        });
    }
    let mut answer = header_list(response.headers());
    strip_hop_by_hop(&mut answer);
    let head = Response::forwarded(response.status().as_u16(), answer);
    Ok(Hop::Answered(head, response))
}

/// Why the agents at another instance refused a request: its one-line answer, less the prefix
/// that the answer here adds again.
async fn refusal(response: hyper::Response<Incoming>) -> String {
    const LONGEST: usize = 4096;
    let body = http_body_util::Limited::new(response.into_body(), LONGEST).collect();
    let text = match tokio::time::timeout(Duration::from_secs(1), body).await {
        Ok(Ok(body)) => String::from_utf8_lossy(&body.to_bytes()).trim().to_owned(),
        _ => String::new(),
    };
    match text.strip_prefix("agent failed: ") {
        Some(why) => why.to_owned(),
        None => "the agents of the name at another instance refused the request".to_owned(),
    }
}

/// Headers as name/value strings.
fn header_list(headers: &http::HeaderMap) -> Headers {
    headers
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str().to_owned(), value)
        })
        .collect()
}

/// How long another instance may take nothing of a response body before it is given up on.
const HOP_SEND_TIMEOUT: Duration = Duration::from_secs(600);

/// Where a forwarded response body comes from.
pub enum Body {
    /// An agent connected to this instance (boxed: an exchange is five times the size of the
    /// other outcomes a request handler returns).
    Agent(Box<Exchange>),
    /// Another instance, which has the agent.
    Instance(hyper::Response<Incoming>),
}

impl Body {
    /// The body's next chunk; `None` once it is complete, `Err` if it broke off. Trailers are
    /// not relayed.
    async fn next_chunk(&mut self) -> Option<Result<Bytes, ()>> {
        match self {
            Body::Agent(exchange) => Some(exchange.next_chunk().await?.map_err(drop)),
            Body::Instance(response) => loop {
                match response.body_mut().frame().await? {
                    Ok(frame) => {
                        if let Ok(chunk) = frame.into_data() {
                            return Some(Ok(chunk));
                        }
                    }
                    Err(_) => return Some(Err(())),
                }
            },
        }
    }

    /// Tells an agent connected here that the client left; another instance learns it from
    /// this connection closing.
    fn client_left(&self) {
        if let Body::Agent(exchange) = self {
            exchange.client_left();
        }
    }
}

/// Streams a forwarded response body to the client; whether it all arrived (only then can the
/// connection be reused). A client that stops reading is let go (see [`super::SEND_TIMEOUT`]),
/// and the agent's stream with it.
pub async fn stream_body(session: &mut ServerSession, mut body: Body) -> bool {
    let progress = Progress::with_patience(Socket::of(session), send_patience(session));
    loop {
        match unless_gone(session, body.next_chunk()).await {
            Some(Some(Ok(chunk))) => {
                if !write_pieces(session, &progress, chunk, false).await {
                    body.client_left();
                    return false;
                }
            }
            Some(None) => break,
            Some(Some(Err(()))) => return false,
            None => {
                body.client_left();
                return false;
            }
        }
    }
    write_pieces(session, &progress, Bytes::new(), true).await
}

/// What `next` gives, unless the client leaves first (`None`): a body slow to come (an event
/// stream, a long-poll) must not keep the upstream request going for a client that is gone.
/// Biased, so that a chunk already there costs no read of the client's socket.
async fn unless_gone<T>(
    session: &mut ServerSession,
    next: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        item = next => Some(item),
        () = client_gone(session) => None,
    }
}

/// The request as the upstream should see it.
fn request_head(
    session: &ServerSession,
    path: String,
    withhold_authorization: bool,
) -> RequestHead {
    let request = session.req_header();
    let mut headers: Headers = header_list(&request.headers)
        .into_iter()
        .filter(|(name, _)| {
            let relays_own = withhold_authorization && name == "authorization";
            !(RELAY_HEADERS.contains(&name.as_str()) || relays_own || spelt_as_own(name))
        })
        .collect();
    strip_hop_by_hop(&mut headers);
    join_cookies(&mut headers);
    // Also when another instance sent it on (its address joins the chain, as at any proxy): the
    // hop marker is a plain header that any client can send, so it cannot vouch for the chain.
    add_forwarded(&mut headers, client_address(session), host(session));
    RequestHead {
        method: request.method.as_str().to_owned(),
        path,
        headers,
        timeout_ms: None,
    }
}

/// Whether `name` spells with underscores a header the relay sets or removes (`X_Forwarded_For`):
/// an upstream that reads `_` as `-`, as CGI, WSGI and PHP do, would take it for the relay's own.
/// nginx drops every name with an underscore; these are the ones that matter.
fn spelt_as_own(name: &str) -> bool {
    if !name.contains('_') {
        return false;
    }
    let name = name.replace('_', "-");
    let set_here = [
        "host",
        "content-length",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    ];
    RELAY_HEADERS.contains(&name.as_str())
        || set_here.contains(&name.as_str())
        || is_hop_by_hop(&name)
}

/// The client's IP address, for `X-Forwarded-For`.
fn client_address(session: &ServerSession) -> Option<String> {
    session.client_addr().map(|addr| match addr.as_inet() {
        Some(inet) => inet.ip().to_string(),
        None => addr.to_string(),
    })
}

/// The host the client asked for, for `X-Forwarded-Host`: `Host`, or over HTTP/2 the URI's
/// authority (`:authority`).
fn host(session: &ServerSession) -> Option<String> {
    let request = session.req_header();
    match request.headers.get("host") {
        Some(host) => host.to_str().ok().map(String::from),
        None => request.uri.authority().map(|a| a.as_str().to_owned()),
    }
}

/// Makes several `Cookie` fields one, joined by `; ` (RFC 9113 §8.2.3): an HTTP/2 client may send
/// each cookie in a field of its own, which an HTTP/1.1 upstream would read as the first alone,
/// or joined by `, `.
fn join_cookies(headers: &mut Headers) {
    if headers.iter().filter(|(name, _)| name == "cookie").count() < 2 {
        return;
    }
    let mut cookies = Vec::new();
    headers.retain(|(name, value)| {
        let cookie = name == "cookie";
        if cookie {
            cookies.push(value.clone());
        }
        !cookie
    });
    headers.push(("cookie".into(), cookies.join("; ")));
}

/// `X-Forwarded-For` (appended to a proxy chain already there, whose lines are joined into one
/// so that the client's address ends the chain), `-Proto` and `-Host`.
fn add_forwarded(headers: &mut Headers, client: Option<String>, host: Option<String>) {
    let existing = |headers: &Headers, name: &str| headers.iter().position(|(n, _)| n == name);
    if let Some(client) = client {
        let mut chain: Vec<String> = Vec::new();
        headers.retain(|(name, value)| {
            let link = name == "x-forwarded-for";
            if link {
                chain.push(value.clone());
            }
            !link
        });
        chain.push(client);
        headers.push(("x-forwarded-for".into(), chain.join(", ")));
    }
    // Behind the load balancer that ends TLS, its own X-Forwarded-Proto is the truth.
    if existing(headers, "x-forwarded-proto").is_none() {
        headers.push(("x-forwarded-proto".into(), "http".into()));
    }
    if let (Some(host), None) = (host, existing(headers, "x-forwarded-host")) {
        headers.push(("x-forwarded-host".into(), host));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cookies in several fields become one field; one alone stays where it is.
    #[test]
    fn cookies_are_joined() {
        let mut headers: Headers = vec![
            ("cookie".into(), "a=1".into()),
            ("accept".into(), "*/*".into()),
            ("cookie".into(), "b=2".into()),
        ];
        join_cookies(&mut headers);
        let joined = [("accept", "*/*"), ("cookie", "a=1; b=2")];
        assert_eq!(headers, joined.map(|(n, v)| (n.to_owned(), v.to_owned())));
        let mut one: Headers = vec![("cookie".into(), "a=1".into()), ("x".into(), "y".into())];
        let before = one.clone();
        join_cookies(&mut one);
        assert_eq!(one, before);
    }

    /// A header spelt with underscores as one the relay sets or removes is not passed on; other
    /// names with underscores are.
    #[test]
    fn underscored_spellings_of_the_relays_headers() {
        for own in [
            "x_forwarded_for",
            "transfer_encoding",
            "x_backstream_client_id",
            "host_",
        ] {
            assert_eq!(spelt_as_own(own), own != "host_", "{own}");
        }
        for theirs in ["api_key", "x-forwarded-for", "x_request_id"] {
            assert!(!spelt_as_own(theirs), "{theirs}");
        }
    }

    /// A client is given [`SEND_TIMEOUT`] without progress, another instance 10 minutes.
    #[tokio::test]
    async fn other_instances_are_given_longer() {
        use tokio::io::AsyncWriteExt;
        for (extra, patience) in [
            ("", SEND_TIMEOUT),
            ("x-burrow-hop: a\r\n", HOP_SEND_TIMEOUT),
        ] {
            let (relay, mut client) = tokio::io::duplex(4096);
            let head = format!("GET /r/a/x HTTP/1.1\r\nHost: relay\r\n{extra}\r\n");
            client.write_all(head.as_bytes()).await.expect("sent");
            let mut session = ServerSession::new_http1(Box::new(relay));
            assert!(session.read_request().await.expect("a request"));
            assert_eq!(send_patience(&session), patience, "{extra:?}");
        }
    }

    /// A proxy chain is extended (its lines joined, in order), an upstream proto kept, the host
    /// recorded.
    #[test]
    fn forwarded_headers() {
        let mut headers = vec![
            ("x-forwarded-for".into(), "10.0.0.1".into()),
            ("accept".into(), "*/*".into()),
            ("x-forwarded-for".into(), "10.0.0.2".into()),
        ];
        add_forwarded(
            &mut headers,
            Some("127.0.0.1".into()),
            Some("relay:8080".into()),
        );
        assert_eq!(
            headers,
            vec![
                ("accept".to_string(), "*/*".to_string()),
                (
                    "x-forwarded-for".to_string(),
                    "10.0.0.1, 10.0.0.2, 127.0.0.1".to_string()
                ),
                ("x-forwarded-proto".into(), "http".into()),
                ("x-forwarded-host".into(), "relay:8080".into()),
            ]
        );
    }
}
