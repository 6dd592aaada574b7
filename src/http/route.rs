//! Routing: a request's method, path and query parsed into one [`Route`], or the error that
//! tells the client why not. Nothing here touches the store or the connection.

use std::borrow::Cow;
use std::time::Duration;

use http::Method;

use crate::duration::{parse_go_duration, MAX_ROUTE_TIMEOUT};
use crate::error::Error;
use crate::jobs::JobId;
use crate::store::Delivery;
use crate::tunnel::{Limit, MessageId, TunnelId};

/// What a request asks for, with its parameters validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /health`, or any path it begins (`/healthz`), as the original's nginx matched it.
    Health,
    /// `GET /demo/`: the browser page.
    Demo,
    /// `OPTIONS` on any of the relay's own routes: a CORS preflight.
    Preflight,
    /// `OPTIONS` on a path that is not the relay's: a CORS preflight for an agent's service
    /// addressed by `x-backstream-client-id`, which a preflight cannot carry (or a health check).
    ServicePreflight,
    /// `POST /t/{tunnel}`.
    Produce { tunnel: TunnelId, limit: Limit },
    /// `GET /t/{tunnel}`: consume without waiting.
    Consume {
        tunnel: TunnelId,
        delivery: Delivery,
    },
    /// `GET /t/{tunnel}/poll`: consume, waiting up to `timeout` seconds (`None`: the default).
    Poll {
        tunnel: TunnelId,
        delivery: Delivery,
        timeout: Option<u64>,
    },
    /// `DELETE /t/{tunnel}/{msg}`.
    Ack { tunnel: TunnelId, msg: MessageId },
    /// `POST /t/{tunnel}/{msg}/reply`.
    Reply { tunnel: TunnelId, msg: MessageId },
    /// `GET /t/{tunnel}/{msg}/reply`.
    ReadReply { tunnel: TunnelId, msg: MessageId },
    /// `GET /t/{tunnel}/{msg}/reply/poll`.
    PollReply {
        tunnel: TunnelId,
        msg: MessageId,
        timeout: Option<u64>,
    },
    /// `GET /t/{tunnel}/{msg}`.
    Status { tunnel: TunnelId, msg: MessageId },
    /// `GET /t/{tunnel}/len`.
    Len { tunnel: TunnelId },
    /// `DELETE /t/{tunnel}/all`.
    Clear { tunnel: TunnelId },
    /// `POST /trigger[?queue=Q][&limit=N]`: queue a job (`limit` as for a produce).
    Trigger { queue: TunnelId, limit: Limit },
    /// `GET /done/{id}[?wait=S]`: a job's state, waiting up to `wait` seconds for it to finish.
    Done { job: JobId, wait: Option<u64> },
    /// `GET /ws[/{tag}][?queue=Q][&limit=N]`: a WebSocket that triggers jobs (`limit` as for a
    /// produce) and pushes their results.
    JobSocket { queue: TunnelId, limit: Limit },
    /// `POST /e/{topic}`: publish an event.
    Publish { topic: TunnelId },
    /// `GET /e/{topic}`: subscribe as server-sent events.
    Subscribe { topic: TunnelId },
    /// `GET /ws/e/{topic}`: subscribe over a WebSocket.
    EventSocket { topic: TunnelId },
    /// `GET /agent/connect?name=NAME`: an agent dialling in (upgraded to a WebSocket).
    AgentConnect { name: TunnelId },
    /// `GET /agents`: presence.
    Agents,
    /// A request for agent `agent` (`x-backstream-client-id` on any path, or `/r/{agent}/...`):
    /// forwarded as `path` (with its query), within `timeout` (`None`: the relay's default).
    /// A CORS `preflight` is forwarded without credentials: browsers never send any with one.
    Forward {
        agent: TunnelId,
        path: String,
        timeout: Option<Duration>,
        preflight: bool,
    },
}

/// What a request must show to pass when authorization is on (see [`crate::auth::Auth`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access<'a> {
    /// Nothing: `/health`, `/demo/`, preflights.
    Open,
    /// What the rules ask for this tunnel id, queue, topic or agent name.
    Name(&'a TunnelId),
    /// The bearer token.
    Token,
}

/// What routing needs from the request besides its line: backstream's two headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoutingHeaders<'a> {
    /// `x-backstream-client-id`: forward to this agent, whatever the path.
    pub client_id: Option<&'a str>,
    /// `x-backstream-request-timeout`: a Go duration bounding the round trip.
    pub timeout: Option<&'a str>,
    /// Whether the request is a CORS preflight: `OPTIONS` asking with
    /// `Access-Control-Request-Method`, without a body.
    pub preflight: bool,
}

impl<'a> RoutingHeaders<'a> {
    /// The agent `x-backstream-client-id` names. An empty header names none, as Go's
    /// `Header.Get` reads it: a proxy that always adds the header must not turn tunnel traffic
    /// into 400s.
    fn agent(&self) -> Option<&'a str> {
        self.client_id.filter(|id| !id.trim().is_empty())
    }
}

/// The shapes of `/t/...` paths, before the method picks the route.
enum TunnelPath {
    Tunnel(TunnelId),
    Poll(TunnelId),
    Len(TunnelId),
    All(TunnelId),
    Message(TunnelId, MessageId),
    Reply(TunnelId, MessageId),
    ReplyPoll(TunnelId, MessageId),
}

impl TunnelPath {
    /// Matches the segments after `/t/`. A trailing `/` is allowed only where PROTOCOL.md
    /// shows `[/]`, as the original's nginx locations did.
    fn parse(rest: &str) -> Option<TunnelPath> {
        let (rest, slash) = match rest.strip_suffix('/') {
            Some(rest) => (rest, true),
            None => (rest, false),
        };
        let segments: Vec<&str> = rest.split('/').collect();
        let tunnel = TunnelId::parse(segments[0])?;
        let msg = || segments.get(1).and_then(|m| m.parse::<MessageId>().ok());
        let path = match segments[1..] {
            [] => TunnelPath::Tunnel(tunnel),
            ["poll"] if !slash => TunnelPath::Poll(tunnel),
            ["len"] if !slash => TunnelPath::Len(tunnel),
            ["all"] if !slash => TunnelPath::All(tunnel),
            [_] => TunnelPath::Message(tunnel, msg()?),
            [_, "reply"] => TunnelPath::Reply(tunnel, msg()?),
            [_, "reply", "poll"] => TunnelPath::ReplyPoll(tunnel, msg()?),
            _ => return None,
        };
        Some(path)
    }

    /// The tunnel the path names.
    fn tunnel(&self) -> &TunnelId {
        match self {
            TunnelPath::Tunnel(tunnel)
            | TunnelPath::Poll(tunnel)
            | TunnelPath::Len(tunnel)
            | TunnelPath::All(tunnel)
            | TunnelPath::Message(tunnel, _)
            | TunnelPath::Reply(tunnel, _)
            | TunnelPath::ReplyPoll(tunnel, _) => tunnel,
        }
    }

    /// The methods this path serves, for `Allow`.
    fn allow(&self) -> &'static str {
        match self {
            TunnelPath::Tunnel(_) | TunnelPath::Reply(..) => "GET, POST, OPTIONS",
            TunnelPath::Poll(_) | TunnelPath::Len(_) | TunnelPath::ReplyPoll(..) => "GET, OPTIONS",
            TunnelPath::All(_) => "DELETE, OPTIONS",
            TunnelPath::Message(..) => "GET, DELETE, OPTIONS",
        }
    }
}

impl Route {
    /// Parses a request line. `query` is the raw query string, if any; `jobs_queue` is the
    /// queue of jobs whose request names none.
    pub fn parse(
        method: &Method,
        path: &str,
        query: Option<&str>,
        routing: RoutingHeaders<'_>,
        jobs_queue: &TunnelId,
    ) -> Result<Route, Error> {
        // Sent on to an agent, its target would arrive as a path it never named, and a 2xx
        // answer would turn the client's connection into a tunnel that nothing serves.
        if method == Method::CONNECT {
            return Err(Error::Connect);
        }
        if let Some(route) = Route::parse_forward(path, query, routing)? {
            return Ok(route);
        }
        let path = &merge_slashes(path);
        let Some(rest) = path.strip_prefix("/t/") else {
            return Route::parse_other(method, path, Query::parse(query), jobs_queue);
        };
        let shape = TunnelPath::parse(rest).ok_or(Error::MalformedUrl)?;
        if method == Method::OPTIONS {
            return Ok(Route::Preflight);
        }
        let query = Query::parse(query);
        let route = match (shape, method.as_str()) {
            (TunnelPath::Tunnel(tunnel), "POST") => Route::Produce {
                tunnel,
                limit: query.limit()?,
            },
            (TunnelPath::Tunnel(tunnel), "GET") => Route::Consume {
                tunnel,
                delivery: query.delivery()?,
            },
            (TunnelPath::Poll(tunnel), "GET") => Route::Poll {
                tunnel,
                delivery: query.delivery()?,
                timeout: query.timeout()?,
            },
            (TunnelPath::Len(tunnel), "GET") => Route::Len { tunnel },
            (TunnelPath::All(tunnel), "DELETE") => Route::Clear { tunnel },
            (TunnelPath::Message(tunnel, msg), "GET") => Route::Status { tunnel, msg },
            (TunnelPath::Message(tunnel, msg), "DELETE") => Route::Ack { tunnel, msg },
            (TunnelPath::Reply(tunnel, msg), "POST") => Route::Reply { tunnel, msg },
            (TunnelPath::Reply(tunnel, msg), "GET") => Route::ReadReply { tunnel, msg },
            (TunnelPath::ReplyPoll(tunnel, msg), "GET") => Route::PollReply {
                tunnel,
                msg,
                timeout: query.timeout()?,
            },
            (shape, _) => {
                return Err(Error::MethodNotAllowed {
                    allow: shape.allow(),
                })
            }
        };
        Ok(route)
    }

    /// The tunnel a well-formed `/t/...` path names, whatever its method and parameters, unless
    /// the request is for an agent: the original checked access to it before anything else.
    pub fn tunnel_in_path(path: &str, routing: RoutingHeaders<'_>) -> Option<TunnelId> {
        if routing.agent().is_some() {
            return None;
        }
        let path = merge_slashes(path);
        let shape = TunnelPath::parse(path.strip_prefix("/t/")?)?;
        Some(shape.tunnel().clone())
    }

    /// A request for an agent, if it is one: backstream's header on any path, or `/r/{agent}/...`.
    fn parse_forward(
        path: &str,
        query: Option<&str>,
        routing: RoutingHeaders<'_>,
    ) -> Result<Option<Route>, Error> {
        let (agent, forwarded_path) = match (routing.agent(), routed_rest(path)) {
            (Some(id), _) => {
                let agent = TunnelId::parse(id.trim()).ok_or_else(|| {
                    Error::BadParameter(format!("Invalid x-backstream-client-id {}", shown(id)))
                })?;
                // `OPTIONS *` (or an absolute target's lost path) names no resource of a service.
                if !path.starts_with('/') {
                    return Err(Error::MalformedUrl);
                }
                (agent, path.to_owned())
            }
            (None, Some((name, rest))) => {
                let agent = TunnelId::parse(name).ok_or(Error::MalformedUrl)?;
                (agent, format!("/{rest}"))
            }
            (None, None) => return Ok(None),
        };
        let timeout = routing
            .timeout
            .map(|raw| {
                // Zero would end the request before its agent could answer, or not, by a race.
                parse_go_duration(raw)
                    .filter(|timeout| *timeout <= MAX_ROUTE_TIMEOUT && !timeout.is_zero())
                    .ok_or_else(|| {
                        Error::BadParameter(format!(
                            "Invalid x-backstream-request-timeout {}: expected a Go duration above 0 and up to 24h such as 3s",
                            shown(raw)
                        ))
                    })
            })
            .transpose()?;
        let path = match query {
            Some(query) => format!("{forwarded_path}?{query}"),
            None => forwarded_path,
        };
        Ok(Some(Route::Forward {
            agent,
            path,
            timeout,
            preflight: routing.preflight,
        }))
    }

    /// The routes outside `/t/`.
    fn parse_other(
        method: &Method,
        path: &str,
        query: Query,
        jobs_queue: &TunnelId,
    ) -> Result<Route, Error> {
        let queue = || query.queue(jobs_queue);
        if let Some(topic) = path.strip_prefix("/e/") {
            let topic = TunnelId::parse(topic).ok_or(Error::MalformedUrl)?;
            return match method.as_str() {
                "POST" => Ok(Route::Publish { topic }),
                "GET" => Ok(Route::Subscribe { topic }),
                "OPTIONS" => Ok(Route::Preflight),
                _ => Err(Error::MethodNotAllowed {
                    allow: "GET, POST, OPTIONS",
                }),
            };
        }
        if let Some(topic) = path.strip_prefix("/ws/e/") {
            let topic = TunnelId::parse(topic).ok_or(Error::MalformedUrl)?;
            return only_get(method, Route::EventSocket { topic });
        }
        if let Some(id) = path.strip_prefix("/done/") {
            // `[/]`, as on the tunnels' routes.
            let id = id.strip_suffix('/').unwrap_or(id);
            return only_get_with(method, || {
                // A bad `wait` is 400 whatever the id, as a bad parameter is on every route.
                let wait = query.seconds("wait", query.wait.as_deref())?;
                let job = id.parse().map_err(|_| Error::UnknownJob(id.to_owned()))?;
                Ok(Route::Done { job, wait })
            });
        }
        match path {
            // Load balancers' and uptime checks may ask with HEAD (RFC 9110 §9.3.2). The
            // original's nginx matched `/health` as a prefix, so probes set up against it at
            // `/healthz` or `/health/` keep passing.
            _ if path.starts_with("/health") => readable(method, Route::Health),
            "/demo" | "/demo/" | "/demo/index.html" => readable(method, Route::Demo),
            "/agents" => readable(method, Route::Agents),
            "/agent/connect" => only_get_with(method, || {
                let name = query.name.as_deref().and_then(TunnelId::parse);
                let name = name.ok_or_else(|| {
                    Error::BadParameter(
                        "Invalid or missing name: expected a tunnel-id-shaped agent name".into(),
                    )
                })?;
                Ok(Route::AgentConnect { name })
            }),
            "/trigger" if method == Method::POST => Ok(Route::Trigger {
                queue: queue()?,
                limit: query.limit()?,
            }),
            "/trigger" if method == Method::OPTIONS => Ok(Route::Preflight),
            "/trigger" => Err(Error::MethodNotAllowed {
                allow: "POST, OPTIONS",
            }),
            _ if is_socket_path(path) => only_get_with(method, || {
                Ok(Route::JobSocket {
                    queue: queue()?,
                    limit: query.limit()?,
                })
            }),
            // A browser's preflight for a request addressed by `x-backstream-client-id` cannot
            // carry that header, so it lands here on whatever path the service has; so does
            // HAProxy's `OPTIONS /` health check.
            _ if method == Method::OPTIONS => Ok(Route::ServicePreflight),
            _ => Err(Error::NotFound),
        }
    }

    /// What the request must show when authorization is on.
    pub fn access(&self) -> Access<'_> {
        match (self, self.tunnel()) {
            // The list spans every agent name, public or not; serving a name is never public:
            // whoever connected as an agent would receive its requests.
            (Route::Agents | Route::AgentConnect { .. }, _) => Access::Token,
            // Browsers send preflights without credentials: a public service answers its own, the
            // relay those of a private one.
            (
                Route::Forward {
                    preflight: true, ..
                },
                _,
            ) => Access::Open,
            (_, Some(name)) => Access::Name(name),
            (_, None) => Access::Open,
        }
    }

    /// The tunnel id (or queue, topic, agent name) the route concerns, if any.
    pub fn tunnel(&self) -> Option<&TunnelId> {
        match self {
            Route::Health | Route::Demo | Route::Preflight | Route::ServicePreflight => None,
            Route::Produce { tunnel, .. }
            | Route::Consume { tunnel, .. }
            | Route::Poll { tunnel, .. }
            | Route::Ack { tunnel, .. }
            | Route::Reply { tunnel, .. }
            | Route::ReadReply { tunnel, .. }
            | Route::PollReply { tunnel, .. }
            | Route::Status { tunnel, .. }
            | Route::Len { tunnel }
            | Route::Clear { tunnel } => Some(tunnel),
            Route::Trigger { queue, .. } | Route::JobSocket { queue, .. } => Some(queue),
            Route::Done { job, .. } => Some(job.queue()),
            Route::Publish { topic }
            | Route::Subscribe { topic }
            | Route::EventSocket { topic } => Some(topic),
            Route::AgentConnect { name } => Some(name),
            Route::Forward { agent, .. } => Some(agent),
            Route::Agents => None,
        }
    }

    /// Whether the request's body is read before it is answered: on the routes that take one,
    /// and on the relay's other HTTP routes when the request is `signed`, a signature being the
    /// HMAC of the body (the original checked every signed request against its body). A WebSocket
    /// handshake and a request for an agent (whose body is streamed on) are not read here.
    pub fn reads_body(&self, signed: bool) -> bool {
        match self {
            Route::Produce { .. }
            | Route::Reply { .. }
            | Route::Trigger { .. }
            | Route::Publish { .. } => true,
            Route::JobSocket { .. }
            | Route::EventSocket { .. }
            | Route::AgentConnect { .. }
            | Route::Forward { .. } => false,
            _ => signed,
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Health => "health",
            Route::Demo => "demo",
            Route::Preflight | Route::ServicePreflight => "preflight",
            Route::Produce { .. } => "produce",
            Route::Consume { .. } => "consume",
            Route::Poll { .. } => "poll",
            Route::Ack { .. } => "ack",
            Route::Reply { .. } => "reply",
            Route::ReadReply { .. } => "read_reply",
            Route::PollReply { .. } => "poll_reply",
            Route::Status { .. } => "status",
            Route::Len { .. } => "len",
            Route::Clear { .. } => "clear",
            Route::Trigger { .. } => "trigger",
            Route::Done { .. } => "done",
            Route::JobSocket { .. } => "job_socket",
            Route::Publish { .. } => "publish",
            Route::Subscribe { .. } => "subscribe",
            Route::EventSocket { .. } => "event_socket",
            Route::AgentConnect { .. } => "agent_connect",
            Route::Agents => "agents",
            Route::Forward { .. } => "forward",
        }
    }
}

/// A whole number of seconds: digits only; one too large for a `u64` is as good as forever
/// (limits cap it later), not malformed.
fn whole_seconds(raw: &str) -> Option<u64> {
    let digits = raw.trim();
    let digits = digits.strip_prefix('+').unwrap_or(digits);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(digits.parse().unwrap_or(u64::MAX))
}

/// `/r/{name}/{rest}` split into the agent's name and the rest of the path, which is forwarded as
/// written; runs of slashes before the rest count as one, as in the relay's own paths.
fn routed_rest(path: &str) -> Option<(&str, &str)> {
    let inside = path.strip_prefix('/')?.trim_start_matches('/');
    let named = inside.strip_prefix("r/")?.trim_start_matches('/');
    Some(named.split_once('/').unwrap_or((named, "")))
}

/// The relay's own paths with each run of slashes read as one, as the original's nginx read them
/// (`merge_slashes`): a client whose base URL ends in `/` asks for `//t/abc`. Requests for agents
/// are read before, by `routed_rest`, which leaves the forwarded part as written.
fn merge_slashes(path: &str) -> Cow<'_, str> {
    if !path.contains("//") {
        return Cow::Borrowed(path);
    }
    let mut merged = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && merged.ends_with('/')) {
            merged.push(c);
        }
    }
    Cow::Owned(merged)
}

/// `/ws` or `/ws/{tag}`, where the tag is a free label such as highway's `/ws/0`.
fn is_socket_path(path: &str) -> bool {
    match path.strip_prefix("/ws") {
        Some("") => true,
        Some(tag) => tag
            .strip_prefix('/')
            .is_some_and(|tag| !tag.is_empty() && !tag.contains('/')),
        None => false,
    }
}

/// `route` for a GET, a preflight for an OPTIONS (browsers ask before sending `Authorization`).
/// Whether `text` is an integer, however large: an optional sign, then digits.
fn is_integer(text: &str) -> bool {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// A route that only reads: GET, or HEAD for its head alone (never for one that hands something
/// out, such as `/done`).
fn readable(method: &Method, route: Route) -> Result<Route, Error> {
    match method.as_str() {
        "HEAD" => Ok(route),
        _ => only_get(method, route).map_err(|_| Error::MethodNotAllowed {
            allow: "GET, HEAD, OPTIONS",
        }),
    }
}

/// A route served to GET alone (and preflights).
fn only_get(method: &Method, route: Route) -> Result<Route, Error> {
    only_get_with(method, || Ok(route))
}

/// As [`only_get`], for a route whose parameters are checked only once the method is right: a
/// wrong method is 405 whatever they are.
fn only_get_with(
    method: &Method,
    route: impl FnOnce() -> Result<Route, Error>,
) -> Result<Route, Error> {
    match method.as_str() {
        "GET" => route(),
        "OPTIONS" => Ok(Route::Preflight),
        _ => Err(Error::MethodNotAllowed {
            allow: "GET, OPTIONS",
        }),
    }
}

/// A value from the request as an error message quotes it: escaped, and cut at 64 characters,
/// so that an answer never echoes a huge input.
fn shown(raw: &str) -> String {
    const SHOWN: usize = 64;
    match raw.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{:?}…", &raw[..cut]),
        None => format!("{raw:?}"),
    }
}

/// The query parameters routes read; the first occurrence of a name wins.
struct Query {
    limit: Option<String>,
    timeout: Option<String>,
    pending: Option<String>,
    queue: Option<String>,
    wait: Option<String>,
    name: Option<String>,
}

impl Query {
    fn parse(raw: Option<&str>) -> Query {
        let mut query = Query {
            limit: None,
            timeout: None,
            pending: None,
            queue: None,
            wait: None,
            name: None,
        };
        for (name, value) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            let slot = match name.as_ref() {
                "limit" => &mut query.limit,
                "timeout" => &mut query.timeout,
                "pending" => &mut query.pending,
                "queue" => &mut query.queue,
                "wait" => &mut query.wait,
                "name" => &mut query.name,
                _ => continue,
            };
            slot.get_or_insert_with(|| value.into_owned());
        }
        query
    }

    /// `limit`: absent → the default, ≤ 0 → off, N → backpressure at N.
    fn limit(&self) -> Result<Limit, Error> {
        let Some(raw) = &self.limit else {
            return Ok(Limit::Default);
        };
        let digits = raw.trim();
        match digits.parse::<i64>() {
            Ok(n) if n <= 0 => Ok(Limit::Off),
            Ok(n) => Ok(Limit::At(n as u64)),
            // An integer beyond 64 bits: as any negative one, or as any too large one.
            Err(_) if is_integer(digits) && digits.starts_with('-') => Ok(Limit::Off),
            Err(_) if is_integer(digits) => Ok(Limit::At(u64::MAX)),
            Err(_) => Err(Error::BadParameter(format!(
                "Invalid limit {}: expected an integer",
                shown(raw)
            ))),
        }
    }

    /// `timeout`: whole seconds ≥ 0; absent → `None` (the relay's default).
    fn timeout(&self) -> Result<Option<u64>, Error> {
        self.seconds("timeout", self.timeout.as_deref())
    }

    /// A parameter in whole seconds ≥ 0, if present.
    fn seconds(&self, name: &str, raw: Option<&str>) -> Result<Option<u64>, Error> {
        raw.map(|raw| {
            whole_seconds(raw).ok_or_else(|| {
                Error::BadParameter(format!(
                    "Invalid {name} {}: expected whole seconds (0 or more)",
                    shown(raw)
                ))
            })
        })
        .transpose()
    }

    /// `queue`: a tunnel id; absent → `default`.
    fn queue(&self, default: &TunnelId) -> Result<TunnelId, Error> {
        match &self.queue {
            None => Ok(default.clone()),
            Some(raw) => TunnelId::parse(raw).ok_or_else(|| {
                Error::BadParameter(format!(
                    "Invalid queue {}: expected 1 to 1024 characters from A-Z a-z 0-9 - _",
                    shown(raw)
                ))
            }),
        }
    }

    /// `pending`: absent → remove on delivery; empty or 0 → pending; N ≥ 1 → pending with a
    /// visibility timeout of N seconds.
    fn delivery(&self) -> Result<Delivery, Error> {
        let Some(raw) = &self.pending else {
            return Ok(Delivery::Remove);
        };
        let seconds = match raw.trim() {
            "" => 0,
            s => whole_seconds(s).ok_or_else(|| {
                Error::BadParameter(format!(
                    "Invalid pending {}: expected nothing, 0, or whole seconds",
                    shown(raw)
                ))
            })?,
        };
        Ok(Delivery::Pending {
            redeliver_after: Duration::from_secs(seconds),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path_and_query: &str) -> Result<Route, Error> {
        parse(Method::GET, path_and_query)
    }

    fn parse(method: Method, path_and_query: &str) -> Result<Route, Error> {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        Route::parse(
            &method,
            path,
            query,
            RoutingHeaders::default(),
            &tunnel("jobs"),
        )
    }

    fn tunnel(id: &str) -> TunnelId {
        TunnelId::parse(id).unwrap()
    }

    /// The fixed words are routes only in the second segment; `/t/poll` is a tunnel.
    #[test]
    fn fixed_words() {
        assert!(matches!(get("/t/x/poll"), Ok(Route::Poll { .. })));
        assert_eq!(
            get("/t/poll").unwrap(),
            Route::Consume {
                tunnel: tunnel("poll"),
                delivery: Delivery::Remove
            }
        );
        assert_eq!(
            get("/t/x/len").unwrap(),
            Route::Len {
                tunnel: tunnel("x")
            }
        );
        assert_eq!(
            parse(Method::DELETE, "/t/x/all").unwrap(),
            Route::Clear {
                tunnel: tunnel("x")
            }
        );
    }

    /// Trailing slashes are accepted exactly where the protocol shows `[/]`.
    #[test]
    fn trailing_slashes() {
        for ok in [
            "/t/x/",
            "/t/x/1-0/",
            "/t/x/1-0/reply/",
            "/t/x/1-0/reply/poll/",
            "/t/x//",
        ] {
            assert!(get(ok).is_ok(), "{ok}");
        }
        for bad in ["/t/x/poll/", "/t/x/len/", "/t//", "/t/"] {
            assert!(matches!(get(bad), Err(Error::MalformedUrl)), "{bad}");
        }
    }

    /// Unknown suffixes, bad message ids and bad characters are malformed.
    #[test]
    fn malformed() {
        for bad in [
            "/t/a/b",
            "/t/a.b",
            "/t/a%20b",
            "/t/x/1-0/other",
            "/t/x/1-0/reply/x",
        ] {
            assert!(matches!(get(bad), Err(Error::MalformedUrl)), "{bad}");
        }
        assert!(matches!(get("/elsewhere"), Err(Error::NotFound)));
    }

    /// CONNECT is refused on every path, an agent's included: the relay carries no tunnels.
    #[test]
    fn connect_is_refused() {
        for target in ["/t/x", "/r/svc/x", "/health"] {
            assert!(matches!(
                parse(Method::CONNECT, target),
                Err(Error::Connect)
            ));
        }
        let routing = RoutingHeaders {
            client_id: Some("svc"),
            ..RoutingHeaders::default()
        };
        let jobs = tunnel("jobs");
        let refused = Route::parse(&Method::CONNECT, "/", None, routing, &jobs);
        assert!(matches!(refused, Err(Error::Connect)));
    }

    /// `/health` is a prefix, as the original's nginx location was.
    #[test]
    fn health_is_a_prefix() {
        for probe in ["/health", "/healthz", "/health/", "/healthcheck"] {
            assert_eq!(get(probe).unwrap(), Route::Health, "{probe}");
        }
        assert!(matches!(get("/heal"), Err(Error::NotFound)));
    }

    /// A run of slashes in the relay's own paths counts as one, as nginx read them; an agent's
    /// path is forwarded as written.
    #[test]
    fn merged_slashes() {
        let consume = Route::Consume {
            tunnel: tunnel("abc"),
            delivery: Delivery::Remove,
        };
        for path in ["//t/abc", "/t//abc", "///t///abc"] {
            assert_eq!(get(path).unwrap(), consume, "{path}");
        }
        assert!(matches!(get("/t/abc//poll"), Ok(Route::Poll { .. })));
        assert_eq!(get("//health").unwrap(), Route::Health);
        for (asked, forwarded) in [
            ("/r/svc//a//b", "//a//b"),
            ("//r/svc/a", "/a"),
            ("/r//svc/a", "/a"),
            ("///r///svc", "/"),
        ] {
            let Ok(Route::Forward { agent, path, .. }) = get(asked) else {
                panic!("{asked}: a routed request");
            };
            assert_eq!(
                (agent.as_str(), path.as_str()),
                ("svc", forwarded),
                "{asked}"
            );
        }
    }

    /// A wrong method names the allowed ones; OPTIONS is always a preflight.
    #[test]
    fn methods() {
        let err = parse(Method::PUT, "/t/x").unwrap_err();
        assert!(matches!(
            err,
            Error::MethodNotAllowed {
                allow: "GET, POST, OPTIONS"
            }
        ));
        let err = parse(Method::GET, "/t/x/all").unwrap_err();
        assert!(matches!(
            err,
            Error::MethodNotAllowed {
                allow: "DELETE, OPTIONS"
            }
        ));
        assert_eq!(
            parse(Method::OPTIONS, "/t/x/len").unwrap(),
            Route::Preflight
        );
        assert!(matches!(
            parse(Method::POST, "/health"),
            Err(Error::MethodNotAllowed {
                allow: "GET, HEAD, OPTIONS"
            })
        ));
        // HEAD where reading changes nothing; never where it would hand something out.
        for path in ["/health", "/demo/", "/agents"] {
            assert!(parse(Method::HEAD, path).is_ok(), "{path}");
        }
        for path in ["/done/q1.17-0", "/t/x", "/t/x/poll"] {
            let refused = parse(Method::HEAD, path);
            assert!(
                matches!(refused, Err(Error::MethodNotAllowed { .. })),
                "{path}"
            );
        }
        // Every route of the relay's own answers a preflight, without credentials.
        for path in [
            "/trigger",
            "/done/q1.17-0",
            "/e/topic",
            "/agents",
            "/ws/e/topic",
        ] {
            let route = parse(Method::OPTIONS, path).unwrap();
            assert_eq!(route, Route::Preflight, "{path}");
            assert_eq!(route.access(), Access::Open, "{path}");
        }
    }

    /// The job routes: queue defaults, job ids, `wait`, socket tags.
    #[test]
    fn job_routes() {
        let trigger = parse(Method::POST, "/trigger").unwrap();
        assert_eq!(
            trigger,
            Route::Trigger {
                queue: tunnel("jobs"),
                limit: Limit::Default,
            }
        );
        let trigger = parse(Method::POST, "/trigger?queue=q1&limit=10").unwrap();
        assert_eq!(
            trigger,
            Route::Trigger {
                queue: tunnel("q1"),
                limit: Limit::At(10),
            }
        );
        for bad in ["/trigger?queue=a.b", "/trigger?limit=abc"] {
            let refused = parse(Method::POST, bad);
            assert!(matches!(refused, Err(Error::BadParameter(_))), "{bad}");
        }
        let socket = get("/ws/0?limit=0").unwrap();
        assert_eq!(
            socket,
            Route::JobSocket {
                queue: tunnel("jobs"),
                limit: Limit::Off,
            }
        );
        assert!(matches!(
            get("/trigger"),
            Err(Error::MethodNotAllowed {
                allow: "POST, OPTIONS"
            })
        ));
        let done = get("/done/q1.17-0?wait=5").unwrap();
        let job = "q1.17-0".parse().unwrap();
        assert_eq!(done, Route::Done { job, wait: Some(5) });
        let job = "q1.17-0".parse().unwrap();
        assert_eq!(
            get("/done/q1.17-0/").unwrap(),
            Route::Done { job, wait: None }
        );
        assert!(matches!(get("/done/nope"), Err(Error::UnknownJob(id)) if id == "nope"));
        // The method is checked first: a wrong one is 405 whatever the id.
        assert!(matches!(
            parse(Method::PUT, "/done/nope"),
            Err(Error::MethodNotAllowed { .. })
        ));
        for bad_wait in ["/done/q1.17-0?wait=x", "/done/nope?wait=x"] {
            assert!(
                matches!(get(bad_wait), Err(Error::BadParameter(_))),
                "{bad_wait}"
            );
        }
        for socket in ["/ws", "/ws/0", "/ws/any-tag?queue=q2"] {
            assert!(
                matches!(get(socket), Ok(Route::JobSocket { .. })),
                "{socket}"
            );
        }
        for other in ["/ws/", "/ws/a/b/c", "/wsx"] {
            assert!(matches!(get(other), Err(Error::NotFound)), "{other}");
        }
    }

    /// An error quotes a parameter's value cut at 64 characters, never a huge input whole.
    #[test]
    fn long_values_are_cut_in_errors() {
        let huge = "9x".repeat(5000);
        let Err(Error::BadParameter(text)) = parse(Method::POST, &format!("/t/a?limit={huge}"))
        else {
            panic!("a bad limit is a bad parameter");
        };
        assert_eq!(
            text,
            format!("Invalid limit \"{}\"…: expected an integer", &huge[..64])
        );
        let Err(Error::BadParameter(text)) = get("/t/a/poll?timeout=é") else {
            panic!("a bad timeout is a bad parameter");
        };
        assert_eq!(
            text,
            "Invalid timeout \"é\": expected whole seconds (0 or more)"
        );
    }

    /// Requests for agents: the header on any path, or `/r/{agent}/...`, with the query kept.
    #[test]
    fn forward_routes() {
        let headers = RoutingHeaders {
            client_id: Some("svc"),
            timeout: Some("1m30s"),
            preflight: false,
        };
        let route = Route::parse(&Method::PUT, "/t/x", Some("a=1"), headers, &tunnel("jobs"));
        let expected = Route::Forward {
            agent: tunnel("svc"),
            path: "/t/x?a=1".into(),
            timeout: Some(Duration::from_secs(90)),
            preflight: false,
        };
        assert_eq!(route.unwrap(), expected);
        let bad = RoutingHeaders {
            client_id: Some("svc"),
            timeout: Some("soon"),
            preflight: false,
        };
        let route = Route::parse(&Method::GET, "/", None, bad, &tunnel("jobs"));
        assert!(matches!(route, Err(Error::BadParameter(_))));
        for empty in ["", " "] {
            let headers = RoutingHeaders {
                client_id: Some(empty),
                ..headers
            };
            let route = Route::parse(&Method::GET, "/t/x", None, headers, &tunnel("jobs"));
            assert!(matches!(route, Ok(Route::Consume { .. })), "{empty:?}");
        }
        let asterisk = Route::parse(&Method::OPTIONS, "*", None, headers, &tunnel("jobs"));
        assert!(matches!(asterisk, Err(Error::MalformedUrl)));
        let route = get("/r/svc/api/v1?q=2").unwrap();
        let expected = Route::Forward {
            agent: tunnel("svc"),
            path: "/api/v1?q=2".into(),
            timeout: None,
            preflight: false,
        };
        assert_eq!(route, expected);
        assert!(matches!(get("/r/svc").unwrap(), Route::Forward { path, .. } if path == "/"));
        assert!(matches!(get("/r/a.b/x"), Err(Error::MalformedUrl)));
        assert_eq!(
            get("/agent/connect?name=svc").unwrap(),
            Route::AgentConnect {
                name: tunnel("svc")
            }
        );
        assert!(matches!(get("/agent/connect"), Err(Error::BadParameter(_))));
        // The method first, whatever the name.
        let post = parse(Method::POST, "/agent/connect");
        assert!(matches!(post, Err(Error::MethodNotAllowed { .. })));
        assert_eq!(
            parse(Method::OPTIONS, "/agent/connect").unwrap(),
            Route::Preflight
        );
        assert_eq!(get("/agents").unwrap(), Route::Agents);
    }

    /// What each kind of route asks of a request when authorization is on.
    #[test]
    fn access() {
        let svc = tunnel("svc");
        assert_eq!(get("/health").unwrap().access(), Access::Open);
        assert_eq!(get("/t/svc").unwrap().access(), Access::Name(&svc));
        assert_eq!(get("/r/svc/x").unwrap().access(), Access::Name(&svc));
        let preflight = RoutingHeaders {
            preflight: true,
            ..RoutingHeaders::default()
        };
        let route = Route::parse(&Method::OPTIONS, "/r/svc/x", None, preflight, &svc);
        assert_eq!(route.unwrap().access(), Access::Open);
        assert_eq!(get("/agents").unwrap().access(), Access::Token);
        let connect = get("/agent/connect?name=svc").unwrap();
        assert_eq!(connect.access(), Access::Token);
    }

    /// The event routes: publish, server-sent events, WebSocket.
    #[test]
    fn event_routes() {
        let topic = tunnel("news");
        assert_eq!(
            parse(Method::POST, "/e/news").unwrap(),
            Route::Publish {
                topic: topic.clone()
            }
        );
        assert_eq!(
            get("/e/news").unwrap(),
            Route::Subscribe {
                topic: topic.clone()
            }
        );
        assert_eq!(get("/ws/e/news").unwrap(), Route::EventSocket { topic });
        assert!(matches!(get("/e/a.b"), Err(Error::MalformedUrl)));
        assert!(matches!(
            parse(Method::DELETE, "/e/x"),
            Err(Error::MethodNotAllowed { .. })
        ));
    }

    /// `limit`, `timeout` and `pending` parse as the protocol says, and reject junk.
    #[test]
    fn parameters() {
        let limit = |q: &str| match parse(Method::POST, &format!("/t/x?{q}")) {
            Ok(Route::Produce { limit, .. }) => Ok(limit),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        assert_eq!(limit("").unwrap(), Limit::Default);
        assert_eq!(limit("limit=0").unwrap(), Limit::Off);
        assert_eq!(limit("limit=-3").unwrap(), Limit::Off);
        assert_eq!(limit("limit=7").unwrap(), Limit::At(7));
        assert!(limit("limit=abc").is_err());
        assert!(limit("limit=1.5").is_err());
        // Beyond 64 bits: off when negative, over any TUNNEL_MAXLEN when positive.
        assert_eq!(limit("limit=-99999999999999999999").unwrap(), Limit::Off);
        assert_eq!(
            limit("limit=18446744073709551616").unwrap(),
            Limit::At(u64::MAX)
        );
        assert!(limit("limit=-").is_err());

        let poll = |q: &str| match get(&format!("/t/x/poll?{q}")) {
            Ok(Route::Poll {
                delivery, timeout, ..
            }) => Ok((delivery, timeout)),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        let pending = |s| Delivery::Pending {
            redeliver_after: Duration::from_secs(s),
        };
        assert_eq!(poll("").unwrap(), (Delivery::Remove, None));
        assert_eq!(poll("timeout=5&pending").unwrap(), (pending(0), Some(5)));
        assert_eq!(poll("pending=").unwrap().0, pending(0));
        assert_eq!(poll("pending=0").unwrap().0, pending(0));
        assert_eq!(poll("pending=30").unwrap().0, pending(30));
        // Too large for a u64 is still whole seconds: capped later, not refused.
        let huge = "99999999999999999999999";
        assert_eq!(poll(&format!("timeout={huge}")).unwrap().1, Some(u64::MAX));
        assert_eq!(
            poll(&format!("pending={huge}")).unwrap().0,
            pending(u64::MAX)
        );
        for bad in [
            "timeout=abc",
            "timeout=-1",
            "timeout=1.5",
            "pending=x",
            "pending=-1",
        ] {
            assert!(matches!(poll(bad), Err(Error::BadParameter(_))), "{bad}");
        }
    }
}
