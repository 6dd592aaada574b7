//! The CORS headers on every answer Burrow gives of its own accord — the relay's, and an agent's
//! errors — as the original relay's `cors-headers.conf` set them, so that a browser's script can
//! read an error whoever answered it.

/// The methods every answer allows browsers.
pub const ALLOWED_METHODS: &str = "GET, POST, DELETE, OPTIONS";

/// The headers, in the order they are written.
pub const HEADERS: [(&str, &str); 3] = [
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", ALLOWED_METHODS),
    (
        "Access-Control-Expose-Headers",
        "*, X-Message-Id, X-Queue-Size",
    ),
];
