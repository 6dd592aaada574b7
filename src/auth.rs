//! Authorization, as http-event-relay does it: a request passes if its tunnel is public, if it
//! carries the bearer token, or if its body is signed (`X-Hub-Signature-256`, GitHub-style).
//! Secrets are compared in constant time and never logged.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;

/// What a request presents.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// The `Authorization` header.
    pub authorization: Option<&'a [u8]>,
    /// The `X-Hub-Signature-256` header.
    pub signature: Option<&'a [u8]>,
}

/// The relay's authorization rules.
#[derive(Debug, Clone)]
pub struct Auth {
    config: AuthConfig,
}

impl Auth {
    /// Rules from configuration; everything passes when none is set.
    pub fn new(config: AuthConfig) -> Auth {
        Auth { config }
    }

    /// Whether authorization is on at all.
    pub fn enabled(&self) -> bool {
        self.config.enabled()
    }

    /// Whether a request's body takes part in its authorization: signatures are checked
    /// (`TUNNEL_SIGNATURE_SECRET`) and it carries one shaped as `sha256=<hex digest>`. One shaped
    /// otherwise can never pass, so such a request is refused as an unsigned one is.
    pub fn checks_signature_of(&self, credentials: Credentials<'_>) -> bool {
        self.config.signature_secret.is_some()
            && credentials.signature.and_then(signature_digest).is_some()
    }

    /// Whether `name` is open to everyone.
    pub fn is_public(&self, name: &str) -> bool {
        self.config.public_ids.contains(name)
    }

    /// Whether a request for `name` (a tunnel id, queue or agent name) with `body` may pass.
    pub fn allows(&self, name: &str, credentials: Credentials<'_>, body: &[u8]) -> bool {
        if !self.config.enabled() || self.config.public_ids.contains(name) {
            return true;
        }
        self.token_matches(credentials.authorization)
            || self.signature_matches(credentials.signature, body)
    }

    /// Whether a request that only the bearer token opens (one spanning every name) may pass.
    pub fn allows_token(&self, credentials: Credentials<'_>) -> bool {
        !self.config.enabled() || self.token_matches(credentials.authorization)
    }

    /// Whether an `Authorization` value carries the relay's own token, which is never passed on:
    /// as `Bearer <token>` or bare, alone or among credentials a proxy joined with commas.
    pub fn carries_relay_token(&self, authorization: &[u8]) -> bool {
        let Some(token) = &self.config.token else {
            return false;
        };
        // A token with commas of its own spans as many more of the comma-separated pieces.
        let span = token.bytes().filter(|&b| b == b',').count() + 1;
        let commas = authorization.iter().enumerate().filter(|(_, &b)| b == b',');
        let starts: Vec<usize> = std::iter::once(0)
            .chain(commas.map(|(at, _)| at + 1))
            .collect();
        (0..starts.len()).any(|first| {
            // The run of pieces ends at the comma before the next run's first piece, or at the end.
            let end = match starts.get(first + span) {
                Some(next) => next - 1,
                None if first + span == starts.len() => authorization.len(),
                None => return false,
            };
            let part = authorization[starts[first]..end].trim_ascii();
            self.token_matches(Some(part)) || self.token_equals(part)
        })
    }

    fn token_matches(&self, authorization: Option<&[u8]>) -> bool {
        authorization
            .and_then(bearer_token)
            .is_some_and(|given| self.token_equals(given))
    }

    /// Whether `given` is the token, compared in constant time.
    fn token_equals(&self, given: &[u8]) -> bool {
        let Some(expected) = &self.config.token else {
            return false;
        };
        // Comparing digests keeps the comparison constant-time even in the token's length.
        let expected = Sha256::digest(expected.as_bytes());
        let given = Sha256::digest(given);
        expected.ct_eq(&given).into()
    }

    fn signature_matches(&self, header: Option<&[u8]>, body: &[u8]) -> bool {
        let (Some(secret), Some(header)) = (&self.config.signature_secret, header) else {
            return false;
        };
        if body.is_empty() {
            return false;
        }
        let Some(signature) = signature_digest(header) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
            return false;
        };
        mac.update(body);
        mac.verify_slice(&signature).is_ok()
    }
}

/// The digest of `sha256=<hex>` (in hex of either case, blanks around it allowed), if the
/// value is shaped so.
fn signature_digest(header: &[u8]) -> Option<Vec<u8>> {
    let digest = hex::decode(header.strip_prefix(b"sha256=")?.trim_ascii()).ok()?;
    (digest.len() == 32).then_some(digest)
}

/// The token of `Bearer <token>`; the scheme is case-insensitive (RFC 9110).
fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    let header = header.trim_ascii();
    let (scheme, token) = header.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || !token.first()?.is_ascii_whitespace() {
        return None;
    }
    Some(token.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(token: Option<&str>, secret: Option<&str>, public: &[&str]) -> Auth {
        Auth::new(AuthConfig {
            token: token.map(String::from),
            signature_secret: secret.map(String::from),
            public_ids: public.iter().map(|s| s.to_string()).collect(),
            public_ids_set: !public.is_empty(),
        })
    }

    fn with_token(header: &str) -> Credentials<'_> {
        Credentials {
            authorization: Some(header.as_bytes()),
            signature: None,
        }
    }

    fn sign(secret: &str, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    /// The relay's token is recognised however a request carries it, so that it is never passed
    /// on: bearer or bare, among comma-joined credentials; other credentials are not it.
    #[test]
    fn relay_token_is_recognised() {
        let a = auth(Some("sekret"), None, &[]);
        for carried in [
            "Bearer sekret",
            "bearer   sekret ",
            "sekret",
            "Bearer other, Bearer sekret",
            "Bearer sekret,Basic abc",
        ] {
            assert!(a.carries_relay_token(carried.as_bytes()), "{carried}");
        }
        for other in ["Bearer other", "Bearer sekret2", "Basic c2VrcmV0", ""] {
            assert!(!a.carries_relay_token(other.as_bytes()), "{other}");
        }
        assert!(!auth(None, None, &[]).carries_relay_token(b"anything"));
        let commas = auth(Some("sek,ret"), None, &[]);
        for carried in [
            "Bearer sek,ret",
            "sek,ret",
            "Basic x, Bearer sek,ret",
            "sek,ret,Basic x",
        ] {
            assert!(commas.carries_relay_token(carried.as_bytes()), "{carried}");
        }
        for other in ["Bearer sek", "ret", "Bearer sek, ret", "sek,ret2"] {
            assert!(!commas.carries_relay_token(other.as_bytes()), "{other}");
        }
    }

    /// With nothing configured, everything passes.
    #[test]
    fn off_by_default() {
        assert!(auth(None, None, &[]).allows("t", Credentials::default(), b""));
    }

    /// Only the exact bearer token passes.
    #[test]
    fn bearer() {
        let a = auth(Some("tok"), None, &[]);
        assert!(a.allows("t", with_token("Bearer tok"), b""));
        assert!(a.allows("t", with_token("bearer   tok "), b""));
        for bad in [
            "Bearer tok2",
            "Bearer to",
            "Basic tok",
            "Bearertok",
            "tok",
            "Bearer ",
        ] {
            assert!(!a.allows("t", with_token(bad), b""), "{bad}");
        }
        assert!(!a.allows("t", Credentials::default(), b""));
    }

    /// Public ids pass without credentials; others do not.
    #[test]
    fn public_ids() {
        let a = auth(None, None, &["open"]);
        assert!(a.allows("open", Credentials::default(), b""));
        assert!(!a.allows("closed", Credentials::default(), b""));
    }

    /// What only the token opens stays shut to public ids and signatures, open when auth is off.
    #[test]
    fn token_only() {
        assert!(auth(None, None, &[]).allows_token(Credentials::default()));
        let a = auth(Some("tok"), Some("sec"), &["open"]);
        assert!(a.allows_token(with_token("Bearer tok")));
        assert!(!a.allows_token(with_token("Bearer nope")));
        assert!(!a.allows_token(Credentials::default()));
        assert!(!auth(None, None, &["open"]).allows_token(Credentials::default()));
    }

    /// A signature passes only over the exact, non-empty body.
    #[test]
    fn signature() {
        let a = auth(None, Some("sec"), &[]);
        let good = sign("sec", b"body");
        let creds = |s: &'static str| Credentials {
            authorization: None,
            signature: Some(s.as_bytes()),
        };
        let good: &'static str = Box::leak(good.into_boxed_str());
        assert!(a.allows("t", creds(good), b"body"));
        assert!(!a.allows("t", creds(good), b"other"));
        assert!(!a.allows("t", creds(sign("sec", b"").leak()), b""));
        assert!(!a.allows("t", creds(sign("nope", b"body").leak()), b"body"));
        assert!(!a.allows("t", creds("sha256=zz"), b"body"));
    }
}
