//! `cargo xtask bench [--quick] [--out FILE.json] [-- ambit-bench args]`: setup, a release build
//! of the binaries, then `target/release/ambit-bench` (in the test bed's crate: it needs protoc to
//! build, which setup installs, so xtask does not depend on it).

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};

use crate::util::{cargo, command_line, header, is_root, run, step, target_dir};

/// What the test bed reads to find the agent (`ambit_testbed::AGENT_BIN_ENV`).
const AGENT_BIN_ENV: &str = "AMBIT_AGENT_BIN";

pub struct Options {
    pub quick: bool,
    pub out: Option<PathBuf>,
    pub no_build: bool,
    pub args: Vec<String>,
}

pub fn bench(options: &Options) -> Result<ExitCode> {
    if !is_root() {
        bail!("the benchmark needs root for network namespaces, cgroups and eBPF; run it as root");
    }
    if !options.no_build {
        crate::setup::run()?;
        header("build: cargo build --release --bins");
        // The eBPF crate builds only for the bpf target (the agent's build.rs builds it).
        run(cargo().args([
            "build",
            "--release",
            "--workspace",
            "--exclude",
            "ambit-ebpf",
            "--bins",
        ]))
        .context("the release build failed; see the compiler output above")?;
    }
    let release = target_dir().join("release");
    let bench = release.join("ambit-bench");
    let agent = release.join("ambit-agent");
    for bin in [&bench, &agent] {
        if !bin.is_file() {
            bail!(
                "{} was not built; run `cargo build --release -p ambit-testbed -p ambit-agent --bins` \
                 to see why, or `cargo xtask bench` without --no-build",
                bin.display()
            );
        }
    }
    let mut cmd = Command::new(&bench);
    if options.quick {
        cmd.arg("--quick");
    }
    cmd.arg("--out").arg(match &options.out {
        Some(out) => absolute(out)?,
        None => target_dir().join("bench").join("latest.json"),
    });
    cmd.args(&options.args).env(AGENT_BIN_ENV, &agent);
    step(&format!("$ {}", command_line(&cmd)));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", bench.display()))?;
    // Ctrl-C reaches the whole process group: ambit-bench then kills its tools and tears the bed
    // down, which we wait for instead of dying first and returning the shell mid-cleanup.
    ignore_sigint();
    let status = child
        .wait()
        .with_context(|| format!("cannot wait for {}", bench.display()))?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `path` against the directory xtask was started in (cargo keeps the caller's directory).
fn absolute(path: &Path) -> Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_owned());
    }
    Ok(std::env::current_dir()
        .context("cannot read the current directory")?
        .join(path))
}

#[allow(unsafe_code)]
fn ignore_sigint() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: SIG_IGN runs no code in this process; nothing else here handles SIGINT.
    if let Err(e) = unsafe { signal(Signal::SIGINT, SigHandler::SigIgn) } {
        step(&format!(
            "cannot ignore Ctrl-C while the benchmark runs: {e}"
        ));
    }
}
