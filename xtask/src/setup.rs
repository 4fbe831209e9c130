//! `cargo xtask setup`: installs what a fresh Debian bookworm machine (root, rustup with stable and
//! nightly) lacks to build and test Ambit. Idempotent: each step checks first and says what it
//! skips.

use std::{fs, process::Command};

use anyhow::{Context, Result, bail};

use crate::util::{header, is_root, output_of, run as run_command, step};

/// Debian packages: LLVM 22 for bpf-linker, and the tools the test bed, demo and bench use.
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "tcpdump",
    // The HBONE tests use `openssl s_client` as a client without a certificate.
    "openssl",
    // The waypoint tests make HTTP/1.1 and HTTP/2 requests from pods with curl.
    "curl",
    // protoc and the well-known .proto files (google/protobuf/struct.proto), for ambit-proto.
    "protobuf-compiler",
    "libprotobuf-dev",
    // The load tools of `cargo xtask bench` and its smoke test (ambit-bench installs them too
    // when missing): throughput, ping-pong latency, HTTP server, kept-connection and
    // new-connection HTTP load.
    "iperf3",
    "sockperf",
    "nginx",
    "wrk",
    "hey",
    // tests/tests/manifests.rs: the CNI install script (deploy/daemonset/ambit-cni-install) runs
    // on jq, and kubernetes-validate lives in a venv (Debian's Python is externally managed).
    "jq",
    "python3-venv",
    // tests/tests/cni.rs: the reference CNI plugins (bridge, host-local) ambit-cni is chained after.
    "containernetworking-plugins",
];
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const BPFFS: &str = "/sys/fs/bpf";
/// kubernetes-validate from PyPI (bundles the Kubernetes JSON schemas, validates offline), which
/// tests/tests/manifests.rs runs on deploy/daemonset. Pinned: the bundled schemas change with it.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate";
const KUBERNETES_VALIDATE_VERSION: &str = "1.33.1";

pub fn run() -> Result<()> {
    header("setup");
    rust_src()?;
    debian_packages()?;
    bpf_linker()?;
    bpffs()?;
    kubernetes_validate()?;
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

/// The venv holding kubernetes-validate: `<target>/tools/kubernetes-validate`. The manifest
/// tests look for `bin/kubernetes-validate` there (unless `AMBIT_KUBERNETES_VALIDATE` names one).
fn kubernetes_validate_venv() -> std::path::PathBuf {
    crate::util::target_dir()
        .join("tools")
        .join(KUBERNETES_VALIDATE)
}

fn kubernetes_validate() -> Result<()> {
    let venv = kubernetes_validate_venv();
    let exe = venv.join("bin").join(KUBERNETES_VALIDATE);
    let exe_str = exe.to_string_lossy().into_owned();
    let installed = output_of(&exe_str, &["--version"]);
    if installed
        .as_deref()
        .is_some_and(|v| v.trim() == KUBERNETES_VALIDATE_VERSION)
    {
        step(&format!(
            "{KUBERNETES_VALIDATE}: present ({KUBERNETES_VALIDATE_VERSION}, {})",
            exe.display()
        ));
        return Ok(());
    }
    step(&format!(
        "{KUBERNETES_VALIDATE}: {}, installing {KUBERNETES_VALIDATE_VERSION} from PyPI into a venv \
         at {}",
        if installed.is_some() {
            "another version"
        } else {
            "missing"
        },
        venv.display()
    ));
    // --clear: a venv from another version or a broken one is rebuilt, not patched.
    let mut venv_cmd = Command::new("python3");
    venv_cmd.args(["-m", "venv", "--clear"]).arg(&venv);
    run_command(&mut venv_cmd).context(
        "cannot create a Python venv; install python3-venv (`apt-get install -y python3-venv`)",
    )?;
    let requirement = format!("{KUBERNETES_VALIDATE}=={KUBERNETES_VALIDATE_VERSION}");
    let mut pip = Command::new(venv.join("bin").join("pip"));
    pip.args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(&requirement);
    run_command(&mut pip).with_context(|| {
        format!("`pip install {requirement}` failed; PyPI must be reachable from this machine")
    })?;
    if output_of(&exe_str, &["--version"]).is_none() {
        bail!("{} was installed but does not run", exe.display());
    }
    Ok(())
}
