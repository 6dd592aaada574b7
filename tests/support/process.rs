//! Child processes that cannot outlive the test binary.
//!
//! Relays and redis-servers shared by many tests live in statics, which are never dropped. So every
//! child runs under a tiny `sh` guardian that reads its stdin (a pipe held by this process): when the
//! pipe closes — on `Drop`, or because the test binary exited or died — the guardian kills the child.

use std::collections::hash_map::RandomState;
use std::collections::BTreeSet;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Waits for stdin to close, then kills the program it started in the background.
const GUARDIAN: &str =
    r#""$@" </dev/null & pid=$!; read _; kill -9 "$pid" 2>/dev/null; wait "$pid""#;

/// A running program, killed when this value is dropped or the test binary ends.
pub struct Guarded {
    guardian: Child,
    lifeline: Option<ChildStdin>,
    log: PathBuf,
}

impl Guarded {
    /// Starts `program args…` with `env` added, its stdout and stderr appended to `log`.
    pub fn spawn(program: &Path, args: &[&str], env: &[(&str, &str)], log: &Path) -> Guarded {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("the log file is in a fresh tempdir");
        let err = out.try_clone().expect("a file handle can be duplicated");
        let mut guardian = Command::new("sh")
            .arg("-c")
            .arg(GUARDIAN)
            .arg("sh")
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let lifeline = guardian.stdin.take();
        Guarded {
            guardian,
            lifeline,
            log: log.to_owned(),
        }
    }

    /// The program's process id: the guardian's one child.
    pub fn pid(&self) -> u32 {
        let guardian = self.guardian.id();
        let children = format!("/proc/{guardian}/task/{guardian}/children");
        let children = std::fs::read_to_string(children).expect("/proc lists the children");
        let child = children
            .split_whitespace()
            .next()
            .expect("the program runs");
        child.parse().expect("a process id")
    }

    /// Whatever the program has written so far, to explain a failed start.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the program and waits until it is gone.
    pub fn stop(&mut self) {
        if self.lifeline.take().is_some() {
            let _ = self.guardian.wait();
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port that was free a moment ago on 127.0.0.1, for a child process to bind.
///
/// It lies below the kernel's ephemeral range: a port from `bind(0)` is in that range, and in the
/// moment before the child binds it an outgoing connection of a parallel test may take it (a relay
/// in CI failed to start so). Nor is one port handed out twice by this process.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(PoisonError::into_inner);
    let (low, high) = (10_000, ephemeral_ports_start());
    let span = u64::from(high - low);
    let start = RandomState::new().build_hasher().finish();
    (0..span)
        .map(|step| low + ((start.wrapping_add(step)) % span) as u16)
        .find(|&port| {
            !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        })
        .inspect(|&port| {
            given.insert(port);
        })
        .expect("the loopback interface has free ports below the ephemeral range")
}

/// Where the kernel's ephemeral ports begin (Linux's default if it cannot be read).
pub fn ephemeral_ports_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .filter(|&start| start > 20_000)
        .unwrap_or(32_768)
}

/// Sends `signal` (`TERM`, `QUIT`, `KILL`…) to `child`.
#[track_caller]
pub fn signal(child: &Child, signal: &str) {
    signal_pid(child.id(), signal);
}

/// Sends `signal` (`TERM`, `QUIT`…) to process `pid`.
pub fn signal_pid(pid: u32, signal: &str) {
    let sent = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(sent.success(), "SIG{signal} could not be sent");
}

/// The exit status of `child`, if it exits within `limit`.
pub async fn exit_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let mut status = None;
    super::eventually(limit, || {
        status = child.try_wait().expect("the child can be waited on");
        std::future::ready(status.is_some())
    })
    .await;
    status
}
