//! `ambit-demo`: the two-node demo on the network-namespace test bed (what `cargo xtask demo` runs
//! once the prerequisites are installed and the binaries built), and `--cleanup-stale` for the
//! leftovers of crashed test beds (run by `cargo xtask test` before the suite).
//!
//! It lives here, not in xtask, so that xtask itself builds with nothing but Rust: xtask installs
//! `protoc` and the eBPF toolchain, which the test bed's crates need to build.

mod demo;
mod sigint;

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "ambit-demo",
    about = "Ambit's two-node demo on network namespaces"
)]
struct Cli {
    #[command(flatten)]
    options: demo::Options,
    /// Only remove the namespaces, links, cgroups and pins left by crashed test beds, then exit.
    #[arg(long)]
    cleanup_stale: bool,
    /// Stop a demo kept with `--keep` (it tears its cluster down), then exit.
    #[arg(long, conflicts_with = "cleanup_stale")]
    down: bool,
}

pub fn header(title: &str) {
    eprintln!("\n==> {title}");
}

pub fn step(message: &str) {
    eprintln!("    {message}");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = if cli.down {
        demo::down()
    } else if cli.cleanup_stale {
        let cleaned = ambit_testbed::cleanup_stale();
        if !cleaned.is_empty() {
            step(&format!(
                "removed leftovers of crashed test beds: {cleaned:?}"
            ));
        }
        Ok(())
    } else {
        demo::run(&cli.options)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
