//! The `burrow` binary: parse the command line, run, and turn failure into an exit code.

fn main() -> std::process::ExitCode {
    burrow::run()
}
