//! A `burrow serve` process on a free port, configured by environment variables.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;

use super::client::Client;
use super::process::{free_port, Guarded};
use super::redis::RedisServer;
use super::wait_until;

/// Where a relay keeps its tunnels.
#[derive(Clone, Copy)]
pub enum Store<'a> {
    /// The embedded store (no store variables set).
    Memory,
    /// `BURROW_STORE=redis` on this redis-server.
    Redis(&'a RedisServer),
}

/// A running relay, killed on drop.
pub struct Relay {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// `http://127.0.0.1:PORT` of its metrics page.
    metrics: String,
    process: Guarded,
    _dir: TempDir,
}

impl Relay {
    /// Starts a relay on `store` with `env` added, and waits until `GET /health` answers 200.
    pub fn start(store: Store, env: &[(&str, &str)]) -> Relay {
        Relay::start_on(free_port(), store, env)
    }

    /// [`Relay::start`] on a given port (to restart a relay where its clients and agents expect it).
    pub fn start_on(port: u16, store: Store, env: &[(&str, &str)]) -> Relay {
        let relay = Relay::spawn(port, store, env, &["serve"]);
        let ready = wait_until(Duration::from_secs(10), || {
            status_of(port, "/health") == Some(200)
        });
        assert!(
            ready,
            "burrow on port {port} did not become healthy:\n{}",
            relay.output()
        );
        relay
    }

    /// `burrow serve --upgrade` on the port of the relay to replace, on `store` with `env` added
    /// (a `BURROW_CONF` naming the upgrade socket `sock`, as the old relay's does), once it waits
    /// at `sock` for the listening socket: a SIGQUIT to the old relay then hands it over.
    pub fn successor(port: u16, store: Store, env: &[(&str, &str)], sock: &Path) -> Relay {
        let relay = Relay::spawn(port, store, env, &["serve", "--upgrade"]);
        let waiting = wait_until(Duration::from_secs(10), || sock.exists());
        assert!(
            waiting,
            "the new relay never waited at {}:\n{}",
            sock.display(),
            relay.output()
        );
        relay
    }

    /// Runs `burrow ARGS` as a relay on `port`, logging to a file of its own.
    fn spawn(port: u16, store: Store, env: &[(&str, &str)], args: &[&str]) -> Relay {
        let listen = format!("127.0.0.1:{port}");
        let redis_url = match store {
            Store::Memory => None,
            Store::Redis(server) => Some(server.url()),
        };
        // Metrics always on, so that tests can wait for what the relay reports (waiting polls).
        let default_metrics = format!("127.0.0.1:{}", free_port());
        let mut vars = vec![
            ("BURROW_LISTEN", listen.as_str()),
            ("RUST_LOG", "warn"),
            ("BURROW_METRICS_LISTEN", default_metrics.as_str()),
        ];
        if let Some(url) = &redis_url {
            vars.extend([("BURROW_STORE", "redis"), ("REDIS_URL", url.as_str())]);
        }
        vars.extend_from_slice(env);
        let dir = TempDir::new().expect("a tempdir for the relay's log");
        let log = dir.path().join("relay.log");
        let binary = Path::new(env!("CARGO_BIN_EXE_burrow"));
        let process = Guarded::spawn(binary, args, &vars, &log);
        let metrics = vars
            .iter()
            .rev()
            .find(|(name, _)| *name == "BURROW_METRICS_LISTEN")
            .map_or(default_metrics.as_str(), |(_, address)| address);
        Relay {
            base: format!("http://{listen}"),
            metrics: format!("http://{metrics}"),
            process,
            _dir: dir,
        }
    }

    /// A client for this relay.
    pub fn client(&self) -> Client {
        Client::new(&self.base).with_metrics(&self.metrics)
    }

    /// The port the relay listens on.
    pub fn port(&self) -> u16 {
        self.base
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("the base URL ends with the port")
    }

    /// Sends the relay `signal` (`TERM`, `QUIT`…).
    pub fn signal(&self, signal: &str) {
        super::process::signal_pid(self.process.pid(), signal);
    }

    /// Whether the relay process ends within `limit` (a zombie until the test drops it).
    pub async fn exits_within(&self, limit: Duration) -> bool {
        let stat = format!("/proc/{}/stat", self.process.pid());
        super::eventually(limit, || {
            // `pid (comm) state …`: the state follows the last `)`.
            let state = std::fs::read_to_string(&stat).ok();
            let state = state.as_deref().and_then(|s| s.rsplit(')').next());
            std::future::ready(state.is_none_or(|s| s.trim_start().starts_with('Z')))
        })
        .await
    }

    /// The relay's resident memory now, in bytes (`VmRSS`).
    pub fn resident_bytes(&self) -> u64 {
        let status = format!("/proc/{}/status", self.process.pid());
        let status = std::fs::read_to_string(status).expect("the relay runs");
        let kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| {
                value
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .expect("a VmRSS line");
        kib * 1024
    }

    /// Kills the relay (SIGKILL) and waits until it is gone; its log stays readable.
    pub fn kill(&mut self) {
        self.process.stop();
    }

    /// The relay's log so far (stdout and stderr).
    pub fn output(&self) -> String {
        self.process.output()
    }
}

/// The status of `GET path` on `port` right now, if the relay answers at all.
pub fn status_of(port: u16, path: &str) -> Option<u16> {
    let attempt = || -> std::io::Result<Option<u16>> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: burrow\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes())?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        Ok(std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|code| code.parse().ok()))
    };
    attempt().ok().flatten()
}
