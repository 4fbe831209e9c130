//! `cargo xtask`: Ambit's developer tasks (the alias lives in `.cargo/config.toml`).
//!
//! - `setup`: install what a fresh Debian machine lacks to build the agent and its eBPF programs.
//! - `test`: setup, build the binaries, run the whole test suite against them.
//! - `demo`: setup, build, then two nodes with pods and agents on the test bed, real traffic, and a
//!   report of which connections went through the agents.

mod demo;
mod setup;
mod sigint;
mod util;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Ambit's developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install missing build and test prerequisites (idempotent; needs root to install).
    Setup,
    /// Setup, build the binaries, then `cargo test` the workspace with them.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. `-- -p ambit-testbed`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, build, and run the two-node demo with real traffic through the agents.
    Demo(demo::Options),
    /// Benchmarks (not implemented yet).
    Bench,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<ExitCode> = match cli.command {
        Command::Setup => setup::run().map(|()| ExitCode::SUCCESS),
        Command::Test { args } => util::test(&args),
        Command::Demo(options) => demo::run(&options).map(|()| ExitCode::SUCCESS),
        Command::Bench => {
            eprintln!("cargo xtask bench: not implemented yet (issue 6)");
            Ok(ExitCode::FAILURE)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
