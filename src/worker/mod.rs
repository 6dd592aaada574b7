//! `burrow worker`: takes jobs from a queue on a relay and runs a command for each (PROTOCOL.md
//! part 2).
//!
//! A job queue is a tunnel, a job a message taken in pending mode with a visibility timeout, and
//! its result the message's reply. The worker runs `--concurrency` polling loops; each takes a job,
//! runs the command on it (`command`), and hands in the result or a failure report through the
//! relay client (`client`), which rides out relay outages with back-off.
//!
//! Shutdown has two steps. The first SIGTERM or SIGINT stops taking jobs (waiting polls are
//! abandoned) and lets the jobs in hand finish and reply, then the worker exits 0. A second signal
//! kills the running commands and exits 1 without replying: those jobs stay pending and reach
//! another worker after their visibility timeout.

mod client;
mod command;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::signals::StopSignals;
use crate::tunnel::TunnelId;
use client::{Delivery, Job, Relay, Reply};
use command::{Failure, JobCommand, Limits, Outcome, Why};

/// The longest job timeout or visibility timeout accepted, in seconds (30 days).
const MAX_SECONDS: u64 = 30 * 24 * 3600;

/// The relay's default `TUNNEL_MAX_MESSAGE_SIZE`: the largest result a default relay accepts.
const DEFAULT_MAX_OUTPUT: &str = "131072";

/// The largest `--max-output`: the largest `TUNNEL_MAX_MESSAGE_SIZE` a relay takes.
const MAX_OUTPUT: u64 = crate::config::MAX_MESSAGE_SIZE as u64;

/// The worker's command line, as typed. (No `Debug`: it holds the token.)
#[derive(Args)]
pub struct WorkerArgs {
    /// The relay's base URL, `http://` or `https://` (a path prefix is kept).
    #[arg(long, env = "BURROW_RELAY", value_name = "URL")]
    relay: String,

    /// The job queue (a tunnel id).
    #[arg(long, env = "BURROW_JOBS_QUEUE", default_value = "jobs")]
    queue: String,

    /// Sent as `Authorization: Bearer <TOKEN>` (the relay's TUNNEL_ACCESS_TOKEN).
    #[arg(long, env = command::TOKEN_VARIABLE, hide_env_values = true)]
    token: Option<String>,

    /// How many jobs run at once.
    #[arg(long, env = "BURROW_WORKER_CONCURRENCY", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,

    /// Seconds a job's command may run before it is killed and the job reported failed.
    #[arg(long, env = "BURROW_JOB_TIMEOUT", value_name = "SECONDS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    job_timeout: u64,

    /// Seconds a taken job stays invisible to other workers (default: job timeout + 30); must be
    /// longer than the job timeout.
    #[arg(long, env = "BURROW_JOB_VISIBILITY", value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    visibility: Option<u64>,

    /// The most bytes of stdout a result may have (the relay's TUNNEL_MAX_MESSAGE_SIZE).
    #[arg(long, env = "BURROW_MAX_OUTPUT", value_name = "BYTES", default_value = DEFAULT_MAX_OUTPUT,
          value_parser = clap::value_parser!(u64).range(1..=MAX_OUTPUT))]
    max_output: u64,

    /// The command run for each job, with the job's JSON on stdin; no shell.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// Why the command line does not make a worker.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--relay (BURROW_RELAY) {url:?} is not a URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("--relay (BURROW_RELAY) must be an http:// or https:// URL, not {0:?}")]
    BadScheme(String),
    #[error("--relay (BURROW_RELAY) must not carry a query or fragment: {0:?}")]
    UrlExtras(String),
    /// Not echoed: the URL holds a password.
    #[error(
        "--relay (BURROW_RELAY) must not hold a user or password: they are not sent (and would \
         be logged); give the relay's token with --token (BURROW_TOKEN)"
    )]
    Credentials,
    #[error(
        "--queue (BURROW_JOBS_QUEUE) {0:?} is not a tunnel id (1 to 1024 characters from A-Z a-z \
         0-9 - _)"
    )]
    BadQueue(String),
    #[error("--token (BURROW_TOKEN) cannot be sent in an HTTP header")]
    BadToken,
    #[error(
        "--visibility (BURROW_JOB_VISIBILITY) of {visibility} s must be longer than --job-timeout \
         (BURROW_JOB_TIMEOUT) of {job_timeout} s: otherwise a job still running is handed to \
         another worker"
    )]
    VisibilityTooShort { visibility: u64, job_timeout: u64 },
    #[error("no command given: put it after `--`, as in `burrow worker --relay URL -- ./job`")]
    NoCommand,
}

/// Why a worker stopped other than by a signal.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot listen for SIGTERM and SIGINT: {0}")]
    Signals(#[source] std::io::Error),
    #[error("cannot build the HTTP client: {0}")]
    Http(#[source] reqwest::Error),
}

/// A validated worker configuration.
pub struct WorkerConfig {
    /// The relay's base URL, without a trailing slash.
    relay: String,
    queue: TunnelId,
    token: Option<String>,
    concurrency: u16,
    limits: Limits,
    /// Seconds; always longer than the job timeout.
    visibility: u64,
    command: JobCommand,
}

impl WorkerConfig {
    /// Checks the command line and fills in defaults.
    pub fn from_args(args: WorkerArgs) -> Result<WorkerConfig, ConfigError> {
        let url = reqwest::Url::parse(&args.relay).map_err(|err| ConfigError::BadUrl {
            url: args.relay.clone(),
            reason: err.to_string(),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ConfigError::BadScheme(args.relay));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(ConfigError::UrlExtras(args.relay));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(ConfigError::Credentials);
        }
        let queue = TunnelId::parse(&args.queue).ok_or(ConfigError::BadQueue(args.queue))?;
        if let Some(token) = &args.token {
            reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| ConfigError::BadToken)?;
        }
        let visibility = args.visibility.unwrap_or(args.job_timeout + 30);
        if visibility <= args.job_timeout {
            return Err(ConfigError::VisibilityTooShort {
                visibility,
                job_timeout: args.job_timeout,
            });
        }
        let mut words = args.command.into_iter();
        let program = words.next().ok_or(ConfigError::NoCommand)?;
        Ok(WorkerConfig {
            relay: url.as_str().trim_end_matches('/').to_owned(),
            queue,
            token: args.token,
            concurrency: args.concurrency,
            limits: Limits {
                timeout: Duration::from_secs(args.job_timeout),
                max_output: usize::try_from(args.max_output).unwrap_or(usize::MAX),
            },
            visibility,
            command: JobCommand {
                program,
                args: words.collect(),
            },
        })
    }
}

impl std::fmt::Debug for WorkerConfig {
    /// Everything but the token's value, so that the configuration can be printed safely.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("relay", &self.relay)
            .field("queue", &self.queue)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("concurrency", &self.concurrency)
            .field("limits", &self.limits)
            .field("visibility", &self.visibility)
            .field("command", &self.command)
            .finish()
    }
}

/// Runs `burrow worker` until a signal stops it; the exit code says how it ended.
pub fn run(args: WorkerArgs) -> ExitCode {
    let config = match WorkerConfig::from_args(args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("burrow worker: {err}");
            return ExitCode::from(2);
        }
    };
    let ended = crate::cli::on_one_thread(work(config))
        .map_err(WorkerError::Runtime)
        .and_then(|ended| ended);
    match ended {
        Ok(Phase::Aborting) => ExitCode::FAILURE,
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("burrow worker: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Where the worker is in its life; only ever moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Taking and running jobs.
    Running,
    /// First signal: finishing the jobs in hand, taking no more.
    Draining,
    /// Second signal: killing the commands, replying nothing.
    Aborting,
}

/// What every polling loop shares.
struct Worker {
    relay: Relay,
    queue: TunnelId,
    command: JobCommand,
    limits: Limits,
    visibility: Duration,
}

/// Runs the polling loops until they have all stopped; answers the phase they stopped in.
async fn work(config: WorkerConfig) -> Result<Phase, WorkerError> {
    let stop = StopSignals::watch().map_err(WorkerError::Signals)?;
    let http = client::http_client(config.token.as_deref()).map_err(WorkerError::Http)?;
    let worker = Arc::new(Worker {
        relay: Relay::new(http, &config.relay, &config.queue, config.visibility),
        queue: config.queue.clone(),
        command: config.command.clone(),
        limits: config.limits,
        visibility: Duration::from_secs(config.visibility),
    });
    log::info!(
        "worker started: relay={} queue={} concurrency={} job_timeout={}s visibility={}s command={:?}",
        config.relay,
        config.queue,
        config.concurrency,
        config.limits.timeout.as_secs(),
        config.visibility,
        config.command.program,
    );

    let (phase, watching) = watch::channel(Phase::Running);
    let signals = tokio::spawn(follow_signals(phase, stop));
    let mut loops = JoinSet::new();
    for _ in 0..config.concurrency {
        loops.spawn(job_loop(worker.clone(), watching.clone()));
    }
    while let Some(ended) = loops.join_next().await {
        if let Err(err) = ended {
            log::error!("a polling loop stopped unexpectedly: {err}");
        }
    }
    signals.abort();
    let phase = *watching.borrow();
    if phase == Phase::Aborting {
        log::warn!("stopped; jobs in hand were released to other workers");
    } else {
        log::info!("stopped");
    }
    Ok(phase)
}

/// Moves the phase forward on signals: to draining at the first (SIGTERM, SIGINT or SIGHUP), to
/// aborting at a SIGTERM or SIGINT after it.
async fn follow_signals(phase: watch::Sender<Phase>, mut stop: StopSignals) {
    for next in [Phase::Draining, Phase::Aborting] {
        match next {
            Phase::Draining => stop.stop().await,
            _ => stop.again().await,
        }
        match next {
            Phase::Draining => log::info!(
                "stopping: taking no more jobs, finishing the jobs in hand (signal again to abort)"
            ),
            _ => log::warn!("aborting: killing the running jobs without replying"),
        }
        phase.send_replace(next);
    }
    // Keep the sender, so that loops waiting for a phase never see the channel close.
    std::future::pending::<()>().await;
}

/// Resolves once the worker has reached `phase`.
async fn reached(mut watching: watch::Receiver<Phase>, phase: Phase) {
    if watching.wait_for(|now| *now >= phase).await.is_err() {
        // The sender outlives every loop (see `follow_signals`); should it ever go, the phase can
        // no longer change.
        std::future::pending::<()>().await;
    }
}

/// One polling loop: take a job, run it, reply; until the worker stops.
async fn job_loop(worker: Arc<Worker>, watching: watch::Receiver<Phase>) {
    loop {
        // Checked before polling, not only in the race below: a poll that reached the relay and
        // was then abandoned could take a job that nobody runs until its visibility timeout.
        if *watching.borrow() >= Phase::Draining {
            return;
        }
        let job = tokio::select! {
            // A job that arrives together with the signal is run rather than left to time out.
            biased;
            job = worker.relay.take() => job,
            () = reached(watching.clone(), Phase::Draining) => return,
        };
        tokio::select! {
            biased;
            () = reached(watching.clone(), Phase::Aborting) => {
                // Dropping the job's future killed its command.
                log::info!(
                    "job queue={} id={} outcome=released",
                    worker.queue, job.id
                );
                return;
            }
            () = worker.handle(&job) => {}
        }
    }
}

impl Worker {
    /// Runs one job and hands in its result; logs one line saying how it went.
    async fn handle(&self, job: &Job) {
        let started = Instant::now();
        let deadline = job.taken + self.visibility;
        let (reply, mut outcome) = match command::run(&self.command, &job.body, self.limits).await {
            Outcome::Success(output) => (result_reply(output), "done".to_owned()),
            Outcome::Failure(failure) => {
                let outcome = format!("failed ({})", failure.why);
                (failure_reply(&failure), outcome)
            }
        };
        let mut delivery = self.relay.reply(job, &reply, deadline).await;
        if delivery == Delivery::TooLarge {
            let failure = Failure::new(Why::TooLargeForRelay(reply.body.len()));
            outcome = format!("failed ({})", failure.why);
            delivery = self
                .relay
                .reply(job, &failure_reply(&failure), deadline)
                .await;
        }
        match delivery {
            Delivery::Accepted => {}
            Delivery::NotPending => {
                log::warn!(
                    "job {} was no longer pending when its result came (its visibility timeout \
                     expired and another worker took it, and may have replied first, it was \
                     acknowledged, or its queue was cleared or lost by the store); result dropped",
                    job.id
                );
                outcome.push_str(", reply not accepted");
            }
            Delivery::MaybeEarlier => {
                log::warn!(
                    "job {id} was not pending when its result was handed in again: the earlier \
                     attempt, which got no clear answer, may have delivered it (GET \
                     /done/{queue}.{id} tells, or GET /t/{queue}/{id}/reply for a message \
                     produced straight on the queue), or its visibility timeout expired",
                    id = job.id,
                    queue = self.queue,
                );
                outcome.push_str(", reply perhaps accepted by an earlier attempt");
            }
            Delivery::TooLarge => outcome.push_str(", reply refused as too large"),
            Delivery::GaveUp => {
                outcome.push_str(", relay unreachable until the visibility timeout: not replied")
            }
        }
        log::info!(
            "job queue={} id={} outcome={outcome} duration={:.3}s",
            self.queue,
            job.id,
            started.elapsed().as_secs_f64(),
        );
    }
}

/// The reply for a command's stdout, passed on byte for byte: `application/json` when it parses as
/// JSON (surrounding whitespace allowed), `text/plain; charset=utf-8` when it is other UTF-8 text,
/// `application/octet-stream` otherwise.
fn result_reply(output: Vec<u8>) -> Reply {
    let content_type = if serde_json::from_slice::<serde_json::Value>(&output).is_ok() {
        "application/json"
    } else if std::str::from_utf8(&output).is_ok() {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    };
    Reply {
        content_type,
        body: Bytes::from(output),
    }
}

/// The reply reporting a failed job: an RFC 9457 problem, which the relay turns into `Failed`.
fn failure_reply(failure: &Failure) -> Reply {
    let problem = serde_json::json!({
        "title": "job failed",
        "detail": failure.detail(),
        "exit_code": failure.exit_code(),
    });
    Reply {
        content_type: "application/problem+json",
        body: Bytes::from(problem.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        worker: WorkerArgs,
    }

    fn config(args: &[&str]) -> Result<WorkerConfig, ConfigError> {
        let cli = Cli::try_parse_from(std::iter::once("worker").chain(args.iter().copied()))
            .expect("the arguments parse");
        WorkerConfig::from_args(cli.worker)
    }

    /// Defaults: queue `jobs`, one loop, 300 s jobs, visibility 30 s longer; the command split off.
    #[test]
    fn defaults() {
        let config = config(&["--relay", "http://relay:8080/", "--", "sh", "-c", "cat"]).unwrap();
        assert_eq!(config.relay, "http://relay:8080");
        assert_eq!(config.queue.as_str(), "jobs");
        assert_eq!(config.concurrency, 1);
        assert_eq!(config.limits.timeout, Duration::from_secs(300));
        assert_eq!(config.limits.max_output, 131072);
        assert_eq!(config.visibility, 330);
        assert_eq!(config.command.program, "sh");
        assert_eq!(config.command.args, ["-c", "cat"]);
    }

    /// A visibility timeout not longer than the job timeout is refused, naming both.
    #[test]
    fn visibility_must_exceed_job_timeout() {
        for visibility in ["10", "5"] {
            let err = config(&[
                "--relay",
                "http://r",
                "--job-timeout",
                "10",
                "--visibility",
                visibility,
                "--",
                "cat",
            ])
            .unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::VisibilityTooShort {
                        job_timeout: 10,
                        ..
                    }
                ),
                "{err}"
            );
            assert!(err.to_string().contains("--visibility"), "{err}");
        }
        let ok = config(
            &[
                "--relay",
                "http://r",
                "--job-timeout",
                "10",
                "--visibility",
                "11",
            ]
            .into_iter()
            .chain(["--", "cat"])
            .collect::<Vec<_>>(),
        );
        assert_eq!(ok.unwrap().visibility, 11);
    }

    /// Only http and https relays, without query or credentials, and tunnel-id queues are accepted.
    #[test]
    fn relay_and_queue_are_checked() {
        let err = config(&["--relay", "ftp://r", "--", "cat"]).unwrap_err();
        assert!(matches!(err, ConfigError::BadScheme(_)), "{err}");
        let err = config(&["--relay", "relay:8080", "--", "cat"]).unwrap_err();
        assert!(matches!(err, ConfigError::BadScheme(_)), "{err}");
        let err = config(&["--relay", "not a url", "--", "cat"]).unwrap_err();
        assert!(matches!(err, ConfigError::BadUrl { .. }), "{err}");
        let err = config(&["--relay", "http://r/?x=1", "--", "cat"]).unwrap_err();
        assert!(matches!(err, ConfigError::UrlExtras(_)), "{err}");
        let err = config(&["--relay", "http://me:pw@r", "--", "cat"]).unwrap_err();
        assert!(matches!(err, ConfigError::Credentials), "{err}");
        assert!(!err.to_string().contains("pw"), "{err}");
        let err = config(&["--relay", "http://r", "--queue", "a/b", "--", "cat"]).unwrap_err();
        assert!(matches!(err, ConfigError::BadQueue(_)), "{err}");
        let ok = config(&["--relay", "https://r/prefix/", "--", "cat"]).unwrap();
        assert_eq!(ok.relay, "https://r/prefix");
    }

    /// Zero concurrency, job timeout or output limit and timeouts past 30 days do not parse; a
    /// command is required.
    #[test]
    fn ranges() {
        for args in [
            &["--relay", "http://r", "--concurrency", "0", "--", "cat"][..],
            &["--relay", "http://r", "--job-timeout", "0", "--", "cat"],
            &[
                "--relay",
                "http://r",
                "--job-timeout",
                "2592001",
                "--",
                "cat",
            ],
            &[
                "--relay",
                "http://r",
                "--visibility",
                "2592001",
                "--",
                "cat",
            ],
            &["--relay", "http://r", "--max-output", "0", "--", "cat"],
            &[
                "--relay",
                "http://r",
                "--max-output",
                "536870913",
                "--",
                "cat",
            ],
            &["--relay", "http://r"],
        ] {
            let parsed = Cli::try_parse_from(std::iter::once("worker").chain(args.iter().copied()));
            assert!(parsed.is_err(), "{args:?}");
        }
    }

    /// JSON stdout is sent as JSON, other text as text, other bytes as bytes; never altered.
    #[test]
    fn result_content_types() {
        let json = result_reply(b" {\"a\": 1}\n".to_vec());
        assert_eq!(json.content_type, "application/json");
        assert_eq!(&json.body[..], b" {\"a\": 1}\n");
        assert_eq!(
            result_reply(b"hello\n".to_vec()).content_type,
            "text/plain; charset=utf-8"
        );
        assert_eq!(
            result_reply(vec![]).content_type,
            "text/plain; charset=utf-8"
        );
        assert_eq!(
            result_reply(vec![0xff, 0xfe]).content_type,
            "application/octet-stream"
        );
    }

    /// A failure is a problem document with title, detail and exit code.
    #[test]
    fn failure_problem() {
        let failure = Failure {
            why: Why::Exit(3),
            stderr: b"boom\n".to_vec(),
        };
        let reply = failure_reply(&failure);
        assert_eq!(reply.content_type, "application/problem+json");
        let problem: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(
            problem,
            serde_json::json!({
                "title": "job failed",
                "detail": "exited with status 3\nboom",
                "exit_code": 3,
            })
        );
        let timed_out = failure_reply(&Failure::new(Why::TimedOut(5)));
        let problem: serde_json::Value = serde_json::from_slice(&timed_out.body).unwrap();
        assert_eq!(problem["exit_code"], serde_json::Value::Null);
        assert_eq!(problem["detail"], "timed out after 5 s");
    }
}
