//! Builds Pingora's `Server` from `conf/burrow.yaml` and the [`Config`], and runs it until a
//! signal stops it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server, ShutdownWatch};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;
use tokio::signal::unix::{signal, SignalKind};

use crate::access_log;
use crate::config::{Config, RedisConfig, StoreConfig};
use crate::drain::{self, InFlight};
use crate::http::{log_left_out_store_failures, Connections, Lifecycle, RelayApp};
use crate::presence::{Presence, ANNOUNCE_EVERY, ANNOUNCE_RETRY};
use crate::signals::Signals;
use crate::store::{Store, StoreError};

/// Pingora's settings when `BURROW_CONF` names no file.
const DEFAULT_CONF: &str = include_str!("../conf/burrow.yaml");

/// Pingora's grace period when the configuration names none (its `EXIT_TIMEOUT`), in seconds.
const PINGORA_GRACE_PERIOD: u64 = 300;

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The Pingora YAML file `BURROW_CONF` names is unreadable or invalid.
    #[error("BURROW_CONF={path:?} is not usable: {message}")]
    PingoraConf { path: String, message: String },
    /// The store's runtime could not start.
    #[error("could not start the store's runtime: {0}")]
    Runtime(#[from] std::io::Error),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A new relay (`--upgrade`) cannot wait for the listening socket where the configuration
    /// says (Pingora would panic there).
    #[error("the upgrade socket {path} cannot be made: {why}")]
    UpgradeSocket { path: String, why: &'static str },
    /// A listening address is taken, not this host's, or a port below 1024 without the
    /// capability to listen there.
    #[error("{var}={address} cannot be listened on: {source}{hint}")]
    Listen {
        var: &'static str,
        address: String,
        source: std::io::Error,
        /// What to do about it, when that is clear (empty, or beginning with a separator).
        hint: &'static str,
    },
}

/// Runs the relay until a signal stops it: SIGTERM drains gracefully, SIGINT stops at once, and
/// SIGQUIT hands the listening socket to a process started with `upgrade` before draining.
pub fn run(config: Config, upgrade: bool) -> Result<(), ServeError> {
    // Before any thread is started: threads inherit the capabilities of the one starting them.
    raise_bind_capability();
    raise_open_file_limit();
    let conf = pingora_conf(&config)?;
    // Pingora would retry a taken address for half a minute, then panic in its listener thread
    // and leave a process that serves nothing. (An upgrade takes the address over from the old
    // process, which still holds it.)
    if !upgrade {
        can_listen("BURROW_LISTEN", &config.listen)?;
        if let Some(metrics) = &config.metrics_listen {
            can_listen("BURROW_METRICS_LISTEN", metrics)?;
        }
    } else {
        can_wait_at(&conf.upgrade_sock)?;
    }
    // The store's background tasks (redis connections, the wake-up subscriber, expiry) live on
    // their own runtime: Pingora's service runtimes come and go with the services.
    let store_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("burrow-store")
        .enable_all()
        .build()?;
    // Watched before the store is opened, which may wait for a redis server for seconds: a SIGINT
    // then stops the relay too, also when its parent ignores SIGINT (which the handler undoes),
    // and a SIGTERM drains it as soon as it runs (rather than the default action: exit 143).
    let (handing_over, handover) = tokio::sync::watch::channel(false);
    let (interrupt, signals) = {
        let _runtime = store_runtime.enter();
        let signals = Signals::watch(conf.upgrade_sock.clone(), handing_over)?;
        (signal(SignalKind::interrupt()), signals)
    };
    store_runtime.spawn(exit_on_interrupt(interrupt));
    let store = store_runtime.block_on(Store::open(&config.store))?;
    let grace = conf.grace_period_seconds.unwrap_or(PINGORA_GRACE_PERIOD);
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    // With `upgrade`, this waits until the old process has handed the listening socket over: a
    // successor's time counts from then.
    server.bootstrap();
    let in_flight = InFlight::default();
    let life = Lifecycle {
        grace: Duration::from_secs(grace),
        in_flight: in_flight.clone(),
        handing_over: handover,
        successor: upgrade,
    };
    let app = RelayApp::new(&config, store, life);
    let drainer = background_service("drain", Drainer(in_flight));
    let announcer = background_service("presence", Announcer(app.presence()));
    let access_log = background_service("access log", AccessLogFlusher);
    let mut service = Service::new("burrow".to_string(), Connections::new(Arc::new(app)));
    // No L4 read buffer: Pingora's default allocates 64 KiB per connection up front, which would
    // dominate the cost of an idle long-poll, and the HTTP/1 parser reads into a buffer of its own.
    let unbuffered_reads = L4BufferSettings::default().read(0);
    service.add_listener(ListenerConfig::tcp(&config.listen).l4_buffer(unbuffered_reads));
    server.add_service(service);
    server.add_service(announcer);
    server.add_service(access_log);
    server.add_service(drainer);
    if let Some(metrics_listen) = &config.metrics_listen {
        crate::metrics::init();
        let mut metrics = pingora_prometheus::prometheus_http_service();
        metrics.add_tcp(metrics_listen);
        server.add_service(metrics);
    }
    log::info!(
        "Burrow listening on {} ({} store, {})",
        config.listen,
        config.store.name(),
        config.auth.summary()
    );
    if let Some(var) = config.unused_redis_setting {
        log::warn!(
            "{var} is set, but no store is named: using the memory store, whose content is lost \
             when the relay stops (the Lua relay used redis on 127.0.0.1); set REDIS_HOST, \
             REDIS_URL or BURROW_STORE"
        );
    }
    if let StoreConfig::Redis(redis) = &config.store {
        warn_of_self_connect(redis);
    }
    let environment = std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)));
    for warning in crate::config::unread_settings(environment) {
        log::warn!("{warning}");
    }
    let loopback = config
        .advertise
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|address| address.ip().is_loopback());
    if matches!(config.store, StoreConfig::Redis(_)) && loopback && !config.advertise_given {
        log::info!(
            "agents connected here are announced at {}, which only instances on this host \
             reach: set BURROW_ADVERTISE when instances run on several hosts or containers",
            config.advertise
        );
    }
    server.run(RunArgs {
        shutdown_signal: Box::new(signals),
    });
    // The requests drained at shutdown were logged after the flusher's last round.
    access_log::flush();
    store_runtime.shutdown_background();
    Ok(())
}

/// Stops the process at SIGINT, having written the access log. Pingora's own quick shutdown
/// stops its runtimes under their tasks, and its accept loop then sometimes spins on the
/// errors for ever (about one SIGINT in ten), logging each.
async fn exit_on_interrupt(interrupt: std::io::Result<tokio::signal::unix::Signal>) {
    let mut interrupt = match interrupt {
        Ok(interrupt) => interrupt,
        Err(e) => {
            log::warn!("cannot watch for SIGINT ({e}): it stops the relay without a word");
            return;
        }
    };
    if interrupt.recv().await.is_some() {
        log::info!("SIGINT received, exiting");
        access_log::flush();
        std::process::exit(0);
    }
}

/// Whether a new relay can make its upgrade socket at `path`: a path a Unix socket can have
/// (108 bytes with its terminating NUL), in a directory that exists, where nothing but a file
/// (which it replaces) stands.
fn can_wait_at(path: &str) -> Result<(), ServeError> {
    const SUN_PATH: usize = 108;
    let refused = |why| ServeError::UpgradeSocket {
        path: path.to_owned(),
        why,
    };
    if path.len() >= SUN_PATH {
        return Err(refused("a Unix socket's path is at most 107 bytes"));
    }
    let path = std::path::Path::new(path);
    if path.is_dir() {
        return Err(refused("a directory stands there"));
    }
    // A bare file name (`up.sock`) is in the working directory.
    let dir = path.parent().map(|dir| match dir.as_os_str().is_empty() {
        true => std::path::Path::new("."),
        false => dir,
    });
    if !dir.is_some_and(|dir| dir.is_dir()) {
        return Err(refused("its directory does not exist"));
    }
    Ok(())
}

/// Whether `address` can be listened on now (std's listener, as Pingora's, reuses addresses).
fn can_listen(var: &'static str, address: &str) -> Result<(), ServeError> {
    std::net::TcpListener::bind(address)
        .map(drop)
        .map_err(|source| {
            let low_port = address
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|address| address.port() < 1024);
            let hint = match source.kind() == std::io::ErrorKind::PermissionDenied && low_port {
                true => {
                    " (a port below 1024 needs root or the NET_BIND_SERVICE capability: \
                         listen on a port from 1024, 8080 say)"
                }
                false => "",
            };
            ServeError::Listen {
                var,
                address: address.to_owned(),
                source,
                hint,
            }
        })
}

/// Ends a stopping relay as soon as nothing is left in flight (see `drain`), where Pingora
/// would sleep out its whole grace period first.
struct Drainer(InFlight);

#[async_trait]
impl BackgroundService for Drainer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        crate::tunnel::stopping(&mut shutdown).await;
        self.0.stopping();
        tokio::time::sleep(drain::AT_LEAST).await;
        // Counted after the pause too: a kept-alive connection may have brought one more.
        self.0.drained().await;
        log::info!("nothing left in flight: exiting");
        access_log::flush();
        std::process::exit(0);
    }
}

/// Announces this instance's agents in the store until shutdown (see `presence`).
struct Announcer(Presence);

#[async_trait]
impl BackgroundService for Announcer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
        // Whether the last announcement failed: logged when that starts and ends, not each time.
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    if let Err(e) = self.0.withdraw().await {
                        log::debug!("presence: {e}");
                    }
                    return;
                }
                _ = tick.tick() => {}
                // A new agent is reachable from other instances at once, not at the next tick;
                // so are this instance's agents when a restarted store has lost their records.
                () = self.0.agents_changed() => {}
                () = self.0.store_back() => {}
            }
            match self.0.announce().await {
                Ok(()) if failing => {
                    failing = false;
                    log::info!("presence: this instance's agents are announced again");
                }
                Ok(()) => {}
                Err(e) => {
                    if !failing {
                        log::warn!(
                            "presence: cannot announce this instance's agents ({e}); other \
                             instances cannot route to them until it can"
                        );
                    }
                    failing = true;
                    // Once the store is back, its agents should be reachable again at once.
                    tick.reset_after(ANNOUNCE_RETRY);
                }
            }
        }
    }
}

/// Writes out the access log's buffered lines every second, and once more at shutdown; tells the
/// store failures left out of the log since its last line about them.
struct AccessLogFlusher;

#[async_trait]
impl BackgroundService for AccessLogFlusher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(access_log::FLUSH_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {
                    access_log::flush();
                    log_left_out_store_failures(false);
                }
            }
        }
        access_log::flush();
        log_left_out_store_failures(true);
    }
}

/// Pingora's settings: the built-in ones, with the keys of the `BURROW_CONF` file (if any) laid
/// over them, so that a file raising the grace period keeps the rest (Pingora's own defaults
/// differ: one thread, a shared upgrade socket, five minutes of grace).
fn pingora_conf(config: &Config) -> Result<ServerConf, ServeError> {
    let built_in = || ServeError::PingoraConf {
        path: "(built in)".into(),
        message: "not a YAML mapping".into(),
    };
    let mut settings: serde_yaml::Mapping =
        serde_yaml::from_str(DEFAULT_CONF).map_err(|_| built_in())?;
    let path = config.pingora_conf.as_deref();
    let unusable = |message: String| ServeError::PingoraConf {
        path: path.unwrap_or("(built in)").to_owned(),
        message,
    };
    let mut own_socket = false;
    if let Some(path) = path {
        let yaml = std::fs::read_to_string(path).map_err(|e| unusable(e.to_string()))?;
        let file: serde_yaml::Value =
            serde_yaml::from_str(&yaml).map_err(|e| unusable(e.to_string()))?;
        let keys = match file {
            serde_yaml::Value::Mapping(keys) => keys,
            // An empty file (or one of comments only) changes nothing.
            serde_yaml::Value::Null => serde_yaml::Mapping::new(),
            _ => return Err(unusable("not a YAML mapping of settings".into())),
        };
        own_socket = keys.contains_key("upgrade_sock");
        warn_of_unknown_keys(path, &keys);
        settings.extend(keys);
    }
    let yaml = serde_yaml::to_string(&settings).map_err(|e| unusable(e.to_string()))?;
    // Only the parser's own words: Pingora's error repeats the whole file as its context.
    let mut conf =
        ServerConf::from_yaml(&yaml).map_err(|e| unusable(e.root_cause().to_string()))?;
    // Pingora would panic building a runtime without threads, or with more than the process
    // can open (each thread also holds a store connection).
    if !(1..=MAX_THREADS).contains(&conf.threads) {
        let threads = conf.threads;
        return Err(unusable(format!(
            "threads: {threads} is not valid: from 1 to {MAX_THREADS}"
        )));
    }
    // Daemonized, the relay would leave its supervisor (a container's init, systemd) believing it
    // exited, and hold its caller's output.
    if conf.daemon {
        return Err(unusable(
            "daemon: true is not supported: Burrow stays in the foreground for its supervisor"
                .into(),
        ));
    }
    // Pingora reads these only when it daemonizes.
    let only_daemonized = [
        (
            "error_log",
            conf.error_log.is_some(),
            "Burrow logs to stderr",
        ),
        ("user", conf.user.is_some(), "start Burrow as that user"),
        (
            "group",
            conf.group.is_some(),
            "start Burrow with that group",
        ),
    ];
    for (key, set, instead) in only_daemonized {
        if set {
            let path = path.unwrap_or("(built in)");
            log::warn!("BURROW_CONF {path}: {key} is ignored: {instead}");
        }
    }
    // One socket per port: relays on one host must not take each other's listening socket in a
    // graceful upgrade (the wrong one's port closed, the new process served nothing).
    if !own_socket {
        if let Ok(listen) = config.listen.parse::<std::net::SocketAddr>() {
            conf.upgrade_sock = format!("/tmp/burrow_upgrade_{}.sock", listen.port());
        }
    }
    Ok(conf)
}

/// The most worker threads a `BURROW_CONF` file may ask for.
const MAX_THREADS: usize = 1024;

/// Warns of each key of a `BURROW_CONF` file that is no Pingora setting, which Pingora would
/// ignore without a word (a misspelt `upgrade_sock`, say), with the setting it resembles.
fn warn_of_unknown_keys(path: &str, keys: &serde_yaml::Mapping) {
    let Ok(serde_yaml::Value::Mapping(known)) = serde_yaml::to_value(ServerConf::default()) else {
        return;
    };
    let known: Vec<&str> = known.keys().filter_map(serde_yaml::Value::as_str).collect();
    for key in keys.keys() {
        let Some(key) = key.as_str().filter(|key| !known.contains(key)) else {
            continue;
        };
        match crate::config::closest(key, known.iter().copied(), 3) {
            Some(setting) => log::warn!(
                "BURROW_CONF {path}: {key} is no Pingora setting: ignored (did you mean {setting}?)"
            ),
            None => log::warn!("BURROW_CONF {path}: {key} is no Pingora setting: ignored"),
        }
    }
}

/// Makes the capability to listen on ports below 1024 effective where the binary was given it as
/// permitted only (the container image's `setcap cap_net_bind_service=+p`). Given as effective
/// too, it would stop the binary from starting at all wherever the capability is dropped
/// (`--cap-drop ALL`); this way it starts there, and listens on any port from 1024.
fn raise_bind_capability() {
    use caps::{CapSet, Capability};
    let bind = Capability::CAP_NET_BIND_SERVICE;
    if caps::has_cap(None, CapSet::Permitted, bind).unwrap_or(false) {
        if let Err(e) = caps::raise(None, CapSet::Effective, bind) {
            log::warn!("cannot use the capability to listen on ports below 1024: {e}");
        }
    }
}

/// Below this many open files, the relay warns that it cannot hold the connections it is
/// built for (10,000 idle long-polls, say).
const FEW_OPEN_FILES: u64 = 10_000;

/// Raises the soft limit on open files to the hard one, as Go's runtime does (backstream's
/// users never met it): the soft limit systemd and many shells give (1024) would cap the relay at
/// about a thousand connections, and a client beyond them waits unanswered. Warns when even the
/// hard limit is low.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let mut limit = soft;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => limit = hard,
            Err(e) => log::debug!("could not raise the open-file limit from {soft} to {hard}: {e}"),
        }
    }
    if limit < FEW_OPEN_FILES {
        log::warn!(
            "the relay may have at most {limit} open files: it holds fewer connections than \
             that, and clients beyond them wait unanswered; raise the limit (`ulimit -n`, \
             systemd's LimitNOFILE=, docker's --ulimit nofile=)"
        );
    }
}

/// Warns when the redis server is on this host at a port in the ephemeral range: while it is
/// down, one of the relay's reconnection attempts can rarely be given that very port as its own
/// and connect to itself (TCP simultaneous open), which keeps the port from the server.
fn warn_of_self_connect(redis: &RedisConfig) {
    const RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    let Some(port) = redis.loopback_port() else {
        return;
    };
    let Ok(range) = std::fs::read_to_string(RANGE) else {
        return;
    };
    let mut bounds = range.split_whitespace().map(str::parse::<u16>);
    if let (Some(Ok(low)), Some(Ok(high))) = (bounds.next(), bounds.next()) {
        if (low..=high).contains(&port) {
            log::warn!(
                "the redis server's port {port} is in this host's ephemeral range ({low}-{high}, \
                 {RANGE}): while the server is down the relay can connect to itself there and \
                 answer 500 until restarted; move the server outside the range (6379 is)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new relay refuses an upgrade socket it could not make, in one line, before Pingora
    /// would panic on it.
    #[test]
    fn upgrade_socket_must_be_makeable() {
        let dir = tempfile::TempDir::new().expect("a tempdir");
        let nowhere = dir.path().join("missing/up.sock");
        assert!(can_wait_at(nowhere.to_str().unwrap()).is_err());
        assert!(can_wait_at(dir.path().to_str().unwrap()).is_err());
        assert!(can_wait_at("/").is_err());
        let long = dir.path().join("a".repeat(120));
        assert!(can_wait_at(long.to_str().unwrap()).is_err());
        assert!(can_wait_at(dir.path().join("up.sock").to_str().unwrap()).is_ok());
        // A bare name is in the working directory, which exists.
        assert!(can_wait_at("up.sock").is_ok());
    }

    /// The built-in settings give each port its own upgrade socket; a `BURROW_CONF` file's is
    /// kept as written.
    #[test]
    fn upgrade_socket_per_port() {
        let listen = |port: &str| {
            let vars = [("BURROW_LISTEN", format!("127.0.0.1:{port}"))];
            let config = Config::from_lookup(|name| {
                vars.iter()
                    .find(|(var, _)| *var == name)
                    .map(|(_, v)| v.clone())
            });
            pingora_conf(&config.expect("valid")).expect("the built-in settings")
        };
        assert_eq!(listen("8123").upgrade_sock, "/tmp/burrow_upgrade_8123.sock");
        assert_eq!(listen("8124").upgrade_sock, "/tmp/burrow_upgrade_8124.sock");
        let file = tempfile::NamedTempFile::new().expect("a temporary file");
        std::fs::write(
            file.path(),
            "---\nversion: 1\nupgrade_sock: /run/mine.sock\n",
        )
        .unwrap();
        let path = file.path().display().to_string();
        let config = Config::from_lookup(|name| (name == "BURROW_CONF").then(|| path.clone()));
        let conf = pingora_conf(&config.expect("valid")).expect("the file's settings");
        assert_eq!(conf.upgrade_sock, "/run/mine.sock");
    }

    /// A `BURROW_CONF` file's keys replace the built-in ones, and only those: the rest keep
    /// Burrow's values, not Pingora's defaults. An empty file changes nothing; one that is not a
    /// mapping of settings is refused.
    #[test]
    fn conf_file_overlays_the_built_in_settings() {
        let with_file = |text: &str| {
            let file = tempfile::NamedTempFile::new().expect("a temporary file");
            std::fs::write(file.path(), text).expect("the file is written");
            let path = file.path().display().to_string();
            let vars = [
                ("BURROW_CONF", path),
                ("BURROW_LISTEN", "127.0.0.1:8125".to_owned()),
            ];
            let config = Config::from_lookup(|name| {
                vars.iter()
                    .find(|(var, _)| *var == name)
                    .map(|(_, v)| v.clone())
            });
            pingora_conf(&config.expect("valid"))
        };
        let raised = with_file("grace_period_seconds: 30\n").expect("usable");
        assert_eq!(raised.grace_period_seconds, Some(30));
        assert_eq!(raised.threads, 2);
        assert!(!raised.work_stealing);
        assert_eq!(raised.graceful_shutdown_timeout_seconds, Some(2));
        assert_eq!(raised.upgrade_sock, "/tmp/burrow_upgrade_8125.sock");
        let empty = with_file("# nothing to change\n").expect("usable");
        assert_eq!(empty.grace_period_seconds, Some(8));
        assert_eq!(empty.threads, 2);
        assert!(with_file("- threads\n").is_err());
        assert!(with_file("threads: 0\n").is_err());
        assert!(with_file("threads: 100000\n").is_err());
        assert!(with_file("daemon: true\n").is_err());
        assert!(with_file("daemon: false\n").is_ok());
        assert!(with_file("threads: [\n").is_err());
    }
}
