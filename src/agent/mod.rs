//! `burrow agent`: dials out to a relay, registers a name, and forwards the requests the relay
//! routes to that name to an upstream HTTP service (PROTOCOL.md part 3, docs/AGENT-PROTOCOL.md).
//!
//! The agent keeps one WebSocket to the relay (`connection`), reconnecting forever with back-off;
//! each request runs in a task of its own (`upstream`). SIGTERM or SIGINT: the agent says GOAWAY,
//! refuses new requests (the relay retries them on another agent), lets those in flight finish
//! within 10 s, and exits 0; a second signal exits 1 at once, cutting them.

pub(crate) mod client;
pub(crate) mod connection;
pub(crate) mod upstream;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::routing::frame::{MAX_MESSAGE, MOVES_HEADER};
use crate::signals::StopSignals;
use crate::tunnel::TunnelId;
use connection::{Ended, Redial};
use upstream::Upstream;

/// How long requests in flight may take to finish after SIGTERM.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// The first reconnect delay; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The longest reconnect delay.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// After a relay said it is stopping (GOAWAY), the longest reconnect delay for
/// [`QUICK_REDIAL_FOR`]: a relay restarted in place, or its replacement, is usually back within
/// seconds, and requests for this agent wait only 5 s for it.
const QUICK_REDIAL: Duration = Duration::from_millis(500);

/// How long after a relay's GOAWAY reconnecting stays quick.
const QUICK_REDIAL_FOR: Duration = Duration::from_secs(30);

/// The shortest delay before dialling again, whatever a relay's `Retry-After` says: a relay
/// handing over (`Retry-After: 0`) takes most new connections itself for a few seconds, and an
/// agent may be refused several times before it reaches the new process.
const MIN_REDIAL: Duration = Duration::from_millis(20);

/// How long dialling the relay (TCP, TLS and the WebSocket handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's command line, as typed. (No `Debug`: it holds the token.)
#[derive(Args)]
pub struct AgentArgs {
    /// The relay's base URL, `http://` or `https://` (a path prefix is kept).
    #[arg(long, env = "BURROW_RELAY", value_name = "URL")]
    relay: String,

    /// The name clients address this agent by (1 to 1024 characters from A-Z a-z 0-9 - _).
    #[arg(long, env = "BURROW_AGENT_NAME")]
    name: String,

    /// The HTTP service requests are forwarded to, `http://` or `https://` (a path prefix is kept).
    #[arg(long, env = "BURROW_UPSTREAM", value_name = "URL")]
    upstream: String,

    /// Sent to the relay as `Authorization: Bearer <TOKEN>`.
    #[arg(long, env = "BURROW_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// The two URL settings, named as flag and environment variable in errors.
const RELAY: &str = "--relay (BURROW_RELAY)";
const UPSTREAM: &str = "--upstream (BURROW_UPSTREAM)";

/// Why the command line does not make an agent. Each error names the setting both ways: a
/// container sets the variable, a shell types the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{flag} {url:?} is not a URL: {reason}")]
    NotAUrl {
        flag: &'static str,
        url: String,
        reason: String,
    },
    #[error("{0} must be an http:// or https:// URL without query or fragment, not {1:?}")]
    NotHttp(&'static str, String),
    /// Not echoed: the URL holds a password.
    #[error(
        "{0} must not hold a user or password: they are not sent (and would be logged){hint}",
        hint = if *.0 == RELAY { "; give the relay's token with --token (BURROW_TOKEN)" } else { "" }
    )]
    Credentials(&'static str),
    #[error(
        "--name (BURROW_AGENT_NAME) {0:?} is not a valid name (1 to 1024 characters from A-Z a-z \
         0-9 - _)"
    )]
    InvalidName(String),
    #[error("--token (BURROW_TOKEN) cannot be sent in an HTTP header")]
    InvalidToken,
}

/// A validated agent configuration.
pub struct AgentConfig {
    /// `ws(s)://…/agent/connect?name=NAME`.
    connect_url: String,
    name: TunnelId,
    upstream: url::Url,
    token: Option<String>,
}

impl AgentConfig {
    /// Checks the command line and derives the relay's WebSocket URL.
    pub fn from_args(args: AgentArgs) -> Result<AgentConfig, ConfigError> {
        let relay = http_url(RELAY, &args.relay)?;
        let upstream = http_url(UPSTREAM, &args.upstream)?;
        let name = TunnelId::parse(&args.name).ok_or(ConfigError::InvalidName(args.name))?;
        if let Some(token) = &args.token {
            HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| ConfigError::InvalidToken)?;
        }
        let mut connect = relay.clone();
        // http → ws and https → wss; `http_url` allowed no other scheme.
        let scheme = if relay.scheme() == "https" {
            "wss"
        } else {
            "ws"
        };
        connect
            .set_scheme(scheme)
            .map_err(|()| ConfigError::NotHttp(RELAY, args.relay.clone()))?;
        let path = format!("{}/agent/connect", relay.path().trim_end_matches('/'));
        connect.set_path(&path);
        connect.query_pairs_mut().append_pair("name", name.as_str());
        Ok(AgentConfig {
            connect_url: connect.to_string(),
            name,
            upstream,
            token: args.token,
        })
    }
}

impl std::fmt::Debug for AgentConfig {
    /// Everything but the token's value, so that the configuration can be printed safely.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("connect_url", &self.connect_url)
            .field("name", &self.name)
            .field("upstream", &self.upstream.as_str())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn http_url(flag: &'static str, raw: &str) -> Result<url::Url, ConfigError> {
    let url = url::Url::parse(raw).map_err(|err| ConfigError::NotAUrl {
        flag,
        url: raw.to_owned(),
        reason: err.to_string(),
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::Credentials(flag));
    }
    if !matches!(url.scheme(), "http" | "https")
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(ConfigError::NotHttp(flag, raw.to_owned()));
    }
    Ok(url)
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen for SIGTERM and SIGINT: {0}")]
    Signals(#[source] std::io::Error),
    #[error("cannot use the upstream: {0}")]
    Upstream(String),
}

/// Runs `burrow agent` until a signal stops it; the exit code says how it ended.
pub fn run(args: AgentArgs) -> ExitCode {
    let config = match AgentConfig::from_args(args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("burrow agent: {err}");
            return ExitCode::from(2);
        }
    };
    // One thread (measured in docs/PERFORMANCE.md: 88 % → 69 % of a core at the same rate,
    // one-connection latency 0.36 → 0.24 ms against a multi-threaded runtime).
    let ended = crate::cli::on_one_thread(agent(config))
        .map_err(AgentError::Runtime)
        .and_then(|ended| ended);
    match ended {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("burrow agent: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Connects, serves and reconnects until a signal asks to stop.
async fn agent(config: AgentConfig) -> Result<(), AgentError> {
    let mut stop = StopSignals::watch().map_err(AgentError::Signals)?;
    let upstream = Arc::new(Upstream::new(&config.upstream).map_err(AgentError::Upstream)?);
    let (drain_tx, drain) = watch::channel(false);
    tokio::spawn(async move {
        stop.stop().await;
        log::info!(
            "stopping: taking no more requests, finishing those in flight (signal again to stop \
             at once)"
        );
        // The sender lives on, so that the connection never sees the channel close.
        drain_tx.send_replace(true);
        stop.again().await;
        // As a worker's second signal: whoever sends it wants the process gone, not the requests.
        log::warn!("stopping at once: the requests still in flight are cut");
        std::process::exit(1);
    });
    log::info!(
        "agent started: name={} relay={} upstream={}",
        config.name,
        config.connect_url,
        config.upstream
    );

    let mut backoff = Backoff::new();
    let mut outage: Option<(Instant, u32)> = None;
    // A refusal of the token is logged when it starts, also within an outage that began otherwise
    // (a relay handing over, then a new process with another token).
    let mut refused: Option<StatusCode> = None;
    // Connections whose relay said GOAWAY, finishing their requests while a new one serves.
    let mut leaving = Vec::new();
    while !*drain.borrow() {
        let mut stop = drain.clone();
        let dialled = tokio::select! {
            dialled = dial(&config) => dialled,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        match dialled {
            Ok(socket) => {
                match outage.take() {
                    Some((since, attempts)) => log::info!(
                        "connected to the relay again after {:.1}s ({attempts} failed attempts)",
                        since.elapsed().as_secs_f64()
                    ),
                    None => log::info!("connected to the relay"),
                }
                refused = None;
                backoff.reset();
                let (redial, redialled) = oneshot::channel();
                let served =
                    connection::serve(socket, upstream.clone(), drain.clone(), DRAIN_GRACE, redial);
                let mut link = tokio::spawn(served);
                let ended = tokio::select! {
                    ended = &mut link => ended,
                    Ok(why) = redialled => {
                        match why {
                            Redial::Stopping => log::info!(
                                "the relay is going away: connecting again while its requests \
                                 in flight finish"
                            ),
                            Redial::Moving => log::info!(
                                "the relay hands over to a new process: connecting to it while \
                                 this connection still serves"
                            ),
                        }
                        backoff.relay_stopping();
                        leaving.retain(|link: &JoinHandle<Ended>| !link.is_finished());
                        leaving.push(link);
                        continue;
                    }
                };
                match ended {
                    Ok(Ended::Drained) => break,
                    Ok(Ended::Lost(reason)) => {
                        log::warn!("connection to the relay lost: {reason}; reconnecting");
                        outage = Some((Instant::now(), 0));
                    }
                    Err(failed) => {
                        log::warn!("connection to the relay ended: {failed}; reconnecting");
                        outage = Some((Instant::now(), 0));
                    }
                }
            }
            Err(why) => {
                // One line per outage, except for a refused token (when it starts).
                let first = outage.is_none();
                match why {
                    DialError::Refused(status) if refused != Some(status) => {
                        log::error!(
                            "the relay refused this agent ({status}): check --token; retrying \
                             with back-off"
                        );
                        refused = Some(status);
                    }
                    DialError::Refused(_) => {}
                    DialError::Stopping(after) => {
                        if let Some(after) = after {
                            backoff.at_most(after);
                        }
                        if first {
                            log::info!(
                                "the relay is stopping or handing over (503); dialling again"
                            );
                        }
                    }
                    DialError::Unreachable(reason) if first => {
                        log::warn!("cannot reach the relay: {reason}; retrying with back-off")
                    }
                    DialError::Unreachable(_) => {}
                }
                match &mut outage {
                    Some((_, attempts)) => *attempts += 1,
                    None => outage = Some((Instant::now(), 1)),
                }
            }
        }
        let pause = backoff.next();
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop_signal(drain.clone()) => break,
        }
    }
    // Those still finishing drain as the last one did.
    for link in leaving {
        let _ = link.await;
    }
    log::info!("stopped");
    Ok(())
}

async fn stop_signal(mut drain: watch::Receiver<bool>) {
    if drain.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Why the agent could not connect to the relay.
enum DialError {
    /// The relay answered the handshake 401 or 403: the token is missing or wrong.
    Refused(StatusCode),
    /// The relay answered 503: it is stopping, or handing its address over to a new process;
    /// with the delay its `Retry-After` asks for (0 when handing over: the new process is one dial
    /// away).
    Stopping(Option<Duration>),
    /// Anything else, on one line.
    Unreachable(String),
}

/// Opens the WebSocket to the relay.
async fn dial(
    config: &AgentConfig,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    DialError,
> {
    let dial_error = |err: tokio_tungstenite::tungstenite::Error| match err {
        tokio_tungstenite::tungstenite::Error::Http(response)
            if matches!(
                response.status(),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            ) =>
        {
            DialError::Refused(response.status())
        }
        tokio_tungstenite::tungstenite::Error::Http(response)
            if response.status() == StatusCode::SERVICE_UNAVAILABLE =>
        {
            DialError::Stopping(retry_after(response.headers().get("Retry-After")))
        }
        err => DialError::Unreachable(err.to_string()),
    };
    let mut request = config
        .connect_url
        .as_str()
        .into_client_request()
        .map_err(dial_error)?;
    request
        .headers_mut()
        .insert(MOVES_HEADER, HeaderValue::from_static("1"));
    if let Some(token) = &config.token {
        if let Ok(mut value) = HeaderValue::from_str(&format!("Bearer {token}")) {
            value.set_sensitive(true);
            request.headers_mut().insert("Authorization", value);
        }
    }
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let connecting = tokio_tungstenite::connect_async_with_config(request, Some(ws_config), true);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok((socket, _response))) => Ok(socket),
        Ok(Err(err)) => Err(dial_error(err)),
        Err(_) => Err(DialError::Unreachable(format!(
            "no answer within {}s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// A `Retry-After` in seconds (the form a relay sends; a date is not waited for).
fn retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let seconds = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds))
}

/// Exponential back-off with jitter: 100 ms doubling to 10 s, each delay drawn from its upper half
/// so that many agents cut off together do not reconnect in step; at most 500 ms for a while after
/// a relay said it is stopping; at most what a relay's `Retry-After` asked for, next time.
struct Backoff {
    next: Duration,
    /// Until when delays stay short (see [`QUICK_REDIAL`]).
    quick_until: Option<Instant>,
    /// The longest the next delay may be, as a relay asked.
    asked: Option<Duration>,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: FIRST_BACKOFF,
            quick_until: None,
            asked: None,
        }
    }

    /// Connected: the next outage starts from the first delay.
    fn reset(&mut self) {
        self.next = FIRST_BACKOFF;
    }

    /// The relay said it is stopping: it, or another instance, should take the agent soon.
    fn relay_stopping(&mut self) {
        self.quick_until = Some(Instant::now() + QUICK_REDIAL_FOR);
    }

    /// The relay asked to be dialled again within `after` (`Retry-After`): the next delay is at
    /// most that, and at least [`MIN_REDIAL`].
    fn at_most(&mut self, after: Duration) {
        self.asked = Some(after.max(MIN_REDIAL));
    }

    fn next(&mut self) -> Duration {
        let mut delay = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        if self.quick_until.is_some_and(|until| Instant::now() < until) {
            delay = delay.min(QUICK_REDIAL);
        }
        if let Some(asked) = self.asked.take() {
            delay = delay.min(asked);
        }
        delay.mul_f64(0.5 + fastrand::f64() / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn config(args: &[&str]) -> Result<AgentConfig, ConfigError> {
        let cli = Cli::try_parse_from(std::iter::once("agent").chain(args.iter().copied()))
            .expect("the arguments parse");
        AgentConfig::from_args(cli.agent)
    }

    /// http → ws and https → wss, a path prefix kept, the name in the query.
    #[test]
    fn connect_url() {
        let args = [
            "--relay",
            "http://relay:8080/",
            "--name",
            "svc-1",
            "--upstream",
            "http://127.0.0.1:81/",
        ];
        let c = config(&args).unwrap();
        assert_eq!(c.connect_url, "ws://relay:8080/agent/connect?name=svc-1");
        assert_eq!(c.upstream.as_str(), "http://127.0.0.1:81/");
        let args = [
            "--relay",
            "https://r/p",
            "--name",
            "a",
            "--upstream",
            "http://u",
        ];
        let c = config(&args).unwrap();
        assert_eq!(c.connect_url, "wss://r/p/agent/connect?name=a");
    }

    /// Bad schemes, names, tokens and URLs with credentials are refused, naming the flag.
    #[test]
    fn refused() {
        let err = config(&[
            "--relay",
            "ftp://r",
            "--name",
            "a",
            "--upstream",
            "http://u",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("--relay"), "{err}");
        let err = config(&[
            "--relay",
            "http://r",
            "--name",
            "a/b",
            "--upstream",
            "http://u",
        ])
        .unwrap_err();
        assert!(matches!(err, ConfigError::InvalidName(_)), "{err}");
        let err = config(&["--relay", "http://r", "--name", "a", "--upstream", "u"]).unwrap_err();
        assert!(err.to_string().contains("--upstream"), "{err}");
        let err = config(&[
            "--relay",
            "http://r",
            "--name",
            "a",
            "--upstream",
            "http://u",
            "--token",
            "a\nb",
        ])
        .unwrap_err();
        assert!(matches!(err, ConfigError::InvalidToken), "{err}");
        for (relay, upstream, flag) in [
            ("http://me:pw@r", "http://u", RELAY),
            ("http://r", "http://me:pw@u", UPSTREAM),
            ("http://r", "http://me@u", UPSTREAM),
        ] {
            let err = config(&["--relay", relay, "--name", "a", "--upstream", upstream]);
            let err = err.unwrap_err();
            assert!(
                matches!(err, ConfigError::Credentials(f) if f == flag),
                "{err}"
            );
            assert!(!err.to_string().contains("pw"), "{err}");
        }
    }

    /// Delays double from 100 ms to at most 10 s, jittered within their upper half.
    #[test]
    fn backoff() {
        let mut backoff = Backoff::new();
        let delays: Vec<Duration> = (0..12).map(|_| backoff.next()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= FIRST_BACKOFF);
        assert!(delays.iter().all(|d| *d <= MAX_BACKOFF));
        assert!(delays[11] >= MAX_BACKOFF / 2);
        backoff.reset();
        assert!(backoff.next() <= FIRST_BACKOFF);
    }

    /// After a relay's GOAWAY, delays stay at most 500 ms however many attempts fail.
    #[test]
    fn quick_redial_after_a_relay_stops() {
        let mut backoff = Backoff::new();
        backoff.relay_stopping();
        let delays: Vec<Duration> = (0..12).map(|_| backoff.next()).collect();
        assert!(delays.iter().all(|d| *d <= QUICK_REDIAL), "{delays:?}");
        assert!(delays[11] >= QUICK_REDIAL / 2, "{delays:?}");
    }

    /// `Retry-After` in seconds is read; anything else is no delay asked for.
    #[test]
    fn retry_after_is_read_in_seconds() {
        let read = |value: &'static str| retry_after(Some(&HeaderValue::from_static(value)));
        assert_eq!(read("0"), Some(Duration::ZERO));
        assert_eq!(read(" 1 "), Some(Duration::from_secs(1)));
        assert_eq!(read("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(read("-1"), None);
        assert_eq!(retry_after(None), None);
    }

    /// A relay's `Retry-After` bounds the next delay only, and 0 means the shortest one.
    #[test]
    fn retry_after_bounds_the_next_delay() {
        let mut backoff = Backoff::new();
        for _ in 0..8 {
            backoff.next();
        }
        backoff.at_most(Duration::ZERO);
        let asked = backoff.next();
        assert!(asked >= MIN_REDIAL / 2 && asked <= MIN_REDIAL, "{asked:?}");
        assert!(backoff.next() >= MAX_BACKOFF / 2, "only the next one");
        backoff.at_most(Duration::from_secs(60));
        assert!(
            backoff.next() <= MAX_BACKOFF,
            "never longer than the back-off"
        );
    }
}
