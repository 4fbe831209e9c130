//! Starting processes inside a node's or pod's network namespace and cgroup, and tracking them so
//! the bed can kill whatever is left when it is dropped.
//!
//! This is the only module of the test bed with `unsafe`: `Command::pre_exec` runs code in the
//! forked child, where it enters the netns with `setns(2)` and joins the cgroup by writing to
//! `cgroup.procs`, before `exec` (and, for [`refuse_bpf_prog_attach`], installs a seccomp
//! filter).
#![allow(unsafe_code)]

use std::{
    ffi::OsStr,
    fs::{File, OpenOptions},
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::Path,
    process::{Child, ChildStderr, ChildStdout, Command, ExitStatus},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use nix::{sys::signal::Signal, unistd::Pid};

use crate::cmd::command_line;

/// A [`Command`] for `program` that, when spawned, runs in the network namespace at `netns` (a
/// file such as `/run/netns/<name>`) and in the cgroup directory `cgroup_dir`.
///
/// Both are opened here, in the parent, so a missing netns or cgroup is reported with its path.
pub(crate) fn command_in(
    program: impl AsRef<OsStr>,
    netns: &Path,
    cgroup_dir: &Path,
) -> Result<Command> {
    let netns_fd: OwnedFd = File::open(netns)
        .with_context(|| {
            format!(
                "cannot open network namespace {}; was it deleted (pod removed, bed dropped)?",
                netns.display()
            )
        })?
        .into();
    let procs_path = cgroup_dir.join("cgroup.procs");
    let procs_fd: OwnedFd = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .with_context(|| {
            format!(
                "cannot open {} to move the process into its cgroup; does the cgroup exist?",
                procs_path.display()
            )
        })?
        .into();
    let mut cmd = Command::new(program);
    // SAFETY: the closure runs in the forked child between fork and exec, where only
    // async-signal-safe operations are allowed. It makes two raw syscalls, setns(2) and write(2),
    // on file descriptors that the closure owns and that stay open until the `Command` is dropped,
    // and it neither allocates nor takes locks (`last_os_error` only reads errno).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns_fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            let pid = b"0";
            if libc::write(procs_fd.as_raw_fd(), pid.as_ptr().cast(), pid.len()) != 1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Makes the kernel refuse `bpf(BPF_PROG_ATTACH, ..)` (EINVAL, its answer for an attach type it
/// does not have) to the process `cmd` starts, by a seccomp filter installed before `exec`;
/// every other system call, and every other `bpf` command, passes. What an agent meets on a
/// kernel without `sk_skb` sockmap programs: its capture attaches by `BPF_LINK_CREATE` and
/// still works, the splice program (attached to its map by `BPF_PROG_ATTACH`) does not.
pub(crate) fn refuse_bpf_prog_attach(cmd: &mut Command) {
    // <linux/audit.h>, <linux/bpf.h>; x86_64 only (the CI machine kind), checked by the filter.
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const BPF_PROG_ATTACH: u32 = 8;
    // Offsets in `struct seccomp_data`: nr, arch, then args[0] after the instruction pointer.
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    const ARG0_LOW: u32 = 16;
    let load = |k| libc::sock_filter {
        code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k, jt, jf| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let ret = |k| libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k,
    };
    // Jumps count the instructions skipped: index 6 refuses, index 7 allows.
    let filter = [
        load(ARCH),
        jeq(AUDIT_ARCH_X86_64, 0, 5),
        load(NR),
        jeq(libc::SYS_bpf as u32, 0, 3),
        load(ARG0_LOW),
        jeq(BPF_PROG_ATTACH, 0, 1),
        ret(libc::SECCOMP_RET_ERRNO | (libc::EINVAL as u32 & libc::SECCOMP_RET_DATA)),
        ret(libc::SECCOMP_RET_ALLOW),
    ];
    // SAFETY: the closure runs in the forked child between fork and exec. It makes two raw
    // syscalls, prctl(2), on the filter it owns (moved in, so it lives until exec), and neither
    // allocates nor takes locks.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &raw const prog,
                ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

struct State {
    child: Child,
    status: Option<ExitStatus>,
}

impl State {
    fn poll(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    fn kill(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.poll()? {
            return Ok(status);
        }
        self.child.kill()?;
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok(status)
    }
}

/// A process started by the test bed. It is killed (SIGKILL) when this handle is dropped, and at
/// the latest when the bed is dropped.
pub struct Process {
    state: Arc<Mutex<State>>,
    pid: u32,
    description: String,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("pid", &self.pid)
            .field("command", &self.description)
            .finish()
    }
}

impl Process {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The command line it was started with.
    pub fn description(&self) -> &str {
        &self.description
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        self.lock()
            .poll()
            .with_context(|| format!("cannot check process {} ({})", self.pid, self.description))
    }

    /// Whether it is still running.
    pub fn is_running(&self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for it to exit; `None` if it is still running then.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` if it is still running (a no-op once it has exited and been reaped, so a
    /// recycled pid is never hit).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let mut state = self.lock();
        if state.poll()?.is_some() {
            return Ok(());
        }
        let pid =
            i32::try_from(self.pid).map_err(|_| anyhow!("BUG: pid {} out of range", self.pid))?;
        nix::sys::signal::kill(Pid::from_raw(pid), signal).with_context(|| {
            format!(
                "cannot send {signal} to {} ({})",
                self.pid, self.description
            )
        })
    }

    /// SIGKILLs it (if still running) and reaps it.
    pub fn kill(&self) -> Result<ExitStatus> {
        self.lock()
            .kill()
            .with_context(|| format!("cannot kill {} ({})", self.pid, self.description))
    }

    /// Takes its stdout pipe, if it was started with `Stdio::piped()` and not taken yet.
    pub fn take_stdout(&self) -> Option<ChildStdout> {
        self.lock().child.stdout.take()
    }

    /// Takes its stderr pipe, if it was started with `Stdio::piped()` and not taken yet.
    pub fn take_stderr(&self) -> Option<ChildStderr> {
        self.lock().child.stderr.take()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(e) = self.lock().kill() {
            eprintln!(
                "testbed: cannot kill {} ({}): {e}",
                self.pid, self.description
            );
        }
    }
}

/// A tracked process: pid, command line, shared state.
type Tracked = (u32, String, Arc<Mutex<State>>);

/// The processes a bed started, for the final kill.
#[derive(Default)]
pub(crate) struct Tracker {
    procs: Mutex<Vec<Tracked>>,
}

impl Tracker {
    /// Spawns `cmd` and tracks it; `place` says where it runs, for error messages.
    pub(crate) fn spawn(&self, cmd: &mut Command, place: &str) -> Result<Process> {
        let description = command_line(cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{description}` in {place}"))?;
        let pid = child.id();
        let state = Arc::new(Mutex::new(State {
            child,
            status: None,
        }));
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        // Forget processes that are gone, so a long test does not accumulate handles.
        procs.retain(|(_, _, s)| {
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .poll()
                .map_or(true, |st| st.is_none())
        });
        procs.push((pid, description.clone(), Arc::clone(&state)));
        Ok(Process {
            state,
            pid,
            description,
        })
    }

    /// Kills and reaps every tracked process that still runs. Never panics.
    pub(crate) fn kill_all(&self) {
        let procs = std::mem::take(&mut *self.procs.lock().unwrap_or_else(|p| p.into_inner()));
        for (pid, description, state) in procs {
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = state.kill() {
                eprintln!("testbed: cannot kill {pid} ({description}): {e}");
            }
        }
    }
}
