//! `ambit-cni`: the chained CNI plugin (spec 1.0.0, also 0.3.x, 0.4.0 and 1.1.0) that tells the
//! node's agent about each new pod, so a pod of an opted-in namespace starts only once its
//! traffic is captured.
//!
//! The container runtime runs it after the interface plugin (e.g. `bridge` + `host-local`) with
//! `CNI_COMMAND` and the network config on stdin. On ADD it sends the pod (from `CNI_ARGS`,
//! `CNI_NETNS` and the IPs of `prevResult`) to the agent's admin socket and waits for the answer,
//! then prints `prevResult` unchanged. When the agent cannot be reached it decides from the
//! agent's state file (see `plugin`). Errors are the spec's JSON object on stdout with exit code
//! 1; logs go to stderr and to `logFile`. `cni` is the protocol, `plugin` the commands, `log`
//! the log.
//!
//! Network config fields of ours: `agentSocket` (default `/run/ambit/admin.sock`), `stateFile`
//! (default `/var/lib/ambit/cni-state.json`, persistent: it must outlive a reboot), `timeoutSeconds` (default 60: how long an ADD waits
//! for enrollment), `logFile` (optional).

mod cni;
mod log;
mod plugin;

use std::{
    io::{IsTerminal, Read, Write},
    panic::AssertUnwindSafe,
    process::ExitCode,
};

use crate::cni::{CniError, code};

/// More than any network config with a result in it; a bound so stdin cannot exhaust memory.
const MAX_STDIN: u64 = 16 * 1024 * 1024;

fn main() -> ExitCode {
    let mut log = log::Log::stderr();
    let stdin = read_stdin();
    let reply_version = stdin
        .as_deref()
        .map_or_else(|_| cni::LATEST_VERSION.to_owned(), cni::reply_version);
    // A bug must still give the runtime an error result, not a bare panic message.
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let env = cni::Env::read(|k| std::env::var_os(k))?;
        let stdin = stdin.as_deref().map_err(Clone::clone)?;
        plugin::run(&env, stdin, &mut log)
    }))
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(CniError::new(
            code::BUG,
            "BUG: ambit-cni panicked",
            format!("{what}; please report this with the plugin's stderr"),
        ))
    });
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(result)) => {
            // Nothing to do if the runtime stopped reading; the exit code still says success.
            let _ = writeln!(stdout, "{result}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(stdout, "{}", e.to_json(&reply_version));
            ExitCode::FAILURE
        }
    }
}

/// Stdin, bounded; empty when it is a terminal (someone trying `CNI_COMMAND=VERSION ambit-cni`
/// by hand), so we never wait on a keyboard.
fn read_stdin() -> Result<Vec<u8>, CniError> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(Vec::new());
    }
    let mut buf = Vec::new();
    stdin
        .lock()
        .take(MAX_STDIN + 1)
        .read_to_end(&mut buf)
        .map_err(|e| {
            CniError::new(
                code::IO_FAILURE,
                "cannot read the network config from stdin",
                e.to_string(),
            )
        })?;
    if buf.len() as u64 > MAX_STDIN {
        return Err(CniError::new(
            code::IO_FAILURE,
            "the network config on stdin is too large",
            format!("more than {MAX_STDIN} bytes"),
        ));
    }
    Ok(buf)
}
