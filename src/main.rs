//! The `burrow` binary: parse the command line, run, and turn failure into an exit code.

/// mimalloc: per-thread free lists suit a relay whose requests allocate and free many small
/// buffers on the thread that serves them (glibc's malloc was ~10 % of the relay's profile).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    burrow::run()
}
