//! `upstream`: the HTTP/1.1 service behind `burrow agent` in the route scenario, on
//! 127.0.0.1:`--port` for at most `--seconds`. `GET /small` → `Hello, world!` (13 bytes);
//! `GET /big?mb=N` → N MiB streamed with a Content-Length; `PUT /sink` reads the body
//! (Content-Length or chunked), discards it and answers with the byte count as text; anything
//! else → 404. Keep-alive connections; prints `RESULT` with the totals when the time is up.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};

use crate::util::Args;

static REQUESTS: AtomicU64 = AtomicU64::new(0);
static SUNK: AtomicU64 = AtomicU64::new(0);
static SENT_BIG: AtomicU64 = AtomicU64::new(0);

/// What `/big` sends, over and over.
static BLOCK: [u8; 64 * 1024] = [b'x'; 64 * 1024];

pub async fn run(args: &Args) {
    let port: u16 = args.get("port", 8081);
    let seconds: u64 = args.get("seconds", 300);
    let bound = TcpListener::bind(("127.0.0.1", port)).await;
    let listener = crate::util::or_exit(bound, "bind the upstream port");
    let accept = async {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(connection(tcp));
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(seconds), accept).await;
    println!(
        "RESULT scenario=upstream requests={} big_bytes_sent={} sink_bytes={}",
        REQUESTS.load(Ordering::Relaxed),
        SENT_BIG.load(Ordering::Relaxed),
        SUNK.load(Ordering::Relaxed)
    );
}

/// Serves one keep-alive connection until the client closes it (or an error).
async fn connection(tcp: TcpStream) -> io::Result<()> {
    let (read, mut write) = tcp.into_split();
    let mut read = BufReader::with_capacity(64 * 1024, read);
    let mut line = String::new();
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut words = line.split_whitespace();
        let method = words.next().unwrap_or_default().to_string();
        let target = words.next().unwrap_or_default().to_string();
        let (mut length, mut chunked, mut close) = (0u64, false, false);
        loop {
            line.clear();
            read.read_line(&mut line).await?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap_or((header, ""));
            let value = value.trim().to_ascii_lowercase();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().unwrap_or(0),
                "transfer-encoding" => chunked = value.contains("chunked"),
                "connection" => close = value == "close",
                "expect" if value == "100-continue" => {
                    write.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?
                }
                _ => {}
            }
        }
        let received = discard_body(&mut read, length, chunked).await?;
        REQUESTS.fetch_add(1, Ordering::Relaxed);
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        match (method.as_str(), path) {
            ("GET", "/small") => respond(&mut write, 200, b"Hello, world!").await?,
            ("GET", "/big") => {
                let mb: u64 = query
                    .strip_prefix("mb=")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                let mut left = mb << 20;
                write.write_all(&head(200, left)).await?;
                while left > 0 {
                    let n = left.min(BLOCK.len() as u64);
                    write.write_all(&BLOCK[..n as usize]).await?;
                    left -= n;
                    SENT_BIG.fetch_add(n, Ordering::Relaxed);
                }
            }
            ("PUT" | "POST", "/sink") => {
                SUNK.fetch_add(received, Ordering::Relaxed);
                respond(&mut write, 200, received.to_string().as_bytes()).await?
            }
            _ => respond(&mut write, 404, b"").await?,
        }
        if close {
            return Ok(());
        }
    }
}

/// Writes a whole response in one write.
async fn respond(write: &mut OwnedWriteHalf, status: u16, body: &[u8]) -> io::Result<()> {
    let mut response = head(status, body.len() as u64);
    response.extend_from_slice(body);
    write.write_all(&response).await
}

fn head(status: u16, length: u64) -> Vec<u8> {
    let reason = if status == 200 { "OK" } else { "Not Found" };
    format!("HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {length}\r\n\r\n")
        .into_bytes()
}

/// Reads and drops a request body; its length in bytes.
async fn discard_body(
    read: &mut (impl AsyncBufRead + Unpin),
    length: u64,
    chunked: bool,
) -> io::Result<u64> {
    if !chunked {
        return tokio::io::copy(&mut (&mut *read).take(length), &mut tokio::io::sink()).await;
    }
    let (mut total, mut line) = (0, String::new());
    loop {
        line.clear();
        read.read_line(&mut line).await?;
        let size = line.trim_end().split(';').next().unwrap_or_default();
        let size = u64::from_str_radix(size, 16).map_err(|_| io::Error::other("bad chunk size"))?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                line.clear();
                if read.read_line(&mut line).await? == 0 || line.trim_end().is_empty() {
                    return Ok(total);
                }
            }
        }
        total += tokio::io::copy(&mut (&mut *read).take(size), &mut tokio::io::sink()).await?;
        line.clear();
        read.read_line(&mut line).await?;
    }
}
