//! Configuration: the environment, read once at start-up into a typed [`Config`].
//!
//! Names and defaults follow http-event-relay so that a deployment keeps its environment when it
//! swaps containers; Burrow's own settings are prefixed `BURROW_`. A value that does not parse stops
//! start-up with an error naming the variable — never a silent default.

use std::collections::HashSet;
use std::time::Duration;

use crate::duration::{parse_go_duration, MAX_ROUTE_TIMEOUT};
use crate::tunnel::TunnelId;

/// A configuration value that could not be used; the message names the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The variable is set but its value does not parse.
    #[error("{var}={value:?} is not valid: {expected}")]
    Invalid {
        var: &'static str,
        value: String,
        expected: &'static str,
    },
    /// The variable is set to bytes that are not UTF-8: read as unset, a secret so set would
    /// turn authorization off.
    #[error("{var} is not valid: its value is not UTF-8 text")]
    NotUnicode { var: String },
}

/// Which store keeps tunnels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// The embedded, in-process store.
    Memory,
    /// KeyDB / Redis / Valkey at this URL.
    Redis(RedisConfig),
}

impl StoreConfig {
    /// The store's name as `BURROW_STORE` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            StoreConfig::Memory => "memory",
            StoreConfig::Redis(_) => "redis",
        }
    }
}

/// How to reach KeyDB / Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// A `redis://` or `rediss://` URL, built from `REDIS_HOST`/`REDIS_PORT` when `REDIS_URL` is unset.
    pub url: String,
    /// `REDIS_PASSWORD`, applied when the URL carries none.
    pub password: Option<String>,
    /// The shared pool's size (`REDIS_POOL_SIZE`); the store opens at most 4 of them.
    pub pool_size: usize,
    /// `BURROW_EMPTY_TUNNEL_TTL`: how long a tunnel's emptied stream is kept before redis expires
    /// it; zero keeps it, as the original did.
    pub empty_tunnel_ttl: Duration,
}

impl RedisConfig {
    /// The server's port when it is on this host (a loopback address or `localhost`), where a
    /// port in the ephemeral range lets a reconnecting relay connect to itself.
    pub fn loopback_port(&self) -> Option<u16> {
        let url = url::Url::parse(&self.url).ok()?;
        // A `redis:` URL's host is opaque to the parser: an IPv4 address stays a name.
        let loopback = match url.host()? {
            url::Host::Domain(name) => match name.parse::<std::net::IpAddr>() {
                Ok(ip) => ip.is_loopback(),
                Err(_) => name.eq_ignore_ascii_case("localhost"),
            },
            url::Host::Ipv4(ip) => ip.is_loopback(),
            url::Host::Ipv6(ip) => ip.is_loopback(),
        };
        loopback.then(|| url.port().unwrap_or(6379))
    }
}

/// Which requests must prove who they are.
#[derive(Clone, Default)]
pub struct AuthConfig {
    /// `TUNNEL_ACCESS_TOKEN`: the bearer token.
    pub token: Option<String>,
    /// `TUNNEL_SIGNATURE_SECRET`: the key of `X-Hub-Signature-256`.
    pub signature_secret: Option<String>,
    /// `TUNNEL_PUBLIC_IDS`: tunnels open to everyone.
    pub public_ids: HashSet<String>,
    /// Whether `TUNNEL_PUBLIC_IDS` is set, even to separators only (`,`): that turns
    /// authorization on with nothing public, as the original read a set variable.
    pub public_ids_set: bool,
}

impl AuthConfig {
    /// Authorization is on when any of its three settings is given.
    pub fn enabled(&self) -> bool {
        self.token.is_some() || self.signature_secret.is_some() || self.public_ids_set
    }

    /// What the start-up line says of authorization, so that a misspelled variable that left the
    /// relay open shows: which of the settings are on, never their values.
    pub fn summary(&self) -> String {
        if !self.enabled() {
            return "authorization off".into();
        }
        let public = match self.public_ids.len() {
            1 => "1 public id".to_owned(),
            n => format!("{n} public ids"),
        };
        let on = [
            self.token.as_ref().map(|_| "bearer token".to_owned()),
            self.signature_secret
                .as_ref()
                .map(|_| "signatures".to_owned()),
            (self.public_ids_set || !self.public_ids.is_empty()).then_some(public),
        ];
        // Agents and `/agents` open to the bearer token alone, so without one they never open.
        let no_agents = match self.token {
            None => " (no bearer token: agents cannot connect and /agents answers 403)",
            Some(_) => "",
        };
        format!(
            "authorization on: {}{no_agents}",
            on.into_iter().flatten().collect::<Vec<_>>().join(", ")
        )
    }
}

// Secrets must never reach a log, so Debug says only which settings are present.
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field(
                "signature_secret",
                &self.signature_secret.as_ref().map(|_| "<set>"),
            )
            .field("public_ids", &self.public_ids.len())
            .finish()
    }
}

/// The rules every tunnel follows.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// `TUNNEL_MAXLEN`: the most messages one tunnel holds.
    pub maxlen: u64,
    /// `TUNNEL_BACKPRESSURE`: whether a produce without `limit` is refused when the tunnel is full.
    pub backpressure: bool,
    /// `TUNNEL_MAX_POLL_TIMEOUT`: longer poll timeouts are capped to this.
    pub max_poll_timeout: Duration,
    /// `TUNNEL_DEFAULT_POLL_TIMEOUT`: the poll timeout when none is asked for.
    pub default_poll_timeout: Duration,
    /// `TUNNEL_DEFAULT_CONTENT_TYPE`: handed out for messages stored without a type.
    pub default_content_type: String,
    /// `TUNNEL_REPLY_TTL`: how long an unread reply is kept.
    pub reply_ttl: Duration,
    /// `BURROW_JOB_TTL`: how long a triggered job's record is kept while it is queued or
    /// running; once it is done, it is kept as long as its result.
    pub job_ttl: Duration,
    /// `TUNNEL_MAX_MESSAGE_SIZE`: the largest body accepted, in bytes.
    pub max_message_size: usize,
}

/// The variables `burrow serve` reads, for `--help`; README.md's "Configuration" says what each
/// one means and takes. (A test checks that this names exactly the variables read.)
pub const VARIABLES_HELP: &str = "\
Environment (README.md, \"Configuration\", says what each takes):
  listening    BURROW_LISTEN (0.0.0.0:8080), BURROW_ADVERTISE, BURROW_METRICS_LISTEN,
               BURROW_HEADER_TIMEOUT, BURROW_CONF (Pingora settings laid over the built-in ones)
  store        BURROW_STORE (memory | redis), REDIS_URL, REDIS_HOST, REDIS_PORT,
               REDIS_PASSWORD, REDIS_POOL_SIZE, REDIS_POOL_KEEPALIVE, BURROW_EMPTY_TUNNEL_TTL
  access       TUNNEL_ACCESS_TOKEN, TUNNEL_SIGNATURE_SECRET, TUNNEL_PUBLIC_IDS, TUNNEL_DEMO_ID
  tunnels      TUNNEL_MAXLEN, TUNNEL_BACKPRESSURE, TUNNEL_MAX_MESSAGE_SIZE,
               TUNNEL_MAX_POLL_TIMEOUT, TUNNEL_DEFAULT_POLL_TIMEOUT, TUNNEL_DEFAULT_CONTENT_TYPE,
               TUNNEL_REPLY_TTL
  jobs         BURROW_JOBS_QUEUE, BURROW_JOB_TTL
  routing      BURROW_ROUTE_TIMEOUT
  logs         BURROW_ACCESS_LOG, RUST_LOG";

/// The variables `burrow serve` reads, as [`VARIABLES_HELP`] names them.
fn relay_variables() -> impl Iterator<Item = &'static str> {
    VARIABLES_HELP
        .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
        .filter(|word| word.contains('_'))
}

/// What `burrow agent` and `burrow worker` read from the environment, and a relay does not.
const CLIENT_VARIABLES: [&str; 8] = [
    "BURROW_RELAY",
    "BURROW_TOKEN",
    "BURROW_AGENT_NAME",
    "BURROW_UPSTREAM",
    "BURROW_WORKER_CONCURRENCY",
    "BURROW_JOB_TIMEOUT",
    "BURROW_JOB_VISIBILITY",
    "BURROW_MAX_OUTPUT",
];

/// A warning for each variable of `environment` named like a setting (`BURROW_…`, `TUNNEL_…`,
/// `REDIS_…` in any case, or within two letters of one) that `burrow serve` does not read: a
/// misspelt `TUNNEL_ACCESS_TOKEN` would otherwise leave the relay open without a word.
/// Kubernetes' service links (`REDIS_SERVICE_HOST`, `BURROW_PORT_80_TCP`…) are nobody's settings
/// and pass.
pub fn unread_settings(environment: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    let like_a_setting = |name: &str| {
        let upper = name.to_ascii_uppercase();
        ["BURROW_", "TUNNEL_", "REDIS_"]
            .iter()
            .any(|prefix| upper.starts_with(prefix))
            || relay_variables().any(|known| strsim::levenshtein(known, &upper) <= 2)
    };
    let mut warnings: Vec<String> = environment
        .into_iter()
        .filter(|(name, _)| like_a_setting(name))
        .filter(|(name, value)| !service_link(name, value))
        .filter(|(name, _)| !relay_variables().any(|known| known == name))
        .map(|(name, _)| {
            if CLIENT_VARIABLES.contains(&name.as_str()) {
                return format!(
                    "{name} is set, but only `burrow agent` and `burrow worker` read it: ignored"
                );
            }
            match closest(&name.to_ascii_uppercase(), relay_variables(), 2) {
                Some(known) => {
                    format!("{name} is no setting of the relay: ignored (did you mean {known}?)")
                }
                None => format!("{name} is no setting of the relay: ignored"),
            }
        })
        .collect();
    warnings.sort();
    warnings
}

/// Of the `known` names, the one `name` most likely misspells (at most `within` letters off),
/// for a "did you mean".
pub fn closest<'a>(
    name: &str,
    known: impl Iterator<Item = &'a str>,
    within: usize,
) -> Option<&'a str> {
    known
        .map(|candidate| (strsim::levenshtein(candidate, name), candidate))
        .filter(|(distance, _)| *distance <= within)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Whether `name=value` is one of the variables Kubernetes sets for each service
/// (`{SVC}_SERVICE_HOST`, `{SVC}_SERVICE_PORT[_{PORT}]`, `{SVC}_PORT=tcp://…`,
/// `{SVC}_PORT_{N}_{TCP|UDP|SCTP}[_PROTO|_PORT|_ADDR]`).
fn service_link(name: &str, value: &str) -> bool {
    let words: Vec<&str> = name.split('_').collect();
    let port_link = words.windows(3).any(|w| {
        w[0] == "PORT" && w[1].parse::<u16>().is_ok() && matches!(w[2], "TCP" | "UDP" | "SCTP")
    });
    name.ends_with("_SERVICE_HOST")
        || name.contains("_SERVICE_PORT")
        || (name.ends_with("_PORT") && value.contains("://"))
        || port_link
}

/// Everything `burrow serve` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// `BURROW_LISTEN`: the one HTTP listening address.
    pub listen: String,
    /// `BURROW_METRICS_LISTEN`: where Prometheus metrics are served; off when unset.
    pub metrics_listen: Option<String>,
    /// `BURROW_ACCESS_LOG`: one info line per request.
    pub access_log: bool,
    /// `BURROW_JOBS_QUEUE`: the queue of jobs triggered without `?queue=`.
    pub jobs_queue: TunnelId,
    /// `BURROW_ADVERTISE`: the `host:port` other instances reach this one at (default: the listen
    /// address, with an unspecified IP replaced by 127.0.0.1).
    pub advertise: String,
    /// Whether `BURROW_ADVERTISE` was set, rather than derived from the listen address.
    pub advertise_given: bool,
    /// `BURROW_ROUTE_TIMEOUT`: the round-trip limit of a routed request without
    /// `x-backstream-request-timeout` (a Go duration).
    pub route_timeout: Duration,
    /// `BURROW_HEADER_TIMEOUT`: how long a request head may take to arrive once its first byte
    /// has (a client trickling a head, slowloris, is cut off then).
    pub header_timeout: Duration,
    /// `BURROW_CONF`: a Pingora YAML file whose settings replace those of the built-in
    /// `conf/burrow.yaml`.
    pub pingora_conf: Option<String>,
    /// Where tunnels live.
    pub store: StoreConfig,
    /// A redis setting given where the memory store was chosen because nothing named a store
    /// (`REDIS_PORT` without `REDIS_HOST`, say): the Lua relay would have used redis on
    /// 127.0.0.1, so start-up warns.
    pub unused_redis_setting: Option<&'static str>,
    /// Who may use tunnels.
    pub auth: AuthConfig,
    /// How tunnels behave.
    pub tunnel: TunnelConfig,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let not_unicode = std::cell::RefCell::new(None);
        let config = Config::from_lookup(|name| match std::env::var(name) {
            Ok(value) => Some(value),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => {
                not_unicode.borrow_mut().get_or_insert(name.to_owned());
                None
            }
        });
        match not_unicode.into_inner() {
            Some(var) => Err(ConfigError::NotUnicode { var }),
            None => config,
        }
    }

    /// Reads configuration through `lookup`, which returns a variable's value if it is set.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let env = Env { lookup: &lookup };
        let tunnel = TunnelConfig {
            // Redis takes counts up to 2^63 - 1.
            maxlen: env.parse(
                "TUNNEL_MAXLEN",
                1000,
                "a whole number from 1 to 9223372036854775807",
                |n: &u64| (1..=i64::MAX as u64).contains(n),
            )?,
            backpressure: env.flag("TUNNEL_BACKPRESSURE", true)?,
            max_poll_timeout: env.seconds("TUNNEL_MAX_POLL_TIMEOUT", 60)?,
            default_poll_timeout: env.seconds("TUNNEL_DEFAULT_POLL_TIMEOUT", 30)?,
            default_content_type: env.header_value("TUNNEL_DEFAULT_CONTENT_TYPE", "text/plain")?,
            reply_ttl: env.ttl("TUNNEL_REPLY_TTL", 3600)?,
            job_ttl: env.ttl("BURROW_JOB_TTL", 86_400)?,
            max_message_size: env.parse(
                "TUNNEL_MAX_MESSAGE_SIZE",
                131_072,
                "a size in bytes from 1 to 536870912 (512 MiB, the most redis keeps in one value)",
                |n: &usize| (1..=MAX_MESSAGE_SIZE).contains(n),
            )?,
        };
        let mut auth = AuthConfig {
            token: env.token("TUNNEL_ACCESS_TOKEN")?,
            signature_secret: env.secret("TUNNEL_SIGNATURE_SECRET")?,
            public_ids: env.tunnel_ids("TUNNEL_PUBLIC_IDS")?,
            public_ids_set: env.get("TUNNEL_PUBLIC_IDS").is_some(),
        };
        // The original's older setting for one open tunnel, which did not turn authorization
        // on by itself.
        let demo = env.get("TUNNEL_DEMO_ID").map(|demo| {
            TunnelId::parse(demo.trim()).ok_or_else(|| invalid_id("TUNNEL_DEMO_ID", demo.clone()))
        });
        if let Some(demo) = demo.transpose()?.filter(|_| auth.enabled()) {
            auth.public_ids.insert(demo.as_str().to_owned());
        }
        let listen = env
            .socket_address("BURROW_LISTEN")?
            .unwrap_or_else(|| "0.0.0.0:8080".into());
        let metrics_listen = env.socket_address("BURROW_METRICS_LISTEN")?;
        // Both would bind (Pingora reuses ports), and connections would be shared between them.
        if let Some(metrics) = metrics_listen.as_ref().filter(|m| overlap(m, &listen)) {
            return Err(ConfigError::Invalid {
                var: "BURROW_METRICS_LISTEN",
                value: metrics.clone(),
                expected: "an address other than BURROW_LISTEN's",
            });
        }
        let advertise = env.host_port("BURROW_ADVERTISE")?;
        Ok(Config {
            advertise_given: advertise.is_some(),
            advertise: advertise.unwrap_or_else(|| reachable(&listen)),
            listen,
            metrics_listen,
            access_log: env.flag("BURROW_ACCESS_LOG", true)?,
            jobs_queue: env.tunnel_id("BURROW_JOBS_QUEUE", "jobs")?,
            route_timeout: env.route_timeout("BURROW_ROUTE_TIMEOUT", Duration::from_secs(3))?,
            header_timeout: env
                .parse(
                    "BURROW_HEADER_TIMEOUT",
                    10,
                    "a whole number of seconds from 1 to 3600",
                    |s: &u64| (1..=3600).contains(s),
                )
                .map(Duration::from_secs)?,
            pingora_conf: env.get("BURROW_CONF"),
            unused_redis_setting: unused_redis_setting(&env),
            store: store_config(&env)?,
            auth,
            tunnel,
        })
    }
}

/// The listen address as another process on this host reaches it.
fn reachable(listen: &str) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => format!("127.0.0.1:{}", addr.port()),
        _ => listen.to_owned(),
    }
}

/// Whether two listening addresses (checked `IP:port`s) take the same port on a common IP.
fn overlap(a: &str, b: &str) -> bool {
    match (
        a.parse::<std::net::SocketAddr>(),
        b.parse::<std::net::SocketAddr>(),
    ) {
        (Ok(a), Ok(b)) => {
            a.port() == b.port()
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        }
        _ => false,
    }
}

/// The first redis setting given while no store is named (see [`Config::unused_redis_setting`]).
/// Kubernetes sets `REDIS_PORT=tcp://…` for a service named `redis`: that is no one's setting.
fn unused_redis_setting(env: &Env) -> Option<&'static str> {
    let named = ["BURROW_STORE", "REDIS_HOST", "REDIS_URL"];
    if named.iter().any(|var| env.get(var).is_some()) {
        return None;
    }
    let settings = [
        "REDIS_PORT",
        "REDIS_PASSWORD",
        "REDIS_POOL_SIZE",
        "REDIS_POOL_KEEPALIVE",
    ];
    settings.into_iter().find(|var| {
        env.get(var)
            .is_some_and(|value| !value.starts_with("tcp://"))
    })
}

fn store_config(env: &Env) -> Result<StoreConfig, ConfigError> {
    // Looked up only when the store is not named, so that `memory` reads no redis setting.
    let redis_wanted = || env.get("REDIS_HOST").is_some() || env.get("REDIS_URL").is_some();
    let kind = env.get("BURROW_STORE");
    match kind.as_deref() {
        Some("memory") => return Ok(StoreConfig::Memory),
        None if !redis_wanted() => return Ok(StoreConfig::Memory),
        Some("redis") | None => {}
        Some(other) => {
            return Err(ConfigError::Invalid {
                var: "BURROW_STORE",
                value: other.into(),
                expected: "`memory` or `redis`",
            })
        }
    }
    let url = match env.get("REDIS_URL") {
        Some(url) => match redis_url(&url) {
            Ok(()) => url,
            Err(expected) => {
                return Err(ConfigError::Invalid {
                    var: "REDIS_URL",
                    value: without_credentials(&url),
                    expected,
                })
            }
        },
        None => {
            let host = env.get("REDIS_HOST").unwrap_or_else(|| "127.0.0.1".into());
            // Kubernetes sets `REDIS_PORT=tcp://IP:PORT` for a service named `redis`: its port
            // belongs to that service, not necessarily to REDIS_HOST, so it is refused, saying so.
            let expected = "a TCP port (a tcp://… link, as Kubernetes sets for a service named \
                            redis, is not one: set the port by hand)";
            let port: u16 = env.parse("REDIS_PORT", 6379, expected, |p: &u16| *p > 0)?;
            // An IPv6 address is bracketed in a URL.
            let url = match host.contains(':') && !host.starts_with('[') {
                true => format!("redis://[{host}]:{port}"),
                false => format!("redis://{host}:{port}"),
            };
            // Not only what a URL can hold: `#`, `?` or `@` would cut the host short.
            let plain = host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._:[]".contains(c));
            if !plain || redis_url(&url).is_err() {
                return Err(ConfigError::Invalid {
                    var: "REDIS_HOST",
                    value: host,
                    expected: "a host name or IP address",
                });
            }
            url
        }
    };
    // The Lua relay's setting is still checked, so that a deployment's environment carries over
    // as it is; Burrow's connections are persistent and have no idle keep-alive to tune.
    env.seconds("REDIS_POOL_KEEPALIVE", 10)?;
    Ok(StoreConfig::Redis(RedisConfig {
        url,
        password: env.get("REDIS_PASSWORD"),
        pool_size: env.parse(
            "REDIS_POOL_SIZE",
            100,
            "a whole number ≥ 1",
            |n: &usize| *n >= 1,
        )?,
        empty_tunnel_ttl: env.seconds("BURROW_EMPTY_TUNNEL_TTL", 0)?,
    }))
}

/// Checks a store URL as the redis client will read it (so that a bad one stops start-up naming
/// its variable); the error says what was expected.
fn redis_url(url: &str) -> Result<(), &'static str> {
    const EXPECTED: &str =
        "a redis:// or rediss:// URL: [user:password@]host[:port][/database 0-255]";
    let parsed = url::Url::parse(url).map_err(|_| EXPECTED)?;
    let database = parsed.path().trim_start_matches('/');
    let valid = matches!(parsed.scheme(), "redis" | "rediss")
        && parsed.host_str().is_some_and(|host| !host.is_empty())
        && (database.is_empty() || database.parse::<u8>().is_ok());
    valid.then_some(()).ok_or(EXPECTED)
}

/// `url` as an error may show it: what comes before its last `@` (a user and password), after
/// the scheme, is hidden.
fn without_credentials(url: &str) -> String {
    let Some(at) = url.rfind('@') else {
        return url.to_owned();
    };
    let scheme = url[..at].find("://").map_or(0, |end| end + 3);
    format!("{}<hidden>{}", &url[..scheme], &url[at..])
}

/// Typed access to the environment; every error names its variable.
struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Env<'_> {
    /// A set, non-empty value.
    fn get(&self, var: &str) -> Option<String> {
        (self.lookup)(var).filter(|v| !v.is_empty())
    }

    /// A secret key: unset is none, but set and empty is refused, since an empty token or key
    /// would leave the relay open to a deployment that meant to close it (`TOKEN=${UNSET}`). Any
    /// other bytes make a key.
    fn secret(&self, var: &'static str) -> Result<Option<String>, ConfigError> {
        match (self.lookup)(var) {
            Some(value) if value.is_empty() => {
                let expected = "a non-empty secret (unset the variable to go without)";
                Err(refused_secret(var, &value, expected))
            }
            value => Ok(value),
        }
    }

    /// A bearer token, a [`Env::secret`] that requests carry in a header: one with whitespace
    /// at an end (a file's trailing newline) or a control character other than a tab could never
    /// be matched, and the relay would refuse everyone without saying why.
    fn token(&self, var: &'static str) -> Result<Option<String>, ConfigError> {
        let Some(value) = self.secret(var)? else {
            return Ok(None);
        };
        let http_space = |c: char| c == ' ' || c == '\t';
        let expected = if value.trim_matches(http_space) != value
            || value.ends_with(['\r', '\n'])
            || value.starts_with(['\r', '\n'])
        {
            "a token without whitespace at either end (a file's trailing newline?)"
        } else if value.chars().any(|c| c.is_control() && c != '\t') {
            "a token without control characters"
        } else {
            return Ok(Some(value));
        };
        Err(refused_secret(var, &value, expected))
    }

    /// A value that can be sent as an HTTP header value: visible ASCII and inner spaces.
    fn header_value(&self, var: &'static str, default: &str) -> Result<String, ConfigError> {
        let Some(value) = self.get(var) else {
            return Ok(default.into());
        };
        let visible = |b: u8| b.is_ascii_graphic() || b == b' ';
        if value.trim() == value && value.bytes().all(visible) {
            return Ok(value);
        }
        Err(ConfigError::Invalid {
            var,
            value,
            expected: "a header value of visible ASCII, such as text/plain",
        })
    }

    /// Comma-separated tunnel ids, spaces around them ignored.
    fn tunnel_ids(&self, var: &'static str) -> Result<HashSet<String>, ConfigError> {
        let value = self.get(var).unwrap_or_default();
        let ids = value.split(',').map(str::trim).filter(|id| !id.is_empty());
        let mut valid = HashSet::new();
        for id in ids {
            if TunnelId::parse(id).is_none() {
                return Err(ConfigError::Invalid {
                    var,
                    value: id.into(),
                    expected: "comma-separated ids of 1 to 1024 characters from A-Z a-z 0-9 - _",
                });
            }
            valid.insert(id.to_owned());
        }
        Ok(valid)
    }

    fn parse<T: std::str::FromStr>(
        &self,
        var: &'static str,
        default: T,
        expected: &'static str,
        valid: impl Fn(&T) -> bool,
    ) -> Result<T, ConfigError> {
        let Some(value) = self.get(var) else {
            return Ok(default);
        };
        match value.trim().parse::<T>() {
            Ok(parsed) if valid(&parsed) => Ok(parsed),
            _ => Err(ConfigError::Invalid {
                var,
                value,
                expected,
            }),
        }
    }

    /// A Go-style round-trip timeout such as `3s` or `1m30s`, at most a day.
    fn route_timeout(&self, var: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        let Some(value) = self.get(var) else {
            return Ok(default);
        };
        match parse_go_duration(&value) {
            Some(timeout) if timeout <= MAX_ROUTE_TIMEOUT && !timeout.is_zero() => Ok(timeout),
            _ => Err(ConfigError::Invalid {
                var,
                value,
                expected: "a Go duration above 0 and up to 24h, such as 500ms, 3s or 1m30s",
            }),
        }
    }

    /// A tunnel id, such as a queue name.
    fn tunnel_id(&self, var: &'static str, default: &str) -> Result<TunnelId, ConfigError> {
        let value = self.get(var).unwrap_or_else(|| default.into());
        TunnelId::parse(&value).ok_or_else(|| invalid_id(var, value.clone()))
    }

    /// An `IP:port` socket address, if set.
    fn socket_address(&self, var: &'static str) -> Result<Option<String>, ConfigError> {
        let Some(value) = self.get(var) else {
            return Ok(None);
        };
        // Port 0 would listen somewhere no one is told of.
        match value.parse::<std::net::SocketAddr>() {
            Ok(address) if address.port() != 0 => Ok(Some(value)),
            _ => Err(ConfigError::Invalid {
                var,
                value,
                expected: "an IP:port address with a port, such as 0.0.0.0:8080",
            }),
        }
    }

    /// A `host:port` address (a name or an IP; an IPv6 one in brackets), if set.
    fn host_port(&self, var: &'static str) -> Result<Option<String>, ConfigError> {
        let Some(value) = self.get(var) else {
            return Ok(None);
        };
        let valid = value.rsplit_once(':').is_some_and(|(host, port)| {
            let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
            // An unspecified address (`0.0.0.0`, `[::]`) is where one listens, not where other
            // instances can connect, nor is a broadcast or multicast one; digits and dots that
            // are no dotted quad (`0`, `000.0.0.0`) are an IPv4 address a resolver reads its own way.
            let unreachable = |host: &str| match host.parse::<std::net::IpAddr>() {
                Ok(ip) => match ip.to_canonical() {
                    std::net::IpAddr::V4(v4) => {
                        v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast()
                    }
                    std::net::IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
                },
                Err(_) => host.chars().all(|c| c.is_ascii_digit() || c == '.'),
            };
            let host_ok = !unreachable(bare.unwrap_or(host))
                && match bare {
                    Some(ipv6) => ipv6.parse::<std::net::Ipv6Addr>().is_ok(),
                    // A name or IPv4 address: anything else (`#`, `?`, `@`) would cut a URL short.
                    None => {
                        let name = |c: char| c.is_ascii_alphanumeric() || "-._".contains(c);
                        !host.is_empty() && host.chars().all(name)
                    }
                };
            host_ok && port.parse::<u16>().is_ok_and(|port| port > 0)
        });
        if valid {
            Ok(Some(value))
        } else {
            Err(ConfigError::Invalid {
                var,
                value,
                expected: "a host:port address other instances can reach, such as 10.0.3.7:8080",
            })
        }
    }

    /// Whole seconds, at most ten years (timeouts and TTLs are added to the clock).
    fn seconds(&self, var: &'static str, default: u64) -> Result<Duration, ConfigError> {
        let expected = "a whole number of seconds up to 315360000 (ten years)";
        self.parse(var, default, expected, |s| *s <= TEN_YEARS)
            .map(Duration::from_secs)
    }

    /// How long something is kept: whole seconds, at least one (nothing kept for no time would
    /// be lost as it is written), at most ten years.
    fn ttl(&self, var: &'static str, default: u64) -> Result<Duration, ConfigError> {
        let expected = "a whole number of seconds from 1 to 315360000 (ten years)";
        self.parse(var, default, expected, |s| (1..=TEN_YEARS).contains(s))
            .map(Duration::from_secs)
    }

    fn flag(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        let value = self.get(var).map(|v| v.trim().to_ascii_lowercase());
        match value.as_deref() {
            None => Ok(default),
            Some("true" | "yes" | "on") => Ok(true),
            Some("false" | "no" | "off") => Ok(false),
            // As the original read its flags (`tonumber(x) >= 1`): any number, on from 1.
            Some(number) => match number.parse::<f64>() {
                Ok(n) if n.is_finite() => Ok(n >= 1.0),
                _ => Err(ConfigError::Invalid {
                    var,
                    value: self.get(var).unwrap_or_default(),
                    expected: "1 or 0 (any number: on from 1), or true/false, yes/no, on/off",
                }),
            },
        }
    }
}

/// The longest duration a setting may give: timeouts and TTLs are added to the clock.
const TEN_YEARS: u64 = 10 * 365 * 24 * 3600;

/// The largest `TUNNEL_MAX_MESSAGE_SIZE`: redis keeps at most 512 MiB in one value.
pub const MAX_MESSAGE_SIZE: usize = 512 * 1024 * 1024;

/// The error for a value of `var` that is no tunnel id.
fn invalid_id(var: &'static str, value: String) -> ConfigError {
    ConfigError::Invalid {
        var,
        value,
        expected: "1 to 1024 characters from A-Z a-z 0-9 - _",
    }
}

/// The error for a secret that is refused, which does not repeat it.
fn refused_secret(var: &'static str, value: &str, expected: &'static str) -> ConfigError {
    ConfigError::Invalid {
        var,
        value: format!("<{} characters>", value.chars().count()),
        expected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_lookup(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    /// `burrow serve --help` names every variable the configuration reads (with either store), and
    /// nothing else but `RUST_LOG`, which the logger reads.
    #[test]
    fn help_names_every_variable() {
        let asked = std::cell::RefCell::new(std::collections::BTreeSet::new());
        for store in ["memory", "redis"] {
            let lookup = |name: &str| {
                asked.borrow_mut().insert(name.to_owned());
                (name == "BURROW_STORE").then(|| store.to_owned())
            };
            Config::from_lookup(lookup).expect("the defaults are valid");
        }
        let mut asked = asked.into_inner();
        asked.insert("RUST_LOG".to_owned());
        let named: std::collections::BTreeSet<String> =
            relay_variables().map(str::to_owned).collect();
        assert_eq!(named, asked);
    }

    /// Variables named like settings that the relay does not read are named, with the closest
    /// setting; the relay's own, the agent's and worker's, and Kubernetes' service links are told
    /// apart.
    #[test]
    fn unread_settings_are_named() {
        let environment = [
            ("TUNNEL_ACCESS_TOKENS", "secret"),
            ("BURROW_STORES", "redis"),
            ("BURROW_TOKEN", "t"),
            ("REDIS_SOMETHING_ELSE_ENTIRELY", "x"),
            ("TUNNEL_ACCESS_TOKEN", "secret"),
            ("REDIS_PORT", "6379"),
            ("RUST_LOG", "info"),
            ("PATH", "/usr/bin"),
            ("REDIS_SERVICE_HOST", "10.0.0.1"),
            ("REDIS_SERVICE_PORT_REDIS", "6379"),
            ("BURROW_PORT", "tcp://10.0.0.2:80"),
            ("BURROW_PORT_80_TCP_ADDR", "10.0.0.2"),
            ("BURROW_METRICS_PORT_9090_TCP", "tcp://10.0.0.3:9090"),
            ("TUNNELS_ACCESS_TOKEN", "secret"),
            ("tunnel_access_token", "secret"),
            ("HOSTNAME", "relay-0"),
            ("RUSTUP_HOME", "/root/.rustup"),
            // Three letters from BURROW_CONF: too far to be taken for it.
            ("BURROW_LOG", "debug"),
        ];
        let owned = environment.map(|(name, value)| (name.to_owned(), value.to_owned()));
        assert_eq!(
            unread_settings(owned),
            [
                "BURROW_LOG is no setting of the relay: ignored",
                "BURROW_STORES is no setting of the relay: ignored (did you mean BURROW_STORE?)",
                "BURROW_TOKEN is set, but only `burrow agent` and `burrow worker` read it: ignored",
                "REDIS_SOMETHING_ELSE_ENTIRELY is no setting of the relay: ignored",
                "TUNNELS_ACCESS_TOKEN is no setting of the relay: ignored \
                 (did you mean TUNNEL_ACCESS_TOKEN?)",
                "TUNNEL_ACCESS_TOKENS is no setting of the relay: ignored \
                 (did you mean TUNNEL_ACCESS_TOKEN?)",
                "tunnel_access_token is no setting of the relay: ignored \
                 (did you mean TUNNEL_ACCESS_TOKEN?)",
            ]
        );
        // A port given by hand, not by Kubernetes, is a misspelt setting.
        let by_hand = [("BURROW_PORT".to_owned(), "80".to_owned())];
        assert_eq!(unread_settings(by_hand).len(), 1);
    }

    /// With nothing set, the original's defaults and the embedded store apply.
    #[test]
    fn defaults() {
        let c = config(&[]).expect("defaults are valid");
        assert_eq!(c.store, StoreConfig::Memory);
        assert_eq!(c.tunnel.maxlen, 1000);
        assert!(c.tunnel.backpressure);
        assert_eq!(c.tunnel.max_poll_timeout, Duration::from_secs(60));
        assert_eq!(c.tunnel.default_poll_timeout, Duration::from_secs(30));
        assert_eq!(c.tunnel.default_content_type, "text/plain");
        assert_eq!(c.tunnel.reply_ttl, Duration::from_secs(3600));
        assert_eq!(c.tunnel.job_ttl, Duration::from_secs(86_400));
        assert_eq!(c.tunnel.max_message_size, 131_072);
        assert_eq!(c.listen, "0.0.0.0:8080");
        assert_eq!(c.advertise, "127.0.0.1:8080");
        assert!(!c.advertise_given);
        assert_eq!(c.header_timeout, Duration::from_secs(10));
        assert!(!c.auth.enabled());
    }

    /// `BURROW_ADVERTISE` takes a name or an IP with a port.
    #[test]
    fn advertise_forms() {
        for value in ["relay-0.relay:8080", "10.0.3.7:80", "[fd00::7]:8080"] {
            let c = config(&[("BURROW_ADVERTISE", value)]).expect(value);
            assert_eq!(c.advertise, value);
            assert!(c.advertise_given);
        }
        // Where one listens, but no address to reach.
        let unreachable = [
            "0.0.0.0:8080",
            "[::]:8080",
            "0:8080",
            "000.000.000.000:8080",
            "[::ffff:0.0.0.0]:8080",
            "255.255.255.255:8080",
            "224.0.0.1:8080",
            "[ff02::1]:8080",
        ];
        for value in unreachable {
            let refused = config(&[("BURROW_ADVERTISE", value)]).expect_err(value);
            assert!(
                refused.to_string().contains("BURROW_ADVERTISE"),
                "{refused}"
            );
        }
    }

    /// REDIS_HOST alone selects the redis store; REDIS_URL wins over host and port.
    #[test]
    fn redis_selection() {
        let c = config(&[("REDIS_HOST", "keydb"), ("REDIS_PORT", "6380")]).unwrap();
        let StoreConfig::Redis(r) = c.store else {
            panic!("expected redis")
        };
        assert_eq!(r.url, "redis://keydb:6380");
        let c = config(&[("REDIS_HOST", "keydb"), ("REDIS_URL", "redis://x:1/2")]).unwrap();
        assert!(matches!(c.store, StoreConfig::Redis(r) if r.url == "redis://x:1/2"));
        let c = config(&[("REDIS_HOST", "keydb"), ("BURROW_STORE", "memory")]).unwrap();
        assert_eq!(c.store, StoreConfig::Memory);
        // The memory store reads no redis setting (one that is not UTF-8 would stop start-up).
        let asked = std::cell::RefCell::new(Vec::new());
        let c = Config::from_lookup(|name| {
            asked.borrow_mut().push(name.to_owned());
            (name == "BURROW_STORE").then(|| "memory".to_owned())
        });
        assert_eq!(c.unwrap().store, StoreConfig::Memory);
        let asked = asked.into_inner();
        assert!(
            !asked.iter().any(|name| name.starts_with("REDIS_")),
            "{asked:?}"
        );
        let c = config(&[("REDIS_HOST", "::1")]).unwrap();
        assert!(matches!(c.store, StoreConfig::Redis(r) if r.url == "redis://[::1]:6379"));
        let url = "rediss://user:pw@keydb.internal:6380/2";
        let c = config(&[("REDIS_URL", url)]).unwrap();
        assert!(matches!(c.store, StoreConfig::Redis(r) if r.url == url));
    }

    /// Only a server on this host has a port that the relay's own connections can take.
    #[test]
    fn loopback_port() {
        let port = |url: &str| {
            let StoreConfig::Redis(r) = config(&[("REDIS_URL", url)]).unwrap().store else {
                panic!("expected redis")
            };
            r.loopback_port()
        };
        assert_eq!(port("redis://127.0.0.1:45602"), Some(45602));
        assert_eq!(port("redis://LocalHost/1"), Some(6379));
        assert_eq!(port("redis://[::1]:7000"), Some(7000));
        assert_eq!(port("redis://127.1.2.3:7001"), Some(7001));
        assert_eq!(port("redis://keydb:45602"), None);
        assert_eq!(port("redis://10.0.0.5:45602"), None);
    }

    /// An unparsable value is an error that names its variable.
    #[test]
    fn errors_name_the_variable() {
        for (var, value) in [
            ("TUNNEL_MAXLEN", "abc"),
            ("TUNNEL_MAXLEN", "0"),
            ("TUNNEL_BACKPRESSURE", "maybe"),
            ("TUNNEL_MAX_POLL_TIMEOUT", "-1"),
            ("REDIS_PORT", "99999"),
            ("BURROW_STORE", "postgres"),
            ("TUNNEL_MAX_MESSAGE_SIZE", "1k"),
            ("TUNNEL_MAX_MESSAGE_SIZE", "536870913"),
            ("BURROW_LISTEN", "localhost"),
            ("BURROW_METRICS_LISTEN", "9090"),
            ("BURROW_ACCESS_LOG", "yes please"),
            ("BURROW_JOBS_QUEUE", "a.b"),
            ("BURROW_ROUTE_TIMEOUT", "3"),
            ("BURROW_ROUTE_TIMEOUT", "25h"),
            ("TUNNEL_REPLY_TTL", "315360001"),
            ("TUNNEL_REPLY_TTL", "0"),
            ("BURROW_JOB_TTL", "0"),
            ("TUNNEL_DEMO_ID", "a.b"),
            ("TUNNEL_MAX_POLL_TIMEOUT", "18446744073709551615"),
            ("REDIS_POOL_KEEPALIVE", "soon"),
            ("BURROW_ADVERTISE", "bad"),
            ("BURROW_ADVERTISE", "host:notport"),
            ("BURROW_ADVERTISE", "host:0"),
            ("BURROW_ADVERTISE", ":8080"),
            ("BURROW_ADVERTISE", "http://host:8080"),
            ("BURROW_ADVERTISE", "[::1:8080"),
            ("BURROW_ADVERTISE", "127.0.0.1#x:8080"),
            ("BURROW_ADVERTISE", "user@host:8080"),
            ("BURROW_ADVERTISE", "ho?st:8080"),
            ("BURROW_HEADER_TIMEOUT", "0"),
            ("BURROW_HEADER_TIMEOUT", "3601"),
            ("TUNNEL_ACCESS_TOKEN", ""),
            ("TUNNEL_SIGNATURE_SECRET", ""),
            ("TUNNEL_BACKPRESSURE", "inf"),
            ("REDIS_URL", "redis://"),
            ("REDIS_URL", "redis://127.0.0.1:99999"),
            ("REDIS_URL", "redis://127.0.0.1:6379/notanumber"),
            ("REDIS_URL", "redis://127.0.0.1:6379/256"),
            ("REDIS_URL", "http://127.0.0.1:6379"),
            ("REDIS_HOST", "bad host"),
            ("REDIS_HOST", "127.0.0.1#x"),
            ("REDIS_HOST", "u@127.0.0.1"),
            ("BURROW_METRICS_LISTEN", "0.0.0.0:8080"),
            ("TUNNEL_MAXLEN", "9223372036854775808"),
            ("TUNNEL_DEFAULT_CONTENT_TYPE", "text/plain\r"),
            ("TUNNEL_DEFAULT_CONTENT_TYPE", "text/plain\n"),
            ("TUNNEL_DEFAULT_CONTENT_TYPE", "tëxt/plain"),
            ("TUNNEL_ACCESS_TOKEN", "s3cret\n"),
            ("TUNNEL_ACCESS_TOKEN", " "),
            ("TUNNEL_PUBLIC_IDS", "ok, a.b"),
            ("BURROW_ROUTE_TIMEOUT", "0s"),
            ("BURROW_LISTEN", "127.0.0.1:0"),
        ] {
            let vars = [(var, value), ("REDIS_HOST", "h")];
            let err = config(&vars).expect_err(var).to_string();
            assert!(err.starts_with(var), "{err}");
        }
        // A Kubernetes service link is not taken for the port of REDIS_HOST, and the error says so.
        let link = [
            ("REDIS_HOST", "redis"),
            ("REDIS_PORT", "tcp://10.0.0.7:6380"),
        ];
        let err = config(&link).unwrap_err().to_string();
        assert!(err.contains("Kubernetes"), "{err}");
        // A secret is not repeated in its error, nor a flag's value trimmed.
        let err = config(&[("TUNNEL_ACCESS_TOKEN", "s3cret\n")]).unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        for url in ["redis://admin:s3cret@host:99999/0", "admin:s3cret@host"] {
            let err = config(&[("REDIS_URL", url)]).unwrap_err().to_string();
            assert!(
                !err.contains("s3cret") && err.contains("<hidden>@host"),
                "{err}"
            );
        }
        // A signature key is any bytes; a token may hold a tab, as a header value may.
        let keys = config(&[
            ("TUNNEL_SIGNATURE_SECRET", "secret \t\u{1}"),
            ("TUNNEL_ACCESS_TOKEN", "a\tb c"),
        ]);
        assert!(keys.is_ok(), "{keys:?}");
        let err = config(&[("TUNNEL_BACKPRESSURE", " x ")]).unwrap_err();
        assert!(err.to_string().contains("\" x \""), "{err}");
    }

    /// Public ids are a comma-separated list; the Debug form hides secrets.
    #[test]
    fn auth_settings() {
        let c = config(&[
            ("TUNNEL_PUBLIC_IDS", "a, b,,c"),
            ("TUNNEL_ACCESS_TOKEN", "s3cret"),
        ])
        .unwrap();
        assert_eq!(c.auth.public_ids.len(), 3);
        assert!(c.auth.enabled());
        assert!(!format!("{:?}", c).contains("s3cret"));
        let summary = c.auth.summary();
        assert_eq!(summary, "authorization on: bearer token, 3 public ids");
        let c = config(&[("TUNNEL_ACCES_TOKEN", "s3cret")]).unwrap();
        assert_eq!(c.auth.summary(), "authorization off");
        let c = config(&[("TUNNEL_PUBLIC_IDS", "a")]).unwrap();
        let no_agents = " (no bearer token: agents cannot connect and /agents answers 403)";
        assert_eq!(
            c.auth.summary(),
            format!("authorization on: 1 public id{no_agents}")
        );
        let c = config(&[("TUNNEL_PUBLIC_IDS", ",")]).unwrap();
        assert!(c.auth.public_ids.is_empty());
        assert_eq!(
            c.auth.summary(),
            format!("authorization on: 0 public ids{no_agents}")
        );
    }

    /// A redis setting with no store named is noted (the Lua relay used redis there); not once a
    /// store is named, nor Kubernetes' `REDIS_PORT=tcp://…`.
    #[test]
    fn unused_redis_setting_is_noted() {
        let c = config(&[("REDIS_PORT", "6380")]).unwrap();
        assert_eq!(c.unused_redis_setting, Some("REDIS_PORT"));
        assert!(matches!(c.store, StoreConfig::Memory));
        let c = config(&[("REDIS_PASSWORD", "pw")]).unwrap();
        assert_eq!(c.unused_redis_setting, Some("REDIS_PASSWORD"));
        for vars in [
            &[("REDIS_PORT", "tcp://10.0.0.7:6379")][..],
            &[("REDIS_PORT", "6380"), ("BURROW_STORE", "memory")],
            &[("REDIS_PORT", "6380"), ("REDIS_HOST", "keydb")],
            &[],
        ] {
            assert_eq!(config(vars).unwrap().unused_redis_setting, None, "{vars:?}");
        }
    }

    /// `TUNNEL_DEMO_ID` opens one tunnel when authorization is on, and does not turn it on.
    #[test]
    fn demo_id_is_public() {
        let c = config(&[("TUNNEL_DEMO_ID", "demo"), ("TUNNEL_ACCESS_TOKEN", "t")]).unwrap();
        assert!(c.auth.public_ids.contains("demo"));
        let c = config(&[("TUNNEL_DEMO_ID", "demo")]).unwrap();
        assert!(!c.auth.enabled());
    }

    /// Flags are read as the original read them (`tonumber(x) >= 1`): any number, on from 1; or
    /// a word, in any case.
    #[test]
    fn numeric_flags() {
        for (value, on) in [
            ("2", true),
            ("1", true),
            ("0", false),
            ("-1", false),
            ("1.0", true),
            ("0.5", false),
            ("99999999999999999999", true),
            ("on", true),
            ("TRUE", true),
            ("No", false),
        ] {
            let c = config(&[("TUNNEL_BACKPRESSURE", value)]).unwrap();
            assert_eq!(c.tunnel.backpressure, on, "{value}");
        }
    }
}
