//! Finding the cgroup the capture programs attach to: the pods' parent cgroup on cgroup v2.
//!
//! The mount point differs between hosts (`/sys/fs/cgroup` on unified hosts,
//! `/sys/fs/cgroup/unified` on hybrid ones), so it is read from `/proc/self/mountinfo`.

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read /proc/self/mountinfo: {0}")]
    Mountinfo(io::Error),
    #[error(
        "no cgroup v2 filesystem is mounted; mount one (mount -t cgroup2 none /sys/fs/cgroup) or boot with cgroup v2"
    )]
    NoCgroup2,
    #[error("cgroup {path} is not under the cgroup v2 mount {mount}")]
    NotUnderMount { path: PathBuf, mount: PathBuf },
    #[error(
        "cannot open cgroup {path}: {cause} (is `cgroup` in the config the pods' parent cgroup?)"
    )]
    Open { path: PathBuf, cause: io::Error },
}

/// The first cgroup2 mount point in `mountinfo` text.
fn parse_mountinfo(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        // `36 25 0:31 / /sys/fs/cgroup/unified rw,... shared:9 - cgroup2 cgroup2 rw`
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 mount point of this host.
pub fn cgroup2_mount() -> Result<PathBuf, Error> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(Error::Mountinfo)?;
    parse_mountinfo(&text).ok_or(Error::NoCgroup2)
}

/// Resolves the configured cgroup (relative to the mount, or absolute under it) to a path.
pub fn resolve(configured: &Path) -> Result<PathBuf, Error> {
    let mount = cgroup2_mount()?;
    if configured.starts_with(&mount) {
        return Ok(configured.to_owned());
    }
    let rel = configured.strip_prefix("/").unwrap_or(configured);
    let path = mount.join(rel);
    if !path.starts_with(&mount) {
        return Err(Error::NotUnderMount { path, mount });
    }
    Ok(path)
}

/// Opens the cgroup directory for attaching programs.
pub fn open(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|cause| Error::Open {
        path: path.to_owned(),
        cause,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_among_v1_mounts() {
        let text = "\
30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
36 30 0:31 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_mountinfo(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_mountinfo("31 30 0:27 / /x rw - cgroup cgroup rw\n"),
            None
        );
    }

    #[test]
    fn unescapes_mount_paths() {
        assert_eq!(unescape_octal(r"/a\040b"), "/a b");
        assert_eq!(unescape_octal(r"/plain"), "/plain");
    }
}
