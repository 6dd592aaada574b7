//! `loadgen`: Burrow's load generator for the scenarios wrk cannot express. Each subcommand runs
//! one bounded scenario against a relay on 127.0.0.1 and prints one parseable `RESULT` line.
//!
//! Usage: `loadgen <wake|idle|race|reply|faults> --addr 127.0.0.1:PORT [--option value]...`
//! (options per scenario in loadtest/README.md; `--threads N` sets tokio worker threads).

mod faults;
mod http;
mod idle;
mod race;
mod reply;
mod util;
mod wake;

use util::Args;

fn main() {
    let mut argv = std::env::args().skip(1);
    let scenario = argv.next().unwrap_or_default();
    let args = Args::parse(argv).unwrap_or_else(|e| {
        eprintln!("loadgen: {e}");
        std::process::exit(2)
    });
    let threads: usize = args.get("threads", 1);
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    runtime.block_on(async {
        match scenario.as_str() {
            "wake" => wake::run(&args).await,
            "idle" => idle::run(&args).await,
            "race" => race::run(&args).await,
            "reply" => reply::run(&args).await,
            "faults" => faults::run(&args).await,
            other => {
                eprintln!("loadgen: unknown scenario {other:?} (wake, idle, race, reply, faults)");
                std::process::exit(2)
            }
        }
    });
}
