//! The access log (`BURROW_ACCESS_LOG`): one line per request on stderr, in env_logger's format
//! and under its filter (`RUST_LOG`, target `burrow::access` at info), written in batches.
//!
//! Through `log`, each line cost a formatted record, a lock and a write(2): ~4.5 µs of relay CPU
//! per request, 9 % of produce throughput on redis and 23 % on the memory store
//! (docs/PERFORMANCE.md). Here a line is formatted into one shared buffer, written out with one
//! write(2) once it holds [`FLUSH_AT`] bytes, and otherwise by [`flush`], which the server calls
//! every [`FLUSH_EVERY`] and when it stops: a line appears at most that late.

use std::borrow::Cow;
use std::io::Write;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// The `log` target of access lines, as `RUST_LOG` names it.
const TARGET: &str = "burrow::access";

/// The buffer is written out once it holds this much.
const FLUSH_AT: usize = 32 * 1024;

/// How often the server flushes the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

static BUFFER: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// How many characters of a method a log line shows (the longest registered method has 17).
pub const SHOWN_METHOD: usize = 32;

/// A value from the client (a method, a path) as a log line shows it: cut at `chars` characters
/// and marked `…`, so that one request is one short line whatever it sends (this log's, and the
/// agent's).
pub fn shown(text: &str, chars: usize) -> Cow<'_, str> {
    match text.char_indices().nth(chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]).into(),
        None => text.into(),
    }
}

/// Whether `RUST_LOG` lets access lines through.
pub fn enabled() -> bool {
    log::log_enabled!(target: TARGET, log::Level::Info)
}

/// Appends one line (`message` and a newline, after env_logger's prefix).
pub fn line(message: std::fmt::Arguments<'_>) {
    let now = jiff::Timestamp::now();
    let mut buffer = buffer();
    // Seconds, as env_logger prints them.
    let _ = write!(buffer, "[{:.0} INFO  {TARGET}] ", now);
    let _ = buffer.write_fmt(message);
    buffer.push(b'\n');
    if buffer.len() >= FLUSH_AT {
        write_out(&mut buffer);
    }
}

/// Writes out the lines buffered so far.
pub fn flush() {
    write_out(&mut buffer());
}

/// Written while the buffer is locked, so that lines keep their order.
fn write_out(buffer: &mut Vec<u8>) {
    if buffer.is_empty() {
        return;
    }
    // Nowhere to report a failing stderr; the lines are dropped as env_logger would.
    let _ = std::io::stderr().lock().write_all(buffer);
    buffer.clear();
}

fn buffer() -> MutexGuard<'static, Vec<u8>> {
    // Poisoning only means a panic mid-append: at worst one partial line.
    BUFFER.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long value is shown cut (at a character, not a byte), a short one whole.
    #[test]
    fn shown_values() {
        assert_eq!(shown("/a/é", 256), "/a/é");
        let long = format!("/{}", "é".repeat(70_000));
        let cut = shown(&long, 256);
        assert_eq!(cut.chars().count(), 257);
        assert!(cut.ends_with('…'));
        assert_eq!(
            shown(&"X".repeat(50_000), SHOWN_METHOD).len(),
            32 + '…'.len_utf8()
        );
    }
}
