//! Checks of an HTTP/1 request head that Pingora lets through but that must not be served, as
//! nginx refuses them too: a body whose framing two parties could read differently (request
//! smuggling, RFC 9112 §6.1 and §6.3), a transfer coding the relay cannot undo, and a missing or
//! malformed `Host` (RFC 9112 §3.2). (Pingora itself refuses Transfer-Encoding in HTTP/1.0 and
//! one whose last coding is not `chunked`.)

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::Version;
use pingora_http::RequestHeader;

use crate::error::Error;

/// Whether a raw HTTP/1 request head (as read, before Pingora parses it) has both
/// `Content-Length` and `Transfer-Encoding`: the parser would drop the length and go by the
/// coding, where a proxy in front may have gone by the length.
pub fn has_both_lengths(raw: &[u8]) -> bool {
    let mut lines = raw
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .skip_while(|line| line.is_empty());
    // The request line, then the header lines up to the blank one.
    lines.next();
    let (mut length, mut coding) = (false, false);
    for line in lines.take_while(|line| !line.is_empty()) {
        let name = line.split(|&b| b == b':').next().unwrap_or_default();
        length |= name.trim_ascii().eq_ignore_ascii_case(b"content-length");
        coding |= name.trim_ascii().eq_ignore_ascii_case(b"transfer-encoding");
    }
    length && coding
}

/// Whether an HTTP/1 request head may be served. A refused one is answered, and its connection
/// closed: where its body ends is unknown.
pub fn check(head: &RequestHeader) -> Result<(), Error> {
    let headers = &head.headers;
    let malformed = |why| Err(Error::MalformedHead(why));
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
    /// the head: not in the request line, nor in a body or a request pipelined behind.
    #[test]
    fn both_lengths_in_raw_heads() {
        let both = b"POST / HTTP/1.1\r\nHost: a\r\ncontent-LENGTH: 3\r\nTransfer-Encoding : chunked\r\n\r\n";
        assert!(has_both_lengths(both));
        assert!(has_both_lengths(
            b"\r\nPOST / HTTP/1.1\nContent-Length: 3\nTransfer-Encoding: chunked\n\n"
        ));
        assert!(!has_both_lengths(
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n"
        ));
        assert!(!has_both_lengths(
            b"POST /transfer-encoding:x HTTP/1.1\r\nContent-Length: 20\r\n\r\nTransfer-Encoding: x\r\n"
        ));
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
}
