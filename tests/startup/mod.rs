//! Start-up: a setting that does not parse stops the relay with a message naming it.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::process::free_port;
use crate::support::wait_until;

/// An unparsable setting makes `burrow serve` exit non-zero with stderr naming the variable.
#[test]
fn unparsable_setting_is_fatal() {
    let settings = [
        ("TUNNEL_MAXLEN", "abc"),
        ("TUNNEL_MAX_POLL_TIMEOUT", "soon"),
        ("TUNNEL_BACKPRESSURE", "maybe"),
        ("TUNNEL_MAX_MESSAGE_SIZE", "128k"),
    ];
    for (var, value) in settings {
        let (success, stderr) = serve_with(var, value);
        assert!(!success, "{var}={value} did not stop start-up");
        assert!(
            stderr.contains(var),
            "{var}={value}: stderr does not name it: {stderr:?}"
        );
    }
}

/// Runs `burrow serve` with `var=value`; answers whether it exited successfully, and its stderr.
fn serve_with(var: &str, value: &str) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_burrow"))
        .arg("serve")
        .env("BURROW_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("RUST_LOG", "warn")
        .env(var, value)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("burrow starts");
    let mut status = None;
    wait_until(Duration::from_secs(10), || {
        status = child.try_wait().expect("the child can be waited for");
        status.is_some()
    });
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{var}={value}: burrow is still running after 10 s");
    };
    let mut stderr = String::new();
    let mut pipe = child.stderr.take().expect("stderr is piped");
    pipe.read_to_string(&mut stderr)
        .expect("stderr is readable");
    (status.success(), stderr)
}
