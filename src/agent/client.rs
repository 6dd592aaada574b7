//! The agent's HTTP/1.1 client for its one upstream: hyper's connection API over TCP (or TLS for
//! an `https://` upstream) with a stack of idle keep-alive connections. One origin only, so a
//! request costs no URL parse, pool-key lookup or proxy check: against reqwest's general client
//! this cut the agent's CPU per routed request by a quarter (docs/PERFORMANCE.md).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::MaybeTlsStream;

use crate::routing::head::{MAX_RESPONSE_HEADERS, MAX_RESPONSE_HEAD_BYTES};
use crate::routing::stream::{BodyReader, Inbound};

/// How long opening a connection to the upstream (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an idle connection may take to be ready for the next request before it is closed.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// Idle connections kept beyond this many are closed.
const MAX_IDLE: usize = 256;

/// Why a request got no response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, #[source] io::Error),
    #[error("no connection to {0} within {1:?}")]
    ConnectTimeout(String, Duration),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// Keep-alive HTTP/1.1 connections to one upstream.
pub struct Client {
    /// `host:port`, dialled for every new connection.
    address: String,
    /// The `Host` header every request carries.
    host: HeaderValue,
    /// For an `https://` upstream: the TLS connector and the name its certificate must carry.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Idle connections, the most recently used last.
    idle: Mutex<Vec<Connection>>,
}

/// One connection to the upstream, closed when dropped: only [`Client::release`] keeps one, so a
/// request reset midway (its body perhaps still being sent to an upstream that stopped reading
/// it) does not leave its connection open. One dropped midway is reset (see [`Resettable`]).
pub struct Connection {
    sender: SendRequest<RequestBody>,
    /// The task that drives it: aborted to close a connection that cannot be reused.
    task: AbortHandle,
    /// Whether it served a request before: an upstream may have closed it meanwhile.
    reused: bool,
    /// Whether no exchange on it is under way (none began, or the last is complete both ways).
    idle: bool,
    /// Set to reset the connection rather than close it.
    reset: Arc<AtomicBool>,
    /// The bytes received on it so far.
    received: Arc<AtomicU64>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        if !self.idle {
            self.reset.store(true, Ordering::Relaxed);
        }
        self.task.abort();
    }
}

/// The stream under an upstream connection: counts the bytes it receives, and is reset rather
/// than closed when dropped once its [`Connection`] was given up midway: a close would queue the
/// FIN behind request bytes that an upstream which stopped reading never takes, keeping both ends
/// (and the upstream's worker) open.
struct Resettable {
    inner: MaybeTlsStream<TcpStream>,
    reset: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
}

impl Drop for Resettable {
    fn drop(&mut self) {
        if !self.reset.load(Ordering::Relaxed) {
            return;
        }
        let tcp = match &self.inner {
            MaybeTlsStream::Plain(tcp) => tcp,
            MaybeTlsStream::Rustls(tls) => tls.get_ref().0,
            _ => return,
        };
        let _ = tcp.set_zero_linger();
    }
}

impl AsyncRead for Resettable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        let received = (buf.filled().len() - before) as u64;
        self.received.fetch_add(received, Ordering::Relaxed);
        read
    }
}

impl AsyncWrite for Resettable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Client {
    /// A client for `url`'s scheme, host and port (`http` or `https`; the caller checked).
    pub fn new(url: &url::Url) -> Result<Client, String> {
        let host = url.host_str().ok_or("the upstream URL has no host")?;
        let port = url
            .port_or_known_default()
            .ok_or("the upstream URL has no port")?;
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let tls = if url.scheme() == "https" {
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|err| format!("{host:?} is not a TLS server name: {err}"))?;
            Some((tls_connector()?, name))
        } else {
            None
        };
        Ok(Client {
            address: format!("{}:{port}", host),
            host: HeaderValue::from_str(&authority).map_err(|err| err.to_string())?,
            tls,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// A connection for the next request: an idle one that is still open, or a new one opened
    /// within `patience` (at most [`CONNECT_TIMEOUT`]).
    pub async fn connection(&self, patience: Duration) -> Result<Connection, ClientError> {
        while let Some(mut connection) = self.checkout() {
            // Idle is ready at once; one still sending its last request (to an upstream that
            // stopped reading) is not worth waiting for.
            let ready = tokio::time::timeout(READY_TIMEOUT, connection.sender.ready()).await;
            if let Ok(Ok(())) = ready {
                connection.reused = true;
                return Ok(connection);
            }
        }
        self.connect(patience.min(CONNECT_TIMEOUT)).await
    }

    /// Sends `request` on `connection` (from [`Client::connection`]), or on a new connection if
    /// that one closed before taking it — or, for a request that can be sent twice (idempotent,
    /// without a body), if a connection used before broke before the answer: the upstream closed
    /// it as idle while the request was on its way, as servers' keep-alive timeouts do. The
    /// response's connection goes back to the pool through [`Client::release`] once its body
    /// has been read to the end.
    pub async fn send(
        &self,
        mut connection: Connection,
        mut request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Connection), ClientError> {
        request
            .headers_mut()
            .insert(http::header::HOST, self.host.clone());
        let again = (connection.reused && replayable(&request)).then(|| {
            let mut copy = Request::new(RequestBody::empty());
            *copy.method_mut() = request.method().clone();
            *copy.uri_mut() = request.uri().clone();
            *copy.headers_mut() = request.headers().clone();
            copy
        });
        connection.idle = false;
        let received = connection.received.load(Ordering::Relaxed);
        // What goes out again on a new connection.
        let resent = match connection.sender.try_send_request(request).await {
            Ok(response) => return Ok((response, connection)),
            Err(mut err) => {
                // Not a byte of an answer: a partial one says the upstream took the request.
                let unanswered = closed_before_answering(err.error())
                    && connection.received.load(Ordering::Relaxed) == received;
                match (err.take_message(), again) {
                    (Some(unsent), _) => unsent,
                    (None, Some(again)) if unanswered => again,
                    (None, _) => return Err(err.into_error().into()),
                }
            }
        };
        let mut fresh = self.connect(CONNECT_TIMEOUT).await?;
        fresh.idle = false;
        let response = fresh.sender.send_request(resent).await?;
        Ok((response, fresh))
    }

    /// Keeps a connection whose exchange is complete both ways for the next request; closes one
    /// whose request body was not all sent (the upstream answered without reading it): it could
    /// carry no other request before that body, which nobody waits for.
    pub fn release(&self, mut connection: Connection, body_sent: bool) {
        if !body_sent {
            return;
        }
        connection.idle = true;
        if connection.sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_IDLE {
                idle.push(connection);
            }
        }
    }

    fn checkout(&self) -> Option<Connection> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(connection) = idle.pop() {
            if !connection.sender.is_closed() {
                return Some(connection);
            }
        }
        None
    }

    async fn connect(&self, limit: Duration) -> Result<Connection, ClientError> {
        let connecting = async {
            let tcp = TcpStream::connect(&self.address).await?;
            tcp.set_nodelay(true)?;
            match &self.tls {
                None => Ok(MaybeTlsStream::Plain(tcp)),
                Some((connector, name)) => Ok(MaybeTlsStream::Rustls(
                    connector.connect(name.clone(), tcp).await?,
                )),
            }
        };
        let stream = tokio::time::timeout(limit, connecting)
            .await
            .map_err(|_| ClientError::ConnectTimeout(self.address.clone(), limit))?
            .map_err(|err| ClientError::Connect(self.address.clone(), err))?;
        let reset = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let stream = Resettable {
            inner: stream,
            reset: Arc::clone(&reset),
            received: Arc::clone(&received),
        };
        // Past hyper's default of 100: a response head with more headers is still a response.
        let (sender, connection) = http1::Builder::new()
            .max_headers(MAX_RESPONSE_HEADERS)
            .max_buf_size(MAX_RESPONSE_HEAD_BYTES)
            .handshake(TokioIo::new(stream))
            .await?;
        let task = tokio::spawn(async move {
            if let Err(err) = connection.await {
                log::debug!("upstream connection ended: {err}");
            }
        });
        Ok(Connection {
            sender,
            task: task.abort_handle(),
            reused: false,
            idle: true,
            reset,
            received,
        })
    }
}

/// Whether `request` may be sent again after an upstream may have received it: an idempotent
/// method (RFC 9110 §9.2.2) and no body, since the relay streams a body once.
fn replayable(request: &Request<RequestBody>) -> bool {
    use http::Method;
    let idempotent = [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ];
    idempotent.contains(request.method()) && hyper::body::Body::is_end_stream(request.body())
}

/// Whether `err` says the connection ended before an answer: closed, or reset.
fn closed_before_answering(err: &hyper::Error) -> bool {
    if err.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            use io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
            return matches!(io.kind(), ConnectionReset | ConnectionAborted | BrokenPipe);
        }
        source = cause.source();
    }
    false
}

/// rustls with ring and the system's root certificates, speaking HTTP/1.1.
fn tls_connector() -> Result<TlsConnector, String> {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err("no usable root certificates on this system".into());
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| err.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A request body as hyper sends it: nothing, or `first` and then what the relay sends until
/// `END`.
pub struct RequestBody {
    first: Option<Bytes>,
    rest: Option<BodyReader>,
    sent: BodySent,
    /// The length the request declared, and how much of it hyper took so far: hyper takes no
    /// more of a body than that, and so never learns of its end.
    length: Option<u64>,
    taken: u64,
}

/// Whether hyper has taken the whole of a [`RequestBody`]. Cheap to clone.
#[derive(Clone)]
pub struct BodySent(Arc<AtomicBool>);

impl BodySent {
    /// Whether the body was taken to its end.
    pub fn all(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl RequestBody {
    /// No body.
    pub fn empty() -> RequestBody {
        RequestBody {
            first: None,
            rest: None,
            sent: BodySent(Arc::new(AtomicBool::new(true))),
            length: None,
            taken: 0,
        }
    }

    /// `first`, then the rest of the stream, of `length` bytes if the request declared one.
    pub fn streaming(first: Bytes, rest: BodyReader, length: Option<u64>) -> RequestBody {
        RequestBody {
            first: Some(first),
            rest: Some(rest),
            sent: BodySent(Arc::default()),
            length,
            taken: 0,
        }
    }

    /// Counts `chunk` as taken, and the body as sent once its declared length is.
    fn took(&mut self, chunk: &Bytes) {
        self.taken += chunk.len() as u64;
        if self.length.is_some_and(|length| self.taken >= length) {
            self.sent.0.store(true, Ordering::Relaxed);
        }
    }

    /// Tells whether this body was taken to its end.
    pub fn sent(&self) -> BodySent {
        self.sent.clone()
    }
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Some(chunk) = self.first.take() {
            self.took(&chunk);
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let Some(reader) = self.rest.as_mut() else {
            return Poll::Ready(None);
        };
        reader.poll_next(cx).map(|item| match item {
            Inbound::Data(chunk) => {
                self.took(&chunk);
                Some(Ok(Frame::data(chunk)))
            }
            Inbound::End => {
                self.rest = None;
                self.sent.0.store(true, Ordering::Relaxed);
                None
            }
            Inbound::Reset(reason) => Some(Err(io::Error::other(reason))),
            Inbound::Response(_) => Some(Err(io::Error::other("a RESPONSE from the relay"))),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}
