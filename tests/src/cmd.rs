//! Running setup commands (`ip`, `sysctl`) with errors that show the command line and its stderr.

use std::{ffi::OsStr, process::Command};

use anyhow::{Context, Result, bail};

/// Runs `program args...` to completion and returns its stdout. A failure names the command, its
/// exit status and its stderr.
pub(crate) fn run<I, S>(program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_command(&mut cmd)
}

/// Like [`run`] for a prepared [`Command`].
pub(crate) fn run_command(cmd: &mut Command) -> Result<String> {
    let line = command_line(cmd);
    let out = cmd.output().with_context(|| {
        format!(
            "cannot run `{line}`; is {} installed and on PATH? (`cargo xtask setup` installs iproute2)",
            cmd.get_program().to_string_lossy()
        )
    })?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip args...`.
pub(crate) fn ip<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run("ip", args)
}

/// Runs `ip -n <netns> args...`.
pub(crate) fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    run("ip", all)
}

/// Sets sysctls (`key=value`) inside a named netns.
pub(crate) fn sysctl_in(netns: &str, settings: &[&str]) -> Result<()> {
    let mut args = vec!["netns", "exec", netns, "sysctl", "-q", "-w"];
    args.extend_from_slice(settings);
    run("ip", args).map(drop)
}

/// The command as a shell-like line, for messages.
pub(crate) fn command_line(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}
