//! Go-style durations (`500ms`, `12s`, `1m30s`, `1.5h`), as backstream's
//! `x-backstream-request-timeout` header and `BURROW_ROUTE_TIMEOUT` take them.

use std::time::Duration;

/// The longest round-trip timeout a routed request may ask for (`x-backstream-request-timeout`,
/// `BURROW_ROUTE_TIMEOUT`): a day, far beyond any sensible wait for a response head, and far
/// from the clock arithmetic's limits.
pub const MAX_ROUTE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Parses a Go duration: one or more `<number><unit>` with units `ns`, `us` (or `µs`), `ms`,
/// `s`, `m`, `h`; numbers may have a fraction; `0` alone is zero. Negative durations are refused.
pub fn parse_go_duration(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    // Go takes a sign; a negative bound is no bound, so only `+` is accepted.
    let raw = raw.strip_prefix('+').unwrap_or(raw);
    if raw == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = raw;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            // Go accepts both micro signs: U+00B5 and the Greek U+03BC.
            "us" | "\u{b5}s" | "\u{3bc}s" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds_per_unit;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Go's forms parse; junk, bare numbers and negatives do not.
    #[test]
    fn go_durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_go_duration("500ms"), Some(ms(500)));
        assert_eq!(parse_go_duration("12s"), Some(ms(12_000)));
        assert_eq!(parse_go_duration("1m30s"), Some(ms(90_000)));
        assert_eq!(parse_go_duration("1.5h"), Some(ms(5_400_000)));
        assert_eq!(parse_go_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("+2s"), Some(ms(2_000)));
        let micros = Some(Duration::from_micros(300));
        assert_eq!(parse_go_duration("300\u{b5}s"), micros);
        assert_eq!(parse_go_duration("300\u{3bc}s"), micros);
        for bad in ["", "+", "5", "abc", "-1s", "1x", "s", "1.2.3s"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }
}
