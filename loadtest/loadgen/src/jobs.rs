//! `jobs` and `jobs-ws`: jobs end to end through a real `burrow worker` that run.sh starts on
//! `--queue` (it runs `cat` per job, so a job's result is the job itself).
//!
//! `jobs`: `--clients` connections each trigger a job (`POST /trigger?queue=Q`) and collect it
//! (`GET /done/{id}?wait=30`), again and again, until `--n` jobs or `--seconds`: jobs/s and the
//! trigger → Done latency under load. `jobs-ws`: one WebSocket (`GET /ws?queue=Q`), `--n` jobs
//! one at a time; latency = frame sent → Done frame received. It also times `cat` spawned
//! directly (`--spawns`), the floor a job's latency cannot go below.

use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

use crate::http::Conn;
use crate::util::{percentiles, Args};

const SHORT: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(33);

pub async fn throughput(args: &Args) {
    let addr: String = args.get("addr", "127.0.0.1:8080".to_string());
    let queue: String = args.get("queue", "lt-jobs".to_string());
    let n: usize = args.get("n", 2000);
    let clients: usize = args.get("clients", 16);
    let seconds: u64 = args.get("seconds", 20);

    // One job first, so that the worker is known to be polling before the clock starts.
    let warm = run_job(&mut Conn::new(&addr), &queue, usize::MAX).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (addr, queue, next) = (addr.clone(), queue.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(&addr);
            let (mut latencies, mut errors) = (Vec::new(), 0usize);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || Instant::now() >= deadline {
                    return (latencies, errors);
                }
                match run_job(&mut conn, &queue, i).await {
                    Ok(ms) => latencies.push(ms),
                    Err(_) => errors += 1,
                }
            }
        }));
    }
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (l, e) = task.await.unwrap_or_default();
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "RESULT scenario=jobs clients={clients} warmup_ok={} done={} errors={errors} seconds={elapsed:.1} \
         rate={:.0} {}",
        warm.is_ok(),
        latencies.len(),
        latencies.len() as f64 / elapsed,
        percentiles(&mut latencies)
    );
}

/// Triggers job `{"n":i}` and collects it; the ms from trigger sent to Done received.
async fn run_job(conn: &mut Conn, queue: &str, i: usize) -> Result<f64, String> {
    let sent = Instant::now();
    let job = format!("{{\"n\":{i}}}");
    let path = format!("/trigger?queue={queue}");
    let triggered = conn.send("POST", &path, job.as_bytes(), SHORT).await;
    let triggered = triggered.map_err(|e| e.to_string())?;
    let location = triggered.header("location").map(String::from);
    let Some(done) = location.filter(|_| triggered.status == 202) else {
        return Err(format!("trigger: {}", triggered.status));
    };
    let collected = conn
        .send("GET", &format!("{done}?wait=30"), b"", WAIT)
        .await;
    let collected = collected.map_err(|e| e.to_string())?;
    let ms = sent.elapsed().as_secs_f64() * 1000.0;
    let body = String::from_utf8_lossy(&collected.body);
    if collected.status == 200 && is_done(&body, &job) {
        Ok(ms)
    } else {
        Err(format!("done: {} {body}", collected.status))
    }
}

/// A Done answer whose result is the job itself (what `cat` gives back).
fn is_done(body: &str, job: &str) -> bool {
    body.contains("\"status\":\"Done\"") && body.contains(&format!("\"result\":{job}"))
}

pub async fn websocket(args: &Args) {
    let addr: String = args.get("addr", "127.0.0.1:8080".to_string());
    let queue: String = args.get("queue", "lt-jobs".to_string());
    let n: usize = args.get("n", 500);
    let seconds: u64 = args.get("seconds", 30);
    let spawns: usize = args.get("spawns", 200);

    let url = format!("ws://{addr}/ws?queue={queue}");
    let connected = tokio_tungstenite::connect_async(url.as_str()).await;
    let (mut socket, _) = crate::util::or_exit(connected, "WebSocket to the relay");
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut done, mut started, mut errors) = (Vec::new(), Vec::new(), 0);
    // Job 0 is a warm-up (the worker is polling once it is done); it is not counted.
    for i in 0..=n {
        if Instant::now() >= deadline {
            break;
        }
        let job = format!("{{\"n\":{i}}}");
        let sent = Instant::now();
        if socket.send(Message::text(job.clone())).await.is_err() {
            errors += 1;
            break;
        }
        let (mut ack, mut finished) = (None, None);
        while finished.is_none() {
            let frame = tokio::time::timeout(SHORT, socket.next()).await;
            let Ok(Some(Ok(Message::Text(text)))) = frame else {
                if matches!(frame, Ok(Some(Ok(_)))) {
                    continue; // pings and the like
                }
                break;
            };
            if text.contains("\"status\":\"started\"") {
                ack = Some(sent.elapsed());
            } else if is_done(&text, &job) {
                finished = Some(sent.elapsed());
            } else {
                break;
            }
        }
        match (ack, finished) {
            (Some(a), Some(f)) if i > 0 => {
                started.push(a.as_secs_f64() * 1000.0);
                done.push(f.as_secs_f64() * 1000.0);
            }
            (Some(_), Some(_)) => {}
            _ => errors += 1,
        }
    }
    let _ = socket.close(None).await;
    let mut spawn_ms = spawn_cat(spawns).await;
    println!(
        "RESULT scenario=jobs-ws jobs={} errors={errors} {} started_{} cat_{}",
        done.len(),
        percentiles(&mut done),
        percentiles(&mut started).replace(' ', " started_"),
        percentiles(&mut spawn_ms).replace(' ', " cat_"),
    );
}

/// Runs `cat` `count` times as the worker does (a job on stdin, stdout read to the end): ms each.
async fn spawn_cat(count: usize) -> Vec<f64> {
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let child = tokio::process::Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn();
        let Ok(mut child) = child else { break };
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"{\"n\":1}").await;
        }
        if child.wait_with_output().await.is_ok() {
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    times
}
