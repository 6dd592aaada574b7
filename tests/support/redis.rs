//! A real `redis-server` on a free port, and a minimal RESP client to look at what relays store.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;

use super::process::{free_port, Guarded};
use super::wait_until;

/// A `redis-server` in its own tempdir, without persistence; stopped on drop.
pub struct RedisServer {
    port: u16,
    dir: TempDir,
    process: Option<Guarded>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    pub fn start() -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            dir: TempDir::new().expect("a tempdir for redis-server"),
            process: None,
        };
        server.launch();
        server
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (the store outage); its port stays reserved for [`RedisServer::restart`].
    pub fn stop(&mut self) {
        self.process = None;
    }

    /// Starts the server again on the same port and in the same directory.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// A connection in `MONITOR` mode: each line it reads is one command the server ran, with
    /// who ran it (`[0 127.0.0.1:port]` for a client, `[0 lua]` for a script).
    pub fn monitor(&self) -> BufReader<TcpStream> {
        let mut monitor = self.send(&["MONITOR"]);
        let mut ok = String::new();
        monitor
            .read_line(&mut ok)
            .expect("redis-server answers MONITOR");
        assert_eq!(ok.trim_end(), "+OK");
        monitor
    }

    /// The server's process id, to freeze it with SIGSTOP (see `process::signal_pid`).
    pub fn pid(&self) -> u32 {
        self.command(&["INFO", "server"])
            .text()
            .lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .map(|pid| pid.trim().parse::<u32>().expect("a process id"))
            .expect("INFO server names the process")
    }

    /// Runs one command on a fresh connection and returns its reply.
    pub fn command(&self, args: &[&str]) -> Value {
        Value::read(&mut self.send(args)).expect("redis-server answers in RESP")
    }

    /// Sends one command on a fresh connection, to read the answer from.
    fn send(&self, args: &[&str]) -> BufReader<TcpStream> {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).expect("redis-server is up");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("a socket accepts a timeout");
        let mut writer = stream.try_clone().expect("a socket can be duplicated");
        writer
            .write_all(&encode(args))
            .expect("redis-server accepts the command");
        BufReader::new(stream)
    }

    fn launch(&mut self) {
        let port = self.port.to_string();
        let dir = self.dir.path().to_str().expect("tempdir paths are UTF-8");
        let args = [
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--dir",
            dir,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ];
        let log = self.dir.path().join("redis.log");
        let process = Guarded::spawn(Path::new("redis-server"), &args, &[], &log);
        let ready = wait_until(Duration::from_secs(10), || answers_ping(self.port));
        assert!(
            ready,
            "redis-server did not answer PING:\n{}",
            process.output()
        );
        self.process = Some(process);
    }
}

/// Whether a server on `port` answers `PING` with `+PONG` right now.
fn answers_ping(port: u16) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.write_all(b"PING\r\n")?;
        let mut answer = [0u8; 5];
        stream.read_exact(&mut answer)?;
        Ok(&answer == b"+PONG")
    };
    attempt().unwrap_or(false)
}

/// A command as a RESP array of bulk strings.
fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend(format!("${}\r\n", arg.len()).bytes());
        out.extend(arg.bytes());
        out.extend(b"\r\n");
    }
    out
}

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Value>>),
}

impl Value {
    fn read(reader: &mut impl BufRead) -> std::io::Result<Value> {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end_matches("\r\n");
        let (kind, rest) = line.split_at(1.min(line.len()));
        let number = || -> std::io::Result<i64> {
            rest.parse()
                .map_err(|_| std::io::Error::other(format!("bad RESP line {line:?}")))
        };
        Ok(match kind {
            "+" => Value::Status(rest.to_owned()),
            "-" => Value::Error(rest.to_owned()),
            ":" => Value::Int(number()?),
            "$" => match usize::try_from(number()?) {
                Ok(len) => {
                    let mut data = vec![0; len + 2];
                    reader.read_exact(&mut data)?;
                    data.truncate(len);
                    Value::Bulk(Some(data))
                }
                Err(_) => Value::Bulk(None),
            },
            "*" => match usize::try_from(number()?) {
                Ok(len) => Value::Array(Some(
                    (0..len)
                        .map(|_| Value::read(reader))
                        .collect::<Result<_, _>>()?,
                )),
                Err(_) => Value::Array(None),
            },
            _ => return Err(std::io::Error::other(format!("bad RESP line {line:?}"))),
        })
    }

    /// The text of a status or bulk reply.
    #[track_caller]
    pub fn text(&self) -> String {
        match self {
            Value::Status(s) => s.clone(),
            Value::Bulk(Some(data)) => String::from_utf8_lossy(data).into_owned(),
            other => panic!("expected a string reply, got {other:?}"),
        }
    }

    /// The number of an integer reply.
    #[track_caller]
    pub fn int(&self) -> i64 {
        match self {
            Value::Int(n) => *n,
            other => panic!("expected an integer reply, got {other:?}"),
        }
    }

    /// The items of an array reply (none for a nil array).
    #[track_caller]
    pub fn items(&self) -> &[Value] {
        match self {
            Value::Array(items) => items.as_deref().unwrap_or_default(),
            other => panic!("expected an array reply, got {other:?}"),
        }
    }

    /// A flat `[key, value, key, value…]` array as pairs of texts (stream entries, XINFO rows).
    #[track_caller]
    pub fn pairs(&self) -> Vec<(String, String)> {
        self.items()
            .chunks(2)
            .map(|pair| {
                (
                    pair[0].text(),
                    pair.get(1).map(value_text).unwrap_or_default(),
                )
            })
            .collect()
    }
}

/// Text of a scalar value, for display in pairs (integers included).
fn value_text(value: &Value) -> String {
    match value {
        Value::Int(n) => n.to_string(),
        Value::Status(_) | Value::Bulk(Some(_)) => value.text(),
        other => format!("{other:?}"),
    }
}
