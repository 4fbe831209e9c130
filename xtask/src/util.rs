//! Shared helpers (running commands, workspace paths) and `cargo xtask test`.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_owned()
}

/// The cargo target directory: `$CARGO_TARGET_DIR` or `<root>/target`.
pub fn target_dir() -> PathBuf {
    let root = workspace_root();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir), // `join` keeps an absolute path as it is
        None => root.join("target"),
    }
}

/// Where the debug build puts binary `name`.
pub fn debug_bin(name: &str) -> PathBuf {
    target_dir().join("debug").join(name)
}

/// The cargo that runs us (`$CARGO`), or `cargo` from PATH.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn header(title: &str) {
    eprintln!("\n==> {title}");
}

pub fn step(message: &str) {
    eprintln!("    {message}");
}

pub fn command_line(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` with inherited stdio; fails with the command line if it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = command_line(cmd);
    step(&format!("$ {line}"));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{line}`; is it installed and on PATH?"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `program args` quietly; `Some(stdout)` if it ran and succeeded.
pub fn output_of<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Builds the agent and `ambit-testpod` (and the other host binaries) in the debug profile.
pub fn build_bins() -> Result<()> {
    header("build: cargo build --bins");
    // The eBPF crate builds only for the bpf target (the agent's build.rs builds it).
    run(cargo().args(["build", "--workspace", "--exclude", "ambit-ebpf", "--bins"]))
        .context("the build failed; see the compiler output above")
}

/// What the test bed reads to find the binaries (`ambit_testbed::AGENT_BIN_ENV`, ...; xtask does
/// not depend on the bed's crate, which needs `protoc` to build).
const AGENT_BIN_ENV: &str = "AMBIT_AGENT_BIN";
const TESTPOD_BIN_ENV: &str = "AMBIT_TESTPOD_BIN";

/// `cargo xtask demo [--no-build] [-- args]`: setup, build, then `ambit-demo args`.
pub fn demo(no_build: bool, keep: bool, down: bool, args: &[String]) -> Result<ExitCode> {
    if !is_root() {
        bail!("the demo needs root for network namespaces, cgroups and eBPF; run it as root");
    }
    // Taking a kept demo down needs only the binary that runs it.
    let skip_build = no_build || (down && debug_bin("ambit-demo").is_file());
    if !skip_build {
        crate::setup::run()?;
        build_bins()?;
    }
    let demo = debug_bin("ambit-demo");
    if !demo.is_file() {
        bail!(
            "{} was not built; run `cargo build -p ambit-testbed --bins` to see why, or \
             `cargo xtask demo` without --no-build",
            demo.display()
        );
    }
    let mut cmd = Command::new(&demo);
    if down {
        cmd.arg("--down");
    } else if keep {
        cmd.arg("--keep");
    }
    cmd.args(args);
    step(&format!("$ {}", command_line(&cmd)));
    if keep {
        return demo_in_background(cmd);
    }
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", demo.display()))?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What `ambit-demo --keep` prints once the cluster is ready (`demo::KEPT_MARKER` there).
const KEPT_MARKER: &str = "ambit-demo: kept";

/// Runs the demo in a process group of its own (Ctrl-C here does not reach it), its output in
/// `target/demo/keep.log`, shown here until it says the cluster is kept (or it ends); then
/// returns, leaving it running.
fn demo_in_background(mut cmd: Command) -> Result<ExitCode> {
    use std::{io::Read as _, os::unix::process::CommandExt as _};
    let dir = target_dir().join("demo");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log = dir.join("keep.log");
    let out =
        std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut child = cmd
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("cannot start the demo")?;
    let pid = child.id();
    let lost = |e: std::io::Error| {
        anyhow::anyhow!(
            "cannot follow the demo's output ({e}); it runs on (pid {pid}, output in {}); \
             `cargo xtask demo --down` stops it",
            log.display()
        )
    };
    let mut reader = std::fs::File::open(&log).map_err(lost)?;
    let mut shown = String::new();
    let mut pending = Vec::new();
    let started = std::time::Instant::now();
    loop {
        // Bytes, not text: a read may end inside a character; what is whole is shown.
        reader.read_to_end(&mut pending).map_err(lost)?;
        let whole = match std::str::from_utf8(&pending) {
            Ok(_) => pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => pending.len(),
        };
        let more: Vec<u8> = pending.drain(..whole).collect();
        let more = String::from_utf8_lossy(&more);
        eprint!("{more}");
        shown.push_str(&more);
        if shown.contains(KEPT_MARKER) {
            step(&format!(
                "the demo keeps running in the background (pid {pid}; its output: {}); `cargo xtask demo --down` removes it",
                log.display()
            ));
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(status) = child.try_wait().map_err(lost)? {
            // Whatever it wrote last.
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
            pending.extend(rest);
            eprint!("{}", String::from_utf8_lossy(&pending));
            bail!("the demo ended before it was ready to keep ({status}); see above");
        }
        if started.elapsed() > std::time::Duration::from_secs(600) {
            bail!(
                "the demo was not ready after 10 minutes (pid {pid}; {}); `cargo xtask demo --down` stops it",
                log.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// `cargo xtask test [-- args]`.
pub fn test(extra: &[String]) -> Result<ExitCode> {
    crate::setup::run()?;
    build_bins()?;
    let agent = debug_bin("ambit-agent");
    let testpod = debug_bin("ambit-testpod");
    if is_root() {
        // Leftovers of crashed test beds (namespaces, links, cgroups, pins) would collide.
        run(Command::new(debug_bin("ambit-demo")).arg("--cleanup-stale"))?;
    }
    let mut cmd = cargo();
    cmd.arg("test");
    // `-p` in the extra arguments picks packages itself; otherwise test the whole workspace
    // except the eBPF crate, which builds only for the bpf target.
    let picks_packages = extra
        .iter()
        .any(|a| a == "-p" || a == "--package" || a.starts_with("--package="));
    if picks_packages {
        header("test: cargo test");
    } else {
        header("test: cargo test --workspace");
        cmd.args(["--workspace", "--exclude", "ambit-ebpf"]);
    }
    cmd.args(extra)
        .env(AGENT_BIN_ENV, &agent)
        .env(TESTPOD_BIN_ENV, &testpod);
    step(&format!(
        "$ {AGENT_BIN_ENV}={} {TESTPOD_BIN_ENV}={} {}",
        agent.display(),
        testpod.display(),
        command_line(&cmd)
    ));
    let status = cmd
        .status()
        .context("cannot run cargo test; is cargo on PATH?")?;
    if status.success() {
        eprintln!("\nxtask test: all tests passed");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("\nxtask test: cargo test failed ({status}); see the failures above");
        Ok(ExitCode::FAILURE)
    }
}
