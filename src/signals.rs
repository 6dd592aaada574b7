//! The signals that stop or upgrade a running relay, as Pingora's shutdown watch reads them, and
//! whether a new relay waits to take the listening socket over (a SIGQUIT without one is refused);
//! and those that stop `burrow agent` and `burrow worker`.

use std::os::unix::fs::FileTypeExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// The signals that stop the relay as Pingora's own watch reads them (SIGTERM drains, SIGQUIT
/// hands the listening socket over, then drains; `server` stops it at once on SIGINT), except
/// that a SIGQUIT with no new process waiting at the upgrade socket is refused: Pingora would
/// hand the socket to nobody and drain, leaving nothing listening.
pub struct Signals {
    quit: tokio::sync::Mutex<Signal>,
    terminate: tokio::sync::Mutex<Signal>,
    hangup: tokio::sync::Mutex<Signal>,
    upgrade_sock: String,
    handing_over: Arc<tokio::sync::watch::Sender<bool>>,
}

/// How often a relay handing over looks whether the new process has taken the listening socket.
const LOOK_EVERY: Duration = Duration::from_millis(10);

/// How long the new process may take to take the socket: it looks once a second, five times.
const TAKEN_WITHIN: Duration = Duration::from_secs(7);

/// How long Pingora's old process serves on after handing the socket over, before its drain
/// (its `CLOSE_TIMEOUT`): a SIGTERM meanwhile is taken only then.
const HAND_OVER: Duration = Duration::from_secs(5);

impl Signals {
    /// Starts watching; signals that come before Pingora asks are kept for it. `handing_over`
    /// is set once a SIGQUIT is taken and the new process has the listening socket.
    pub fn watch(
        upgrade_sock: String,
        handing_over: tokio::sync::watch::Sender<bool>,
    ) -> std::io::Result<Signals> {
        Ok(Signals {
            quit: tokio::sync::Mutex::new(signal(SignalKind::quit())?),
            terminate: tokio::sync::Mutex::new(signal(SignalKind::terminate())?),
            hangup: tokio::sync::Mutex::new(signal(SignalKind::hangup())?),
            upgrade_sock,
            handing_over: Arc::new(handing_over),
        })
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (mut quit, mut terminate) = (self.quit.lock().await, self.terminate.lock().await);
        let mut hangup = self.hangup.lock().await;
        loop {
            tokio::select! {
                _ = terminate.recv() => return ShutdownSignal::GracefulTerminate,
                // What nginx does on SIGHUP, reloading its settings, the relay cannot (they come
                // from its environment); stopping instead would surprise whoever sent it.
                _ = hangup.recv() => log::warn!(
                    "SIGHUP ignored: there is nothing to reload (settings come from the \
                     environment: restart, or upgrade, to change them); still serving"
                ),
                _ = quit.recv() => {
                    if listens_at(&self.upgrade_sock) {
                        let (path, handing_over) = (self.upgrade_sock.clone(), self.handing_over.clone());
                        tokio::spawn(async move {
                            taken_over(&path).await;
                            handing_over.send_replace(true);
                        });
                        tokio::spawn(terminate_during_hand_over());
                        return ShutdownSignal::GracefulUpgrade;
                    }
                    log::error!(
                        "SIGQUIT ignored: no new process waits at {} to take the listening \
                         socket (start `burrow serve --upgrade` first); still serving",
                        self.upgrade_sock
                    );
                }
            }
        }
    }
}

/// The signals that stop `burrow agent` and `burrow worker`: SIGTERM, SIGINT (Ctrl-C), and
/// SIGHUP (their terminal hung up), which would otherwise kill them with requests or jobs in hand.
pub struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
    /// `None` where SIGHUP was ignored from the start (`nohup`): it stays ignored.
    hangup: Option<Signal>,
}

impl StopSignals {
    /// Starts watching; from now on these signals no longer kill the process.
    pub fn watch() -> std::io::Result<StopSignals> {
        let hangup = match hangup_ignored() {
            true => None,
            false => Some(signal(SignalKind::hangup())?),
        };
        Ok(StopSignals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup,
        })
    }

    /// Resolves at the first of these signals: stop, finishing what is in hand.
    pub async fn stop(&mut self) {
        let hangup = async {
            match &mut self.hangup {
                Some(hangup) => hangup.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
            _ = hangup => {}
        }
    }

    /// Resolves at a SIGTERM or SIGINT after [`StopSignals::stop`]: stop at once. Not at another
    /// SIGHUP: a terminal hanging up often sends two (the shell passes one on, the kernel sends
    /// another as the session ends), and that is still one request to finish what is in hand.
    pub async fn again(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// Whether SIGHUP is ignored (bit 0 of `SigIgn` in `/proc/self/status`), as `nohup` leaves it for
/// a process meant to outlive its terminal: a handler would undo that.
fn hangup_ignored() -> bool {
    let ignored = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let mask = status
                .lines()
                .find_map(|line| line.strip_prefix("SigIgn:"))?;
            u64::from_str_radix(mask.trim(), 16).ok()
        });
    ignored.is_some_and(|mask| mask & 1 != 0)
}

/// Says that a SIGTERM during the hand-over waits for its end: Pingora does not watch signals
/// then, and an operator would otherwise see nothing happen for seconds.
async fn terminate_during_hand_over() {
    let Ok(mut terminate) = signal(SignalKind::terminate()) else {
        return;
    };
    if let Ok(Some(())) = tokio::time::timeout(HAND_OVER, terminate.recv()).await {
        log::warn!(
            "SIGTERM during the upgrade's hand-over: the drain begins at its end, 5 s after the \
             SIGQUIT"
        );
    }
}

/// Resolves once the new process no longer listens at its upgrade socket `path`: it has taken the
/// listening socket (it looks once a second) and removed the file, and connections to the address
/// reach it from then on. (Or it gave up, or [`TAKEN_WITHIN`] passed.)
async fn taken_over(path: &str) {
    let deadline = Instant::now() + TAKEN_WITHIN;
    while listens_at(path) && Instant::now() < deadline {
        tokio::time::sleep(LOOK_EVERY).await;
    }
}

/// Whether a process listens on the Unix socket at `path`, where a new relay waits for the
/// listening socket until it has it: the socket file must be there (the old relay connects by
/// path; one unlinked under a new relay that still listens leads nowhere), and a socket bound to
/// that path must be listening — a file left by one that was killed is no listener. The kernel's
/// table of sockets says which listen (`/proc/net/unix`, flag `__SO_ACCEPTCON`); connecting to
/// find out would not do, since the new relay takes the first connection for the hand-over.
/// Without that table, the file answers alone.
fn listens_at(path: &str) -> bool {
    const ACCEPTING: u32 = 0x10000;
    if !std::fs::metadata(path).is_ok_and(|found| found.file_type().is_socket()) {
        return false;
    }
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return true;
    };
    // Num RefCount Protocol Flags Type St Inode Path: the path, which may hold spaces, last.
    let bound_here = format!(" {path}");
    table.lines().skip(1).any(|line| {
        let flags = line.split_whitespace().nth(3);
        let flags = flags.and_then(|flags| u32::from_str_radix(flags, 16).ok());
        line.ends_with(&bound_here) && flags.is_some_and(|flags| flags & ACCEPTING != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new relay waits at the upgrade socket while a socket bound to its path listens and its
    /// file is there: not when the file was left by one that is gone, nor when the file was
    /// removed under one still listening; a path may hold spaces.
    #[test]
    fn successor_waits_only_while_it_listens_there() {
        let dir = tempfile::TempDir::new().expect("a tempdir");
        let path = dir.path().join("up  grade.sock");
        let name = path.to_str().expect("a UTF-8 path");
        assert!(!listens_at(name));
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bound");
        assert!(listens_at(name));
        std::fs::remove_file(&path).expect("removed");
        assert!(!listens_at(name), "the file is gone");
        drop(listener);
        let left = std::os::unix::net::UnixListener::bind(&path).expect("bound again");
        drop(left);
        assert!(path.exists());
        assert!(!listens_at(name), "nobody listens there");
    }
}
