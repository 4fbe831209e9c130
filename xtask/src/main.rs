//! `cargo xtask`: Ambit's developer tasks (the alias lives in `.cargo/config.toml`).
//!
//! - `setup`: install what a fresh Debian machine lacks to build the agent and its eBPF programs.
//! - `test`: setup, build the binaries, run the whole test suite against them.
//! - `demo`: setup, build, then two nodes with pods and agents on the test bed, real traffic, and a
//!   report of which connections went through the agents.
//! - `bench`: setup, release build, then Ambit against the direct path with real load tools.
//! - `fuzz`: the coverage-guided fuzz targets (cargo-fuzz, libFuzzer) for a given time each.

mod bench;
mod fuzz;
mod setup;
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
    /// Setup, build, and run the two-node demo with real traffic through the agents
    /// (`ambit-demo`; arguments after `--` go to it, e.g. `-- --help`); `--keep` leaves it
    /// running to poke at, `--down` removes it.
    Demo {
        /// Skip setup and build; use the binaries already in the target dir.
        #[arg(long)]
        no_build: bool,
        /// After the scenes, leave the two nodes running in the background and print the
        /// `ambitctl` and `ip netns exec` commands to try; `--down` removes them.
        #[arg(long, conflicts_with = "down")]
        keep: bool,
        /// Remove a demo left running by `--keep`.
        #[arg(long)]
        down: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, release build, then the benchmark: the direct, same-node and cross-node paths
    /// measured with iperf3, sockperf, wrk, hey and nginx on the test bed, agent CPU and memory,
    /// and the xDS scale steps (`ambit-bench`; arguments after `--` go to it, e.g.
    /// `-- --runs 5`, `-- --help`).
    Bench {
        /// Every scenario once, briefly; skips the 100k-workload scale step.
        #[arg(long)]
        quick: bool,
        /// The JSON report (default: target/bench/latest.json).
        #[arg(long, value_name = "FILE.json")]
        out: Option<std::path::PathBuf>,
        /// Skip setup and build; use the release binaries already in the target dir.
        #[arg(long)]
        no_build: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The fuzz targets under libFuzzer (cargo-fuzz on nightly, installed when missing), one
    /// after the other, from their seed corpus and kept crashers; prints how many inputs each
    /// ran. The README's test command runs each only briefly, without coverage guidance.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60, value_name = "N")]
        seconds: u64,
        /// Stop a target after this many inputs, if that comes before --seconds.
        #[arg(long, value_name = "N")]
        runs: Option<u64>,
        /// Only this target (repeatable): policy, xds, path, hbone, http, identity, config, cni.
        #[arg(long = "target", value_name = "NAME")]
        targets: Vec<String>,
        /// cargo-fuzz's sanitizer: address (default), leak, memory, thread, or none (about
        /// twice as many inputs per second; panics and hangs are still found).
        #[arg(long, default_value = "address")]
        sanitizer: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<ExitCode> = match cli.command {
        Command::Setup => setup::run().map(|()| ExitCode::SUCCESS),
        Command::Test { args } => util::test(&args),
        Command::Demo {
            no_build,
            keep,
            down,
            args,
        } => util::demo(no_build, keep, down, &args),
        Command::Bench {
            quick,
            out,
            no_build,
            args,
        } => bench::bench(&bench::Options {
            quick,
            out,
            no_build,
            args,
        }),
        Command::Fuzz {
            seconds,
            runs,
            targets,
            sanitizer,
        } => fuzz::fuzz(&fuzz::Options {
            seconds,
            runs,
            targets,
            sanitizer,
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
