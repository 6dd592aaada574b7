//! Shared helpers of the scenarios: command-line options, percentiles, the relay's RSS and CPU
//! from /proc, its waiting-poll gauge, and the store's client count through redis-cli.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::http::Conn;

/// `--key value` options.
pub struct Args(HashMap<String, String>);

impl Args {
    /// Reads `--key value` pairs; anything else is an error.
    pub fn parse(args: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut map = HashMap::new();
        let mut args = args.peekable();
        while let Some(key) = args.next() {
            let key = key
                .strip_prefix("--")
                .ok_or_else(|| format!("expected --option, got {key:?}"))?
                .to_string();
            let value = args
                .next()
                .ok_or_else(|| format!("--{key} needs a value"))?;
            map.insert(key, value);
        }
        Ok(Args(map))
    }

    /// The option `key` parsed, or `default` when absent. Exits on a value that does not parse.
    pub fn get<T: FromStr>(&self, key: &str, default: T) -> T {
        match self.0.get(key) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| {
                eprintln!("loadgen: --{key} {v:?} does not parse");
                std::process::exit(2)
            }),
        }
    }

    /// The option `key` as text, if given.
    pub fn opt(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
}

/// p50, p99 and max of `values` (ms), as a `p50_ms=.. p99_ms=.. max_ms=..` fragment.
pub fn percentiles(values: &mut [f64]) -> String {
    if values.is_empty() {
        return "p50_ms=nan p99_ms=nan max_ms=nan".into();
    }
    values.sort_by(f64::total_cmp);
    let at =
        |p: f64| values[((values.len() as f64 * p).ceil() as usize).clamp(1, values.len()) - 1];
    format!(
        "p50_ms={:.3} p99_ms={:.3} max_ms={:.3}",
        at(0.50),
        at(0.99),
        values[values.len() - 1]
    )
}

/// Milliseconds between two instants, negative when `to` came first.
pub fn ms_between(from: Instant, to: Instant) -> f64 {
    if to >= from {
        (to - from).as_secs_f64() * 1000.0
    } else {
        -((from - to).as_secs_f64() * 1000.0)
    }
}

/// A prefix that makes this run's tunnel ids unique.
pub fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}", nanos % (1 << 48))
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User + system CPU time of `pid` in clock ticks (1/100 s on Linux).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command name: state is field 3; utime and stime are fields 14 and 15.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// The CPU use of each of `pids` over `window`, in percent of one core (`nan` if unreadable).
pub async fn cpu_percent(pids: &[u32], window: Duration) -> Vec<f64> {
    let before: Vec<_> = pids.iter().map(|&p| cpu_ticks(p)).collect();
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let secs = started.elapsed().as_secs_f64();
    pids.iter()
        .zip(before)
        .map(|(&p, b)| match (b, cpu_ticks(p)) {
            (Some(b), Some(a)) => (a - b) as f64 / 100.0 / secs * 100.0,
            _ => f64::NAN,
        })
        .collect()
}

/// The relay's `burrow_waiting_polls` gauge, read from its metrics endpoint.
pub async fn waiting_polls(metrics: &str) -> Option<u64> {
    let mut conn = Conn::new(metrics);
    let resp = conn
        .send("GET", "/metrics", b"", Duration::from_secs(5))
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&resp.body);
    let line = text
        .lines()
        .find(|l| l.starts_with("burrow_waiting_polls "))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<f64>()
        .ok()
        .map(|v| v as u64)
}

/// Waits until the relay reports `n` waiting polls, at most `limit`; the count last seen.
pub async fn wait_for_waiters(metrics: Option<&str>, n: u64, limit: Duration) -> u64 {
    let Some(metrics) = metrics else {
        tokio::time::sleep(limit.min(Duration::from_secs(3))).await;
        return 0;
    };
    let deadline = Instant::now() + limit;
    loop {
        let seen = waiting_polls(metrics).await.unwrap_or(0);
        if seen >= n || Instant::now() >= deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The store's `connected_clients` (through redis-cli, not counting redis-cli itself).
pub fn redis_clients(port: u16) -> Option<u64> {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "info", "clients"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("connected_clients:"))?;
    let n: u64 = line.trim_end().split(':').nth(1)?.parse().ok()?;
    Some(n.saturating_sub(1))
}

/// The value, or exits with a one-line message saying what failed (the relay is not up, a port is
/// taken): a load run that cannot start has nothing to report.
pub fn or_exit<T, E: std::fmt::Display>(result: Result<T, E>, doing: &str) -> T {
    result.unwrap_or_else(|e| {
        eprintln!("loadgen: {doing}: {e}");
        std::process::exit(2)
    })
}
