//! `wake`: N long-polls wait on distinct tunnels; then one message per tunnel is produced, one at
//! a time. Latency = from the produce response's arrival to that tunnel's poll response (and,
//! as `from_produce_sent_*`, from the produce request's sending).

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::http::Conn;
use crate::util::{ms_between, percentiles, run_id, wait_for_waiters, Args};

pub async fn run(args: &Args) {
    let addr: String = args.get("addr", "127.0.0.1:8080".to_string());
    let n: usize = args.get("n", 1000);
    let metrics = args.opt("metrics");
    let prefix = format!("wake-{}", run_id());

    let mut arrivals = Vec::with_capacity(n);
    for i in 0..n {
        let mut conn = Conn::new(&addr);
        crate::util::or_exit(conn.open().await, "connect to the relay");
        let (tx, rx) = oneshot::channel();
        let path = format!("/t/{prefix}-{i}/poll?timeout=60");
        tokio::spawn(async move {
            let resp = conn.send("GET", &path, b"", Duration::from_secs(63)).await;
            let _ = tx.send((Instant::now(), resp.map(|r| r.status).unwrap_or(0)));
        });
        arrivals.push(rx);
    }
    let seen = wait_for_waiters(metrics.as_deref(), n as u64, Duration::from_secs(20)).await;

    let mut producer = Conn::new(&addr);
    let (mut latencies, mut errors, mut early) = (Vec::with_capacity(n), 0, 0);
    let mut end_to_end = Vec::with_capacity(n);
    for (i, arrival) in arrivals.into_iter().enumerate() {
        let path = format!("/t/{prefix}-{i}?limit=0");
        let sent = Instant::now();
        let produced = producer
            .send("POST", &path, b"wake", Duration::from_secs(5))
            .await;
        let produced_at = Instant::now();
        if produced.map(|r| r.status).unwrap_or(0) != 201 {
            errors += 1;
            continue;
        }
        match tokio::time::timeout(Duration::from_secs(5), arrival).await {
            Ok(Ok((at, 200))) => {
                let ms = ms_between(produced_at, at);
                early += usize::from(ms < 0.0);
                latencies.push(ms.max(0.0));
                end_to_end.push(ms_between(sent, at));
            }
            _ => errors += 1,
        }
    }
    println!(
        "RESULT scenario=wake waiters={n} seen_waiting={seen} delivered={} errors={errors} \
         poll_before_produce_answer={early} {} from_produce_sent_{}",
        latencies.len(),
        percentiles(&mut latencies),
        percentiles(&mut end_to_end).replace(" ", " from_produce_sent_")
    );
}
