//! The HTTP service behind the agent in the end-to-end tests: a hyper server inside the test, on a
//! port of its own, whose answers depend on the path.
//!
//! - `/sleep…`: counts itself in [`Upstream::sleeping`], waits two seconds, then answers `200 late`.
//! - `/hang`: counts itself in [`Upstream::hanging`] while in progress, and never answers.
//! - `/hang-body`: answers `200` and a body that never comes, counted in [`Upstream::hanging`]
//!   until hyper drops it.
//! - `/blob?bytes=N`: `N` bytes of [`blob`], streamed in 64 KiB chunks.
//! - `/sha256`: reads the request body as it streams and answers `{"len", "sha256"}`.
//! - `/mirror…`: answers the request body as it is.
//! - `/many-headers`: `200 many` with 150 headers `x-h-0`… beyond hyper's default limit.
//! - `/redirect`: `302` to an address where no one listens.
//! - `/close`: `200 bye` with `Connection: close`, then closes the connection.
//! - anything else: [`Echo`] as JSON, with status `x-echo-status` (200 without it), headers
//!   `X-Upstream-Id`, `X-Reply: yes` and two `Set-Cookie`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

type Body = BoxBody<Bytes, Infallible>;

/// A running upstream; it serves until the test's runtime ends.
pub struct Upstream {
    pub port: u16,
    /// How many `/sleep` requests have arrived.
    pub sleeping: watch::Sender<u64>,
    /// How many `/hang` requests are in progress (arrived, and their connection still open).
    pub hanging: watch::Sender<u64>,
    /// How many requests have arrived.
    pub arrived: Arc<AtomicU64>,
    /// How many connections have been accepted.
    pub connections: Arc<AtomicU64>,
    tls: bool,
}

impl Upstream {
    /// Starts an upstream that says `id` in `X-Upstream-Id` and in its echoes.
    pub async fn start(id: &str) -> Upstream {
        Upstream::serve(id, None).await
    }

    /// The same over TLS, with the certificate and key in PEM files (a certificate for
    /// `localhost`).
    pub async fn start_tls(id: &str, cert: &std::path::Path, key: &std::path::Path) -> Upstream {
        let certs = CertificateDer::pem_file_iter(cert)
            .expect("the certificate file reads")
            .collect::<Result<Vec<_>, _>>()
            .expect("the certificate parses");
        let key = PrivateKeyDer::from_pem_file(key).expect("the key parses");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("the certificate and key match");
        Upstream::serve(id, Some(TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn serve(id: &str, tls: Option<TlsAcceptor>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sleeping = watch::Sender::new(0);
        let hanging = watch::Sender::new(0);
        let id: Arc<str> = id.into();
        let arrived = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let (count, accepted) = (arrived.clone(), connections.clone());
        let waits = Waits {
            sleeping: sleeping.clone(),
            hanging: hanging.clone(),
        };
        let secure = tls.is_some();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let (id, waits, count) = (id.clone(), waits.clone(), count.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_connection(tcp, id, waits, count).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                serve_connection(stream, id, waits, count).await;
                            }
                        }
                    }
                });
            }
        });
        Upstream {
            port,
            sleeping,
            hanging,
            arrived,
            connections,
            tls: secure,
        }
    }

    /// How many requests have arrived so far.
    pub fn arrived(&self) -> u64 {
        self.arrived.load(Ordering::SeqCst)
    }

    /// How many connections have been accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// The agent's `--upstream`: `http://127.0.0.1:PORT`, or `https://localhost:PORT` over TLS.
    pub fn url(&self) -> String {
        match self.tls {
            false => format!("http://127.0.0.1:{}", self.port),
            true => format!("https://localhost:{}", self.port),
        }
    }
}

/// One `/hang` request in progress.
struct Hanging(watch::Sender<u64>);

impl Drop for Hanging {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// The counts of requests that wait, which tests await.
#[derive(Clone)]
struct Waits {
    sleeping: watch::Sender<u64>,
    hanging: watch::Sender<u64>,
}

async fn serve_connection<S>(stream: S, id: Arc<str>, waits: Waits, count: Arc<AtomicU64>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        count.fetch_add(1, Ordering::SeqCst);
        let (id, waits) = (id.clone(), waits.clone());
        async move { Ok::<_, Infallible>(answer(request, &id, &waits).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// What the upstream received, as its echo reports it.
#[derive(Debug)]
pub struct Echo {
    pub upstream: String,
    pub method: String,
    /// Path and query as the upstream's request line had them.
    pub uri: String,
    /// Every header in order, names lower-case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Echo {
    /// Parses an echo answer.
    #[track_caller]
    pub fn parse(body: &[u8]) -> Echo {
        let json: serde_json::Value = serde_json::from_slice(body)
            .unwrap_or_else(|e| panic!("not an echo ({e}): {}", String::from_utf8_lossy(body)));
        let text = |key: &str| json[key].as_str().unwrap_or_default().to_owned();
        let headers = json["headers"]
            .as_array()
            .expect("an echo lists headers")
            .iter()
            .map(|pair| {
                let text = |i: usize| pair[i].as_str().unwrap_or_default().to_owned();
                (text(0), text(1))
            })
            .collect();
        Echo {
            upstream: text("upstream"),
            method: text("method"),
            uri: text("uri"),
            headers,
            body: text("body"),
        }
    }

    /// Every value of header `name` (lower-case), in order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The one value of header `name`; panics if it is absent or repeated.
    #[track_caller]
    pub fn one(&self, name: &str) -> &str {
        match self.all(name)[..] {
            [value] => value,
            ref other => panic!("header {name}: {other:?} in {self:?}"),
        }
    }

    /// Whether header `name` reached the upstream at all.
    pub fn has(&self, name: &str) -> bool {
        !self.all(name).is_empty()
    }
}

async fn answer(request: Request<Incoming>, id: &str, waits: &Waits) -> Response<Body> {
    let path = request.uri().path().to_owned();
    if path == "/hang" {
        waits.hanging.send_modify(|n| *n += 1);
        // Counted out when hyper drops the request: its connection closed.
        let _hanging = Hanging(waits.hanging.clone());
        return std::future::pending().await;
    }
    if path == "/hang-body" {
        waits.hanging.send_modify(|n| *n += 1);
        let hanging = Hanging(waits.hanging.clone());
        let never = futures_util::stream::unfold(hanging, |hanging| async move {
            std::future::pending::<()>().await;
            Some((Ok(Frame::data(Bytes::new())), hanging))
        });
        return Response::new(BodyExt::boxed(StreamBody::new(never)));
    }
    if path.starts_with("/sleep") {
        waits.sleeping.send_modify(|n| *n += 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        return whole(200, "late");
    }
    if path == "/many-headers" {
        let mut response = Response::builder();
        for i in 0..150 {
            response = response.header(format!("x-h-{i}"), i);
        }
        return response
            .body(Full::new(Bytes::from("many")).boxed())
            .expect("a valid response");
    }
    if path == "/redirect" {
        // Somewhere no one listens: followed by the relay, it would fail.
        return Response::builder()
            .status(302)
            .header("Location", "http://127.0.0.1:9/elsewhere")
            .body(Full::new(Bytes::new()).boxed())
            .expect("a valid response");
    }
    if path == "/forged-mark" {
        // The relays' own mark between instances, as if this service spoke in their name.
        return Response::builder()
            .status(422)
            .header("x-burrow-hop", "refused")
            .body(Full::new(Bytes::from("the service's own 422")).boxed())
            .expect("a valid response");
    }
    if path == "/close" {
        return Response::builder()
            .header("Connection", "close")
            .body(Full::new(Bytes::from("bye")).boxed())
            .unwrap();
    }
    if path == "/blob" {
        let len = request
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("bytes="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let data = Bytes::from(blob(len));
        let chunks = (0..len.div_ceil(65_536)).map(move |i| {
            Ok(Frame::data(
                data.slice(i * 65_536..len.min((i + 1) * 65_536)),
            ))
        });
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        return Response::builder()
            .header("Content-Type", "application/octet-stream")
            .body(BodyExt::boxed(body))
            .unwrap();
    }
    if path == "/sha256" {
        let mut body = request.into_body();
        let (mut hash, mut len) = (Sha256::new(), 0usize);
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return whole(400, "the request body failed");
            };
            if let Some(data) = frame.data_ref() {
                hash.update(data);
                len += data.len();
            }
        }
        let json = serde_json::json!({"len": len, "sha256": hex::encode(hash.finalize())});
        return whole(200, json.to_string());
    }
    let method = request.method().to_string();
    let uri = request.uri().to_string();
    let status = request
        .headers()
        .get("x-echo-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let headers: Vec<_> = request
        .headers()
        .iter()
        .map(|(n, v)| [n.as_str().to_owned(), v.to_str().unwrap_or("?").to_owned()])
        .collect();
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return whole(400, "the request body failed"),
    };
    if path.starts_with("/mirror") {
        return whole(200, body);
    }
    let json = serde_json::json!({
        "upstream": id,
        "method": method,
        "uri": uri,
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .header("X-Upstream-Id", id)
        .header("X-Reply", "yes")
        .header("Set-Cookie", "a=1")
        .header("Set-Cookie", "b=2")
        .body(Full::new(Bytes::from(json.to_string())).boxed())
        .unwrap()
}

fn whole(status: u16, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Full::new(body.into()).boxed())
        .unwrap()
}

/// `len` pseudo-random bytes, the same every time (xorshift64), so nothing periodic hides a
/// reordered or repeated chunk.
pub fn blob(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}
