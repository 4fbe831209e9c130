//! cgroup v2 helpers: finding the mount, making the bed's subtree, and emptying and removing it.
//!
//! The agent attaches its cgroup eBPF programs to a node's cgroup, so every process the bed runs
//! in a pod sits in that pod's cgroup below it.

use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{sys::signal, unistd::Pid};

/// The mount point of the cgroup v2 hierarchy, read from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").context(
        "cannot read /proc/self/mountinfo to find the cgroup v2 mount; is /proc mounted?",
    )?;
    parse_cgroup2_mount(&text).context(
        "no cgroup2 filesystem in /proc/self/mountinfo; the test bed needs cgroup v2 \
         (mount it with `mount -t cgroup2 none /sys/fs/cgroup/unified` or boot with unified cgroups)",
    )
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // `id parent major:minor root mount-point options [optional...] - fstype source super`
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let digit = |k: usize| u32::from(bytes[i + k] - b'0');
            let v = digit(1) * 64 + digit(2) * 8 + digit(3);
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Creates a cgroup directory (and missing parents).
pub(crate) fn create(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create cgroup {}; is the cgroup v2 mount writable (root, not a read-only \
             container mount)?",
            dir.display()
        )
    })
}

/// The pids in `dir/cgroup.procs` (only this cgroup, not its children).
pub(crate) fn procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Every cgroup directory at and below `dir`, children before parents.
pub(crate) fn subtree_bottom_up(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(dir.to_owned());
    }
    if dir.is_dir() {
        walk(dir, &mut out);
    }
    out
}

/// SIGKILLs every process at and below `dir`: `cgroup.kill` where the kernel has it (5.14+), and
/// each pid in `cgroup.procs` as well.
pub(crate) fn kill_all(dir: &Path) {
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    for cg in subtree_bottom_up(dir) {
        for pid in procs(&cg) {
            let _ = signal::kill(Pid::from_raw(pid), signal::Signal::SIGKILL);
        }
    }
}

/// Kills what runs in the subtree and removes it bottom-up, retrying for up to `timeout` while
/// processes are still exiting.
pub(crate) fn remove_tree(dir: &Path, timeout: Duration) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    loop {
        kill_all(dir);
        let mut busy = Vec::new();
        for cg in subtree_bottom_up(dir) {
            match fs::remove_dir(&cg) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => busy.push(format!("{} ({e}; pids {:?})", cg.display(), procs(&cg))),
            }
        }
        if busy.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("cannot remove cgroups: {}", busy.join(", "));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mount() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:5 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/sda rw\n"),
            None
        );
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
    }
}
