//! `burrow agent` as a real process against a hand-written relay side: the wire protocol byte by
//! byte (docs/AGENT-PROTOCOL.md), the token, SIGTERM, outages and configuration errors. The relay's
//! own side is in `end_to_end`: client, relay, agent and an upstream (`upstream`) for real.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::support::process::{self, free_port};

const WAIT: Duration = Duration::from_secs(10);

/// A `burrow agent` child process logging to a file of its own; killed on drop.
struct Agent {
    child: Child,
    dir: TempDir,
}

impl Agent {
    fn start(args: &[&str]) -> Agent {
        Agent::start_with(args, &[])
    }

    /// `burrow agent ARGS` with extra environment variables.
    fn start_with(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Agent {
        let burrow = Command::new(Path::new(env!("CARGO_BIN_EXE_burrow")));
        Agent::spawn(burrow, args, env)
    }

    /// `burrow agent ARGS` under `nohup`, which starts it with SIGHUP ignored.
    fn start_nohup(args: &[&str]) -> Agent {
        let mut nohup = Command::new("nohup");
        nohup.arg(env!("CARGO_BIN_EXE_burrow"));
        Agent::spawn(nohup, args, &[])
    }

    /// Runs `command agent ARGS`, logging to a file of its own.
    fn spawn(mut command: Command, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Agent {
        let dir = TempDir::new().expect("a tempdir for the agent's log");
        let log =
            std::fs::File::create(dir.path().join("agent.log")).expect("the tempdir is writable");
        let child = command
            .arg("agent")
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("BURROW_TOKEN")
            .env_remove("BURROW_RELAY")
            .env_remove("BURROW_AGENT_NAME")
            .env_remove("BURROW_UPSTREAM")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("a file handle can be duplicated"))
            .stderr(log)
            .spawn()
            .expect("the burrow binary starts");
        Agent { child, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn terminate(&self) {
        process::signal(&self.child, "TERM");
    }

    /// Waits up to `limit` for the agent to exit.
    async fn exit(&mut self, limit: Duration) -> ExitStatus {
        let status = process::exit_within(&mut self.child, limit).await;
        status.unwrap_or_else(|| {
            panic!(
                "the agent did not exit:
{}",
                self.log()
            )
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An upstream that answers every request `200`, `X-Up: yes`, body `hi`, after reading its head.
async fn tiny_upstream() -> u16 {
    let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Up: yes\r\nConnection: close\r\n\r\nhi";
    upstream_answering(answer).await
}

/// An upstream that answers `answer` to the first request of each connection, then closes it.
async fn upstream_answering(answer: &'static str) -> u16 {
    upstream_answering_then(answer, false).await
}

/// An upstream that answers `answer` to the first request of each connection and then neither
/// reads nor closes it, as a service refusing an upload before reading it may.
async fn upstream_answering_unread(answer: &'static str) -> u16 {
    upstream_answering_then(answer, true).await
}

/// An upstream that answers `answer` to the first request of each connection, then closes it or,
/// if `hold`, keeps it open unread.
async fn upstream_answering_then(answer: &'static str, hold: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_head(&mut tcp).await.is_some() {
                    let _ = tcp.write_all(answer.as_bytes()).await;
                    if hold {
                        std::future::pending::<()>().await;
                    }
                }
            });
        }
    });
    port
}

/// An upstream that reads a request's head and then neither reads nor answers until told (on the
/// returned sender); then it reads the connection to its end and says how that ended: `true` for
/// a reset, `false` for a close.
async fn upstream_holding() -> (
    u16,
    tokio::sync::mpsc::Sender<()>,
    tokio::sync::mpsc::Receiver<bool>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (go, mut told) = tokio::sync::mpsc::channel::<()>(1);
    let (ended, endings) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            if read_head(&mut tcp).await.is_none() || told.recv().await.is_none() {
                continue;
            }
            let mut rest = Vec::new();
            let reset = tcp.read_to_end(&mut rest).await.is_err();
            let _ = ended.send(reset).await;
        }
    });
    (port, go, endings)
}

/// An upstream that answers the first request of each connection `200 hi` (kept alive), and
/// closes the connection without an answer when the next one comes, as when its keep-alive
/// timeout ends the connection while a request is on its way — or after `partial`, the start of
/// an answer; counts the heads it received.
async fn upstream_closing_on_the_second_request(partial: &'static str) -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let heads = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&heads);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let heads = Arc::clone(&counted);
            tokio::spawn(async move {
                if read_head(&mut tcp).await.is_some() {
                    heads.fetch_add(1, Ordering::SeqCst);
                    let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";
                    let _ = tcp.write_all(answer.as_bytes()).await;
                }
                if read_head(&mut tcp).await.is_some() {
                    heads.fetch_add(1, Ordering::SeqCst);
                    let _ = tcp.write_all(partial.as_bytes()).await;
                }
            });
        }
    });
    (port, heads)
}

/// Reads a head (a request's or a response's) off `tcp`, up to its blank line and perhaps a
/// little past it; `None` if the connection ends first.
async fn read_head(tcp: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// A frame as the wire has it: type, big-endian stream id, payload.
fn frame(kind: u8, stream: u32, payload: &[u8]) -> Message {
    let mut bytes = vec![kind];
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    Message::binary(bytes)
}

/// The next binary message's bytes, skipping pings and pongs.
async fn next_frame(socket: &mut WebSocketStream<TcpStream>) -> Vec<u8> {
    loop {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a frame in time")
            .expect("the connection is open")
            .expect("a valid message");
        if let Message::Binary(bytes) = message {
            return bytes.to_vec();
        }
    }
}

/// Accepts the agent's WebSocket, answering the request line and Authorization header it sent.
// The handshake callback's error type is tungstenite's, large as it is.
#[allow(clippy::result_large_err)]
async fn accept_agent(listener: &TcpListener) -> (WebSocketStream<TcpStream>, String, String) {
    let (tcp, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("the agent dials in time")
        .unwrap();
    let mut seen = (String::new(), String::new());
    let callback = |request: &Request, response: Response| {
        seen.0 = request.uri().to_string();
        seen.1 = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok(response)
    };
    let socket = tokio_tungstenite::accept_hdr_async(tcp, callback)
        .await
        .unwrap();
    (socket, seen.0, seen.1)
}

/// The agent dials `/agent/connect?name=…` with its token, answers a HEAD with WINDOW 0, RESPONSE,
/// DATA and END byte for byte as documented, and on SIGTERM says GOAWAY and exits 0.
#[tokio::test]
async fn agent_speaks_the_wire_protocol() {
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_url = format!("http://{}/", relay.local_addr().unwrap());
    let upstream = format!("http://127.0.0.1:{}", tiny_upstream().await);
    let mut agent = Agent::start(&[
        "--relay",
        &relay_url,
        "--name",
        "wire-1",
        "--upstream",
        &upstream,
        "--token",
        "s3cret",
    ]);
    let (mut socket, uri, authorization) = accept_agent(&relay).await;
    assert_eq!(uri, "/agent/connect?name=wire-1");
    assert_eq!(authorization, "Bearer s3cret");

    let head = br#"{"method":"GET","path":"/x?y=1","headers":[["Accept","*/*"]]}"#;
    socket.send(frame(1, 1, head)).await.unwrap();
    socket.send(frame(3, 1, b"")).await.unwrap();
    assert_eq!(next_frame(&mut socket).await, [6, 0, 0, 0, 1, 0, 0, 0, 0]);
    let response = next_frame(&mut socket).await;
    assert_eq!(response[..5], [4, 0, 0, 0, 1]);
    let response: serde_json::Value = serde_json::from_slice(&response[5..]).unwrap();
    assert_eq!(response["status"], 200);
    let headers = response["headers"].as_array().unwrap();
    assert!(
        headers.contains(&serde_json::json!(["x-up", "yes"])),
        "{headers:?}"
    );
    assert!(!headers.iter().any(|h| h[0] == "connection"), "{headers:?}");
    assert_eq!(next_frame(&mut socket).await, [2, 0, 0, 0, 1, b'h', b'i']);
    assert_eq!(next_frame(&mut socket).await, [3, 0, 0, 0, 1]);

    agent.terminate();
    assert_eq!(next_frame(&mut socket).await, [7, 0, 0, 0, 0]);
    let status = agent.exit(WAIT).await;
    assert!(status.success(), "{status}\n{}", agent.log());
    let log = agent.log();
    assert!(log.contains("GET /x status=200"), "{log}");
    assert!(!log.contains("s3cret"), "the token was logged:\n{log}");
}

/// A relay that is not there is logged once, not once per attempt; SIGTERM still exits 0 at once.
#[tokio::test]
async fn outage_logged_once_and_sigterm_exits() {
    let relay = format!("http://127.0.0.1:{}", free_port());
    let mut agent = Agent::start(&[
        "--relay",
        &relay,
        "--name",
        "alone",
        "--upstream",
        "http://127.0.0.1:9",
    ]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let log = agent.log();
    assert_eq!(log.matches("cannot reach the relay").count(), 1, "{log}");
    let asked = Instant::now();
    agent.terminate();
    assert!(agent.exit(WAIT).await.success(), "{}", agent.log());
    assert!(asked.elapsed() < Duration::from_secs(2));
}

/// A refused token is logged when the refusals start, also within an outage that began
/// otherwise (a relay handing over answers 503, then a new process with another token 403), and
/// once, not once per attempt.
#[tokio::test]
async fn refused_token_is_logged_within_an_outage() {
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_url = format!("http://{}", relay.local_addr().unwrap());
    let (dials, mut dialled) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = relay.accept().await {
            read_head(&mut tcp).await;
            let answer = match *dials.borrow() {
                0 => "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Length: 0\r\n\r\n",
                _ => "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
            };
            let _ = tcp.write_all(answer.as_bytes()).await;
            dials.send_modify(|n| *n += 1);
        }
    });
    let agent = Agent::start(&[
        "--relay",
        &relay_url,
        "--name",
        "rotated",
        "--upstream",
        "http://127.0.0.1:9",
    ]);
    let third = dialled.wait_for(|&n| n >= 3);
    tokio::time::timeout(WAIT, third)
        .await
        .expect("dialled a third time")
        .unwrap();
    let log = agent.log();
    assert!(
        log.contains("the relay is stopping or handing over (503)"),
        "{log}"
    );
    let refused = "the relay refused this agent (403 Forbidden): check --token";
    assert_eq!(log.matches(refused).count(), 1, "{log}");
}

/// The agent reconnects after the relay drops its connection.
#[tokio::test]
async fn reconnects_after_the_relay_hangs_up() {
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_url = format!("http://{}", relay.local_addr().unwrap());
    let _agent = Agent::start(&[
        "--relay",
        &relay_url,
        "--name",
        "again",
        "--upstream",
        "http://127.0.0.1:9",
    ]);
    let (socket, _, authorization) = accept_agent(&relay).await;
    assert_eq!(authorization, "");
    drop(socket);
    let (_socket, uri, _) = accept_agent(&relay).await;
    assert_eq!(uri, "/agent/connect?name=again");
}

/// Unusable arguments stop the agent with exit code 2 and a message naming the flag.
#[test]
fn configuration_errors() {
    for (args, flag) in [
        (
            [
                "--relay",
                "ftp://r",
                "--name",
                "a",
                "--upstream",
                "http://u",
            ],
            "--relay",
        ),
        (
            [
                "--relay",
                "http://r",
                "--name",
                "a b",
                "--upstream",
                "http://u",
            ],
            "--name",
        ),
        (
            ["--relay", "http://r", "--name", "a", "--upstream", "nope"],
            "--upstream",
        ),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_burrow"))
            .arg("agent")
            .args(args)
            .env_remove("BURROW_TOKEN")
            .output()
            .expect("the burrow binary runs");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(flag), "{stderr}");
    }
}

mod end_to_end;
mod upstream;
