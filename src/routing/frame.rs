//! The agent protocol's frames (docs/AGENT-PROTOCOL.md): one per binary WebSocket message, laid
//! out as `[type: u8][stream id: u32 big-endian][payload]`.
//!
//! This module only turns bytes into typed frames and back; what a frame means to a stream is
//! `stream`'s business.

use bytes::{BufMut, Bytes, BytesMut};

/// The bytes before a frame's payload: its type and its stream id.
pub const HEADER_LEN: usize = 5;

/// The largest WebSocket message either side accepts: a `DATA` frame, or a head with large
/// headers.
pub const MAX_MESSAGE: usize = 1024 * 1024;

/// The largest body chunk one `DATA` frame carries.
pub const MAX_DATA: usize = 64 * 1024;

/// The largest body chunk this side puts in one `DATA` frame (as HTTP/2's default frame size).
/// A WebSocket keeps for its life the buffer room its largest frame took: with 64 KiB frames, an
/// idle agent's link that had carried a body held ~250 KiB more on the relay than with these;
/// uploads cost the relay ~15–20 % more CPU (docs/PERFORMANCE.md "Session 25").
pub const DATA_PIECE: usize = 16 * 1024;

/// The credit each side starts with, per stream and direction: the `DATA` bytes it may send before
/// the peer grants more with `WINDOW`.
pub const INITIAL_WINDOW: u32 = 256 * 1024;

/// The header an agent sends with its WebSocket handshake to say it understands `MOVE` (value
/// `1`); the relay sends `MOVE` to no other agent, since an unknown frame type ends a connection.
pub const MOVES_HEADER: &str = "x-burrow-agent-moves";

/// What a frame is; the byte values are the wire's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Relay → agent: a new request; payload JSON `{"method","path","headers"}`.
    Head = 1,
    /// Both ways: a body chunk of at most [`MAX_DATA`] bytes.
    Data = 2,
    /// Both ways: the sender's body is complete.
    End = 3,
    /// Agent → relay: the response head; payload JSON `{"status","headers"}`.
    Response = 4,
    /// Both ways: abandon the stream; payload a UTF-8 reason.
    Reset = 5,
    /// Both ways: payload u32 BE, more `DATA` credit granted to the peer on this stream. A grant of
    /// 0 from the agent acknowledges a `HEAD`: the agent has taken the request.
    Window = 6,
    /// Both ways, stream 0: the sender opens no more streams and the peer should send it none; the
    /// connection closes once the streams in flight are done.
    GoAway = 7,
    /// Relay → agent, stream 0, only to agents that asked for it ([`MOVES_HEADER`]): this relay
    /// process is handing its address over to a new one. Connect again now, and keep serving on
    /// this connection until it says `GOAWAY`.
    Move = 8,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Head,
            2 => Kind::Data,
            3 => Kind::End,
            4 => Kind::Response,
            5 => Kind::Reset,
            6 => Kind::Window,
            7 => Kind::GoAway,
            8 => Kind::Move,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the frame says.
    pub kind: Kind,
    /// 0 for connection-level frames (`GOAWAY`, `MOVE`); streams are numbered from 1.
    pub stream: u32,
    /// What follows the header; its meaning depends on `kind`.
    pub payload: Bytes,
}

/// Why bytes are not a frame. Any of these is a protocol violation by the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a frame of {0} bytes is shorter than its 5-byte header")]
    Short(usize),
    #[error("unknown frame type {0}")]
    UnknownKind(u8),
    #[error("a DATA frame of {0} bytes is larger than 64 KiB")]
    DataTooLarge(usize),
    #[error("a WINDOW payload must be 4 bytes, not {0}")]
    BadWindow(usize),
    #[error("a {0:?} frame must name a stream (id 0 is the connection's)")]
    NoStream(Kind),
    #[error("a {0:?} frame is the connection's: its stream id must be 0")]
    OnStream(Kind),
}

impl Frame {
    /// A frame of `kind` on `stream` carrying `payload`.
    pub fn new(kind: Kind, stream: u32, payload: Bytes) -> Frame {
        Frame {
            kind,
            stream,
            payload,
        }
    }

    /// A `WINDOW` frame granting `credit` more bytes.
    pub fn window(stream: u32, credit: u32) -> Frame {
        Frame::new(
            Kind::Window,
            stream,
            Bytes::copy_from_slice(&credit.to_be_bytes()),
        )
    }

    /// A `RESET` frame giving `reason`.
    pub fn reset(stream: u32, reason: &str) -> Frame {
        Frame::new(
            Kind::Reset,
            stream,
            Bytes::copy_from_slice(reason.as_bytes()),
        )
    }

    /// The wire form: header then payload.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER_LEN + self.payload.len());
        out.put_u8(self.kind as u8);
        out.put_u32(self.stream);
        out.put_slice(&self.payload);
        out.freeze()
    }

    /// Parses one WebSocket message's bytes, checking what can be checked without stream state.
    pub fn decode(mut bytes: Bytes) -> Result<Frame, FrameError> {
        if bytes.len() < HEADER_LEN {
            return Err(FrameError::Short(bytes.len()));
        }
        let header = bytes.split_to(HEADER_LEN);
        let kind = Kind::from_byte(header[0]).ok_or(FrameError::UnknownKind(header[0]))?;
        let stream = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let connections = matches!(kind, Kind::GoAway | Kind::Move);
        if stream == 0 && !connections {
            return Err(FrameError::NoStream(kind));
        }
        if stream != 0 && connections {
            return Err(FrameError::OnStream(kind));
        }
        match kind {
            Kind::Data if bytes.len() > MAX_DATA => Err(FrameError::DataTooLarge(bytes.len())),
            Kind::Window if bytes.len() != 4 => Err(FrameError::BadWindow(bytes.len())),
            _ => Ok(Frame::new(kind, stream, bytes)),
        }
    }

    /// A `WINDOW` frame's credit (0 for any other frame; `decode` checked the length).
    pub fn credit(&self) -> u32 {
        match (self.kind, self.payload.as_ref()) {
            (Kind::Window, [a, b, c, d]) => u32::from_be_bytes([*a, *b, *c, *d]),
            _ => 0,
        }
    }

    /// A `RESET` frame's reason, lossily decoded (it is only ever logged or passed on). A client
    /// may get it as its one-line error: only its first line counts, without control
    /// characters, cut at [`REASON_LIMIT`] characters.
    pub fn reason(&self) -> String {
        let text = String::from_utf8_lossy(&self.payload);
        let line = text.lines().next().unwrap_or_default();
        let mut printable = line.chars().filter(|c| !c.is_control());
        let mut reason: String = printable.by_ref().take(REASON_LIMIT).collect();
        if printable.next().is_some() {
            reason.push('…');
        }
        reason
    }
}

/// The most characters of a `RESET` reason passed on.
pub const REASON_LIMIT: usize = 200;

#[cfg(test)]
mod tests {
    use super::*;

    /// A reason is passed on as one line: the first, without control characters, cut short.
    #[test]
    fn reasons_are_one_short_line() {
        let reason =
            |text: &[u8]| Frame::new(Kind::Reset, 1, Bytes::copy_from_slice(text)).reason();
        assert_eq!(reason(b"upstream down"), "upstream down");
        assert_eq!(reason(b"boom\r\nX: y"), "boom");
        assert_eq!(reason(b"a\0b\rc\x7f"), "abc");
        let long = reason(&[b'x'; 900_000]);
        assert_eq!(long.chars().count(), REASON_LIMIT + 1);
        assert!(long.ends_with('…'));
        assert_eq!(reason(&[b'y'; REASON_LIMIT]), "y".repeat(REASON_LIMIT));
    }

    /// Every kind round-trips, and the header is type then big-endian stream id.
    #[test]
    fn round_trip() {
        for kind in [
            Kind::Head,
            Kind::Data,
            Kind::End,
            Kind::Response,
            Kind::Reset,
        ] {
            let frame = Frame::new(kind, 0x0102_0304, Bytes::from_static(b"xyz"));
            let wire = frame.encode();
            assert_eq!(&wire[..5], &[kind as u8, 1, 2, 3, 4]);
            assert_eq!(Frame::decode(wire).unwrap(), frame);
        }
        let window = Frame::window(7, 65536);
        assert_eq!(&window.encode()[..], &[6, 0, 0, 0, 7, 0, 1, 0, 0]);
        assert_eq!(Frame::decode(window.encode()).unwrap().credit(), 65536);
        assert_eq!(Frame::reset(3, "gone").reason(), "gone");
    }

    /// Short, unknown, oversized and stream-less frames are typed errors, never panics.
    #[test]
    fn malformed() {
        assert_eq!(
            Frame::decode(Bytes::from_static(&[2, 0, 0])),
            Err(FrameError::Short(3))
        );
        assert_eq!(
            Frame::decode(Bytes::from_static(&[9, 0, 0, 0, 1])),
            Err(FrameError::UnknownKind(9))
        );
        let big = Frame::new(Kind::Data, 1, Bytes::from(vec![0; MAX_DATA + 1])).encode();
        assert_eq!(
            Frame::decode(big),
            Err(FrameError::DataTooLarge(MAX_DATA + 1))
        );
        let full = Frame::new(Kind::Data, 1, Bytes::from(vec![0; MAX_DATA])).encode();
        assert!(Frame::decode(full).is_ok());
        assert_eq!(
            Frame::decode(Bytes::from_static(&[6, 0, 0, 0, 1, 0, 0])),
            Err(FrameError::BadWindow(2))
        );
        assert_eq!(
            Frame::decode(Bytes::from_static(&[2, 0, 0, 0, 0])),
            Err(FrameError::NoStream(Kind::Data))
        );
        assert!(Frame::decode(Bytes::from_static(&[7, 0, 0, 0, 0])).is_ok());
        assert_eq!(
            Frame::decode(Bytes::from_static(&[7, 0, 0, 0, 1])),
            Err(FrameError::OnStream(Kind::GoAway))
        );
        let moving = Frame::decode(Bytes::from_static(&[8, 0, 0, 0, 0]));
        assert_eq!(moving.map(|frame| frame.kind), Ok(Kind::Move));
        assert_eq!(
            Frame::decode(Bytes::from_static(&[8, 0, 0, 0, 3])),
            Err(FrameError::OnStream(Kind::Move))
        );
    }
}
