//! The relay's Pingora app: reads a request, parses its [`Route`], authorizes it, hands it to
//! the tunnel, job or event logic and writes the [`Response`] — or, for WebSockets and
//! server-sent events, the head after which the connection stays open. One `HttpServerApp` serves
//! every route: it owns the session, so a long-poll can wait on the shutdown signal and answer 204
//! when it fires, and it can take the upgraded stream. Where a routed request goes is
//! `routed`'s.

use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::Method;
use log::{debug, warn};
use pingora_core::apps::{
    HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream,
};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use tokio::sync::watch;

use super::forward::Body;
use super::parked::{self, Detached, Wait};
use super::response::Response;
use super::route::{Access, Route, RoutingHeaders};
use super::watched::{unless_stalled, write_pieces, Progress, Socket};
use super::{connection, forward, framing, sse, websocket, SEND_TIMEOUT};
use crate::access_log::{self, SHOWN_METHOD};
use crate::auth::{Auth, Credentials};
use crate::config::Config;
use crate::cors::ALLOWED_METHODS;
use crate::drain::InFlight;
use crate::error::Error;
use crate::events::Subscription;
use crate::jobs::{JobId, Jobs};
use crate::metrics;
use crate::presence::Presence;
use crate::routing::head::trim_ows;
use crate::routing::{self, Agents};
use crate::store::{Message, MessageStatus, Payload, Store, StoreError};
use crate::tunnel::{Limit, Shutdown, TunnelId, Tunnels};

mod routed;

/// The browser demo page, served at `/demo/`.
const DEMO_PAGE: &str = include_str!("demo.html");

/// How much room a body gets before its bytes come; it grows as they do.
const BODY_ROOM: usize = 16 * 1024;

/// How long an idle client connection is kept open between requests.
pub(super) const KEEPALIVE_SECS: u64 = 60;

/// What a handler decided.
// Lives on the stack for one request; boxing the response would allocate for every request.
#[allow(clippy::large_enum_variant)]
enum Outcome {
    /// A response, and what follows it on the connection, if anything.
    Respond(Response, Option<After>),
    /// A long-poll with nothing to answer yet.
    Wait(Wait),
}

impl Outcome {
    /// A whole response; the connection may be reused.
    fn whole(response: Response) -> Outcome {
        Outcome::Respond(response, None)
    }
}

/// What follows a written head on the same connection.
enum After {
    /// After `101 Switching Protocols`, the connection speaks WebSocket (never reused).
    Upgraded(Upgraded),
    /// After `200 text/event-stream`, the subscription's events follow (never reused).
    EventStream(Subscription),
    /// An agent's response body, streamed.
    Forward(Body),
}

/// What an upgraded connection serves.
enum Upgraded {
    /// Jobs sent as frames on this queue, with this limit.
    Jobs(TunnelId, Limit),
    /// A topic's events pushed as frames.
    Events(Subscription),
    /// An agent dialling in under this name; whether it understands `MOVE`.
    Agent(TunnelId, bool),
}

/// Where the relay process is in its life, as requests see it; set up by `server`.
pub struct Lifecycle {
    /// How long requests in flight may take once shutdown begins (Pingora's grace period).
    pub grace: Duration,
    /// The requests in flight, which a stopping relay waits for.
    pub in_flight: InFlight,
    /// Turns true once SIGQUIT has handed the listening socket over to a new process.
    pub handing_over: watch::Receiver<bool>,
    /// Whether this process took the listening socket over from another (`--upgrade`).
    pub successor: bool,
}

/// The relay app: shared by every connection.
pub struct RelayApp {
    tunnels: Tunnels,
    jobs: Jobs,
    events: Store,
    agents: Agents,
    presence: Presence,
    proxy: forward::HopClient,
    auth: Auth,
    access_log: bool,
    jobs_queue: TunnelId,
    route_timeout: Duration,
    header_timeout: Duration,
    /// How long requests in flight may take once shutdown begins (Pingora's grace period).
    grace: Duration,
    /// The requests in flight, which a stopping relay waits for.
    in_flight: InFlight,
    /// Turns true once SIGQUIT has handed the listening socket over to a new process.
    handing_over: watch::Receiver<bool>,
    /// Whether other instances share the store (redis): agents leaving a stopping relay can be
    /// found at them.
    shared_store: bool,
    /// Until when a request for a name no agent has here may wait for one: a new process of a
    /// graceful upgrade cannot know its predecessor's agents, which are on their way.
    successor_until: Option<Instant>,
    options: HttpServerOptions,
}

impl RelayApp {
    /// An app serving tunnels, jobs, events and agents on `store` as `config` says, at the stage
    /// of its life `life` tells.
    pub fn new(config: &Config, store: Store, life: Lifecycle) -> RelayApp {
        let tunnels = Tunnels::new(store.clone(), config.tunnel.clone());
        let jobs = Jobs::new(tunnels.clone(), store.clone());
        let agents = Agents::new();
        // A new process of a graceful upgrade cannot know its predecessor's agents, which are on
        // their way: for a while, requests wait for any name, and other instances are told.
        let successor_until = life
            .successor
            .then(|| Instant::now() + routing::RETURN_WITHIN);
        let address = config.advertise.clone();
        let presence = Presence::new(store.clone(), agents.clone(), address, successor_until);
        let mut options = HttpServerOptions::default();
        // Plain-text HTTP/2 for clients that offer it; TLS ends at the load balancer.
        options.h2c = true;
        // An HTTP/2 connection without a stream lasts as long as an idle HTTP/1 one.
        options.h2_idle_timeout = Some(Duration::from_secs(KEEPALIVE_SECS));
        RelayApp {
            tunnels,
            jobs,
            events: store,
            agents,
            presence,
            proxy: forward::hop_client(),
            auth: Auth::new(config.auth.clone()),
            // `RUST_LOG` is read once at start: whether it passes access lines cannot change.
            access_log: config.access_log && access_log::enabled(),
            jobs_queue: config.jobs_queue.clone(),
            route_timeout: config.route_timeout,
            header_timeout: config.header_timeout,
            grace: life.grace,
            in_flight: life.in_flight,
            handing_over: life.handing_over,
            shared_store: !matches!(config.store, crate::config::StoreConfig::Memory),
            successor_until,
            options,
        }
    }

    /// The requests and connections a stopping relay waits for.
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }

    /// This instance's presence, announced by a background service.
    pub fn presence(&self) -> Presence {
        self.presence.clone()
    }

    /// What a request that did not parse is told: a tunnel's bad parameters or method only to
    /// whoever may use the tunnel, as the original checked access first (a signed request, whose
    /// check needs its body, is told what is wrong).
    fn refused_first(
        &self,
        session: &ServerSession,
        routing: RoutingHeaders<'_>,
        error: Error,
    ) -> Error {
        let credentials = credentials(session);
        let checkable = !self.auth.checks_signature_of(credentials);
        let refused = |tunnel: TunnelId| !self.auth.allows(tunnel.as_str(), credentials, b"");
        match error {
            Error::BadParameter(_) | Error::MethodNotAllowed { .. }
                if checkable
                    && Route::tunnel_in_path(session.req_header().uri.path(), routing)
                        .is_some_and(refused) =>
            {
                Error::AccessDenied
            }
            error => error,
        }
    }

    /// Answers one parsed request.
    async fn handle(
        &self,
        route: Route,
        session: &mut ServerSession,
        shutdown: &mut Shutdown,
    ) -> Result<Outcome, Error> {
        // Only a signature needs the body: without one, a request is refused before its body is
        // read (no `100 Continue`, nothing uploaded for nothing), as the original did.
        let signed = matches!(route.access(), Access::Name(_))
            && self.auth.checks_signature_of(credentials(session));
        let allows = |session: &ServerSession, body: &[u8]| match route.access() {
            Access::Open => true,
            Access::Name(name) => self.auth.allows(name.as_str(), credentials(session), body),
            Access::Token => self.auth.allows_token(credentials(session)),
        };
        if !signed && !allows(session, b"") {
            return Err(Error::AccessDenied);
        }
        let body = if route.reads_body(signed) {
            self.read_body(session).await?
        } else {
            Bytes::new()
        };
        if signed && !allows(session, &body) {
            return Err(Error::AccessDenied);
        }
        let tunnels = &self.tunnels;
        let response = match route {
            Route::Health => Response::text(200, "OK"),
            Route::Demo => Response::empty(200)
                .header("Content-Type", "text/html; charset=utf-8")
                .body(DEMO_PAGE),
            Route::Preflight => preflight(session),
            Route::ServicePreflight => service_preflight(session),
            Route::Produce { tunnel, limit } => {
                let payload = payload(session, body)?;
                let (id, size) = tunnels.produce(&tunnel, payload, limit).await?;
                let response = Response::empty(201).header("X-Message-Id", id);
                match size {
                    Some(size) => response.header("X-Queue-Size", size),
                    None => response,
                }
            }
            Route::Consume { tunnel, delivery } => {
                let message = tunnels.consume(&tunnel, delivery, None, shutdown).await?;
                self.message(message)
            }
            Route::Poll {
                tunnel,
                delivery,
                timeout,
            } => {
                let timeout = self.poll_timeout(timeout);
                return Ok(Outcome::Wait(Wait::Message {
                    tunnel,
                    delivery,
                    timeout,
                }));
            }
            Route::Ack { tunnel, msg } => {
                tunnels.ack(&tunnel, msg).await?;
                Response::empty(204)
            }
            Route::Reply { tunnel, msg } => {
                let replied = tunnels.reply(&tunnel, msg, payload(session, body)?).await?;
                Response::empty(if replied { 201 } else { 204 })
            }
            Route::ReadReply { tunnel, msg } => {
                let reply = tunnels.take_reply(&tunnel, msg, None, shutdown).await?;
                self.payload_response(reply)
            }
            Route::PollReply {
                tunnel,
                msg,
                timeout,
            } => {
                let timeout = self.poll_timeout(timeout);
                return Ok(Outcome::Wait(Wait::Reply {
                    tunnel,
                    msg,
                    timeout,
                }));
            }
            Route::Status { tunnel, msg } => {
                Response::empty(match tunnels.status(&tunnel, msg).await? {
                    MessageStatus::Queued => 201,
                    MessageStatus::Pending => 202,
                    MessageStatus::Gone => 204,
                })
            }
            Route::Len { tunnel } => {
                let size = tunnels.len(&tunnel).await?;
                Response::empty(204).header("X-Queue-Size", size)
            }
            Route::Clear { tunnel } => {
                tunnels.clear(&tunnel).await?;
                Response::empty(204).header("X-Queue-Size", 0)
            }
            Route::Trigger { queue, limit } => {
                let job = self.jobs.trigger(&queue, body, limit).await?;
                Response::json(202, &job.to_json()).header("Location", format!("/done/{}", job.id))
            }
            Route::Done { job, wait: None } => self.done(&job, None, shutdown).await?.0,
            Route::Done {
                job,
                wait: Some(asked),
            } => {
                let timeout = self.poll_timeout(Some(asked));
                return Ok(Outcome::Wait(Wait::Job { job, timeout }));
            }
            Route::JobSocket { queue, limit } => {
                // A limit no job could be queued under is refused before the socket opens.
                self.tunnels.bound(limit)?;
                let then = Some(After::Upgraded(Upgraded::Jobs(queue, limit)));
                return Ok(Outcome::Respond(accept(session)?, then));
            }
            Route::Publish { topic } => {
                let reached = self.events.events().subscribers(topic.as_str());
                self.events.publish(topic.as_str(), body).await?;
                Response::empty(202).header("X-Subscribers", reached)
            }
            Route::Subscribe { topic } => {
                // Subscribed before the head is written, so no event after it is missed.
                let subscription = self.subscribe(&topic).await?;
                let head = Response::streaming(200)
                    .header("Content-Type", "text/event-stream")
                    .header("Cache-Control", "no-cache");
                return Ok(Outcome::Respond(
                    head,
                    Some(After::EventStream(subscription)),
                ));
            }
            Route::AgentConnect { name } => {
                // An agent told to leave the moment it came would dial straight back: a
                // stopping relay refuses it, and it tries again after a pause; one handing over
                // refuses it too, and it dials again at once, to reach the new process.
                if *shutdown.borrow() {
                    return Err(Error::ShuttingDown);
                }
                if *self.handing_over.borrow() {
                    return Err(Error::HandingOver);
                }
                let moves = session
                    .get_header(routing::frame::MOVES_HEADER)
                    .is_some_and(|value| value.as_bytes() == b"1");
                let then = Some(After::Upgraded(Upgraded::Agent(name, moves)));
                return Ok(Outcome::Respond(accept(session)?, then));
            }
            Route::Agents => {
                let agents = self.presence.all().await?;
                Response::json(200, &serde_json::json!({ "agents": agents }))
            }
            // A private service is not asked by whoever sends a preflight (it needs no
            // credentials): the relay answers it, and the request itself must carry the token.
            Route::Forward {
                agent,
                preflight: true,
                ..
            } if self.auth.enabled() && !self.auth.is_public(agent.as_str()) => {
                service_preflight(session)
            }
            Route::Forward {
                agent,
                path,
                timeout,
                ..
            } => return self.route(session, agent, path, timeout, shutdown).await,
            Route::EventSocket { topic } => {
                let head = accept(session)?;
                let subscription = self.subscribe(&topic).await?;
                let then = Some(After::Upgraded(Upgraded::Events(subscription)));
                return Ok(Outcome::Respond(head, then));
            }
        };
        Ok(Outcome::whole(response))
    }

    /// Subscribes to `topic`, unless events published now would not reach this process (its
    /// store's event feed is down): a subscriber is not kept waiting for nothing.
    async fn subscribe(&self, topic: &TunnelId) -> Result<Subscription, Error> {
        if !self.events.hears_events() {
            let why = "the events subscriber is not subscribed".into();
            return Err(Error::Store(StoreError::Unavailable(why)));
        }
        // Registered first, so that the store keeps hearing the topic for it.
        let subscription = self.events.events().subscribe(topic.as_str());
        self.events.listen(topic.as_str()).await?;
        Ok(subscription)
    }

    /// Reads the whole body, refusing more than `TUNNEL_MAX_MESSAGE_SIZE` bytes.
    async fn read_body(&self, session: &mut ServerSession) -> Result<Bytes, Error> {
        let limit = self.tunnels.config().max_message_size;
        let too_large = Error::TooLarge { limit };
        let declared = session
            .get_header("Content-Length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            return Err(too_large);
        }
        continue_if_expected(session).await?;
        // Room for what has come, not for what is announced: a connection that announces a large
        // body and sends none must not hold its size.
        let announced = declared.unwrap_or(0).min(BODY_ROOM as u64) as usize;
        let mut body = BytesMut::with_capacity(announced);
        while let Some(chunk) = session
            .read_request_body()
            .await
            .map_err(|e| unreadable(&e))?
        {
            if body.len() + chunk.len() > limit {
                return Err(too_large);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    /// Serves an upgraded connection as a WebSocket until it closes.
    async fn serve_upgraded(&self, session: ServerSession, upgraded: Upgraded, shutdown: Shutdown) {
        let ServerSession::H1(mut h1) = session else {
            return;
        };
        let config = self.tunnels.config();
        // Frames a client sent right behind its handshake, without waiting for the 101, were read
        // with the head: Pingora hands them out first, at once, as the upgraded body.
        let early = h1.read_body_bytes().now_or_never();
        let stream = match early {
            Some(Ok(Some(bytes))) => connection::rewound(h1.into_inner(), &bytes),
            _ => h1.into_inner(),
        };
        // Each kind boxed: inline, every socket's task would have room for the biggest kind.
        match upgraded {
            Upgraded::Jobs(queue, limit) => {
                let (jobs, max_message) = (self.jobs.clone(), config.max_message_size);
                let serving =
                    websocket::serve_jobs(stream, jobs, (queue, limit), max_message, shutdown);
                Box::pin(serving).await;
            }
            Upgraded::Events(subscription) => {
                let max_event = config.max_message_size;
                let serving = websocket::serve_events(stream, subscription, max_event, shutdown);
                Box::pin(serving).await;
            }
            Upgraded::Agent(name, moves) => {
                let socket = websocket::agent_socket(stream).await;
                let handover = moves.then(|| self.handing_over.clone());
                let agents = self.agents.clone();
                let serving = routing::serve(socket, name.to_string(), agents, shutdown, handover);
                Box::pin(serving).await;
            }
        }
    }

    /// The job's state, waiting up to `wait` for it to finish (`GET /done/{id}`); with whether
    /// it hands out the job's final state, which nobody collects again.
    async fn done(
        &self,
        job: &JobId,
        wait: Option<Duration>,
        shutdown: &mut Shutdown,
    ) -> Result<(Response, bool), Error> {
        match self.jobs.collect(job, wait, shutdown).await? {
            Some(collected) => {
                let handed_out = collected.hands_out();
                Ok((Response::json(200, &collected.job.to_json()), handed_out))
            }
            None => Err(Error::UnknownJob(job.to_string())),
        }
    }

    fn poll_timeout(&self, asked: Option<u64>) -> Duration {
        let config = self.tunnels.config();
        asked
            .map(Duration::from_secs)
            .unwrap_or(config.default_poll_timeout)
            .min(config.max_poll_timeout)
    }

    fn message(&self, message: Option<Message>) -> Response {
        match message {
            Some(message) => self
                .payload_response(Some(message.payload))
                .header("X-Message-Id", message.id),
            None => Response::empty(204),
        }
    }

    fn payload_response(&self, payload: Option<Payload>) -> Response {
        let Some(payload) = payload else {
            return Response::empty(204);
        };
        // A type that cannot be a header (stored by the original relay, which took any bytes)
        // is replaced by the default, as a missing one is, rather than left out.
        let content_type = payload
            .content_type
            .filter(|ct| !trim_ows(ct).is_empty() && ::http::HeaderValue::from_str(ct).is_ok())
            .unwrap_or_else(|| self.tunnels.config().default_content_type.clone());
        Response::empty(200)
            .header("Content-Type", content_type)
            .body(payload.body)
    }
}

/// Logs why a request could not be read at debug level: the kind and cause of Pingora's error,
/// not its context, which holds the bytes read (a bearer token, a cookie, a signed body).
fn log_unread(error: &pingora_error::Error) {
    match &error.cause {
        Some(cause) => debug!(
            "could not read a request: {} ({cause})",
            error.etype().as_str()
        ),
        None => debug!("could not read a request: {}", error.etype().as_str()),
    }
}

/// Pingora reads at most this many fields in an HTTP/1 request head (its parser's fixed array);
/// an HTTP/2 head is held to the same.
const MAX_HEADER_FIELDS: usize = 256;

/// Why an HTTP/2 head is refused: more fields than an HTTP/1 head may have (HTTP/2 itself
/// limits only a head's size).
fn too_many_fields(head: &pingora_http::RequestHeader) -> Option<Error> {
    let limit = MAX_HEADER_FIELDS;
    (head.headers.len() > limit).then_some(Error::TooManyHeaderFields { limit })
}

/// What a client whose HTTP/1 head does not parse is told: 431 for more fields than Pingora
/// reads (RFC 6585: too large collectively), 400 for anything else.
fn unparsable_head(error: &pingora_error::Error) -> Error {
    let cause = error.cause.as_deref();
    match cause.and_then(|cause| cause.downcast_ref::<httparse::Error>()) {
        Some(httparse::Error::TooManyHeaders) => Error::TooManyHeaderFields {
            limit: MAX_HEADER_FIELDS,
        },
        _ => Error::MalformedHead("Malformed request head"),
    }
}

/// Why a request could not be read, as the client is told: Pingora's own text (error kinds,
/// parser contexts) goes only to the debug log.
pub(super) fn unreadable(error: &pingora_error::Error) -> Error {
    use pingora_error::ErrorType;
    log_unread(error);
    let why = match error.etype() {
        ErrorType::ReadTimedout => return Error::BodyStalled,
        // Reset mid-body: the client left (499), as one leaving before its head did. One that
        // closed its side may still read the answer (nginx answers it 400 too).
        ErrorType::ReadError => return Error::ClientGone,
        ErrorType::WriteTimedout => "the connection stalled",
        ErrorType::ConnectionClosed | ErrorType::WriteError => "the connection was cut off",
        _ => "the body is malformed",
    };
    Error::BadRequest(why.into())
}

/// Answers `Expect: 100-continue` before a body is read: curl waits a second for it before
/// sending bodies over 1 KiB. An HTTP/1.0 client's is ignored, as RFC 9110 (10.1.1) says and nginx
/// did: it would read the `100` as the answer.
pub(super) async fn continue_if_expected(session: &mut ServerSession) -> Result<(), Error> {
    let expected = session.req_header().version != http::Version::HTTP_10
        && session
            .get_header("Expect")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expected {
        session
            .write_continue_response()
            .await
            .map_err(|e| unreadable(&e))?;
    }
    Ok(())
}

/// A body with the request's Content-Type; an empty one is none (the default type applies), on
/// either store. One that is not UTF-8 is refused rather than stored without it.
fn payload(session: &ServerSession, body: Bytes) -> Result<Payload, Error> {
    let content_type = match session.get_header("Content-Type") {
        // HTTP's whitespace only: a Unicode space is part of the type, kept as it came.
        Some(value) => {
            trim_ows(std::str::from_utf8(value.as_bytes()).map_err(|_| Error::ContentTypeNotText)?)
        }
        None => "",
    };
    let content_type = (!content_type.is_empty()).then(|| content_type.to_owned());
    Ok(Payload { body, content_type })
}

/// The 101 answer to a WebSocket handshake (HTTP/1.1 only: no RFC 8441 WebSockets over HTTP/2).
fn accept(session: &ServerSession) -> Result<Response, Error> {
    if session.is_http2() {
        return Err(Error::NotWebSocket("WebSockets need HTTP/1.1"));
    }
    let request = session.req_header();
    let all = |name: &str| {
        let values = request.headers.get_all(name).iter();
        values.map(|v| v.as_bytes()).collect()
    };
    let header = |name: &str| session.get_header(name).map(|v| v.as_bytes());
    websocket::accept(&websocket::Handshake {
        http11: request.version == http::Version::HTTP_11,
        connection: all("Connection"),
        upgrade: all("Upgrade"),
        version: header("Sec-WebSocket-Version"),
        key: header("Sec-WebSocket-Key"),
    })
}

/// A CORS preflight for an agent's service that the relay answers: adds the one method asked
/// for to the relay's own list (the service may take any).
fn service_preflight(session: &ServerSession) -> Response {
    let asked = session
        .get_header("Access-Control-Request-Method")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        // One method name (a token), not a list or anything else to echo.
        .filter(|asked| asked.len() <= 32 && Method::from_bytes(asked.as_bytes()).is_ok())
        .filter(|asked| !ALLOWED_METHODS.split(", ").any(|m| m == *asked));
    let allowed = match asked {
        Some(asked) => format!("{ALLOWED_METHODS}, {asked}"),
        None => ALLOWED_METHODS.to_owned(),
    };
    preflight(session).header("Access-Control-Allow-Methods", allowed)
}

/// A CORS preflight: lets browsers send whatever headers they asked for.
fn preflight(session: &ServerSession) -> Response {
    let requested = session
        .get_header("Access-Control-Request-Headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("Authorization, Content-Type, X-Hub-Signature-256")
        .to_owned();
    Response::empty(204)
        .header("Access-Control-Max-Age", 3600)
        .header("Access-Control-Allow-Headers", requested)
}

#[async_trait]
impl HttpServerApp for RelayApp {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        // Pingora's own futures are boxed so that they take memory only while they run: the
        // state of this function is held for as long as a long-poll waits. An HTTP/1 head is
        // here whole already (`connection` reads it, bounded in time and size), so the header
        // timeout matters for HTTP/2 streams; it runs on Pingora's timer, cheaper than tokio's
        // on this per-request path.
        let started = Instant::now();
        let read = pingora_timeout::timeout(self.header_timeout, Box::pin(session.read_request()));
        let refused = match read.await {
            Ok(Ok(true)) if session.is_http2() => too_many_fields(session.req_header()),
            Ok(Ok(true)) => framing::check(session.req_header()).err(),
            Ok(Ok(false)) => return None,
            Err(_) => Some(Error::HeadTooSlow(self.header_timeout)),
            Ok(Err(e)) => {
                log_unread(&e);
                // A head that came but does not parse still gets its one-line answer; a client
                // that left or stalled mid-head gets none.
                if e.etype() != &pingora_error::ErrorType::InvalidHTTPHeader {
                    return None;
                }
                Some(unparsable_head(&e))
            }
        };
        if let Some(why) = refused {
            self.refuse(session, why, started).await;
            return None;
        }
        let mut shutdown = shutdown.clone();
        // An HTTP/2 body may come with neither length nor chunking: only its stream tells. (Asked
        // of OPTIONS requests alone, the only ones it concerns.)
        let h2_body = session.req_header().method == Method::OPTIONS
            && session.is_http2()
            && !session.is_body_empty();
        let head = session.req_header();
        let method = head.method.clone();
        let header = |name: &str| session.get_header(name).and_then(|v| v.to_str().ok());
        // Not `to_str`: a value that is not ASCII (`300µs`) is parsed, or refused, not ignored.
        // A header sent twice is one list (RFC 9110 §5.3), refused as `a, b` is, rather than
        // read as whichever value came first.
        let text = |name: &str| {
            let values: Vec<&[u8]> = head
                .headers
                .get_all(name)
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            let joined = values.join(&b", "[..]);
            (!values.is_empty()).then(|| String::from_utf8_lossy(&joined).into_owned())
        };
        let (client_id, timeout) = (
            text("x-backstream-client-id"),
            text(forward::TIMEOUT_HEADER),
        );
        let routing = RoutingHeaders {
            client_id: client_id.as_deref(),
            timeout: timeout.as_deref(),
            preflight: method == Method::OPTIONS
                && header("Access-Control-Request-Method").is_some()
                && header("Transfer-Encoding").is_none()
                && header("Content-Length").is_none_or(|length| length.trim() == "0")
                && !h2_body,
        };
        let route = Route::parse(
            &head.method,
            head.uri.path(),
            head.uri.query(),
            routing,
            &self.jobs_queue,
        );
        let name = route.as_ref().map_or("invalid", Route::name);
        // Counted until its response is written, a streamed body included (a long-poll that
        // leaves to wait outside is answered at once when the relay stops).
        let in_flight = self.in_flight.request();
        let served = Served {
            method: Some(method),
            name,
            tunnel: match &route {
                Ok(route) if self.access_log => route.tunnel().map(|t| t.to_string()),
                _ => None,
            },
            client: self.access_log.then(|| client_ip(&session)).flatten(),
            started,
        };
        // A body refused unread (too large) or broken off is still on the wire, where nothing
        // tells its bytes from the next request's: such a connection is closed after answering.
        let mut body_left = false;
        let outcome = match route {
            Ok(route) => match self.handle(route, &mut session, &mut shutdown).await {
                Ok(outcome) => outcome,
                Err(e) => {
                    body_left = match e {
                        Error::TooLarge { .. } | Error::BadRequest(_) | Error::BodyStalled => true,
                        // Refused before its body was read.
                        Error::AccessDenied => !session.is_body_done(),
                        _ => false,
                    };
                    Outcome::whole(failed(name, e))
                }
            },
            Err(e) => Outcome::whole(Response::from(self.refused_first(&session, routing, e))),
        };
        let (response, after) = match outcome {
            Outcome::Respond(response, after) => (response, after),
            Outcome::Wait(wait) => match parked::detach(session).await {
                Detached::Stream(stream, keepalive) => {
                    let parked = self.clone().park(stream, keepalive, wait, served, shutdown);
                    tokio::spawn(parked);
                    return None;
                }
                Detached::Lost => {
                    self.record(&served, 499);
                    return None;
                }
                Detached::InPlace(whole) => {
                    session = *whole;
                    let waiting = async { self.wait(name, wait, &mut shutdown).await.0 };
                    let Some(response) = unless_reset(&mut session, waiting).await else {
                        self.record(&served, 499);
                        return None;
                    };
                    (response, None)
                }
            },
        };
        let status = response.status;
        // Upgraded connections and event streams are never handed back for another request.
        let reusable = matches!(after, None | Some(After::Forward(_)));
        let asked = session.is_http2() || parked::client_keeps_alive(session.req_header());
        let until_close = close_delimited(&session, &response);
        let keepalive = asked && reusable && !body_left && !until_close && !*shutdown.borrow();
        session.set_keepalive(keepalive.then_some(KEEPALIVE_SECS));
        // nginx's 499 is for the log: a client that left gets nothing, and its connection closes.
        if status == 499 {
            self.record(&served, status);
            return None;
        }
        let written = Box::pin(write(&mut session, response)).await;
        self.record(&served, status);
        written?;
        match after {
            None => {}
            // A response body cut short leaves the connection unusable.
            Some(After::Forward(exchange)) => forward::stream_body(&mut session, exchange)
                .await
                .then_some(())?,
            // The connection now carries WebSocket frames or an event stream until it closes;
            // it is never reused for another request. Served by a task of its own, still counted
            // in flight: this function's state, room for any request, would stay with it.
            Some(After::Upgraded(upgraded)) => {
                let app = self.clone();
                tokio::spawn(async move {
                    let _in_flight = in_flight;
                    app.serve_upgraded(session, upgraded, shutdown).await;
                });
                return None;
            }
            Some(After::EventStream(events)) => {
                tokio::spawn(async move {
                    let _in_flight = in_flight;
                    sse::serve(&mut session, events, shutdown).await;
                });
                return None;
            }
        }
        let settings = HttpPersistentSettings::for_session(&session);
        match Box::pin(session.finish()).await {
            Ok(reusable) => match connection::with_pipelined(reusable?) {
                Ok(stream) => Some(ReusedHttpStream::new(stream, Some(settings))),
                Err(_) => None,
            },
            Err(e) => {
                debug!("could not finish a response: {e}");
                None
            }
        }
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }
}

/// What the metrics and the access log say of a request once it is answered.
struct Served {
    /// `None` for a request refused before its head was read through.
    method: Option<Method>,
    name: &'static str,
    /// Only when the access log is on.
    tunnel: Option<String>,
    /// The peer's address (a load balancer's, behind one); only when the access log is on.
    client: Option<IpAddr>,
    started: Instant,
}

/// The IP address of the connection's peer.
fn client_ip(session: &ServerSession) -> Option<IpAddr> {
    match session.client_addr()? {
        // An IPv4 client of a dual-stack listener is `::ffff:a.b.c.d`: logged as `a.b.c.d`.
        pingora_core::protocols::l4::socket::SocketAddr::Inet(address) => {
            Some(address.ip().to_canonical())
        }
        _ => None,
    }
}

impl RelayApp {
    /// Counts an answered request, and logs it when the access log is on.
    fn record(&self, served: &Served, status: u16) {
        metrics::request(served.name, status, served.started);
        if self.access_log {
            let Served { method, name, .. } = served;
            let method =
                access_log::shown(method.as_ref().map_or("-", Method::as_str), SHOWN_METHOD);
            let ms = served.started.elapsed().as_secs_f64() * 1000.0;
            let tunnel = served.tunnel.as_deref().unwrap_or("-");
            let client: &dyn std::fmt::Display = match &served.client {
                Some(ip) => ip,
                None => &"-",
            };
            access_log::line(format_args!(
                "{method} {name} {status} {ms:.3}ms client={client} tunnel={tunnel}"
            ));
        }
    }

    /// Answers a request refused before routing (a head that is malformed, ambiguous, too slow or
    /// too large), whose head `began` to arrive then, and closes its connection; counted and
    /// logged under the route `invalid`.
    pub(super) async fn refuse(&self, mut session: ServerSession, why: Error, began: Instant) {
        let served = Served {
            method: None,
            name: "invalid",
            tunnel: None,
            client: self.access_log.then(|| client_ip(&session)).flatten(),
            started: began,
        };
        let response = Response::from(why);
        let status = response.status;
        if let Ok(head) = response.head() {
            let _ = session.write_error_response(head, response.body).await;
        }
        self.record(&served, status);
        linger(session).await;
    }

    /// How long a request head may take once its first bytes are in (`BURROW_HEADER_TIMEOUT`).
    pub(super) fn header_timeout(&self) -> Duration {
        self.header_timeout
    }

    /// Answers a long-poll once what it waits for arrives, its time is up, or `shutdown` says
    /// stop (the relay stops, or the client hung up); with whether the answer hands out what it
    /// took from the store (a message, a reply, a job's final state), which nobody else gets.
    async fn wait(&self, name: &str, wait: Wait, shutdown: &mut Shutdown) -> (Response, bool) {
        // Each wait boxed: a waiting poll's task holds the one it runs, not room for the biggest
        // (thousands of polls wait at once).
        let answered = match wait {
            Wait::Message {
                tunnel,
                delivery,
                timeout,
            } => Box::pin(
                self.tunnels
                    .consume(&tunnel, delivery, Some(timeout), shutdown),
            )
            .await
            .map(|message| handed_out(message, |message| self.message(message))),
            Wait::Reply {
                tunnel,
                msg,
                timeout,
            } => Box::pin(
                self.tunnels
                    .take_reply(&tunnel, msg, Some(timeout), shutdown),
            )
            .await
            .map(|reply| handed_out(reply, |reply| self.payload_response(reply))),
            Wait::Job { job, timeout } => Box::pin(self.done(&job, Some(timeout), shutdown)).await,
        };
        answered.unwrap_or_else(|e| (failed(name, e), false))
    }

    /// A long-poll's own task (see `parked`): waits, answers, and goes on serving the client's
    /// next requests on the connection.
    ///
    /// A client that hangs up while it waits takes nothing: the wait ends with it at its next
    /// look (logged as 499, nginx's "client closed request"), so a message or reply stays for the
    /// next consumer. A store step under way then is not cut short, which would lose what it
    /// took: that is answered, and reaches a client that only shut its sending side.
    async fn park(
        self: Arc<Self>,
        stream: Stream,
        keepalive: bool,
        wait: Wait,
        served: Served,
        shutdown: Shutdown,
    ) {
        // Told to stop when the relay stops or the client hangs up.
        let (stop, mut stopping) = watch::channel(*shutdown.borrow());
        let waiting = async {
            let mut relay = shutdown.clone();
            let relay_stops = async {
                crate::tunnel::stopping(&mut relay).await;
                stop.send_replace(true);
                std::future::pending().await
            };
            tokio::select! {
                answer = self.wait(served.name, wait, &mut stopping) => answer,
                never = relay_stops => never,
            }
        };
        let ((response, taken), mut stream, hung_up) =
            parked::until_hung_up(stream, &stop, waiting).await;
        if hung_up && !taken {
            self.record(&served, 499);
            return;
        }
        let keepalive = keepalive && !hung_up && !*shutdown.borrow();
        let status = response.status;
        // A client that takes none of it is let go, as from any other answer.
        let progress = Progress::new(Socket::of_stream(&stream));
        let writing = parked::write(&mut stream, response, keepalive);
        let written = unless_stalled(&progress, writing).await.unwrap_or_else(|| {
            let why = format!("the client took nothing for {SEND_TIMEOUT:?}");
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, why))
        });
        self.record(&served, status);
        match written {
            // Boxed: inline, the serving of further requests (Pingora's session and the whole
            // request handler) would size this task, and every waiting poll would hold that much.
            Ok(()) if keepalive => {
                Box::pin(connection::serve_http1(&self, stream, &shutdown, None)).await
            }
            Ok(()) => {}
            Err(e) => debug!("could not write a response: {e}"),
        }
    }
}

/// The answer to what a wait found, with whether it hands that out (taken from the store).
fn handed_out<T>(found: Option<T>, answer: impl FnOnce(Option<T>) -> Response) -> (Response, bool) {
    let taken = found.is_some();
    (answer(found), taken)
}

/// Runs a long-poll's `waiting` in its session (HTTP/2) unless the client resets its stream first
/// (`None`): like a hung-up HTTP/1 client (`parked::until_hung_up`), it takes nothing.
async fn unless_reset(
    session: &mut ServerSession,
    waiting: impl Future<Output = Response>,
) -> Option<Response> {
    tokio::select! {
        response = waiting => Some(response),
        () = client_gone(session) => None,
    }
}

/// Resolves once the client has closed or reset its connection (or, over HTTP/2, its stream).
/// What it sends meanwhile is read: the rest of a body nobody waits for is dropped, the start of
/// a pipelined next request kept for it by Pingora.
pub(super) async fn client_gone(session: &mut ServerSession) {
    loop {
        match session.read_body_or_idle(false).await {
            Ok(Some(_body)) => {}
            // An HTTP/2 body that ends in trailers reads as ended while its stream has not: read
            // again, it would end at once, for ever. A stream's close is watched for instead.
            Ok(None) => {
                if let Some(closed) = session.watch_h2_stream_close() {
                    let _ = closed.await;
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// How long a connection refused mid-request keeps reading what its client still sends.
const LINGER: Duration = Duration::from_secs(1);

/// Closes a connection refused mid-request (a head too slow or malformed) as nginx's lingering
/// close does: the write side is shut after the answer, then what the client still sends is read
/// and dropped for a moment. Closed with unread bytes, the connection would be reset, and a reset
/// can destroy the answer before the client has read it.
async fn linger(session: ServerSession) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ServerSession::H1(h1) = session else {
        return;
    };
    let mut stream = h1.into_inner();
    let _ = stream.shutdown().await;
    let mut dropped = [0u8; 4096];
    let drain = async { while stream.read(&mut dropped).await.is_ok_and(|n| n > 0) {} };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// What a request presents to authorization.
fn credentials(session: &ServerSession) -> Credentials<'_> {
    Credentials {
        authorization: session.get_header("Authorization").map(|v| v.as_bytes()),
        signature: session
            .get_header("X-Hub-Signature-256")
            .map(|v| v.as_bytes()),
    }
}

/// A handler's error as the response telling the client; store trouble is logged too.
fn failed(name: &str, error: Error) -> Response {
    if let Error::Store(store) = &error {
        log_store_failure(name, store);
    }
    Response::from(error)
}

/// At most one line per this long about store failures: an outage under load would otherwise
/// write one per request.
const STORE_LOG_EVERY: Duration = Duration::from_secs(10);

/// When a store failure was last logged, and how many were left out since.
static STORE_FAILURES: Mutex<(Option<Instant>, u64)> = Mutex::new((None, 0));

/// Logs a store failure unless one was logged less than [`STORE_LOG_EVERY`] ago; the next line
/// counts those left out.
pub(super) fn log_store_failure(name: &str, error: &StoreError) {
    let mut logged = STORE_FAILURES.lock().unwrap_or_else(|e| e.into_inner());
    let (last, left_out) = &mut *logged;
    if last.is_some_and(|at| at.elapsed() < STORE_LOG_EVERY) {
        *left_out += 1;
        return;
    }
    *last = Some(Instant::now());
    match std::mem::take(left_out) {
        0 => warn!("{name}: {error}"),
        n => warn!("{name}: {error} ({n} more store failures since the last line)"),
    }
}

/// Logs how many store failures were left out since the last line, once [`STORE_LOG_EVERY`] has
/// passed since it (or at once, `at_exit`): an outage shorter than that would otherwise end
/// without them told.
pub fn log_left_out_store_failures(at_exit: bool) {
    let mut logged = STORE_FAILURES.lock().unwrap_or_else(|e| e.into_inner());
    let (last, left_out) = &mut *logged;
    let early = last.is_some_and(|at| at.elapsed() < STORE_LOG_EVERY);
    if *left_out == 0 || (early && !at_exit) {
        return;
    }
    *last = Some(Instant::now());
    warn!(
        "{} more store failures since the last line",
        std::mem::take(left_out)
    );
}

/// Whether a streamed body without a length goes to an HTTP/1.0 client, which knows no chunked
/// encoding (RFC 9112 §6.1): the body then ends where the connection does. An upstream's answer
/// with a Content-Length, or of a status that has no body (204, 304), keeps the connection as the
/// client asked.
fn close_delimited(session: &ServerSession, response: &Response) -> bool {
    let has_length =
        (response.headers.iter()).any(|(name, _)| name.eq_ignore_ascii_case("content-length"));
    let bodiless = matches!(response.status, 204 | 304);
    response.streamed
        && !has_length
        && !bodiless
        && session.req_header().version == http::Version::HTTP_10
}

/// Writes a response; `None` when the client is gone.
async fn write(session: &mut ServerSession, response: Response) -> Option<()> {
    let mut head = match response.head() {
        Ok(head) => head,
        Err(e) => {
            warn!("could not build a response header: {e}");
            return None;
        }
    };
    if close_delimited(session, &response) {
        head.remove_header("Transfer-Encoding");
    }
    // A client that takes none of it (its buffers full of earlier answers) is let go.
    let progress = Progress::new(Socket::of(session));
    let head_written = unless_stalled(&progress, session.write_response_header(Box::new(head)));
    match head_written.await {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            debug!("could not write a response: {e}");
            return None;
        }
        None => {
            debug!("a client took nothing of its response for {SEND_TIMEOUT:?}: let go");
            return None;
        }
    }
    // An answer to HEAD has its body's length but not the body: Pingora leaves it out over
    // HTTP/1 only, and over HTTP/2 a client takes it for a protocol error.
    if response.body.is_empty() || session.req_header().method == Method::HEAD {
        return Some(());
    }
    // In pieces: where the client's acknowledgements are not known (over HTTP/2), each piece
    // that goes counts as progress, so that a slow but steady reader of a big answer stays.
    write_pieces(session, &progress, response.body, true)
        .await
        .then_some(())
}

#[cfg(test)]
mod tests {
    use pingora_error::ErrorType;

    use super::*;

    /// A body read that times out is 408, one cut off or malformed 400, one reset 499 (the
    /// client left).
    #[test]
    fn unreadable_bodies() {
        let status = |etype| Response::from(unreadable(&pingora_error::Error::new(etype))).status;
        assert_eq!(status(ErrorType::ReadTimedout), 408);
        assert_eq!(status(ErrorType::ConnectionClosed), 400);
        assert_eq!(status(ErrorType::ReadError), 499);
        assert_eq!(status(ErrorType::InvalidHTTPHeader), 400);
    }

    /// A relay app on the memory store, with the default settings.
    async fn relay_app() -> Arc<RelayApp> {
        let config = Config::from_lookup(|_| None).expect("the defaults");
        let store = Store::open(&config.store).await.expect("the memory store");
        let life = Lifecycle {
            grace: Duration::from_secs(1),
            in_flight: InFlight::default(),
            handing_over: watch::channel(false).1,
            successor: false,
        };
        Arc::new(RelayApp::new(&config, store, life))
    }

    /// A connection as the relay holds it, and its client's end.
    async fn accepted() -> (Stream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a listener");
        let address = listener.local_addr().expect("its address");
        let client = tokio::net::TcpStream::connect(address)
            .await
            .expect("connected");
        let (accepted, _) = listener.accept().await.expect("accepted");
        let stream = pingora_core::protocols::l4::stream::Stream::from(accepted);
        (Box::new(stream), client)
    }

    /// A waiting poll's task holds what it waits with, not room for the requests it serves
    /// next or for the biggest kind of wait: with thousands waiting, each KB is megabytes (it
    /// grew to 8 KB once, unnoticed, doubling what an idle long-poll cost).
    #[tokio::test]
    async fn waiting_polls_hold_little() {
        let app = relay_app().await;
        let (stream, _client) = accepted().await;
        let wait = Wait::Message {
            tunnel: TunnelId::parse("waiting-poll").expect("a tunnel id"),
            delivery: crate::store::Delivery::Remove,
            timeout: Duration::from_secs(1),
        };
        let served = Served {
            method: Some(Method::GET),
            name: "consume",
            tunnel: None,
            client: None,
            started: Instant::now(),
        };
        let parked = app.park(stream, true, wait, served, watch::channel(false).1);
        let size = std::mem::size_of_val(&parked);
        assert!(size <= 2048, "a waiting poll's task is {size} bytes");
    }

    /// So does an idle connection's, between its requests: it was 7.5 KB, the size of the
    /// refusal of a bad head, held by every keep-alive connection for as long as it lasts.
    #[tokio::test]
    async fn idle_connections_hold_little() {
        let app = relay_app().await;
        let (stream, _client) = accepted().await;
        let shutdown = watch::channel(false).1;
        let serving = connection::serve_http1(&app, stream, &shutdown, None);
        let size = std::mem::size_of_val(&serving);
        assert!(size <= 2048, "an idle connection's task is {size} bytes");
    }
}
