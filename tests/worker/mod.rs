//! `burrow worker` (PROTOCOL.md part 2) as real processes: jobs produced with the plain tunnel API,
//! run by a worker child process, and results read back as replies.
//!
//! The worker is a plain child process (killed on drop), not a guarded one, because these tests
//! signal it and watch how it exits.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::support::process::{self, free_port, Guarded};
use crate::support::relay::status_of;
use crate::support::{eventually, shared_redis, tunnel_id, wait_until, Backend, Client, Response};

/// A `burrow worker` child process logging to a file of its own; killed on drop.
struct Worker {
    child: Child,
    dir: TempDir,
}

impl Worker {
    /// Starts `burrow worker --relay relay --queue queue args… -- command…`.
    fn start(relay: &str, queue: &str, args: &[&str], command: &[&str]) -> Worker {
        Worker::start_with(relay, queue, args, &[], command)
    }

    /// [`Worker::start`] with the variables `env` set.
    fn start_with(
        relay: &str,
        queue: &str,
        args: &[&str],
        env: &[(&str, &str)],
        command: &[&str],
    ) -> Worker {
        let dir = TempDir::new().expect("a tempdir for the worker's log");
        let log =
            std::fs::File::create(dir.path().join("worker.log")).expect("the tempdir is writable");
        let child = Command::new(Path::new(env!("CARGO_BIN_EXE_burrow")))
            .args(["worker", "--relay", relay, "--queue", queue])
            .args(args)
            .arg("--")
            .args(command)
            .env("RUST_LOG", "info")
            // Settings of the environment running the tests must not leak into the worker.
            .env_remove("BURROW_TOKEN")
            .env_remove("BURROW_JOB_TIMEOUT")
            .env_remove("BURROW_JOB_VISIBILITY")
            .env_remove("BURROW_WORKER_CONCURRENCY")
            .env_remove("BURROW_MAX_OUTPUT")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("a file handle can be duplicated"))
            .stderr(log)
            .spawn()
            .expect("the burrow binary starts");
        Worker { child, dir }
    }

    /// What the worker has logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("worker.log")).unwrap_or_default()
    }

    /// Sends `signal` (`TERM`, `KILL`…) to the worker.
    fn signal(&self, signal: &str) {
        process::signal(&self.child, signal);
    }

    /// The exit status, if the worker exits within `limit`.
    async fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        process::exit_within(&mut self.child, limit).await
    }

    /// Waits until the log contains `text`; panics with the log otherwise.
    async fn wait_for_log(&self, text: &str) {
        let found = eventually(Duration::from_secs(10), || {
            std::future::ready(self.log().contains(text))
        })
        .await;
        assert!(found, "the worker never logged {text:?}:\n{}", self.log());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A relay on `port` (memory store, or redis at `redis_url`) logging into `dir`, once healthy.
fn relay_on(port: u16, redis_url: Option<&str>, dir: &TempDir) -> Guarded {
    let listen = format!("127.0.0.1:{port}");
    let mut env = vec![("BURROW_LISTEN", listen.as_str()), ("RUST_LOG", "warn")];
    if let Some(url) = redis_url {
        env.extend([("BURROW_STORE", "redis"), ("REDIS_URL", url)]);
    }
    let binary = Path::new(env!("CARGO_BIN_EXE_burrow"));
    let relay = Guarded::spawn(binary, &["serve"], &env, &dir.path().join("relay.log"));
    let healthy = wait_until(Duration::from_secs(10), || {
        status_of(port, "/health") == Some(200)
    });
    assert!(healthy, "the relay did not start:\n{}", relay.output());
    relay
}

/// Produces `job` (a JSON object) on `queue`; returns the message id.
async fn submit(client: &Client, queue: &str, job: &str) -> String {
    client
        .post_typed(&format!("/t/{queue}"), "application/json", job)
        .await
        .expect(201)
        .message_id()
}

/// Long-polls for the reply to `id`, asserting it arrives (200).
async fn result(client: &Client, queue: &str, id: &str) -> Response {
    client
        .get(&format!("/t/{queue}/{id}/reply/poll?timeout=10"))
        .await
        .expect(200)
}

/// Waits until the job `id` is pending (taken by a worker).
async fn wait_until_taken(client: &Client, queue: &str, id: &str) {
    let taken = eventually(Duration::from_secs(10), || async {
        client.status(queue, id).await == 202
    })
    .await;
    assert!(taken, "no worker took job {id}");
}

/// The reply's Content-Type.
fn content_type(response: &Response) -> &str {
    response.header("content-type").unwrap_or_default()
}

/// A failure reply as JSON, asserting it is a problem document titled "job failed".
#[track_caller]
fn problem(response: &Response) -> serde_json::Value {
    assert_eq!(
        content_type(response),
        "application/problem+json",
        "{response:?}"
    );
    let problem: serde_json::Value =
        serde_json::from_slice(&response.body).expect("a problem is JSON");
    assert_eq!(problem["title"], "job failed", "{problem}");
    problem
}

per_store!(shared: [], dedicated: [cat_echoes_the_job, a_dead_workers_job_goes_to_another]);

/// `cat` hands the job's JSON back as the result, typed application/json.
async fn cat_echoes_the_job(backend: Backend) {
    let relay = backend.shared();
    let client = relay.client();
    let queue = tunnel_id("worker-cat");
    let _worker = Worker::start(&relay.base, &queue, &[], &["cat"]);
    let job = r#"{"text":"hello david","n":1}"#;
    let id = submit(&client, &queue, job).await;
    let reply = result(&client, &queue, &id).await;
    assert_eq!(content_type(&reply), "application/json", "{reply:?}");
    assert_eq!(reply.text(), job);
    assert_eq!(
        client.status(&queue, &id).await,
        204,
        "the job is acknowledged"
    );
}

/// A worker SIGKILLed mid-job leaves it pending; after the visibility timeout another worker gets
/// it and replies, once.
async fn a_dead_workers_job_goes_to_another(backend: Backend) {
    let relay = backend.shared();
    let client = relay.client();
    let queue = tunnel_id("worker-dies");
    let short = ["--visibility", "2", "--job-timeout", "1"];
    let mut first = Worker::start(&relay.base, &queue, &short, &["sh", "-c", "sleep 30"]);
    let job = r#"{"step":"redelivered"}"#;
    let id = submit(&client, &queue, job).await;
    wait_until_taken(&client, &queue, &id).await;
    first.signal("KILL");
    first.exit_within(Duration::from_secs(5)).await;
    assert_eq!(
        client.status(&queue, &id).await,
        202,
        "the job stays pending"
    );

    let second = Worker::start(&relay.base, &queue, &short, &["cat"]);
    let reply = result(&client, &queue, &id).await;
    assert_eq!(reply.text(), job);
    let done = format!("id={id} outcome=done");
    second.wait_for_log(&done).await;
    assert_eq!(second.log().matches(&done).count(), 1, "{}", second.log());
    assert_eq!(client.status(&queue, &id).await, 204);
    client
        .get(&format!("/t/{queue}/{id}/reply"))
        .await
        .expect_empty();
}

/// The memory relay shared by the single-store tests.
fn memory() -> (Client, String) {
    let relay = Backend::Memory.shared();
    (relay.client(), relay.base.clone())
}

/// Stdout that is not JSON is replied as text/plain, byte for byte (trailing newline kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_output_is_plain_text() {
    let (client, base) = memory();
    let queue = tunnel_id("worker-text");
    let _worker = Worker::start(&base, &queue, &[], &["sh", "-c", "echo hello"]);
    let id = submit(&client, &queue, r#"{"x":1}"#).await;
    let reply = result(&client, &queue, &id).await;
    assert_eq!(content_type(&reply), "text/plain; charset=utf-8");
    assert_eq!(reply.text(), "hello\n");
}

/// Stdout that is not UTF-8 is replied as application/octet-stream, and `/done` gives it whole,
/// in base64, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_output_reaches_done_in_base64() {
    let (client, base) = memory();
    let queue = tunnel_id("worker-binary");
    let _worker = Worker::start(&base, &queue, &[], &["printf", "\\211PNG\\377"]);
    let triggered = client
        .post_typed(&format!("/trigger?queue={queue}"), "application/json", "{}")
        .await
        .expect(202)
        .json();
    let id = triggered["id"].as_str().expect("a job id");
    let done = client.get(&format!("/done/{id}?wait=10")).await.expect(200);
    let done = done.json();
    assert_eq!(done["status"], "Done", "{done}");
    assert_eq!(done["result_encoding"], "base64", "{done}");
    assert_eq!(done["result"], "iVBOR/8=", "{done}");
}

/// A non-zero exit is replied as a problem with the exit code and the end of stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_command_reports_problem() {
    let (client, base) = memory();
    let queue = tunnel_id("worker-fail");
    let command = ["sh", "-c", "echo boom >&2; exit 3"];
    let worker = Worker::start(&base, &queue, &[], &command);
    let id = submit(&client, &queue, r#"{"x":1}"#).await;
    let problem = problem(&result(&client, &queue, &id).await);
    assert_eq!(problem["exit_code"], 3, "{problem}");
    let detail = problem["detail"].as_str().expect("detail is a string");
    assert!(
        detail.contains("status 3") && detail.contains("boom"),
        "{detail}"
    );
    worker
        .wait_for_log(&format!("id={id} outcome=failed (exited with status 3)"))
        .await;
}

/// A command running past `--job-timeout` is killed and the job reported as timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_timeout_fails_the_job() {
    let (client, base) = memory();
    let queue = tunnel_id("worker-timeout");
    let _worker = Worker::start(&base, &queue, &["--job-timeout", "1"], &["sleep", "5"]);
    let started = Instant::now();
    let id = submit(&client, &queue, r#"{"x":1}"#).await;
    let problem = problem(&result(&client, &queue, &id).await);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "not killed at 1 s"
    );
    assert_eq!(problem["exit_code"], serde_json::Value::Null);
    let detail = problem["detail"].as_str().expect("detail is a string");
    assert!(detail.contains("timed out after 1 s"), "{detail}");
}

/// `--concurrency 4` runs four 1-second jobs at once: eight take about 2 s, not 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_runs_jobs_at_once() {
    let (client, base) = memory();
    let queue = tunnel_id("worker-concurrent");
    let command = ["sh", "-c", "sleep 1; cat"];
    let _worker = Worker::start(&base, &queue, &["--concurrency", "4"], &command);
    let started = Instant::now();
    let mut waiting = Vec::new();
    for i in 0..8 {
        let job = format!(r#"{{"n":{i}}}"#);
        let id = submit(&client, &queue, &job).await;
        let (client, queue) = (client.clone(), queue.clone());
        waiting.push(tokio::spawn(async move {
            (job, result(&client, &queue, &id).await)
        }));
    }
    for waiter in waiting {
        let (job, reply) = waiter.await.expect("the reply poll completes");
        assert_eq!(reply.text(), job);
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "8 jobs took {took:?}");
}

/// SIGTERM while a job runs: the worker finishes it, replies, and exits 0. A SIGHUP after it (a
/// terminal hanging up often sends two) does not abort it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_job_in_hand() {
    let (client, base) = memory();
    let queue = tunnel_id("worker-term");
    let command = ["sh", "-c", "sleep 1; cat"];
    let mut worker = Worker::start(&base, &queue, &[], &command);
    let job = r#"{"finish":"me"}"#;
    let id = submit(&client, &queue, job).await;
    wait_until_taken(&client, &queue, &id).await;
    worker.signal("TERM");
    worker.wait_for_log("stopping").await;
    worker.signal("HUP");
    let status = worker.exit_within(Duration::from_secs(10)).await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "exit: {status:?}\n{}",
        worker.log()
    );
    let reply = result(&client, &queue, &id).await;
    assert_eq!(reply.text(), job);
    assert!(worker.log().contains("outcome=done"), "{}", worker.log());
}

/// A second signal kills the running command and exits 1 without replying: the job stays pending.
/// SIGHUP (a terminal hanging up) counts as one, as SIGTERM and SIGINT do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_releases_the_job() {
    let (client, base) = memory();
    let queue = tunnel_id("worker-abort");
    let dir = TempDir::new().expect("a tempdir for the job's pid");
    let pid_file = dir.path().join("job.pid");
    let script = format!("echo $$ > '{}'; sleep 30", pid_file.display());
    let mut worker = Worker::start(&base, &queue, &[], &["sh", "-c", &script]);
    let id = submit(&client, &queue, r#"{"x":1}"#).await;
    wait_until_taken(&client, &queue, &id).await;
    let started = eventually(Duration::from_secs(5), || {
        std::future::ready(pid_file.exists())
    })
    .await;
    assert!(started, "the job's command did not start");
    worker.signal("HUP");
    worker.wait_for_log("stopping").await;
    worker.signal("INT");
    let status = worker.exit_within(Duration::from_secs(3)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", worker.log());
    let pid = std::fs::read_to_string(&pid_file).expect("the job wrote its pid");
    let gone = eventually(Duration::from_secs(3), || {
        let alive = Command::new("kill")
            .args(["-0", pid.trim()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        std::future::ready(!alive)
    })
    .await;
    assert!(gone, "the job's command {} survived the abort", pid.trim());
    assert!(
        worker.log().contains("outcome=released"),
        "{}",
        worker.log()
    );
    assert_eq!(
        client.status(&queue, &id).await,
        202,
        "the job stays pending"
    );
    client
        .get(&format!("/t/{queue}/{id}/reply"))
        .await
        .expect_empty();
}

/// A reply that meets a relay outage is retried until the relay is back (redis keeps the job
/// pending across the relay's restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_survives_a_relay_restart() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let dir = TempDir::new().expect("a tempdir for the relay's log");
    let start_relay = || relay_on(port, Some(&shared_redis().url()), &dir);
    let mut relay = start_relay();
    let client = Client::new(&base);
    let queue = tunnel_id("worker-reply-outage");
    // The command says when it has the job: the store marks a job pending before the worker has
    // its poll's answer, and a relay stopped in between would take the answer with it.
    let started = dir.path().join("started");
    let script = format!("touch '{}'; sleep 1; cat", started.display());
    let command = ["sh", "-c", script.as_str()];
    let worker = Worker::start(&base, &queue, &["--job-timeout", "5"], &command);
    let job = r#"{"through":"an outage"}"#;
    let id = submit(&client, &queue, job).await;
    let running = eventually(Duration::from_secs(10), || {
        std::future::ready(started.exists())
    })
    .await;
    assert!(running, "the worker never ran job {id}:\n{}", worker.log());
    relay.stop();
    worker.wait_for_log(&format!("handing in job {id}")).await;
    let _relay = start_relay();
    assert_eq!(result(&client, &queue, &id).await.text(), job);
    worker
        .wait_for_log(&format!("id={id} outcome=done duration"))
        .await;
}

/// SIGTERM with no job in hand stops the worker at once, without waiting for its poll to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_when_idle_exits_at_once() {
    let (_, base) = memory();
    let queue = tunnel_id("worker-idle");
    let mut worker = Worker::start(&base, &queue, &[], &["cat"]);
    worker.wait_for_log("worker started").await;
    worker.signal("TERM");
    let status = worker.exit_within(Duration::from_secs(3)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", worker.log());
}

/// A worker started before its relay keeps retrying, and takes jobs once the relay is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_the_relay() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let queue = tunnel_id("worker-late-relay");
    let worker = Worker::start(&base, &queue, &[], &["cat"]);
    worker.wait_for_log("cannot reach the relay").await;
    // The line says why (reqwest's own message names only the request).
    worker.wait_for_log("Connection refused").await;

    let dir = TempDir::new().expect("a tempdir for the relay's log");
    let _relay = relay_on(port, None, &dir);

    let client = Client::new(&base);
    let job = r#"{"late":true}"#;
    let id = submit(&client, &queue, job).await;
    assert_eq!(result(&client, &queue, &id).await.text(), job);
    let log = worker.log();
    assert_eq!(
        log.matches("cannot reach the relay").count(),
        1,
        "one line per outage:\n{log}"
    );
    assert!(log.contains("the relay answers again"), "{log}");
}

/// Against a relay with TUNNEL_ACCESS_TOKEN, a worker without the token is refused (and says so)
/// while one with `--token` works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_sent() {
    let relay = Backend::Memory.start(&[("TUNNEL_ACCESS_TOKEN", "s3cret")]);
    let client = relay.client().with_bearer("s3cret");
    let queue = tunnel_id("worker-token");
    let job = r#"{"auth":"bearer"}"#;
    let id = submit(&client, &queue, job).await;

    let refused = Worker::start(&relay.base, &queue, &[], &["cat"]);
    refused.wait_for_log("403").await;
    assert_eq!(
        client.status(&queue, &id).await,
        201,
        "the job was not taken"
    );
    drop(refused);

    let _worker = Worker::start(&relay.base, &queue, &["--token", "s3cret"], &["cat"]);
    assert_eq!(result(&client, &queue, &id).await.text(), job);
}

/// A token given in BURROW_TOKEN is the worker's, not its jobs': the command runs without it
/// (it opens every tunnel, and a job may come from anyone allowed to trigger one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_without_the_token() {
    let relay = Backend::Memory.start(&[("TUNNEL_ACCESS_TOKEN", "s3cret")]);
    let client = relay.client().with_bearer("s3cret");
    let queue = tunnel_id("worker-env");
    let id = submit(&client, &queue, r#"{"x":1}"#).await;
    let script = r#"cat >/dev/null; echo "{\"token\":\"${BURROW_TOKEN:-none}\"}""#;
    let env = [("BURROW_TOKEN", "s3cret")];
    let _worker = Worker::start_with(&relay.base, &queue, &[], &env, &["sh", "-c", script]);
    assert_eq!(
        result(&client, &queue, &id).await.text().trim_end(),
        r#"{"token":"none"}"#
    );
}

/// A visibility timeout not longer than the job timeout stops the worker at start-up (exit 2).
/// Empty variables count as unset, as for the relay: they do not stop it first.
#[test]
fn visibility_must_exceed_job_timeout() {
    let output = Command::new(Path::new(env!("CARGO_BIN_EXE_burrow")))
        .args(["worker", "--relay", "http://127.0.0.1:9"])
        .env("BURROW_JOBS_QUEUE", "")
        .env("BURROW_WORKER_CONCURRENCY", "")
        .args(["--job-timeout", "10", "--visibility", "10", "--", "cat"])
        .output()
        .expect("the burrow binary runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let says = "--visibility (BURROW_JOB_VISIBILITY) of 10 s must be longer than --job-timeout \
                (BURROW_JOB_TIMEOUT) of 10 s";
    assert!(stderr.contains(says), "{stderr}");
}

/// A value clap refuses names its environment variable when it came from there, and only its
/// flag when it was typed; a missing argument is named with its variable.
#[test]
fn invalid_values_name_where_they_came_from() {
    let worker = |env: &[(&str, &str)], args: &[&str]| {
        let output = Command::new(Path::new(env!("CARGO_BIN_EXE_burrow")))
            .args(["worker", "--relay", "http://127.0.0.1:9"])
            .envs(env.iter().copied())
            .args(args)
            .args(["--", "cat"])
            .output()
            .expect("the burrow binary runs");
        assert_eq!(output.status.code(), Some(2));
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let stderr = worker(&[("BURROW_WORKER_CONCURRENCY", "abc")], &[]);
    assert!(
        stderr.contains("'abc' for 'BURROW_WORKER_CONCURRENCY (--concurrency)'"),
        "{stderr}"
    );
    let stderr = worker(&[], &["--concurrency", "abc"]);
    assert!(stderr.contains("'abc' for '--concurrency "), "{stderr}");
    assert!(!stderr.contains("BURROW_WORKER_CONCURRENCY"), "{stderr}");
    let stderr = worker(&[("BURROW_JOB_TIMEOUT", "0")], &[]);
    assert!(
        stderr.contains("BURROW_JOB_TIMEOUT (--job-timeout)"),
        "{stderr}"
    );
    // A missing argument is named with the variable that could have given it.
    let output = Command::new(Path::new(env!("CARGO_BIN_EXE_burrow")))
        .args(["worker", "--", "cat"])
        .env_remove("BURROW_RELAY")
        .output()
        .expect("the burrow binary runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--relay <URL> (or BURROW_RELAY)"),
        "{stderr}"
    );
}

/// A reply answered 204 after an earlier attempt got no clear answer is not reported as a
/// result dropped: that attempt may have delivered it. A scripted relay hands out one job, answers
/// the first reply 503 and the second 204, and holds later polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_after_an_unclear_attempt_is_not_called_dropped() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port for the scripted relay");
    let base = format!("http://{}", listener.local_addr().expect("bound"));
    let (polls, replies) = (
        std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    );
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (polls, replies) = (polls.clone(), replies.clone());
            tokio::spawn(async move {
                let mut socket = BufReader::new(socket);
                loop {
                    let mut head = String::new();
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        if socket.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(value) =
                            line.to_ascii_lowercase().strip_prefix("content-length:")
                        {
                            length = value.trim().parse().expect("a length");
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    let mut body = vec![0; length];
                    socket.read_exact(&mut body).await.expect("the body");
                    let answer = if head.starts_with("GET /t/jobs/poll") {
                        if polls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
                            std::future::pending::<()>().await;
                        }
                        "HTTP/1.1 200 OK\r\nX-Message-Id: 1-0\r\nContent-Length: 2\r\n\r\n{}"
                    } else if replies.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n\r\nbusy\n"
                    } else {
                        "HTTP/1.1 204 No Content\r\n\r\n"
                    };
                    let written = socket.get_mut().write_all(answer.as_bytes()).await;
                    if written.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let worker = Worker::start(&base, "jobs", &[], &["cat"]);
    worker
        .wait_for_log("id=1-0 outcome=done, reply perhaps accepted by an earlier attempt")
        .await;
    assert!(!worker.log().contains("result dropped"), "{}", worker.log());
    // Where to look, by the id `/done` knows the job by.
    assert!(
        worker.log().contains("(GET /done/jobs.1-0 tells"),
        "{}",
        worker.log()
    );
}
