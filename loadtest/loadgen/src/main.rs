//! `loadgen`: Burrow's load generator for the scenarios wrk cannot express. Each subcommand runs
//! one bounded scenario against a relay on 127.0.0.1 and prints one parseable `RESULT` line.
//!
//! Usage: `loadgen <scenario> --addr 127.0.0.1:PORT [--option value]...` with scenario one of
//! wake, idle, race, reply, faults, jobs, jobs-ws, upstream (a service to route to), transfer
//! (options per scenario in loadtest/README.md; `--threads N` sets tokio worker threads).

mod faults;
mod http;
mod idle;
mod jobs;
mod race;
mod reply;
mod transfer;
mod upstream;
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
    let built = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let runtime = util::or_exit(built, "start the tokio runtime");
    runtime.block_on(async {
        match scenario.as_str() {
            "wake" => wake::run(&args).await,
            "idle" => idle::run(&args).await,
            "race" => race::run(&args).await,
            "reply" => reply::run(&args).await,
            "faults" => faults::run(&args).await,
            "jobs" => jobs::throughput(&args).await,
            "jobs-ws" => jobs::websocket(&args).await,
            "upstream" => upstream::run(&args).await,
            "transfer" => transfer::run(&args).await,
            other => {
                eprintln!("loadgen: unknown scenario {other:?} (see src/main.rs)");
                std::process::exit(2)
            }
        }
    });
}
