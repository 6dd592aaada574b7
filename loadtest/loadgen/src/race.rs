//! `race`: P producers post at once with `limit=L` to one fresh tunnel, T trials; every trial
//! must store exactly L messages (L × 201, the rest 507) and leave the queue at size L.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Barrier;

use crate::http::Conn;
use crate::util::{run_id, Args};

pub async fn run(args: &Args) {
    let addr: String = args.get("addr", "127.0.0.1:8080".to_string());
    let trials: usize = args.get("trials", 10);
    let producers: usize = args.get("producers", 200);
    let limit: u64 = args.get("limit", 10);
    let prefix = format!("race-{}", run_id());
    let timeout = Duration::from_secs(5);

    let mut exact = 0;
    let mut summary = Vec::new();
    for trial in 0..trials {
        let tunnel = format!("{prefix}-{trial}");
        let barrier = Arc::new(Barrier::new(producers));
        let mut tasks = Vec::with_capacity(producers);
        for _ in 0..producers {
            let mut conn = Conn::new(&addr);
            crate::util::or_exit(conn.open().await, "connect to the relay");
            let (barrier, path) = (barrier.clone(), format!("/t/{tunnel}?limit={limit}"));
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                conn.send("POST", &path, b"race", timeout)
                    .await
                    .map_or(0, |r| r.status)
            }));
        }
        let (mut created, mut full, mut other) = (0u64, 0u64, 0u64);
        for task in tasks {
            match task.await.unwrap_or(0) {
                201 => created += 1,
                507 => full += 1,
                _ => other += 1,
            }
        }
        let size = Conn::new(&addr)
            .send("GET", &format!("/t/{tunnel}/len"), b"", timeout)
            .await
            .ok()
            .and_then(|r| r.header("x-queue-size").and_then(|v| v.parse::<u64>().ok()));
        let ok = created == limit && size == Some(limit) && other == 0;
        exact += usize::from(ok);
        println!(
            "trial={trial} created_201={created} full_507={full} other={other} size={}",
            size.map_or("?".into(), |s| s.to_string())
        );
        summary.push(format!(
            "{created}/{}",
            size.map_or("?".into(), |s| s.to_string())
        ));
    }
    println!(
        "RESULT scenario=race trials={trials} producers={producers} limit={limit} exact={exact} \
         pass={} per_trial_201/size={}",
        if exact == trials { "yes" } else { "no" },
        summary.join(",")
    );
}
