//! Start-up: a setting that does not parse stops the relay with a message naming it.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::process::{ephemeral_ports_start, free_port};
use crate::support::{wait_until, Relay, Store};

/// An unusable setting makes `burrow serve` exit with code 2 and stderr naming the variable: values
/// that do not parse, and a `BURROW_CONF` file that is missing or not Pingora's YAML.
#[test]
fn unparsable_setting_is_fatal() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let not_yaml = dir.path().join("not.yaml");
    std::fs::write(&not_yaml, "threads: [unclosed").expect("the file is written");
    let missing = dir.path().join("missing.yaml");
    let no_threads = dir.path().join("no-threads.yaml");
    std::fs::write(&no_threads, "version: 1\nthreads: 0\n").expect("the file is written");
    let settings = [
        ("TUNNEL_MAXLEN", "abc"),
        ("TUNNEL_MAX_POLL_TIMEOUT", "soon"),
        ("TUNNEL_BACKPRESSURE", "maybe"),
        ("TUNNEL_MAX_MESSAGE_SIZE", "128k"),
        ("BURROW_ADVERTISE", "host:notport"),
        ("BURROW_CONF", missing.to_str().expect("a UTF-8 path")),
        ("BURROW_CONF", not_yaml.to_str().expect("a UTF-8 path")),
        ("BURROW_CONF", no_threads.to_str().expect("a UTF-8 path")),
        ("TUNNEL_ACCESS_TOKEN", ""),
        ("REDIS_URL", "redis://127.0.0.1:99999"),
        ("REDIS_HOST", "bad host"),
    ];
    for (var, value) in settings {
        let (code, stderr) = serve_with(var, value);
        assert_eq!(code, Some(2), "{var}={value}: {stderr}");
        assert!(
            stderr.contains(var) && stderr.contains("configuration error"),
            "{var}={value}: stderr does not name it: {stderr:?}"
        );
    }
}

/// A setting that is not UTF-8 stops start-up too: read as unset, a secret would have turned
/// authorization off.
#[test]
fn setting_that_is_not_utf8_is_fatal() {
    use std::os::unix::ffi::OsStrExt;
    let not_utf8 = std::ffi::OsStr::from_bytes(b"\xff\xfe");
    for var in [
        "TUNNEL_SIGNATURE_SECRET",
        "TUNNEL_ACCESS_TOKEN",
        "REDIS_URL",
    ] {
        let (code, stderr) = serve_with(var, not_utf8);
        assert_eq!(code, Some(2), "{var}: {stderr}");
        assert!(
            stderr.contains(&format!("{var} is not valid: its value is not UTF-8 text")),
            "{var}: {stderr:?}"
        );
    }
}

/// A listening address that is taken stops `burrow serve` at once with one line naming it
/// (Pingora alone would retry for 30 s, then leave a process serving nothing).
#[test]
fn taken_address_is_fatal() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let address = taken.local_addr().expect("an address").to_string();
    for var in ["BURROW_LISTEN", "BURROW_METRICS_LISTEN"] {
        let (code, stderr) = serve_with(var, &address);
        assert_eq!(code, Some(1), "{var}: {stderr}");
        assert_eq!(
            stderr.trim_end(),
            format!("burrow: {var}={address} cannot be listened on: Address already in use (os error 98)")
        );
    }
}

/// A `RUST_LOG` that is not UTF-8 is ignored, as env_logger ignores a directive it cannot parse,
/// and said so on stderr, as env_logger says that.
#[test]
fn log_filter_that_is_not_utf8_is_reported() {
    use std::os::unix::ffi::OsStrExt;
    let not_utf8 = std::ffi::OsStr::from_bytes(b"warn\xff");
    let vars = [("RUST_LOG", not_utf8), ("TUNNEL_MAXLEN", "abc".as_ref())];
    let (code, stderr) = serve_with_all(&vars);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("RUST_LOG is not UTF-8 text: ignored"),
        "{stderr:?}"
    );
}

/// A `RUST_LOG` level misspelt as a bare word, which env_logger reads as a module to log and
/// so logs nothing of the relay's, is warned of with the level it resembles.
#[test]
fn misspelt_log_level_is_named() {
    let vars = [
        ("RUST_LOG", "inof,fred=warn".as_ref()),
        ("TUNNEL_MAXLEN", "abc".as_ref()),
    ];
    let (code, stderr) = serve_with_all(&vars);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "RUST_LOG names a module `inof`, not a level: only its lines are logged \
                         (did you mean `info`?)"
        ),
        "{stderr:?}"
    );
}

/// A redis setting given where no store is named starts the memory store with a warning naming
/// it: the Lua relay would have used redis on 127.0.0.1 there.
#[test]
fn unused_redis_setting_is_named() {
    let relay = Relay::start(Store::Memory, &[("REDIS_PORT", "6380")]);
    let said = "REDIS_PORT is set, but no store is named: using the memory store";
    let warned = wait_until(Duration::from_secs(5), || relay.output().contains(said));
    assert!(warned, "{}", relay.output());
}

/// A variable named like a setting that the relay does not read, a misspelt token say, is
/// warned of with the setting it resembles: ignored silently, it would leave the relay open.
#[test]
fn misspelt_setting_is_named() {
    let relay = Relay::start(Store::Memory, &[("TUNNEL_ACCESS_TOKENS", "secret")]);
    let said = "TUNNEL_ACCESS_TOKENS is no setting of the relay: ignored (did you mean \
                TUNNEL_ACCESS_TOKEN?)";
    let warned = wait_until(Duration::from_secs(5), || relay.output().contains(said));
    assert!(warned, "{}", relay.output());
}

/// A key of a `BURROW_CONF` file that is no Pingora setting, which Pingora ignores, is warned of
/// with the setting it resembles (a misspelt `upgrade_sock` would put the upgrade socket
/// elsewhere).
#[test]
fn misspelt_pingora_setting_is_named() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let conf = dir.path().join("burrow.yaml");
    std::fs::write(
        &conf,
        "upgrade_socket: /tmp/x.sock
threads: 2
",
    )
    .expect("the file is written");
    let conf = conf.to_str().expect("a UTF-8 path");
    let relay = Relay::start(Store::Memory, &[("BURROW_CONF", conf)]);
    let said = "upgrade_socket is no Pingora setting: ignored (did you mean upgrade_sock?)";
    let warned = wait_until(Duration::from_secs(5), || relay.output().contains(said));
    assert!(warned, "{}", relay.output());
    assert!(
        !relay.output().contains("threads is no"),
        "{}",
        relay.output()
    );
}

/// A redis server named on this host at a port in the ephemeral range is warned of: a relay
/// reconnecting to it while it is down can connect to itself there.
#[test]
fn redis_port_in_the_ephemeral_range_is_warned_of() {
    let port = ephemeral_ports_start() + 1;
    let url = format!("redis://127.0.0.1:{port}");
    let relay = Relay::start(Store::Memory, &[("REDIS_URL", &url)]);
    let said = format!("the redis server's port {port} is in this host's ephemeral range");
    let warned = wait_until(Duration::from_secs(5), || relay.output().contains(&said));
    assert!(warned, "{}", relay.output());
}

/// The container image gives the binary the capability to listen below port 1024 as permitted
/// only (`setcap cap_net_bind_service=+p`, see Dockerfile): a user other than root then listens on
/// such a port, and where the capability is dropped (`--cap-drop ALL`) the binary still starts
/// (given as effective too, it would not even start) and says what to do. Sets a file capability
/// and changes user, so it needs root, as CI has.
#[test]
fn permitted_capability_listens_below_1024() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mode = std::fs::Permissions::from_mode(0o755);
    std::fs::set_permissions(dir.path(), mode).expect("the directory is opened to others");
    let binary = dir.path().join("burrow");
    std::fs::copy(env!("CARGO_BIN_EXE_burrow"), &binary).expect("the binary is copied");
    let given = Command::new("setcap")
        .arg("cap_net_bind_service=+p")
        .arg(&binary)
        .status()
        .expect("setcap runs (libcap2-bin)");
    assert!(given.success(), "setcap failed: this test needs root");
    let port = (900..1024)
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port below 1024");
    let as_nobody = |bounding: &[&str]| {
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .args(bounding)
            .arg(&binary)
            .arg("serve")
            .env("BURROW_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    };
    let mut serving = as_nobody(&[]).spawn().expect("setpriv runs");
    let listening = wait_until(Duration::from_secs(10), || {
        crate::support::relay::status_of(port, "/health") == Some(200)
    });
    let _ = serving.kill();
    let ended = serving.wait_with_output().expect("the relay is waited for");
    let said = String::from_utf8_lossy(&ended.stderr);
    assert!(listening, "no answer on port {port} as nobody: {said}");
    let refused = as_nobody(&["--bounding-set", "-net_bind_service"])
        .output()
        .expect("setpriv runs");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(
        said.contains("needs root or the NET_BIND_SERVICE capability: listen on a port from 1024"),
        "{said}"
    );
}

/// The soft limit on open files (1024 under systemd and many shells: about a thousand
/// connections) is raised to the hard one, and a hard limit below what the relay is built for
/// is warned of.
#[test]
fn open_file_limit_is_raised() {
    let port = free_port();
    let mut serving = Command::new("prlimit")
        .arg("--nofile=256:4096")
        .arg(env!("CARGO_BIN_EXE_burrow"))
        .arg("serve")
        .env("BURROW_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit runs (util-linux)");
    let listening = wait_until(Duration::from_secs(10), || {
        crate::support::relay::status_of(port, "/health") == Some(200)
    });
    // prlimit becomes the relay: same process.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", serving.id()));
    let _ = serving.kill();
    let ended = serving.wait_with_output().expect("the relay is waited for");
    let said = String::from_utf8_lossy(&ended.stderr);
    assert!(listening, "no answer on port {port}: {said}");
    let limits = limits.expect("the relay's limits are readable");
    let open_files = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a line for open files");
    let values: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(values, ["4096", "4096"], "{open_files}");
    assert!(
        said.contains("the relay may have at most 4096 open files"),
        "{said}"
    );
}

/// Runs `burrow serve` with `var=value`; answers its exit code and its stderr.
fn serve_with(var: &str, value: impl AsRef<std::ffi::OsStr>) -> (Option<i32>, String) {
    serve_with_all(&[(var, value.as_ref())])
}

/// Runs `burrow serve` with `vars`; answers its exit code and its stderr.
fn serve_with_all(vars: &[(&str, &std::ffi::OsStr)]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_burrow"))
        .arg("serve")
        .env("BURROW_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("RUST_LOG", "warn")
        .envs(vars.iter().copied())
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
        panic!("{vars:?}: burrow is still running after 10 s");
    };
    let mut stderr = String::new();
    let mut pipe = child.stderr.take().expect("stderr is piped");
    pipe.read_to_string(&mut stderr)
        .expect("stderr is readable");
    (status.code(), stderr)
}
