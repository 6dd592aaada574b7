//! `idle`: N long-polls (`timeout=60`) held at once on distinct tunnels for `--hold` seconds.
//! Reports the relay's RSS before and while holding them (per-waiter cost), the CPU the relay
//! and the store spend on them (the once-a-second re-check), the store's client connections,
//! then produces one message to each tunnel and counts deliveries (must be all N).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::http::Conn;
use crate::util::{cpu_percent, redis_clients, rss_kib, run_id, wait_for_waiters, Args};

pub async fn run(args: &Args) {
    let addr: String = args.get("addr", "127.0.0.1:8080".to_string());
    let n: usize = args.get("n", 10_000);
    let hold = Duration::from_secs(args.get("hold", 30));
    let pid: u32 = args.get("pid", 0);
    let redis_pid: u32 = args.get("redis-pid", 0);
    let redis_port: u16 = args.get("redis-port", 0);
    let metrics = args.opt("metrics");
    let prefix = format!("idle-{}", run_id());

    let rss_before = rss_kib(pid).unwrap_or(0);
    let started = Instant::now();
    // Connects a few hundred at a time, so the listen backlog never overflows.
    let connecting = Arc::new(Semaphore::new(200));
    let mut polls = Vec::with_capacity(n);
    for i in 0..n {
        let (addr, connecting) = (addr.clone(), connecting.clone());
        let path = format!("/t/{prefix}-{i}/poll?timeout=60");
        polls.push(tokio::spawn(async move {
            let mut conn = Conn::new(&addr);
            {
                let _permit = connecting.acquire().await;
                if conn.open().await.is_err() {
                    return 0;
                }
            }
            conn.send("GET", &path, b"", Duration::from_secs(63))
                .await
                .map_or(0, |r| r.status)
        }));
    }
    let seen = wait_for_waiters(metrics.as_deref(), n as u64, Duration::from_secs(25)).await;
    let all_waiting_s = started.elapsed().as_secs_f64();

    // Hold: settle, measure CPU over the middle third, then RSS and store clients.
    let third = hold / 3;
    tokio::time::sleep(third).await;
    let cpu = cpu_percent(&[pid, redis_pid], third).await;
    let rss_holding = rss_kib(pid).unwrap_or(0);
    let clients = (redis_port != 0)
        .then(|| redis_clients(redis_port))
        .flatten();
    tokio::time::sleep(hold - 2 * third).await;

    // One message to each tunnel, over 32 connections.
    let produced_started = Instant::now();
    let mut producers = Vec::new();
    for k in 0..32 {
        let (addr, prefix) = (addr.clone(), prefix.clone());
        producers.push(tokio::spawn(async move {
            let mut conn = Conn::new(&addr);
            let mut ok = 0;
            for i in (k..n).step_by(32) {
                let path = format!("/t/{prefix}-{i}?limit=0");
                let resp = conn
                    .send("POST", &path, b"idle", Duration::from_secs(5))
                    .await;
                ok += usize::from(resp.is_ok_and(|r| r.status == 201));
            }
            ok
        }));
    }
    let mut produced = 0;
    for p in producers {
        produced += p.await.unwrap_or(0);
    }
    let (mut delivered, mut timed_out, mut failed) = (0, 0, 0);
    for poll in polls {
        match poll.await.unwrap_or(0) {
            200 => delivered += 1,
            204 => timed_out += 1,
            _ => failed += 1,
        }
    }
    let deliver_s = produced_started.elapsed().as_secs_f64();
    let per_waiter = (rss_holding as f64 - rss_before as f64) / n as f64;
    println!(
        "RESULT scenario=idle waiters={n} seen_waiting={seen} all_waiting_after_s={all_waiting_s:.1} \
         rss_before_kib={rss_before} rss_holding_kib={rss_holding} per_waiter_kib={per_waiter:.2} \
         relay_cpu_pct={:.1} store_cpu_pct={:.1} store_clients={} produced={produced} \
         delivered={delivered} poll_204={timed_out} poll_failed={failed} deliver_all_s={deliver_s:.1} \
         rss_after_kib={}",
        cpu[0],
        cpu[1],
        clients.map_or("-".into(), |c| c.to_string()),
        rss_kib(pid).unwrap_or(0),
    );
}
