//! The command line: `burrow [serve | worker | agent]`, parsed with clap. The relay's settings come
//! from the environment (see `config`); `worker` and `agent` take flags, each with an environment
//! variable of its own.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

/// An HTTP relay for parties that cannot reach each other directly.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default). Configured by environment variables; see README.md.
    #[command(after_help = crate::config::VARIABLES_HELP)]
    Serve {
        /// Take over the listening socket of a running relay (graceful upgrade): start this, then
        /// send SIGQUIT to the old process, which hands over its socket and drains.
        #[arg(short, long)]
        upgrade: bool,
    },
    /// Take jobs from a queue on a relay and run a command for each, with the job's JSON on stdin;
    /// its stdout is the result (docs/PROTOCOL.md part 2).
    Worker(crate::worker::WorkerArgs),
    /// Dial out to a relay, register a name, and forward the requests routed to that name to an
    /// upstream HTTP service (docs/PROTOCOL.md part 3).
    Agent(crate::agent::AgentArgs),
}

/// Parses the command line and runs what it names; the exit code reports failure.
pub fn run() -> ExitCode {
    forget_empty_variables();
    let cli = Cli::try_parse().unwrap_or_else(|err| naming_the_variable(err).exit());
    // env_logger reads such a filter as unset, without a word (it warns of one it cannot parse).
    if let Err(std::env::VarError::NotUnicode(_)) = std::env::var("RUST_LOG") {
        eprintln!("burrow: RUST_LOG is not UTF-8 text: ignored");
    }
    if let Ok(filter) = std::env::var("RUST_LOG") {
        for (word, level) in misspelt_levels(&filter) {
            eprintln!(
                "burrow: RUST_LOG names a module `{word}`, not a level: only its lines are \
                 logged (did you mean `{level}`?)"
            );
        }
    }
    // fred logs every reconnection attempt of every connection; Burrow logs store trouble itself,
    // throttled. A RUST_LOG that names fred gets its lines; one that does not (`info`, `warn`)
    // does not.
    let filter = match std::env::var("RUST_LOG") {
        Ok(filter) if filter.contains("fred") => filter,
        Ok(filter) if !filter.trim().is_empty() => format!("{filter},fred=error"),
        _ => "info,fred=error".to_owned(),
    };
    let logger = env_logger::Builder::new().parse_filters(&filter).build();
    log::set_max_level(logger.filter());
    // Only fails if a logger is set already, which nothing else does.
    let _ = log::set_boxed_logger(Box::new(Redacting(logger)));
    match cli.command.unwrap_or(Command::Serve { upgrade: false }) {
        Command::Serve { upgrade } => serve(upgrade),
        Command::Worker(args) => crate::worker::run(args),
        Command::Agent(args) => crate::agent::run(args),
    }
}

/// The bare words of a `RUST_LOG` filter that are no level but within two letters of one, each
/// with that level. env_logger reads such a word (`inof`) as a module to log everything of, and
/// no module is called that: the relay would log nothing, without a word.
fn misspelt_levels(filter: &str) -> Vec<(&str, &'static str)> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    // A directive is `[module][=level]`; the filter may end in `/regex`.
    let directives = filter.split('/').next().unwrap_or_default();
    directives
        .split(',')
        .map(str::trim)
        .filter(|word| !word.is_empty() && !word.contains('='))
        .filter(|word| word.parse::<log::LevelFilter>().is_err())
        .filter_map(|word| {
            let level = crate::config::closest(&word.to_ascii_lowercase(), LEVELS.into_iter(), 2)?;
            Some((word, level))
        })
        .collect()
}

/// Unsets every `BURROW_*` variable that is set but empty, so that the worker's and the agent's
/// flags read one as unset, as the relay's settings do (clap would take the empty value: a shared
/// env file's `BURROW_JOBS_QUEUE=` stopped the worker). Runs first, before any other thread.
fn forget_empty_variables() {
    let empty: Vec<OsString> = std::env::vars_os()
        .filter(|(name, value)| {
            value.is_empty()
                && name
                    .to_str()
                    .is_some_and(|name| name.starts_with("BURROW_"))
        })
        .map(|(name, _)| name)
        .collect();
    for name in empty {
        std::env::remove_var(name);
    }
}

/// `err`, naming environment variables where clap names only flags, which a container
/// configured by `BURROW_*` variables never typed: the variable a refused value came from, when
/// the flag was not on the command line (`BURROW_WORKER_CONCURRENCY (--concurrency)`), and the
/// variable that could have given a missing argument (`--name <NAME> (or BURROW_AGENT_NAME)`).
fn naming_the_variable(mut err: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    match (err.kind(), err.get(ContextKind::InvalidArg)) {
        (
            ErrorKind::InvalidValue | ErrorKind::ValueValidation,
            Some(ContextValue::String(shown)),
        ) => {
            let Some((flag, variable)) = variable_of(shown) else {
                return err;
            };
            let given = std::env::args_os()
                .filter_map(|a| a.into_string().ok())
                .any(|arg| {
                    arg == flag
                        || arg
                            .strip_prefix(flag.as_str())
                            .is_some_and(|r| r.starts_with('='))
                });
            if !given {
                let named = format!("{variable} ({flag})");
                err.insert(ContextKind::InvalidArg, ContextValue::String(named));
            }
        }
        (ErrorKind::MissingRequiredArgument, Some(ContextValue::Strings(missing))) => {
            let named = missing
                .iter()
                .map(|shown| match variable_of(shown) {
                    Some((_, variable)) => format!("{shown} (or {variable})"),
                    None => shown.clone(),
                })
                .collect();
            err.insert(ContextKind::InvalidArg, ContextValue::Strings(named));
        }
        _ => {}
    }
    err
}

/// The flag (`--concurrency`) and environment variable of the argument clap shows as `shown`
/// (`--concurrency <CONCURRENCY>`), if it has a variable.
fn variable_of(shown: &str) -> Option<(String, String)> {
    let command = <Cli as clap::CommandFactory>::command();
    let found = command
        .get_subcommands()
        .flat_map(|sub| sub.get_arguments())
        .find_map(|argument| {
            let flag = format!("--{}", argument.get_long()?);
            let named = shown == flag || shown.starts_with(&format!("{flag} "));
            let variable = argument.get_env()?.to_string_lossy().into_owned();
            named.then_some((flag, variable))
        });
    found
}

fn serve(upgrade: bool) -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("burrow: configuration error: {err}");
            return ExitCode::from(2);
        }
    };
    match crate::server::run(config, upgrade) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err @ crate::server::ServeError::PingoraConf { .. }) => {
            eprintln!("burrow: configuration error: {err}");
            ExitCode::from(2)
        }
        Err(err) => {
            eprintln!("burrow: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a client subcommand (`worker`, `agent`) to completion on a one-thread runtime: both
/// mostly wait on sockets and child processes, and one thread saves cross-thread wake-ups.
pub(crate) fn on_one_thread<F: std::future::Future>(work: F) -> std::io::Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(work))
}

/// env_logger without the trace lines of tungstenite's client handshake, one of which prints the
/// agent's request whole, bearer token included: tokens are never logged, whatever `RUST_LOG`.
struct Redacting(env_logger::Logger);

impl Redacting {
    fn hides(record: &log::Record) -> bool {
        record.level() == log::Level::Trace && record.target() == "tungstenite::handshake::client"
    }
}

impl log::Log for Redacting {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if !Redacting::hides(record) {
            self.0.log(record);
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::misspelt_levels;

    /// Levels in any case, directives naming modules and a filter's regex are left alone.
    #[test]
    fn levels_and_modules_are_not_misspellings() {
        for filter in [
            "info",
            "WARN,fred=debug",
            "burrow=debug,h2",
            "pingora_core/accept",
            "",
        ] {
            assert_eq!(misspelt_levels(filter), [], "{filter}");
        }
    }

    /// Bare words two letters or fewer from a level are named with it, in the filter's order.
    #[test]
    fn words_near_a_level_are_named_with_it() {
        assert_eq!(misspelt_levels("inof"), [("inof", "info")]);
        assert_eq!(
            misspelt_levels(" Wran , burrow=info,debgu/x"),
            [("Wran", "warn"), ("debgu", "debug")]
        );
    }
}
