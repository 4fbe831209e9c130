//! `cargo xtask setup`: installs what a fresh Debian bookworm machine (root, rustup with stable and
//! nightly) lacks to build and test Ambit. Idempotent: each step checks first and says what it
//! skips.

use std::{fs, process::Command};

use anyhow::{Context, Result, bail};

use crate::util::{header, is_root, output_of, run as run_command, step};

/// Debian packages: LLVM 22 for bpf-linker, and the tools the test bed and demo use.
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "tcpdump",
    // The HBONE tests use `openssl s_client` as a client without a certificate.
    "openssl",
    // protoc and the well-known .proto files (google/protobuf/struct.proto), for ambit-proto.
    "protobuf-compiler",
    "libprotobuf-dev",
];
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const BPFFS: &str = "/sys/fs/bpf";

pub fn run() -> Result<()> {
    header("setup");
    rust_src()?;
    debian_packages()?;
    bpf_linker()?;
    bpffs()?;
    Ok(())
}

fn rust_src() -> Result<()> {
    let installed = output_of(
        "rustup",
        &["component", "list", "--installed", "--toolchain", "nightly"],
    )
    .with_context(|| {
        "cannot list the nightly toolchain's components with rustup; install rustup with the \
         stable and nightly toolchains (`rustup toolchain install nightly`)"
    })?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        step("rust-src (nightly): present");
        return Ok(());
    }
    step("rust-src (nightly): missing, adding it");
    run_command(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("cannot add rust-src to the nightly toolchain; the Rust distribution server must be reachable")
}

fn is_installed(package: &str) -> bool {
    output_of("dpkg-query", &["-W", "-f=${Status}", package])
        .is_some_and(|s| s.trim() == "install ok installed")
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        step(&format!(
            "Debian packages: present ({})",
            DEBIAN_PACKAGES.join(" ")
        ));
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!(
            "setup needs root to install Debian packages; run as root or install: \
             apt-get install -y {list}"
        );
    }
    step(&format!("Debian packages: installing {list}"));
    run_command(Command::new("apt-get").arg("update")).context(
        "`apt-get update` failed; the Debian package registry must be reachable from this machine",
    )?;
    run_command(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(&missing),
    )
    .with_context(|| {
        format!(
            "`apt-get install -y {list}` failed; the Debian package registry must be reachable \
             and the packages must exist for this release (bookworm with LLVM 22)"
        )
    })
}

fn bpf_linker() -> Result<()> {
    if let Some(version) = output_of("bpf-linker", &["--version"]) {
        step(&format!("bpf-linker: present ({})", version.trim()));
        return Ok(());
    }
    step("bpf-linker: missing, building it against LLVM 22 (takes a few minutes)");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![std::path::PathBuf::from(LLVM_BIN)];
    paths.extend(std::env::split_paths(&path));
    let path = std::env::join_paths(paths).context("BUG: PATH cannot be joined")?;
    run_command(crate::util::cargo().env("PATH", path).args([
        "install",
        "bpf-linker",
        "--no-default-features",
        "--features",
        "llvm-22",
    ]))
    .context(
        "`cargo install bpf-linker` failed; crates.io must be reachable and llvm-22-dev \
         installed (llvm-config in /usr/lib/llvm-22/bin)",
    )?;
    if output_of("bpf-linker", &["--version"]).is_none() {
        bail!("bpf-linker was installed but does not run; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

fn bpffs_mounted() -> bool {
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|text| {
        text.lines().any(|line| {
            let Some((left, right)) = line.split_once(" - ") else {
                return false;
            };
            left.split_whitespace().nth(4) == Some(BPFFS)
                && right.split_whitespace().next() == Some("bpf")
        })
    })
}

fn bpffs() -> Result<()> {
    if bpffs_mounted() {
        step(&format!("bpffs: mounted at {BPFFS}"));
        return Ok(());
    }
    if !is_root() {
        bail!("setup needs root to mount bpffs; run as root or: mount -t bpf bpf {BPFFS}");
    }
    step(&format!("bpffs: not mounted, mounting it at {BPFFS}"));
    run_command(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
        .context("cannot mount bpffs; does the kernel have CONFIG_BPF_SYSCALL?")
}
