//! `faults` (redis store): a mixed load — paced producers posting unique bodies with `limit=0`,
//! pending consumers (`?pending=5`) that acknowledge with DELETE — while this process stops the
//! redis-server (SIGSTOP for `--stop-for` s, then SIGCONT) and later kills it (SIGKILL) and
//! restarts it with `--restart` on the same port and data dir. Then drains the tunnel and checks:
//! every 201'd body consumed (none lost), redeliveries only of unacknowledged pending messages,
//! only 503 + Retry-After errors and only during the outages, no request past its own timeout
//! + 3 s, and how soon the relay served again after the store came back.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::http::{Conn, Resp};
use crate::util::{ms_between, percentiles, run_id, Args};

/// What the clients saw, with when they saw it.
#[derive(Default)]
struct Log {
    /// body → (sent, answered 201)
    produced: HashMap<String, (Instant, Instant)>,
    /// Bodies whose produce failed (not 201).
    not_produced: HashMap<String, String>,
    /// (body, message id, when, during the drain)
    deliveries: Vec<(String, String, Instant, bool)>,
    /// message id → when its acknowledgement was answered 204.
    acked: HashMap<String, Instant>,
    /// (request kind, outcome, sent, finished)
    errors: Vec<(&'static str, String, Instant, Instant)>,
    /// Finish times of successful requests sent after a given instant (for recovery times).
    successes: Vec<(Instant, Instant)>,
    /// Requests that got no answer within their own timeout + 3 s.
    hung: usize,
}

type Shared = Arc<Mutex<Log>>;

/// A request's outcome as one word: its status (with `+ra` when Retry-After came), or the error.
fn outcome(result: &std::io::Result<Resp>) -> String {
    match result {
        Ok(r) if r.header("retry-after").is_some() => format!("{}+ra", r.status),
        Ok(r) => r.status.to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "hung".into(),
        Err(e) => format!("io:{:?}", e.kind()),
    }
}

/// Records a finished request; true when it succeeded with `ok`.
fn record(
    log: &Shared,
    kind: &'static str,
    result: &std::io::Result<Resp>,
    sent: Instant,
    ok: &[u16],
) -> bool {
    let mut log = log.lock().unwrap();
    let now = Instant::now();
    match result {
        Ok(r) if ok.contains(&r.status) => {
            log.successes.push((sent, now));
            true
        }
        _ => {
            let what = outcome(result);
            log.hung += usize::from(what == "hung");
            log.errors.push((kind, what, sent, now));
            false
        }
    }
}

pub async fn run(args: &Args) {
    let addr: String = args.get("addr", "127.0.0.1:8080".to_string());
    let redis_port: u16 = args.get("redis-port", 6379);
    let pidfile: String = args.get("redis-pidfile", String::new());
    let restart: String = args.get("restart", String::new());
    let seconds: u64 = args.get("seconds", 60);
    let producers: usize = args.get("producers", 3);
    let consumers: usize = args.get("consumers", 4);
    let per_second: u64 = args.get("rate", 150);
    let stop_at: u64 = args.get("stop-at", 15);
    let stop_for: u64 = args.get("stop-for", 5);
    let kill_at: u64 = args.get("kill-at", 35);
    let down_for: u64 = args.get("down-for", 2);
    let tunnel = Arc::new(format!("faults-{}", run_id()));
    let log: Shared = Arc::default();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    // Client-side limits: the request's own timeout (2 s store timeout; poll timeout 5) + 3 s.
    let (short, long) = (Duration::from_secs(5), Duration::from_secs(8));

    let mut tasks = Vec::new();
    for p in 0..producers {
        let (addr, tunnel, log) = (addr.clone(), tunnel.clone(), log.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(&addr);
            let mut pace = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seq = 0u64;
            while Instant::now() < deadline {
                pace.tick().await;
                seq += 1;
                let body = format!("{tunnel}-p{p}-{seq}");
                let sent = Instant::now();
                let path = format!("/t/{tunnel}?limit=0");
                let result = conn.send("POST", &path, body.as_bytes(), short).await;
                if record(&log, "produce", &result, sent, &[201]) {
                    log.lock()
                        .unwrap()
                        .produced
                        .insert(body, (sent, Instant::now()));
                } else {
                    log.lock()
                        .unwrap()
                        .not_produced
                        .insert(body, outcome(&result));
                }
            }
        }));
    }
    for _ in 0..consumers {
        let (addr, tunnel, log) = (addr.clone(), tunnel.clone(), log.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(&addr);
            while Instant::now() < deadline {
                let sent = Instant::now();
                let path = format!("/t/{tunnel}/poll?pending=5&timeout=5");
                let result = conn.send("GET", &path, b"", long).await;
                if !record(&log, "consume", &result, sent, &[200, 204]) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                let Ok(resp) = result else { continue };
                let Some(id) = resp.header("x-message-id").map(String::from) else {
                    continue;
                };
                let body = String::from_utf8_lossy(&resp.body).into_owned();
                log.lock()
                    .unwrap()
                    .deliveries
                    .push((body, id.clone(), Instant::now(), false));
                let sent = Instant::now();
                let result = conn
                    .send("DELETE", &format!("/t/{tunnel}/{id}"), b"", short)
                    .await;
                if record(&log, "ack", &result, sent, &[204]) {
                    log.lock().unwrap().acked.insert(id, Instant::now());
                }
            }
        }));
    }

    // The faults, at fixed offsets from the start.
    let signal = |sig: &'static str| {
        let pidfile = pidfile.clone();
        async move {
            let pid = std::fs::read_to_string(&pidfile).unwrap_or_default();
            let status = tokio::process::Command::new("kill")
                .args([sig, pid.trim()])
                .status()
                .await;
            if !status.is_ok_and(|s| s.success()) {
                eprintln!("loadgen: kill {sig} {} failed", pid.trim());
            }
        }
    };
    tokio::time::sleep_until((started + Duration::from_secs(stop_at)).into()).await;
    // An outage begins when its signal is sent: `kill` may land before its own process exits.
    let t_stop = Instant::now();
    signal("-STOP").await;
    tokio::time::sleep(Duration::from_secs(stop_for)).await;
    signal("-CONT").await;
    let t_cont = Instant::now();
    tokio::time::sleep_until((started + Duration::from_secs(kill_at)).into()).await;
    let t_kill = Instant::now();
    signal("-KILL").await;
    tokio::time::sleep(Duration::from_secs(down_for)).await;
    let t_restart = Instant::now();
    let _ = tokio::process::Command::new("sh")
        .args(["-c", &restart])
        .status()
        .await;
    let mut t_back = None;
    for _ in 0..500 {
        let ping = tokio::process::Command::new("redis-cli")
            .args(["-p", &redis_port.to_string(), "ping"])
            .output()
            .await;
        if ping.is_ok_and(|o| o.stdout.starts_with(b"PONG")) {
            t_back = Some(Instant::now());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t_back = t_back.unwrap_or(t_restart);
    for task in tasks {
        let _ = task.await;
    }

    // Drain: take the oldest pending or next message, acknowledge it, until none is left.
    let mut conn = Conn::new(&addr);
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < drain_deadline {
        let sent = Instant::now();
        let result = conn
            .send("GET", &format!("/t/{tunnel}?pending"), b"", short)
            .await;
        if !record(&log, "drain", &result, sent, &[200, 204]) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let Ok(resp) = result else { continue };
        let Some(id) = resp.header("x-message-id").map(String::from) else {
            break;
        };
        let body = String::from_utf8_lossy(&resp.body).into_owned();
        log.lock()
            .unwrap()
            .deliveries
            .push((body, id.clone(), Instant::now(), true));
        let sent = Instant::now();
        let result = conn
            .send("DELETE", &format!("/t/{tunnel}/{id}"), b"", short)
            .await;
        if record(&log, "drain-ack", &result, sent, &[204]) {
            log.lock().unwrap().acked.insert(id, Instant::now());
        }
    }
    let final_len = conn
        .send("GET", &format!("/t/{tunnel}/len"), b"", short)
        .await
        .ok()
        .and_then(|r| r.header("x-queue-size").map(String::from))
        .unwrap_or_else(|| "?".into());

    report(
        &log.lock().unwrap(),
        started,
        [t_stop, t_cont, t_kill, t_restart, t_back],
        &final_len,
    );
}

/// Checks the log and prints the findings and the RESULT line.
fn report(log: &Log, started: Instant, times: [Instant; 5], final_len: &str) {
    let [t_stop, t_cont, t_kill, t_restart, t_back] = times;
    let grace = Duration::from_secs(3);
    let outages = [(t_stop, t_cont + grace), (t_kill, t_back + grace)];
    let in_outage =
        |sent: Instant, done: Instant| outages.iter().any(|&(a, b)| sent <= b && done >= a);

    // Deliveries by body, in order.
    let mut by_body: HashMap<&str, Vec<(&str, Instant)>> = HashMap::new();
    for (body, id, at, _) in &log.deliveries {
        by_body.entry(body).or_default().push((id, *at));
    }
    let lost = log
        .produced
        .keys()
        .filter(|b| !by_body.contains_key(b.as_str()))
        .count();
    let (mut redelivered, mut duplicates, mut stored_despite_error, mut unknown) = (0, 0, 0, 0);
    for (body, got) in &by_body {
        if !log.produced.contains_key(*body) {
            if log.not_produced.contains_key(*body) {
                stored_despite_error += 1;
            } else {
                unknown += 1;
            }
        }
        let (first_id, _) = got[0];
        for &(id, at) in &got[1..] {
            let acked_before = log.acked.get(id).is_some_and(|&a| a < at);
            if id == first_id && !acked_before {
                redelivered += 1;
            } else {
                duplicates += 1;
            }
        }
    }
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut unexpected = 0;
    for (kind, what, sent, done) in &log.errors {
        let during = in_outage(*sent, *done);
        let expected = during && what == "503+ra";
        if !expected && unexpected < 10 {
            let (s, d) = (ms_between(started, *sent), ms_between(started, *done));
            println!("DETAIL unexpected {kind} {what} sent={s:.0}ms answered={d:.0}ms");
        }
        unexpected += usize::from(!expected);
        let place = if during { "outage" } else { "normal" };
        *kinds.entry(format!("{kind}:{what}@{place}")).or_default() += 1;
    }
    let first_success_after = |t: Instant| {
        log.successes
            .iter()
            .filter(|(sent, _)| *sent >= t)
            .map(|(_, done)| ms_between(t, *done))
            .fold(f64::INFINITY, f64::min)
    };
    // Produce (201) → first delivery latency, before the faults and after the restart.
    let latency = |from: Instant, to: Instant| {
        let mut ms: Vec<f64> = log
            .produced
            .iter()
            .filter(|(_, (sent, _))| *sent >= from && *sent < to)
            .filter_map(|(b, (_, answered))| {
                by_body
                    .get(b.as_str())
                    .map(|g| ms_between(*answered, g[0].1))
            })
            .collect();
        percentiles(&mut ms)
    };
    let end = started + Duration::from_secs(3600);
    let offset = |t: Instant| ms_between(started, t) / 1000.0;
    println!(
        "DETAIL faults stop={:.1}s cont={:.1}s kill={:.1}s restart={:.1}s redis_back={:.1}s errors: {kinds:?}",
        offset(t_stop),
        offset(t_cont),
        offset(t_kill),
        offset(t_restart),
        offset(t_back)
    );
    println!("DETAIL latency_before_faults {}", latency(started, t_stop));
    println!(
        "DETAIL latency_after_restart {}",
        latency(t_back + grace, end)
    );
    let pass = lost == 0 && duplicates == 0 && unexpected == 0 && log.hung == 0 && final_len == "0";
    println!(
        "RESULT scenario=faults produced_201={} produce_failed={} deliveries={} lost={lost} \
         duplicates={duplicates} pending_redeliveries={redelivered} \
         stored_despite_error={stored_despite_error} unknown={unknown} errors={} \
         unexpected_errors={unexpected} hung={} recover_after_cont_ms={:.0} \
         recover_after_restart_ms={:.0} recover_after_redis_up_ms={:.0} final_len={final_len} pass={}",
        log.produced.len(),
        log.not_produced.len(),
        log.deliveries.len(),
        log.errors.len(),
        log.hung,
        first_success_after(t_cont),
        first_success_after(t_restart),
        first_success_after(t_back),
        if pass { "yes" } else { "no" }
    );
}
