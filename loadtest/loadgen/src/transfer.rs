//! `transfer`: a large download (`GET {prefix}/big?mb=N`) and a large upload (`PUT {prefix}/sink`
//! with N MiB, sent after `Expect: 100-continue` as curl does) through the relay, one after the
//! other, each on a fresh connection. Bodies are streamed and counted, never held; the upstream
//! answers an upload with the byte count it received, which must match. The relay's VmRSS
//! (`--pid`) is sampled every 100 ms. Then the upload once more without `Expect`
//! (`plain_upload_*`: status and check only).

use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::util::{rss_kib, Args};

static BLOCK: [u8; 64 * 1024] = [b'u'; 64 * 1024];

pub async fn run(args: &Args) {
    let addr: String = args.get("addr", "127.0.0.1:8080".to_string());
    let prefix: String = args.get("prefix", "/r/svc".to_string());
    let mb: u64 = args.get("mb", 100);
    let pid: u32 = args.get("pid", 0);
    let limit = Duration::from_secs(args.get("seconds", 60));
    let bytes = mb << 20;
    let rss_before = rss_kib(pid).unwrap_or(0);

    let path = format!("{prefix}/big?mb={mb}");
    let download = sampled(pid, exchange(&addr, "GET", &path, 0, false, limit)).await;
    let path = format!("{prefix}/sink");
    let upload = sampled(pid, exchange(&addr, "PUT", &path, bytes, true, limit)).await;
    let plain = sampled(pid, exchange(&addr, "PUT", &path, bytes, false, limit)).await;

    let mut line = format!("RESULT scenario=transfer mb={mb} rss_before_kib={rss_before}");
    let runs = [
        ("download", download),
        ("upload", upload),
        ("plain_upload", plain),
    ];
    for (name, (result, max_rss)) in runs {
        let (status, received, body, secs) = match result {
            Ok(t) => (t.status, t.received, t.body, t.seconds),
            Err(e) => (0, 0, e.to_string(), 0.0),
        };
        // The download must bring N MiB; the upload's answer is the byte count the upstream got.
        let (ok, body) = match name {
            "download" => (status == 200 && received == bytes, "-".to_string()),
            _ => (status == 200 && body == bytes.to_string(), body),
        };
        let body = body.replace(' ', "_"); // one field of the RESULT line
        line += &format!(
            " {name}_status={status} {name}_bytes={received} {name}_answer={body} {name}_ok={ok} \
             {name}_seconds={secs:.2} {name}_mib_s={:.0} {name}_max_rss_kib={max_rss}",
            mb as f64 / secs
        );
    }
    println!("{line}");
}

/// `future`'s output, with the highest VmRSS of `pid` seen every 100 ms while it ran.
async fn sampled<F: Future>(pid: u32, future: F) -> (F::Output, u64) {
    let mut max = rss_kib(pid).unwrap_or(0);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tokio::pin!(future);
    loop {
        tokio::select! {
            out = &mut future => return (out, max.max(rss_kib(pid).unwrap_or(0))),
            _ = tick.tick() => max = max.max(rss_kib(pid).unwrap_or(0)),
        }
    }
}

struct Transfer {
    status: u16,
    /// Response body bytes.
    received: u64,
    /// The response body as text when short (the upload's byte count).
    body: String,
    seconds: f64,
}

/// Sends `method path` with `upload` bytes of body (after a 100 Continue if `expect`), reads the
/// response and counts its body.
async fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    upload: u64,
    expect: bool,
    limit: Duration,
) -> io::Result<Transfer> {
    let work = async {
        let started = Instant::now();
        let tcp = TcpStream::connect(addr).await?;
        let (read, mut write) = tcp.into_split();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {upload}\r\n\
             x-backstream-request-timeout: {}s\r\n{}\r\n",
            limit.as_secs(),
            if expect {
                "Expect: 100-continue\r\n"
            } else {
                ""
            }
        );
        write.write_all(head.as_bytes()).await?;
        let mut read = BufReader::with_capacity(64 * 1024, read);
        let mut line = String::new();
        if expect {
            read.read_line(&mut line).await?;
            if !line.starts_with("HTTP/1.1 100") {
                return Err(io::Error::other(format!(
                    "no 100 Continue: {}",
                    line.trim_end()
                )));
            }
            while read.read_line(&mut line).await? > 0 && !line.ends_with("\r\n\r\n") {}
            line.clear();
        }
        let mut left = upload;
        while left > 0 {
            let n = left.min(BLOCK.len() as u64);
            write.write_all(&BLOCK[..n as usize]).await?;
            left -= n;
        }
        read.read_line(&mut line).await?;
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let (mut length, mut chunked) = (None, false);
        loop {
            line.clear();
            if read.read_line(&mut line).await? == 0 || line.trim_end().is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap_or((&line, ""));
            let (name, value) = (name.to_ascii_lowercase(), value.trim().to_ascii_lowercase());
            match name.as_str() {
                "content-length" => length = value.parse::<u64>().ok(),
                "transfer-encoding" => chunked = value.contains("chunked"),
                _ => {}
            }
        }
        let mut sink = Counter::default();
        if chunked {
            loop {
                line.clear();
                read.read_line(&mut line).await?;
                let size = u64::from_str_radix(line.trim_end().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| io::Error::other("bad chunk size"))?;
                if size == 0 {
                    break;
                }
                tokio::io::copy(&mut (&mut read).take(size), &mut sink).await?;
                line.clear();
                read.read_line(&mut line).await?;
            }
        } else {
            // Content-Length, or up to the end of the connection.
            let length = length.unwrap_or(u64::MAX);
            tokio::io::copy(&mut (&mut read).take(length), &mut sink).await?;
        }
        Ok(Transfer {
            status,
            received: sink.bytes,
            body: String::from_utf8_lossy(&sink.start).into_owned(),
            seconds: started.elapsed().as_secs_f64(),
        })
    };
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timeout")))
}

/// An `AsyncWrite` that counts bytes and keeps the first 64.
#[derive(Default)]
struct Counter {
    bytes: u64,
    start: Vec<u8>,
}

impl tokio::io::AsyncWrite for Counter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let keep = buf.len().min(64usize.saturating_sub(self.start.len()));
        self.start.extend_from_slice(&buf[..keep]);
        self.bytes += buf.len() as u64;
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
