//! Checks of an HTTP/1 request head that Pingora lets through but that must not be served, as
//! nginx refuses them too: a body whose framing two parties could read differently (request
//! smuggling, RFC 9112 §6.1 and §6.3), a transfer coding the relay cannot undo, and a missing or
//! malformed `Host` (RFC 9112 §3.2). (Pingora itself refuses Transfer-Encoding in HTTP/1.0 and
//! one whose last coding is not `chunked`.)

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::Version;
use pingora_http::RequestHeader;

use crate::error::Error;

/// Checks of a raw HTTP/1 request head (as read, before Pingora parses it) for what its parser
/// mends without a word: a request line with a control byte or a space inside its target (it
/// percent-escapes them, and a routed upstream would get a request the client never sent), and
/// `Content-Length` with `Transfer-Encoding` (it drops the length and goes by the coding, where
/// a proxy in front may have gone by the length).
pub fn check_raw(raw: &[u8]) -> Result<(), Error> {
    let mut lines = raw
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .skip_while(|line| line.is_empty());
    // The request line, then the header lines up to the blank one.
    let request_line = lines.next().unwrap_or_default();
    let spaces = request_line.iter().filter(|&&b| b == b' ').count();
    let controls = request_line.iter().any(|&b| b.is_ascii_control());
    if spaces != 2 || controls {
        return Err(Error::MalformedHead("Malformed request line"));
    }
    let (mut length, mut coding) = (false, false);
    for line in lines.take_while(|line| !line.is_empty()) {
        let name = line.split(|&b| b == b':').next().unwrap_or_default();
        length |= name.trim_ascii().eq_ignore_ascii_case(b"content-length");
        coding |= name.trim_ascii().eq_ignore_ascii_case(b"transfer-encoding");
    }
    match length && coding {
        true => Err(Error::MalformedHead(
            "Content-Length and Transfer-Encoding together",
        )),
        false => Ok(()),
    }
}

/// Whether an HTTP/1 request head may be served. A refused one is answered, and its connection
/// closed: where its body ends is unknown.
pub fn check(head: &RequestHeader) -> Result<(), Error> {
    let headers = &head.headers;
    let malformed = |why| Err(Error::MalformedHead(why));
    // Origin-form, `*`, absolute-form, or a CONNECT's authority-form (RFC 9112 §3.2, answered
    // 501 later): Pingora reads any other target (`GET items/5`) as `/`, which a routed request
    // would then reach the service as.
    let target = head.raw_path();
    let absolute = ["http://", "https://"].iter().any(|scheme| {
        target
            .get(..scheme.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(scheme.as_bytes()))
    });
    let connect = head.method == http::Method::CONNECT;
    if !(target.starts_with(b"/") || target == b"*" || absolute || connect) {
        return malformed("Malformed request target");
    }
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    if let Some(length) = lengths.next() {
        let digits = length.as_bytes().trim_ascii();
        if lengths.next().is_some() || digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return malformed("Malformed Content-Length");
        }
    }
    let mut codings = headers.get_all(TRANSFER_ENCODING).iter().peekable();
    if codings.peek().is_some() {
        let mut all = codings.flat_map(|value| value.as_bytes().split(|&b| b == b','));
        let only_chunked = all
            .next()
            .is_some_and(|first| first.trim_ascii().eq_ignore_ascii_case(b"chunked"))
            && all.next().is_none();
        if !only_chunked {
            return Err(Error::UnsupportedCoding);
        }
    }
    if head.version == Version::HTTP_11 {
        let mut hosts = headers.get_all(HOST).iter();
        return match (hosts.next(), hosts.next()) {
            (None, _) => malformed("Missing Host header"),
            (Some(_), Some(_)) => malformed("Several Host headers"),
            (Some(host), None) if !is_host(host.as_bytes()) => malformed("Malformed Host header"),
            _ => Ok(()),
        };
    }
    Ok(())
}

/// A `Host` value: `host[:port]` without anything a URI authority cannot hold. Empty is allowed
/// (RFC 9112 §3.2: a target without an authority).
fn is_host(value: &[u8]) -> bool {
    value
        .iter()
        .all(|b| b.is_ascii_graphic() && !b"/\\?#@".contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both framing headers are found in a raw head whatever their case and order, and only in
    /// the head: not in the request line, nor in a body or a request pipelined behind. A request
    /// line with a stray space or a control byte is refused.
    #[test]
    fn raw_heads() {
        let why = |raw: &[u8]| check_raw(raw).err().map(|e| e.to_string());
        let both = "Content-Length and Transfer-Encoding together";
        let line = "Malformed request line";
        for (raw, refused) in [
            (
                &b"POST / HTTP/1.1\r\nHost: a\r\ncontent-LENGTH: 3\r\nTransfer-Encoding : chunked\r\n\r\n"[..],
                Some(both),
            ),
            (
                b"\r\nPOST / HTTP/1.1\nContent-Length: 3\nTransfer-Encoding: chunked\n\n",
                Some(both),
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n", None),
            (
                b"POST /transfer-encoding:x HTTP/1.1\r\nContent-Length: 20\r\n\r\nTransfer-Encoding: x\r\n",
                None,
            ),
            (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", Some(line)),
            (b"GET /a\0b HTTP/1.1\r\nHost: a\r\n\r\n", Some(line)),
            (b"GET /a\tb HTTP/1.1\r\nHost: a\r\n\r\n", Some(line)),
            (b"GET  /a HTTP/1.1\r\nHost: a\r\n\r\n", Some(line)),
            (b"GET /a?b=%20 HTTP/1.0\r\n\r\n", None),
        ] {
            assert_eq!(why(raw).as_deref(), refused, "{:?}", String::from_utf8_lossy(raw));
        }
    }

    fn head(version: Version, headers: &[(&str, &str)]) -> RequestHeader {
        let mut head = RequestHeader::build("POST", b"/t/x", None).expect("a head");
        head.set_version(version);
        for (name, value) in headers {
            head.append_header(name.to_string(), *value)
                .expect("a header");
        }
        head
    }

    fn status(version: Version, headers: &[(&str, &str)]) -> Option<String> {
        check(&head(version, headers)).err().map(|e| e.to_string())
    }

    /// Framing two readers could disagree on, other codings and bad hosts are refused.
    #[test]
    fn refused_heads() {
        let v11 = Version::HTTP_11;
        let host = ("Host", "relay:8080");
        let te = |value| [host, ("Transfer-Encoding", value)];
        assert_eq!(status(v11, &[host]), None);
        assert_eq!(status(v11, &[host, ("Content-Length", "12")]), None);
        assert_eq!(status(v11, &te("chunked")), None);
        assert_eq!(status(v11, &te(" Chunked ")), None);
        assert_eq!(status(Version::HTTP_10, &[]), None);
        assert_eq!(status(v11, &[("Host", "")]), None);
        for (headers, why) in [
            (
                &[host, ("Content-Length", "3, 3")][..],
                "Malformed Content-Length",
            ),
            (
                &[host, ("Content-Length", "3"), ("Content-Length", "3")],
                "Malformed Content-Length",
            ),
            (
                &[host, ("Content-Length", "+3")],
                "Malformed Content-Length",
            ),
            (&te("gzip, chunked"), "Transfer-Encoding not supported"),
            (&te("chunked, chunked"), "Transfer-Encoding not supported"),
            (&te("identity"), "Transfer-Encoding not supported"),
            (&[], "Missing Host header"),
            (&[host, host], "Several Host headers"),
            (&[("Host", "a b")], "Malformed Host header"),
            (&[("Host", "a/b")], "Malformed Host header"),
        ] {
            assert_eq!(status(v11, headers).as_deref(), Some(why), "{headers:?}");
        }
    }

    /// A target that is neither a path, `*` nor an absolute URL is refused, not read as `/`.
    #[test]
    fn unrooted_targets() {
        let target = |raw: &[u8]| {
            let mut head = RequestHeader::build("GET", raw, None).expect("a head");
            head.append_header("Host", "relay").expect("a header");
            check(&head).err().map(|e| e.to_string())
        };
        for fine in [
            &b"/items/5?force=1"[..],
            b"*",
            b"http://relay/t/x",
            b"HTTPS://relay/",
        ] {
            assert_eq!(target(fine), None, "{:?}", String::from_utf8_lossy(fine));
        }
        let mut connect = RequestHeader::build("CONNECT", b"other:443", None).expect("a head");
        connect
            .append_header("Host", "other:443")
            .expect("a header");
        assert!(
            check(&connect).is_ok(),
            "a CONNECT's target is its authority"
        );
        for refused in [
            &b"items/5?force=1"[..],
            b"evil.com/admin",
            b"../admin",
            b"other:80/p",
        ] {
            let why = target(refused);
            let shown = String::from_utf8_lossy(refused);
            assert_eq!(
                why.as_deref(),
                Some("Malformed request target"),
                "{shown:?}"
            );
        }
    }
}
