//! Tunnel and message identifiers, validated once when a request is parsed.

use std::fmt;
use std::str::FromStr;

/// The longest tunnel id, in characters.
pub const MAX_TUNNEL_ID_LEN: usize = 1024;

/// A tunnel's name: 1 to 1024 characters from `A-Z a-z 0-9 - _`, case-sensitive.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TunnelId(String);

impl TunnelId {
    /// Accepts `raw` if it is a valid tunnel id.
    pub fn parse(raw: &str) -> Option<TunnelId> {
        let valid = !raw.is_empty()
            && raw.len() <= MAX_TUNNEL_ID_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        valid.then(|| TunnelId(raw.to_owned()))
    }

    /// The id as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TunnelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message id, `<milliseconds>-<sequence>` as Redis streams make them; ordered as the stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    /// Milliseconds since the epoch when the message was stored.
    pub ms: u64,
    /// Position among the messages stored in the same millisecond.
    pub seq: u64,
}

impl MessageId {
    /// The id that follows `last` at time `now_ms`, strictly greater than `last`.
    pub fn next_after(last: Option<MessageId>, now_ms: u64) -> MessageId {
        match last {
            Some(last) if last.ms >= now_ms => MessageId {
                ms: last.ms,
                seq: last.seq + 1,
            },
            _ => MessageId { ms: now_ms, seq: 0 },
        }
    }
}

impl FromStr for MessageId {
    type Err = ();

    /// Each part is 1 to 16 decimal digits, as the original's URL pattern demands.
    fn from_str(raw: &str) -> Result<MessageId, ()> {
        let (ms, seq) = raw.split_once('-').ok_or(())?;
        let part = |p: &str| -> Result<u64, ()> {
            if (1..=16).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) {
                p.parse().map_err(|_| ())
            } else {
                Err(())
            }
        };
        Ok(MessageId {
            ms: part(ms)?,
            seq: part(seq)?,
        })
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids of 1 and 1024 characters pass; empty, 1025 characters and other characters do not.
    #[test]
    fn tunnel_ids() {
        assert!(TunnelId::parse("a").is_some());
        assert!(TunnelId::parse("A-z_09").is_some());
        assert!(TunnelId::parse(&"x".repeat(1024)).is_some());
        assert!(TunnelId::parse(&"x".repeat(1025)).is_none());
        assert!(TunnelId::parse("").is_none());
        for bad in ["a.b", "a b", "a/b", "ä", "a%20"] {
            assert!(TunnelId::parse(bad).is_none(), "{bad}");
        }
    }

    /// Message ids round-trip and reject anything but two groups of 1 to 16 digits.
    #[test]
    fn message_ids() {
        let id: MessageId = "1746450313373-0".parse().unwrap();
        assert_eq!(id.to_string(), "1746450313373-0");
        for bad in [
            "1",
            "1-",
            "-1",
            "a-1",
            "1-1-1",
            "12345678901234567-1",
            "+1-1",
        ] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad}");
        }
        let a = MessageId { ms: 5, seq: 3 };
        assert_eq!(
            MessageId::next_after(Some(a), 5),
            MessageId { ms: 5, seq: 4 }
        );
        assert_eq!(
            MessageId::next_after(Some(a), 4),
            MessageId { ms: 5, seq: 4 }
        );
        assert_eq!(
            MessageId::next_after(Some(a), 9),
            MessageId { ms: 9, seq: 0 }
        );
    }
}
