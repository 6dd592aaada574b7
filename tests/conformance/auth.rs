//! Authorization: bearer token, public tunnels and webhook signatures.

use hmac::{Hmac, Mac};
use reqwest::Method;
use sha2::Sha256;

use super::routes::{assert_cors, assert_preflight};
use crate::support::raw::Connection;
use crate::support::says::ACCESS_DENIED;
use crate::support::{tunnel_id, Backend};

/// Burrow: a request head that does not parse is answered 400, and the debug log says why
/// without the bytes read, which hold the client's token (Pingora's error context has them).
pub(super) async fn unreadable_heads_are_logged_without_their_bytes(backend: Backend) {
    let token = "s3cr3t-token-in-a-head";
    let relay = backend.start(&[("TUNNEL_ACCESS_TOKEN", token), ("RUST_LOG", "debug")]);
    let path = format!("/t/{}/len", tunnel_id("unlogged"));
    let mut connection = Connection::open(&relay.base).await;
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nX-A: a\x7fb\r\n\r\n"
    );
    assert_eq!(connection.exchange(&head).await.status, 400);
    let said = "could not read a request";
    let logged = crate::support::wait_until(std::time::Duration::from_secs(5), || {
        relay.output().contains(said)
    });
    assert!(logged, "{}", relay.output());
    assert!(!relay.output().contains(token), "{}", relay.output());
}

/// With TUNNEL_ACCESS_TOKEN only `Authorization: Bearer <token>` gets in; others get 403.
pub(super) async fn access_token_guards_tunnels(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_ACCESS_TOKEN", "tok")]);
    let api = relay.client();
    let path = format!("/t/{}", tunnel_id("token"));
    let denied = api
        .post(&path, "anonymous")
        .await
        .expect_error(403, ACCESS_DENIED);
    assert_cors(&denied);
    api.with_bearer("wrong")
        .post(&path, "x")
        .await
        .expect_error(403, ACCESS_DENIED);
    let bare = api
        .request(Method::POST, &path)
        .header("Authorization", "tok")
        .body("x");
    api.send(bare).await.expect_error(403, ACCESS_DENIED);
    api.with_bearer("tok")
        .post(&path, "welcome")
        .await
        .expect(201);
    assert_eq!(
        api.with_bearer("tok").get(&path).await.expect(200).text(),
        "welcome"
    );
    // Refused before the body is asked for: no `100 Continue`, and the connection is closed,
    // its body never read.
    let mut connection = Connection::open(&relay.base).await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n"
    );
    let answer = connection.exchange(&head).await;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(connection.closed().await);
    // A signature is no reason to read the body where signatures are not checked.
    let mut connection = Connection::open(&relay.base).await;
    let signed = head.replace("\r\n\r\n", "\r\nX-Hub-Signature-256: sha256=00\r\n\r\n");
    let answer = connection.exchange(&signed).await;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(connection.closed().await);
}

/// Authorization covers every `/t/` route, while `/health`, `/demo/` and preflights stay open.
pub(super) async fn auth_covers_every_tunnel_route(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_ACCESS_TOKEN", "tok")]);
    let (anonymous, member) = (relay.client(), relay.client().with_bearer("tok"));
    let t = tunnel_id("guarded");
    let id = member.produce(&t, "secret").await;
    member.consume(&t, "?pending").await.expect(200);
    let routes = [
        (Method::GET, format!("/t/{t}")),
        (Method::GET, format!("/t/{t}/poll?timeout=0")),
        (Method::GET, format!("/t/{t}/len")),
        (Method::DELETE, format!("/t/{t}/all")),
        (Method::GET, format!("/t/{t}/{id}")),
        (Method::DELETE, format!("/t/{t}/{id}")),
        (Method::POST, format!("/t/{t}/{id}/reply")),
        (Method::GET, format!("/t/{t}/{id}/reply")),
        (Method::GET, format!("/t/{t}/{id}/reply/poll?timeout=0")),
    ];
    for (method, path) in routes {
        let response = anonymous
            .send(anonymous.request(method.clone(), &path).body("x"))
            .await;
        assert_eq!(response.status, 403, "{method} {path}: {response:?}");
        response.expect_error(403, ACCESS_DENIED);
    }
    assert_eq!(
        member.status(&t, &id).await,
        202,
        "denied requests changed the tunnel"
    );
    assert_eq!(member.len(&t).await, 1);
    // Access comes before parameters and methods, as in the original: only a member learns
    // what is wrong with its request.
    let malformed = [
        (Method::POST, format!("/t/{t}?limit=abc"), 400),
        (Method::GET, format!("/t/{t}?pending=true"), 400),
        (Method::GET, format!("/t/{t}/poll?timeout=soon"), 400),
        (Method::PUT, format!("/t/{t}"), 405),
    ];
    for (method, path, status) in malformed {
        let request = |client: &crate::support::client::Client| {
            client.request(method.clone(), &path).body("x")
        };
        let response = anonymous.send(request(&anonymous)).await;
        assert_eq!(response.status, 403, "{method} {path}: {response:?}");
        let response = member.send(request(&member)).await;
        assert_eq!(response.status, status, "{method} {path}: {response:?}");
    }

    anonymous.get("/health").await.expect(200);
    anonymous.get("/demo/").await.expect(200);
    let preflight = anonymous
        .request(Method::OPTIONS, &format!("/t/{t}"))
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization, content-type",
        );
    assert_preflight(&anonymous.send(preflight).await.expect(204));
}

/// TUNNEL_PUBLIC_IDS opens exactly the listed tunnels to requests without credentials.
pub(super) async fn public_ids_are_open(backend: Backend) {
    let (open, other) = (tunnel_id("pub1"), tunnel_id("pub2"));
    let public_ids = format!("{open},{other}");
    let relay = backend.start(&[("TUNNEL_PUBLIC_IDS", &public_ids)]);
    let api = relay.client();
    for t in [&open, &other] {
        api.produce(t, "public").await;
        assert_eq!(api.consume(t, "").await.expect(200).text(), "public");
    }
    let closed = format!("/t/{}", tunnel_id("private"));
    api.post(&closed, "x")
        .await
        .expect_error(403, ACCESS_DENIED);
    api.get(&closed).await.expect_error(403, ACCESS_DENIED);
}

/// TUNNEL_SIGNATURE_SECRET admits a POST whose `X-Hub-Signature-256` signs its non-empty body.
pub(super) async fn signature_guards_produce(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_SIGNATURE_SECRET", "sec")]);
    let api = relay.client();
    let t = tunnel_id("signed");
    let path = format!("/t/{t}");
    let request = |method: Method, signature: String, body: &'static str| {
        api.request(method, &path)
            .header("X-Hub-Signature-256", signature)
            .body(body)
    };
    let signed = |signature, body| request(Method::POST, signature, body);
    api.send(signed(sign("sec", b"hook"), "hook"))
        .await
        .expect(201);
    let rejected = [
        signed(sign("other", b"hook"), "hook"),
        signed(sign("sec", b""), ""),
        signed(sign("sec", b"another body"), "hook"),
        signed(hex::encode(sign_bytes("sec", b"hook")), "hook"),
    ];
    for request in rejected {
        api.send(request).await.expect_error(403, ACCESS_DENIED);
    }
    api.post(&path, "unsigned")
        .await
        .expect_error(403, ACCESS_DENIED);
    api.get(&path).await.expect_error(403, ACCESS_DENIED);
    // A value not shaped as `sha256=<hex digest>` can never pass: refused as an unsigned
    // request is, before its body is asked for, and before its bad parameters are told.
    for shapeless in ["garbage", "sha256=00", "sha1=abc"] {
        for target in [path.clone(), format!("{path}?limit=x")] {
            let mut connection = Connection::open(&relay.base).await;
            let head = format!(
                "POST {target} HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\
                 X-Hub-Signature-256: {shapeless}\r\nExpect: 100-continue\r\n\r\n"
            );
            let answer = connection.exchange(&head).await;
            assert_eq!(answer.status, 403, "{shapeless} {target}: {answer:?}");
            assert!(connection.closed().await);
        }
    }

    // Any tunnel route opens to a signed body, as in the original, which checked every signed
    // request against its body: here a consume.
    let consume = |signature, body| request(Method::GET, signature, body);
    api.send(consume(sign("sec", b""), ""))
        .await
        .expect_error(403, ACCESS_DENIED);
    api.send(consume(sign("sec", b"hook"), "other"))
        .await
        .expect_error(403, ACCESS_DENIED);
    let taken = api.send(consume(sign("sec", b"take"), "take")).await;
    assert_eq!(taken.expect(200).text(), "hook");
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`, as GitHub signs webhooks.
fn sign(secret: &str, body: &[u8]) -> String {
    format!("sha256={}", hex::encode(sign_bytes(secret, body)))
}

fn sign_bytes(secret: &str, body: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}
