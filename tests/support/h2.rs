//! One HTTP/2 request sent by hand over h2c, for what a client library never sends: a request body
//! that ends in trailers.

use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;

/// How long a test waits for the answer before failing.
const PATIENCE: Duration = Duration::from_secs(15);

/// Sends `method path` with `headers` and `body` (none when empty) to the relay at `base`
/// (`http://IP:PORT`) over a new h2c connection, ending the request with a trailer instead of an
/// empty end of stream; answers the status and the body, or panics after 15 s.
pub async fn with_trailers(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let exchange = async {
        let address = base.trim_start_matches("http://");
        let socket = TcpStream::connect(address)
            .await
            .expect("the relay accepts");
        let (client, connection) = h2::client::handshake(socket)
            .await
            .expect("an h2c handshake");
        tokio::spawn(connection);
        let mut client = client.ready().await.expect("the connection takes a stream");
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("{base}{path}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(()).expect("a valid request");
        let (response, mut stream) = client.send_request(request, false).expect("sent");
        if !body.is_empty() {
            let data = Bytes::copy_from_slice(body.as_bytes());
            stream.send_data(data, false).expect("the body is sent");
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-trailer", http::HeaderValue::from_static("1"));
        stream
            .send_trailers(trailers)
            .expect("the trailers are sent");
        let response = response.await.expect("an answer");
        let status = response.status().as_u16();
        let mut received = response.into_body();
        let mut text = Vec::new();
        while let Some(chunk) = received.data().await {
            let chunk = chunk.expect("the body is read");
            let _ = received.flow_control().release_capacity(chunk.len());
            text.extend_from_slice(&chunk);
        }
        (status, String::from_utf8_lossy(&text).into_owned())
    };
    tokio::time::timeout(PATIENCE, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {path} with trailers: no answer in {PATIENCE:?}"))
}
