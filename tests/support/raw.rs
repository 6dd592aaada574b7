//! One HTTP/1 connection driven by hand, for what a pooled client hides: whether the relay keeps a
//! connection open, closes it, and answers several requests in turn on it.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long a test waits for any answer before failing.
const PATIENCE: Duration = Duration::from_secs(15);

/// A connection to a relay, reading responses whole.
pub struct Connection {
    stream: BufReader<TcpStream>,
}

/// A response read off the wire.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Lower-case names, values as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    /// The first value of a header, by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Connection {
    /// Connects to the relay at `base` (`http://host:port`).
    pub async fn open(base: &str) -> Connection {
        let address = base.trim_start_matches("http://").trim_end_matches('/');
        let stream = TcpStream::connect(address)
            .await
            .expect("the relay accepts");
        Connection {
            stream: BufReader::new(stream),
        }
    }

    /// Sends `request` as written (request line, headers, blank line, body) and reads the answer.
    pub async fn exchange(&mut self, request: &str) -> Answer {
        let stream = self.stream.get_mut();
        stream.write_all(request.as_bytes()).await.expect("sent");
        tokio::time::timeout(PATIENCE, self.answer())
            .await
            .expect("the relay answers in time")
    }

    /// Sends `requests` in one write, before any answer (pipelining), and reads an answer for each.
    pub async fn pipeline(&mut self, requests: &[String]) -> Vec<Answer> {
        let stream = self.stream.get_mut();
        stream
            .write_all(requests.concat().as_bytes())
            .await
            .expect("sent");
        let mut answers = Vec::new();
        for _ in requests {
            let answer = tokio::time::timeout(PATIENCE, self.answer()).await;
            answers.push(answer.expect("the relay answers in time"));
        }
        answers
    }

    async fn answer(&mut self) -> Answer {
        let mut line = String::new();
        self.stream
            .read_line(&mut line)
            .await
            .expect("a status line");
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {line:?}"));
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.stream.read_line(&mut line).await.expect("a header");
            let Some((name, value)) = line.trim_end().split_once(':') else {
                break;
            };
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        let mut answer = Answer {
            status,
            headers,
            body: Vec::new(),
        };
        let length = answer
            .header("content-length")
            .map_or(0, |v| v.parse().expect("a length"));
        answer.body.resize(length, 0);
        self.stream
            .read_exact(&mut answer.body)
            .await
            .expect("the body");
        answer
    }

    /// Sends `request`, then shuts the sending side (a half-close: `nc -N` does so, and the
    /// client still reads), and reads the answer, if one comes before the relay closes.
    pub async fn half_closed(mut self, request: &str) -> Option<Answer> {
        let stream = self.stream.get_mut();
        stream.write_all(request.as_bytes()).await.expect("sent");
        stream.shutdown().await.expect("the sending side shut");
        let waiting = tokio::time::timeout(PATIENCE, self.stream.fill_buf()).await;
        let closed = waiting
            .expect("the relay answers or closes in time")
            .is_ok_and(<[u8]>::is_empty);
        if closed {
            return None;
        }
        Some(
            tokio::time::timeout(PATIENCE, self.answer())
                .await
                .expect("the relay answers in time"),
        )
    }

    /// Whether the relay closed the connection (rather than sending anything more).
    pub async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(PATIENCE, self.stream.read_to_end(&mut rest)).await;
        matches!(read, Ok(Ok(0)))
    }
}
