//! Running one job: the worker's command with the job's JSON on stdin, its stdout as the result and
//! the end of its stderr to explain a failure, bounded by the job timeout and an output cap.
//!
//! The command runs in a process group of its own, for two reasons: a Ctrl-C at the terminal (sent
//! to the worker's foreground group) must not kill jobs the worker means to finish, and a timeout
//! must kill everything the command started (`sh -c 'sleep 30'` would otherwise leave `sleep`
//! running after `sh` is gone).

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, Command};

/// How much of the end of stderr a failure report keeps: where the error usually is.
pub const STDERR_TAIL: usize = 4096;

/// The command a worker runs for each job: a program and its arguments, run without a shell.
#[derive(Debug, Clone)]
pub struct JobCommand {
    /// The program, found on `PATH` unless it contains a `/`.
    pub program: String,
    /// Its arguments, passed as given.
    pub args: Vec<String>,
}

/// The bounds of one run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The command is killed (with its process group) when it runs longer.
    pub timeout: Duration,
    /// The most bytes of stdout a result may have; more fails the job.
    pub max_output: usize,
}

/// What a run came to.
#[derive(Debug)]
pub enum Outcome {
    /// The command exited with status 0; its whole stdout.
    Success(Vec<u8>),
    /// Anything else.
    Failure(Failure),
}

/// Why a job failed, and the end of the command's stderr.
#[derive(Debug)]
pub struct Failure {
    /// What went wrong.
    pub why: Why,
    /// The last [`STDERR_TAIL`] bytes the command wrote to stderr.
    pub stderr: Vec<u8>,
}

/// What went wrong with a job.
#[derive(Debug, thiserror::Error)]
pub enum Why {
    /// The command exited with a non-zero status.
    #[error("exited with status {0}")]
    Exit(i32),
    /// The command was killed by a signal it did not get from the worker.
    #[error("killed by signal {0}")]
    Signal(i32),
    /// The command ran longer than the job timeout and was killed.
    #[error("timed out after {0} s")]
    TimedOut(u64),
    /// The command wrote more than the output cap to stdout and was killed.
    #[error("output too large (more than {0} bytes)")]
    OutputTooLarge(usize),
    /// The relay refused the result as larger than its `TUNNEL_MAX_MESSAGE_SIZE` (413).
    #[error("output too large for the relay ({0} bytes)")]
    TooLargeForRelay(usize),
    /// The command could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    /// Reading the command's output or waiting for it failed.
    #[error("lost the command's output: {0}")]
    Io(#[source] io::Error),
}

impl Failure {
    /// A failure with no stderr to show.
    pub fn new(why: Why) -> Failure {
        Failure {
            why,
            stderr: Vec::new(),
        }
    }

    /// The exit status, when the command exited by itself with one.
    pub fn exit_code(&self) -> Option<i32> {
        match self.why {
            Why::Exit(code) => Some(code),
            _ => None,
        }
    }

    /// What went wrong, then (on the next lines) the end of stderr.
    pub fn detail(&self) -> String {
        let stderr = String::from_utf8_lossy(&self.stderr);
        let stderr = stderr.trim_end();
        if stderr.is_empty() {
            self.why.to_string()
        } else {
            format!("{}\n{stderr}", self.why)
        }
    }
}

/// The variable that gives the worker its token (see `WorkerArgs`).
pub const TOKEN_VARIABLE: &str = "BURROW_TOKEN";

/// Runs `command` once with `input` on stdin, within `limits`.
///
/// Dropping the returned future (the worker's second signal) kills the command's process group.
pub async fn run(command: &JobCommand, input: &[u8], limits: Limits) -> Outcome {
    let mut child = match Command::new(&command.program)
        .args(&command.args)
        // The worker's token opens every tunnel of the relay; a job, perhaps from anyone who may
        // trigger one, runs without it.
        .env_remove(TOKEN_VARIABLE)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(source) => {
            return Outcome::Failure(Failure::new(Why::Spawn {
                program: command.program.clone(),
                source,
            }))
        }
    };
    // `process_group(0)` makes the child the leader of a new group whose id is its pid.
    let mut group = Group(child.id().map(|pid| Pid::from_raw(pid as i32)));
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());

    let mut output = Vec::new();
    let mut tail = Tail::default();
    // All four at once: a command such as `cat` writes stdout while still reading stdin, so feeding
    // the whole input before reading would deadlock once both pipes are full.
    let finished = tokio::time::timeout(limits.timeout, async {
        tokio::try_join!(
            feed(stdin, input),
            read_capped(stdout, &mut output, limits.max_output),
            read_tail(stderr, &mut tail),
            async { child.wait().await.map_err(Why::Io) },
        )
    })
    .await;
    let why = match finished {
        Err(_elapsed) => Why::TimedOut(limits.timeout.as_secs()),
        Ok(Err(why)) => why,
        Ok(Ok((_, _, _, status))) => match failure_of(status) {
            None => {
                group.0 = None;
                return Outcome::Success(output);
            }
            Some(why) => why,
        },
    };
    // Kill whatever of the job is left (all of it on a timeout, stragglers otherwise) and reap it.
    group.kill();
    let _ = child.wait().await;
    Outcome::Failure(Failure {
        why,
        stderr: tail.into_bytes(),
    })
}

/// Why an exit status is a failure, if it is one.
fn failure_of(status: ExitStatus) -> Option<Why> {
    match (status.code(), status.signal()) {
        (Some(0), _) => None,
        (Some(code), _) => Some(Why::Exit(code)),
        (None, Some(signal)) => Some(Why::Signal(signal)),
        (None, None) => Some(Why::Exit(-1)),
    }
}

/// Writes the job to the command's stdin, then closes it so the command sees the end of its input.
async fn feed(stdin: Option<ChildStdin>, input: &[u8]) -> Result<(), Why> {
    if let Some(mut stdin) = stdin {
        // A command that exits without reading its input (`echo hello`) closes the pipe: that is
        // its business, not a failure of the job.
        if let Err(err) = stdin.write_all(input).await {
            log::debug!("the job command did not take its whole input: {err}");
        }
    }
    Ok(())
}

/// Reads all of stdout into `output`, failing as soon as it is longer than `max`.
async fn read_capped(
    stdout: Option<impl AsyncRead + Unpin>,
    output: &mut Vec<u8>,
    max: usize,
) -> Result<(), Why> {
    let Some(stdout) = stdout else { return Ok(()) };
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    stdout
        .take(limit)
        .read_to_end(output)
        .await
        .map_err(Why::Io)?;
    if output.len() > max {
        return Err(Why::OutputTooLarge(max));
    }
    Ok(())
}

/// Reads all of stderr, keeping its last [`STDERR_TAIL`] bytes in `tail`.
async fn read_tail(stderr: Option<impl AsyncRead + Unpin>, tail: &mut Tail) -> Result<(), Why> {
    let Some(mut stderr) = stderr else {
        return Ok(());
    };
    let mut chunk = [0u8; 8192];
    loop {
        match stderr.read(&mut chunk).await {
            Ok(0) => return Ok(()),
            Ok(n) => tail.push(&chunk[..n]),
            Err(err) => return Err(Why::Io(err)),
        }
    }
}

/// The last [`STDERR_TAIL`] bytes of a stream.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        // Trim only once the buffer is twice the tail, so a chatty command costs no quadratic
        // shifting.
        if self.0.len() > 2 * STDERR_TAIL {
            self.0.drain(..self.0.len() - STDERR_TAIL);
        }
    }

    fn into_bytes(mut self) -> Vec<u8> {
        if self.0.len() > STDERR_TAIL {
            self.0.drain(..self.0.len() - STDERR_TAIL);
        }
        self.0
    }
}

/// The command's process group, killed on drop unless the command finished well.
struct Group(Option<Pid>);

impl Group {
    fn kill(&mut self) {
        if let Some(group) = self.0.take() {
            // ESRCH (the group is already gone) is the common, harmless case.
            let _ = killpg(group, Signal::SIGKILL);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> JobCommand {
        JobCommand {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
        }
    }

    fn limits(timeout_ms: u64) -> Limits {
        Limits {
            timeout: Duration::from_millis(timeout_ms),
            max_output: 1024,
        }
    }

    fn failure(outcome: Outcome) -> Failure {
        match outcome {
            Outcome::Failure(failure) => failure,
            Outcome::Success(out) => panic!("succeeded with {:?}", String::from_utf8_lossy(&out)),
        }
    }

    /// `cat` hands the input back; an input larger than a pipe buffer does not deadlock.
    #[tokio::test]
    async fn echoes_stdin() {
        let cat = JobCommand {
            program: "cat".into(),
            args: vec![],
        };
        let big = vec![b'x'; 1000];
        let generous = Limits {
            timeout: Duration::from_secs(5),
            max_output: 1 << 20,
        };
        match run(&cat, &big, generous).await {
            Outcome::Success(out) => assert_eq!(out, big),
            Outcome::Failure(f) => panic!("{}", f.detail()),
        }
        let huge = vec![b'y'; 512 * 1024];
        match run(&cat, &huge, generous).await {
            Outcome::Success(out) => assert_eq!(out.len(), huge.len()),
            Outcome::Failure(f) => panic!("{}", f.detail()),
        }
    }

    /// A non-zero exit reports its status and the end of stderr.
    #[tokio::test]
    async fn exit_status_and_stderr() {
        let f = failure(run(&sh("echo boom >&2; exit 3"), b"{}", limits(5000)).await);
        assert_eq!(f.exit_code(), Some(3));
        assert_eq!(f.detail(), "exited with status 3\nboom");
    }

    /// Only the last 4 KiB of stderr are kept.
    #[tokio::test]
    async fn stderr_tail() {
        let script = "head -c 20000 /dev/zero | tr '\\0' a >&2; printf END >&2; exit 1";
        let f = failure(run(&sh(script), b"", limits(5000)).await);
        assert_eq!(f.stderr.len(), STDERR_TAIL);
        assert!(f.stderr.ends_with(b"aaEND"));
    }

    /// A command running past the timeout is killed, with whatever it started.
    #[tokio::test]
    async fn timeout_kills_the_group() {
        let started = std::time::Instant::now();
        let f = failure(run(&sh("echo begun >&2; sleep 30 & wait"), b"", limits(300)).await);
        assert!(matches!(f.why, Why::TimedOut(_)), "{f:?}");
        assert!(f.detail().contains("begun"), "{}", f.detail());
        assert_eq!(f.exit_code(), None);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// More stdout than the cap fails the job.
    #[tokio::test]
    async fn output_cap() {
        let f = failure(run(&sh("head -c 5000 /dev/zero"), b"", limits(5000)).await);
        assert!(matches!(f.why, Why::OutputTooLarge(1024)), "{f:?}");
    }

    /// A program that does not exist is a failure, not a panic.
    #[tokio::test]
    async fn cannot_spawn() {
        let missing = JobCommand {
            program: "/nonexistent/burrow-job".into(),
            args: vec![],
        };
        let f = failure(run(&missing, b"", limits(5000)).await);
        assert!(matches!(f.why, Why::Spawn { .. }), "{f:?}");
        assert!(f.detail().starts_with("cannot run /nonexistent/burrow-job"));
    }

    /// A command that ignores its input still succeeds.
    #[tokio::test]
    async fn unread_input() {
        let input = vec![b'z'; 256 * 1024];
        match run(&sh("echo hello"), &input, limits(5000)).await {
            Outcome::Success(out) => assert_eq!(out, b"hello\n"),
            Outcome::Failure(f) => panic!("{}", f.detail()),
        }
    }
}
