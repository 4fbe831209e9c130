//! Ctrl-C during the demo (or SIGTERM, which `--down` sends a kept demo): the first one sets a
//! flag so the demo stops at its next step and tears the test bed down through the normal `Drop`
//! paths; a second one exits at once.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    const FIRST: &[u8] = b"\ninterrupted: tearing down (Ctrl-C again to abort without cleanup)\n";
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit(2) is async-signal-safe; it ends the process without running any code
        // that could hold locks.
        unsafe { libc::_exit(130) };
    }
    // SAFETY: write(2) is async-signal-safe; the buffer is a static byte string.
    unsafe { libc::write(libc::STDERR_FILENO, FIRST.as_ptr().cast(), FIRST.len()) };
}

/// Installs the handler for SIGINT and SIGTERM. No SA_RESTART, so a blocking call returns early
/// with EINTR.
pub fn install() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_sigint),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only touches an atomic and calls async-signal-safe functions
        // (write, _exit), so it is sound whenever the signal arrives.
        unsafe { sigaction(signal, &action) }
            .with_context(|| format!("cannot install the {signal} handler"))?;
    }
    Ok(())
}

/// Whether Ctrl-C was pressed (or SIGTERM received).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
