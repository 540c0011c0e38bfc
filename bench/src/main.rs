//! `tabhub-bench`: drives a real tabhub process with load generated in other processes, and reports what it
//! costs. `tabhub-bench --scenario NAME` (see `--help`); the README's Performance section lists the commands.
//!
//! Processes (all on 127.0.0.0/8, all children killed when the orchestrator exits, panics or gets Ctrl-C):
//! - the orchestrator (this binary without a subcommand): generates the configuration, measures tabhub from
//!   `/proc`, steers the others and prints the table ([`orchestrate`], [`scenarios`], [`report`]);
//! - `tabhub serve --config target/bench/<scenario>.toml`: the server under test (two instances and a
//!   `redis-server` in the publish scenario);
//! - `tabhub-bench fixtures`: the fixture realm (JWKS), the fixture GitLab with an event emitter, and a counting
//!   backend gateway ([`fixtures`]);
//! - `tabhub-bench client`: N load processes, each under 19,000 sockets and binding its own source address
//!   127.0.0.x, reporting JSON lines on stdout ([`clients`]).

mod cli;
mod clients;
mod fixtures;
mod orchestrate;
mod procs;
mod publisher;
mod report;
mod scenarios;
mod shape;
mod tokens;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        Some(cli::Hidden::Fixtures(a)) => fixtures::main(a),
        Some(cli::Hidden::Client(a)) => clients::main(a),
        None => run(cli.run),
    }
}

/// The orchestrator: runs the scenario on a one-thread runtime.
fn run(args: cli::RunArgs) -> ExitCode {
    // One thread: children are spawned from the main thread, which PR_SET_PDEATHSIG ties them to.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tabhub-bench: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        tokio::select! {
            r = scenarios::run(&args) => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        }
    });
    // Dropping the runtime drops every child handle left: they are killed.
    drop(rt);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tabhub-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
