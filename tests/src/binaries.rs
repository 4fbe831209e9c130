//! Finding the binaries the bed runs: `ambit-agent` and `ambit-testpod`.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Environment variable naming the `ambit-agent` binary.
pub const AGENT_BIN_ENV: &str = "AMBIT_AGENT_BIN";
/// Environment variable naming the `ambitctl` binary.
pub const CTL_BIN_ENV: &str = "AMBIT_CTL_BIN";
/// Environment variable naming the `ambit-testpod` binary.
pub const TESTPOD_BIN_ENV: &str = "AMBIT_TESTPOD_BIN";

/// Finds binary `name`: `$env_var` if set, else next to the running executable. Test executables
/// live in `target/<profile>/deps/`, so `<exe dir>/../<name>` is tried first, then `<exe dir>/<name>`
/// (for programs such as xtask that live in `target/<profile>/` themselves).
pub(crate) fn find(name: &str, env_var: &str, how_to_build: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!(
            "{name} binary not found at {} (from {env_var}); {how_to_build}",
            path.display()
        );
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates = [dir.join("..").join(name), dir.join(name)];
    for c in &candidates {
        if c.is_file() {
            return Ok(c.canonicalize().unwrap_or_else(|_| c.clone()));
        }
    }
    bail!(
        "{name} binary not found at {} or {} (set {env_var} to its path to use another); {how_to_build}",
        candidates[0].display(),
        candidates[1].display()
    )
}

/// The `ambit-agent` binary the bed runs.
pub fn agent() -> Result<PathBuf> {
    find(
        "ambit-agent",
        AGENT_BIN_ENV,
        "run `cargo xtask test` or `cargo build -p ambit-agent` first",
    )
}

/// The `ambit-testpod` binary the bed runs in pods.
pub fn testpod() -> Result<PathBuf> {
    find(
        "ambit-testpod",
        TESTPOD_BIN_ENV,
        "run `cargo xtask test` or `cargo build -p ambit-testbed --bins` first",
    )
}

/// The `ambitctl` binary, built beside `ambit-agent`.
pub fn ambitctl() -> Result<PathBuf> {
    find(
        "ambitctl",
        CTL_BIN_ENV,
        "run `cargo xtask test` or `cargo build -p ambit-agent` first",
    )
}
