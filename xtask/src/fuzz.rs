//! `cargo xtask fuzz`: the coverage-guided runs of the fuzz targets in `fuzz/` with cargo-fuzz
//! (libFuzzer, nightly). Installs cargo-fuzz when it is missing. Each target starts from its seed
//! corpus (`fuzz/corpus/<target>`) and the crashers kept as regressions
//! (`fuzz/regressions/<target>`); what it learns goes to `target/fuzz/corpus/<target>`, a crash to
//! `target/fuzz/artifacts/<target>/`. The summary says how many inputs each target ran.

use std::{fs, process::Command};

use anyhow::{Context, Result, bail};

use crate::util::{cargo, header, output_of, run as run_command, step, target_dir, workspace_root};

/// The libFuzzer binaries of `fuzz/Cargo.toml`, in the order they run (the same names as
/// `ambit_fuzz::TARGETS`, which xtask does not depend on).
pub const TARGETS: &[&str] = &[
    "policy", "xds", "ads", "path", "hbone", "http", "identity", "config", "cni", "dns",
];

pub struct Options {
    pub seconds: u64,
    pub runs: Option<u64>,
    pub targets: Vec<String>,
    pub sanitizer: String,
}

pub fn fuzz(options: &Options) -> Result<std::process::ExitCode> {
    for t in &options.targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!(
                "no fuzz target {t:?}; the targets are {}",
                TARGETS.join(", ")
            );
        }
    }
    let targets: Vec<&str> = if options.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        options.targets.iter().map(String::as_str).collect()
    };
    cargo_fuzz()?;
    let root = workspace_root();
    let work = target_dir().join("fuzz");
    let mut results = Vec::new();
    for target in &targets {
        header(&format!("fuzz {target}: {} s", options.seconds));
        let corpus = work.join("corpus").join(target);
        let artifacts = work.join("artifacts").join(target);
        fs::create_dir_all(&corpus)
            .with_context(|| format!("cannot create {}", corpus.display()))?;
        fs::create_dir_all(&artifacts)
            .with_context(|| format!("cannot create {}", artifacts.display()))?;
        let log = work.join(format!("{target}.log"));
        let log_file =
            fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new("cargo");
        // The release profile's fat LTO and single codegen unit (for the shipped agent) would
        // make each target's link take minutes; fuzzing needs optimised code, not that.
        cmd.env("CARGO_PROFILE_RELEASE_LTO", "false")
            .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16")
            .env("CARGO_PROFILE_RELEASE_DEBUG", "line-tables-only");
        cmd.current_dir(&root)
            .args([
                "+nightly",
                "fuzz",
                "run",
                "--fuzz-dir",
                "fuzz",
                "--features",
                "libfuzzer",
            ])
            .args(["--sanitizer", &options.sanitizer])
            .arg(target)
            .arg(&corpus);
        for seeds in ["corpus", "regressions"] {
            let dir = root.join("fuzz").join(seeds).join(target);
            if dir.is_dir() {
                cmd.arg(dir);
            }
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={}", options.seconds))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .args(options.runs.map(|n| format!("-runs={n}")))
            .arg("-print_final_stats=1")
            // An input slower than this is a hang (the async targets give up after 2 s).
            .arg("-timeout=10")
            .stderr(log_file);
        step(&format!(
            "$ {} 2> {}",
            crate::util::command_line(&cmd),
            log.display()
        ));
        let status = cmd
            .status()
            .with_context(|| "cannot run `cargo +nightly fuzz`".to_owned())?;
        let text = fs::read_to_string(&log).unwrap_or_default();
        let execs = stat(&text, "stat::number_of_executed_units:");
        let crashed = !status.success();
        if crashed {
            // The end of the log has libFuzzer's report and the input it saved.
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            for line in tail.into_iter().rev() {
                eprintln!("    | {line}");
            }
        }
        step(&format!(
            "{target}: {} inputs, {}",
            execs.map_or("?".to_owned(), |n| n.to_string()),
            if crashed { "FAILED" } else { "no crash" }
        ));
        results.push((*target, execs, crashed));
    }
    header("fuzz summary");
    for (target, execs, crashed) in &results {
        step(&format!(
            "{target:<9} {:>12} inputs  {}",
            execs.map_or("?".to_owned(), |n| n.to_string()),
            if *crashed {
                "FAILED (see target/fuzz/)"
            } else {
                "0 crashes"
            }
        ));
    }
    if results.iter().any(|(_, _, crashed)| *crashed) {
        step(
            "a crash: fix it, then keep the input libFuzzer saved in target/fuzz/artifacts/ as \
             fuzz/regressions/<target>/<name> so the smoke test replays it",
        );
        return Ok(std::process::ExitCode::FAILURE);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The number after `key` in libFuzzer's final stats.
fn stat(log: &str, key: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

/// cargo-fuzz, installed from crates.io when `cargo fuzz` is missing.
fn cargo_fuzz() -> Result<()> {
    if let Some(version) = output_of("cargo", &["+nightly", "fuzz", "--version"]) {
        step(&format!("cargo-fuzz: present ({})", version.trim()));
        return Ok(());
    }
    step("cargo-fuzz: missing, installing it (takes a few minutes)");
    run_command(cargo().args(["install", "cargo-fuzz", "--locked"]))
        .context("`cargo install cargo-fuzz` failed; crates.io must be reachable")
}

#[cfg(test)]
mod tests {
    #[test]
    fn final_stats_are_read() {
        let log = "#1000 DONE cov: 1\nstat::number_of_executed_units: 12345\nstat::x: 1\n";
        assert_eq!(
            super::stat(log, "stat::number_of_executed_units:"),
            Some(12345)
        );
        assert_eq!(super::stat("", "stat::number_of_executed_units:"), None);
    }
}
