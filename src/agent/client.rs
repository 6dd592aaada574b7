//! The agent's HTTP/1.1 client for its one upstream: hyper's connection API over TCP (or TLS for
//! an `https://` upstream) with a stack of idle keep-alive connections. One origin only, so a
//! request costs no URL parse, pool-key lookup or proxy check: against reqwest's general client
//! this cut the agent's CPU per routed request by a quarter (docs/PERFORMANCE.md).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::MaybeTlsStream;

use crate::routing::head::{MAX_RESPONSE_HEADERS, MAX_RESPONSE_HEAD_BYTES};
use crate::routing::stream::{BodyReader, Inbound};

/// How long opening a connection to the upstream (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    idle: Mutex<Vec<SendRequest<RequestBody>>>,
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
    pub async fn connection(
        &self,
        patience: Duration,
    ) -> Result<SendRequest<RequestBody>, ClientError> {
        while let Some(mut sender) = self.checkout() {
            if sender.ready().await.is_ok() {
                return Ok(sender);
            }
        }
        self.connect(patience.min(CONNECT_TIMEOUT)).await
    }

    /// Sends `request` on `sender` (from [`Client::connection`]), or on a new connection if that
    /// one closed before taking it. The response's connection goes back to the pool through
    /// [`Client::release`] once its body has been read to the end.
    pub async fn send(
        &self,
        mut sender: SendRequest<RequestBody>,
        mut request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, SendRequest<RequestBody>), ClientError> {
        request
            .headers_mut()
            .insert(http::header::HOST, self.host.clone());
        match sender.try_send_request(request).await {
            Ok(response) => Ok((response, sender)),
            Err(mut err) => match err.take_message() {
                Some(unsent) => {
                    let mut fresh = self.connect(CONNECT_TIMEOUT).await?;
                    let response = fresh.send_request(unsent).await?;
                    Ok((response, fresh))
                }
                None => Err(err.into_error().into()),
            },
        }
    }

    /// Keeps a connection whose response was read to the end for the next request.
    pub fn release(&self, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_IDLE {
                idle.push(sender);
            }
        }
    }

    fn checkout(&self) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(sender) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    async fn connect(&self, limit: Duration) -> Result<SendRequest<RequestBody>, ClientError> {
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
        // Past hyper's default of 100: a response head with more headers is still a response.
        let (sender, connection) = http1::Builder::new()
            .max_headers(MAX_RESPONSE_HEADERS)
            .max_buf_size(MAX_RESPONSE_HEAD_BYTES)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                log::debug!("upstream connection ended: {err}");
            }
        });
        Ok(sender)
    }
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
}

impl RequestBody {
    /// No body.
    pub fn empty() -> RequestBody {
        RequestBody {
            first: None,
            rest: None,
        }
    }

    /// `first`, then the rest of the stream.
    pub fn streaming(first: Bytes, rest: BodyReader) -> RequestBody {
        RequestBody {
            first: Some(first),
            rest: Some(rest),
        }
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
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let Some(reader) = self.rest.as_mut() else {
            return Poll::Ready(None);
        };
        reader.poll_next(cx).map(|item| match item {
            Inbound::Data(chunk) => Some(Ok(Frame::data(chunk))),
            Inbound::End => {
                self.rest = None;
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
