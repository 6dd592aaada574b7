//! `reply`: request/reply round trips. P producers each post a message and long-poll its reply;
//! W workers long-poll the queue in pending mode and reply. Bounded by `--seconds` and `--max`
//! round trips; reports the round-trip rate and p50/p99.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::http::Conn;
use crate::util::{percentiles, run_id, Args};

pub async fn run(args: &Args) {
    let addr: String = args.get("addr", "127.0.0.1:8080".to_string());
    let producers: usize = args.get("producers", 32);
    let workers: usize = args.get("workers", 32);
    let seconds: u64 = args.get("seconds", 10);
    let max: usize = args.get("max", 20_000);
    let queue = Arc::new(format!("reply-{}", run_id()));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let budget = Arc::new(AtomicUsize::new(0));
    let short = Duration::from_secs(5);
    let long = Duration::from_secs(33);

    let mut worker_tasks = Vec::new();
    for _ in 0..workers {
        let (addr, queue) = (addr.clone(), queue.clone());
        worker_tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(&addr);
            // Bounded: aborted when the producers are done; each poll is itself bounded.
            for _ in 0..1_000_000 {
                let path = format!("/t/{queue}/poll?pending=30&timeout=30");
                let Ok(job) = conn.send("GET", &path, b"", long).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Some(id) = job.header("x-message-id").map(String::from) else {
                    continue;
                };
                let path = format!("/t/{queue}/{id}/reply");
                let _ = conn.send("POST", &path, &job.body, short).await;
            }
        }));
    }

    let mut producer_tasks = Vec::new();
    for _ in 0..producers {
        let (addr, queue, budget) = (addr.clone(), queue.clone(), budget.clone());
        producer_tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(&addr);
            let (mut trips, mut errors) = (Vec::new(), 0usize);
            while Instant::now() < deadline && budget.fetch_add(1, Ordering::Relaxed) < max {
                let sent = Instant::now();
                let posted = conn
                    .send("POST", &format!("/t/{queue}"), b"ping", short)
                    .await;
                let id = match posted {
                    Ok(r) if r.status == 201 => r.header("x-message-id").map(String::from),
                    _ => None,
                };
                let Some(id) = id else {
                    errors += 1;
                    continue;
                };
                let path = format!("/t/{queue}/{id}/reply/poll?timeout=30");
                match conn.send("GET", &path, b"", long).await {
                    Ok(r) if r.status == 200 && r.body == b"ping" => {
                        trips.push(sent.elapsed().as_secs_f64() * 1000.0)
                    }
                    _ => errors += 1,
                }
            }
            (trips, errors)
        }));
    }
    let (mut trips, mut errors) = (Vec::new(), 0);
    for task in producer_tasks {
        let (t, e) = task.await.unwrap_or_default();
        trips.extend(t);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    for task in worker_tasks {
        task.abort();
    }
    println!(
        "RESULT scenario=reply producers={producers} workers={workers} round_trips={} errors={errors} \
         seconds={elapsed:.1} rate={:.0} {}",
        trips.len(),
        trips.len() as f64 / elapsed,
        percentiles(&mut trips)
    );
}
