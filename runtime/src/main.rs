//! The `lazypull` command: CLI, daemon and thin OCI runtime.
//!
//! `lazypull serve` is the daemon that owns mounts, cache and fetch engine; every other command
//! talks to it over a unix socket and starts it when it is not running (and says so). Commands
//! and flags follow ctr/nerdctl/podman conventions; `run` exits with the container's exit code,
//! and with 125 when lazypull itself failed (as podman and docker do).

mod api;
mod cli;
mod config;
mod convert;
mod daemon;
mod program;
mod report;
mod runtime;
mod spec;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` reports its own failures as 125 so they are told apart from the container's
    // exit codes.
    let failure = if matches!(cli.command, Command::Run(_)) {
        125
    } else {
        1
    };
    let settings = match cli.settings.resolve() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lazypull: {e}");
            return ExitCode::from(failure);
        }
    };
    cli::init_logging(
        settings.log_format,
        matches!(cli.command, Command::Serve | Command::FuseKeeper { .. }),
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // CPU-heavy work is bounded to one job per core in lazypull-fs; a small blocking pool
        // keeps the thread count (and per-thread allocator state) small as well.
        .max_blocking_threads(16)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lazypull: cannot start the async runtime: {e}");
            return ExitCode::from(failure);
        }
    };
    match rt.block_on(cli::execute(cli, settings)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("lazypull: {}", crate::report::chain(&e));
            ExitCode::from(failure)
        }
    }
}
