//! The few things the harness needs from the OS below std: stopping cleanly on Ctrl-C or SIGTERM,
//! tool processes that die with the harness, and the clock tick of `/proc/<pid>/stat`.
#![allow(unsafe_code)]

use std::{
    os::unix::process::CommandExt,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    const FIRST: &[u8] =
        b"\nambit-bench: stopping: killing the load tools and tearing the test bed down \
          (again to abort without cleanup)\n";
    if STOP.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit(2) is async-signal-safe; it ends the process without running any code
        // that could hold locks.
        unsafe { libc::_exit(130) };
    }
    // SAFETY: write(2) is async-signal-safe; the buffer is a static byte string.
    unsafe { libc::write(libc::STDERR_FILENO, FIRST.as_ptr().cast(), FIRST.len()) };
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP: the first one sets a flag the harness
/// checks between and during runs (it then kills its tools and drops the bed); a second one
/// exits at once.
pub fn install_stop_handler() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only touches an atomic and calls async-signal-safe functions
        // (write, _exit), so it is sound whenever the signal arrives.
        unsafe { sigaction(signal, &action) }
            .with_context(|| format!("cannot install the {signal} handler"))?;
    }
    Ok(())
}

/// Whether a stop was asked for.
pub fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Fails with "interrupted" once a stop was asked for.
pub fn check_stop() -> Result<()> {
    if stopping() {
        bail!("interrupted");
    }
    Ok(())
}

/// Makes the process `cmd` starts get SIGKILL when the harness dies, even by SIGKILL (when the
/// bed's cleanup cannot run). Spawn from the main thread: the kernel ties this to the thread.
pub fn die_with_harness(cmd: &mut Command) {
    let harness = std::process::id() as libc::pid_t;
    // SAFETY: runs in the forked child before exec; prctl(2) and getppid(2) are plain syscalls
    // (async-signal-safe), and the closure neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The harness may have died between fork and prctl.
            if libc::getppid() != harness {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf(3) only reads a constant of the C library.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}
