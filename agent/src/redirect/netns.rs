//! Network namespaces of pods: open them, and create sockets inside them.
//!
//! A socket belongs to the netns of the thread that created it, for its whole life, whichever
//! thread uses it later. So the agent only needs to *be* in a pod's netns for the `socket(2)` call
//! (and for the few netlink/sysctl writes that set a pod up): [`Netns::run`] switches the calling
//! thread in, runs a closure, and switches back to the agent's own netns. That is two `setns(2)`
//! calls, cheaper than handing each new connection to a dedicated thread and back.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use nix::sched::CloneFlags;

use crate::addrs::NetnsCookie;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open network namespace {path}: {cause} (does the pod still exist?)")]
    Open { path: PathBuf, cause: io::Error },
    #[error("cannot enter network namespace {path}: {cause} (the agent needs CAP_SYS_ADMIN)")]
    Enter { path: PathBuf, cause: io::Error },
    #[error("cannot read the cookie of network namespace {path}: {cause} (kernel 5.14+ needed)")]
    Cookie { path: PathBuf, cause: io::Error },
}

/// The agent's own netns, captured before any thread could have moved.
static AGENT_NETNS: OnceLock<File> = OnceLock::new();

/// Remembers the netns the process starts in. Call once from `main` before spawning threads.
pub fn init_agent_netns() -> io::Result<()> {
    if AGENT_NETNS.get().is_none() {
        let f = File::open("/proc/thread-self/ns/net")?;
        let _ = AGENT_NETNS.set(f);
    }
    Ok(())
}

/// An open handle on a network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    cookie: NetnsCookie,
    /// The process's own netns ([`Netns::own`]): [`Netns::run`] needs no `setns` (and so no
    /// `CAP_SYS_ADMIN`) to open sockets in it.
    own: bool,
}

impl Netns {
    pub fn open(path: &Path) -> Result<Netns, Error> {
        let file = File::open(path).map_err(|cause| Error::Open {
            path: path.to_owned(),
            cause,
        })?;
        let mut ns = Netns {
            file,
            path: path.to_owned(),
            cookie: NetnsCookie(0),
            own: false,
        };
        let sock =
            ns.run(|| socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None))?;
        // A unix socket has a netns too; its cookie is the namespace's.
        let sock = sock.map_err(|cause| Error::Cookie {
            path: path.to_owned(),
            cause,
        })?;
        ns.cookie = netns_cookie(sock.as_fd())
            .map(NetnsCookie)
            .map_err(|cause| Error::Cookie {
                path: path.to_owned(),
                cause,
            })?;
        Ok(ns)
    }

    /// The calling thread's own netns, without entering it (so without `CAP_SYS_ADMIN`): for a
    /// process that opens its sockets where it runs (the waypoint, the in-process tests).
    pub fn own() -> Result<Netns, Error> {
        let path = Path::new("/proc/thread-self/ns/net");
        let file = File::open(path).map_err(|cause| Error::Open {
            path: path.to_owned(),
            cause,
        })?;
        let cookie = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)
            .and_then(|sock| netns_cookie(sock.as_fd()))
            .map(NetnsCookie)
            .map_err(|cause| Error::Cookie {
                path: path.to_owned(),
                cause,
            })?;
        Ok(Netns {
            file,
            path: path.to_owned(),
            cookie,
            own: true,
        })
    }

    /// The kernel's cookie for this namespace: the key of the enrollment map.
    pub fn cookie(&self) -> NetnsCookie {
        self.cookie
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the calling thread inside this netns, then returns the thread to the agent's
    /// netns. Sockets created by `f` stay in this netns.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, Error> {
        if self.own {
            // Every thread of the process is here already (the agent never leaves a thread in
            // another netns: see below).
            return Ok(f());
        }
        let home = AGENT_NETNS
            .get()
            .expect("BUG: init_agent_netns() was not called at startup");
        nix::sched::setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
            Error::Enter {
                path: self.path.clone(),
                cause: e.into(),
            }
        })?;
        let out = f();
        if let Err(e) = nix::sched::setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A worker thread left in a pod's netns would open later sockets in the wrong place;
            // there is no safe way to continue.
            eprintln!("ambit-agent: cannot return to the agent's network namespace: {e}; aborting");
            std::process::abort();
        }
        Ok(out)
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// `SO_NETNS_COOKIE` of a socket.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given; the fd is borrowed.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The process's own netns is used without entering it: no `setns`, so neither
    /// `CAP_SYS_ADMIN` nor the agent's startup (`init_agent_netns`, never called in unit tests,
    /// without which entering panics) is needed.
    #[test]
    fn sockets_open_in_the_own_netns_without_entering_it() {
        let own = Netns::own().expect("own netns");
        let sock = own
            .run(|| socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None))
            .expect("no setns")
            .expect("socket");
        let cookie = netns_cookie(sock.as_fd()).expect("cookie");
        assert_eq!(NetnsCookie(cookie), own.cookie(), "opened where it runs");
    }
}
