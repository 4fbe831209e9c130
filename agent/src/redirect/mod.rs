//! Traffic capture: loading the eBPF programs, attaching and pinning them, and the typed maps that
//! enroll pods and tell the proxy where a captured connection was going.
//!
//! Kernel state outlives the agent on purpose. Maps and links are pinned under the configured
//! bpffs directory, so a stopped or crashed agent leaves enrolled pods *fail closed* (their new
//! connections are refused, never sent around the mesh) until an agent starts again. A starting
//! agent reuses the pinned maps and replaces each pinned link atomically (pin the new link under a
//! temporary name, then rename it over the old one), so capture never has a gap and programs are
//! never attached twice. `ambit-agent cleanup` removes it all and lets traffic flow directly.
//!
//! Layout under the pin directory:
//! ```text
//! AMBIT_*                   maps (pinned by name by the loader)
//! links/<program>           cgroup links (connect4/6, getpeername4/6, sock_ops; with probes,
//!                           probe_connect4/6 on the kubelet's cgroup, bind_guard4/6 on the host's)
//! pods/<netns-cookie>       one sk_lookup link per enrolled pod netns
//! ```

pub mod cgroup;
mod inspect;
pub mod netns;
pub mod routing;
pub mod splice;

use std::{
    collections::BTreeMap,
    fs, io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use ambit_common::{self as common, Addr, Counter, EnrolledPod, IpKey, SocketKey};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps,
        links::{FdLink, LinkError},
    },
};
use tracing::{debug, info, warn};

use crate::addrs::{ClientAddr, NetnsCookie, OrigDstAddr};

pub use inspect::inspect;
pub use netns::Netns;
pub use splice::{SpliceStats, Splicer};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot prepare bpffs directory {path}: {cause} (is bpffs mounted at /sys/fs/bpf?)")]
    PinDir { path: PathBuf, cause: io::Error },
    #[error(
        "cannot mount bpffs at /sys/fs/bpf: {0} (the agent needs CAP_SYS_ADMIN, or mount it on the host)"
    )]
    MountBpffs(nix::Error),
    #[error(
        "loading the eBPF object failed: {0} (needs root or CAP_BPF+CAP_NET_ADMIN, a kernel with BTF; if maps under the pin path were made by an incompatible version, run `ambit-agent cleanup`)"
    )]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {cause}")]
    Program {
        name: &'static str,
        cause: aya::programs::ProgramError,
    },
    #[error("eBPF program {0} missing from the object (agent built from mismatched sources?)")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} missing from the object (agent built from mismatched sources?)")]
    MissingMap(&'static str),
    #[error("eBPF map {name}: {cause}")]
    Map {
        name: &'static str,
        cause: aya::maps::MapError,
    },
    #[error(
        "eBPF program {name}: cannot take its link: {cause} (kernel without bpf_link support?)"
    )]
    Link {
        name: &'static str,
        cause: LinkError,
    },
    #[error("cannot pin eBPF link at {path}: {cause}")]
    Pin { path: PathBuf, cause: io::Error },
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    #[error(transparent)]
    Netns(#[from] netns::Error),
}

/// The eBPF object, embedded at build time by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit"));

const CGROUP_PROGRAMS: [&str; 10] = [
    common::program::CONNECT4,
    common::program::CONNECT6,
    common::program::DNS_SENDMSG4,
    common::program::DNS_SENDMSG6,
    common::program::DNS_RECVMSG4,
    common::program::DNS_RECVMSG6,
    common::program::GETPEERNAME4,
    common::program::GETPEERNAME6,
    common::program::GETSOCKNAME4,
    common::program::GETSOCKNAME6,
];

/// Read-only access to the original destinations of captured connections, shared by the
/// outbound accept loops. Entries are removed by the `sock_ops` program when the client closes.
pub struct OrigDst {
    map: HashMap<MapData, SocketKey, Addr>,
    /// Netns cookie -> the resolver its pod's DNS last went to.
    dns: HashMap<MapData, u64, Addr>,
}

impl OrigDst {
    /// The original destination of a connection accepted on a pod's outbound listener, looked up
    /// by the client socket's own address inside the pod's netns.
    pub fn lookup(&self, netns: NetnsCookie, client: ClientAddr) -> Option<OrigDstAddr> {
        let key = SocketKey {
            netns_cookie: netns.0,
            ip: ip_words(client.0.ip()),
            port: client.0.port(),
            _pad: [0; 6],
        };
        self.map
            .get(&key, 0)
            .ok()
            .map(|a| OrigDstAddr(addr_to_std(&a)))
    }

    /// The resolver the pod in `netns` sent its last captured DNS query to.
    pub fn dns_resolver(&self, netns: NetnsCookie) -> Option<SocketAddr> {
        self.dns.get(&netns.0, 0).ok().map(|a| addr_to_std(&a))
    }
}

/// What the capture layer knows about one enrolled pod, for logs and `ambitctl`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EnrolledNetns {
    pub cookie: NetnsCookie,
    pub pod_id: u32,
}

/// Owner of the loaded programs and writable maps. Only the agent's control task holds it.
pub struct Redirect {
    ebpf: Ebpf,
    pin_path: PathBuf,
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    inbound: SockHash<MapData, IpKey>,
    pod_ips: HashMap<MapData, IpKey, u8>,
    excluded_in: HashMap<MapData, u16, u8>,
    excluded_out: HashMap<MapData, u16, u8>,
    counters: PerCpuArray<MapData, u64>,
    /// The splice maps' size, in sockets (see [`Redirect::splicer`]).
    splice_sockets: u32,
}

/// Options the programs read from maps, refreshed on every config load.
pub struct CaptureOptions<'a> {
    pub inbound_excluded_ports: &'a [u16],
    pub outbound_excluded_ports: &'a [u16],
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
    T::try_from(map).map_err(|cause| Error::Map { name, cause })
}

impl Redirect {
    /// Loads the programs (reusing pinned maps) and attaches the cgroup programs to the pods'
    /// parent cgroup. Returns the capture owner and the shared original-destination table.
    ///
    /// `log_level` is aya-log's level for the programs (1 error .. 5 trace); `splice_sockets`
    /// sizes the same-node splice maps (not pinned, so any size loads over an older agent's).
    pub fn load(
        pin_path: &Path,
        cgroup: &Path,
        log_level: u8,
        splice_sockets: u32,
    ) -> Result<
        (
            Redirect,
            OrigDst,
            aya_log::EbpfLogger<&'static dyn log::Log>,
        ),
        Error,
    > {
        ensure_bpffs()?;
        migrate_pins(pin_path);
        for dir in [
            pin_path.to_owned(),
            pin_path.join("links"),
            pin_path.join("pods"),
        ] {
            fs::create_dir_all(&dir).map_err(|cause| Error::PinDir { path: dir, cause })?;
        }

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_path)
            .override_global("AYA_LOG_LEVEL", &log_level, false)
            .map_max_entries(common::MAP_SPLICE, splice_sockets)
            .map_max_entries(common::MAP_SPLICE_SOCKETS, splice_sockets)
            .map_max_entries(common::MAP_SPLICE_PEER, splice_sockets)
            .load(EBPF_OBJECT)?;
        // Must stay alive while the programs load and run.
        let logger = aya_log::EbpfLogger::init(&mut ebpf).map_err(|e| Error::Pin {
            path: pin_path.to_owned(),
            cause: io::Error::other(format!("aya-log: {e}")),
        })?;

        let cgroup_path = cgroup::resolve(cgroup)?;
        let cgroup_dir = cgroup::open(&cgroup_path)?;
        // With bpf_link (kernel 5.7+) the kernel wants no attach flags: links always coexist with
        // other links, which is what lets a restarting agent attach before it detaches the old.
        let links = pin_path.join("links");
        for name in CGROUP_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|cause| Error::Program { name, cause })?;
            let id = prog
                .attach(&cgroup_dir, CgroupAttachMode::Single)
                .map_err(|cause| Error::Program { name, cause })?;
            let link = prog
                .take_link(id)
                .map_err(|cause| Error::Program { name, cause })?;
            pin_replacing(name, FdLink::try_from(link), &links.join(name))?;
        }
        {
            let name = common::program::SOCK_OPS;
            let prog: &mut SockOps = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|cause| Error::Program { name, cause })?;
            let id = prog
                .attach(&cgroup_dir, CgroupAttachMode::Single)
                .map_err(|cause| Error::Program { name, cause })?;
            let link = prog
                .take_link(id)
                .map_err(|cause| Error::Program { name, cause })?;
            pin_replacing(name, FdLink::try_from(link), &links.join(name))?;
        }
        {
            let name = common::program::SK_LOOKUP;
            let prog: &mut SkLookup = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|cause| Error::Program { name, cause })?;
        }
        info!(cgroup = %cgroup_path.display(), pin_path = %pin_path.display(), "eBPF capture programs attached");

        let orig_dst = OrigDst {
            map: take(&mut ebpf, common::MAP_ORIG_DST)?,
            dns: take(&mut ebpf, common::MAP_DNS_RESOLVER)?,
        };
        let redirect = Redirect {
            enrolled: take(&mut ebpf, common::MAP_ENROLLED)?,
            inbound: take(&mut ebpf, common::MAP_INBOUND_LISTENERS)?,
            pod_ips: take(&mut ebpf, common::MAP_POD_IPS)?,
            excluded_in: take(&mut ebpf, common::MAP_EXCLUDED_IN)?,
            excluded_out: take(&mut ebpf, common::MAP_EXCLUDED_OUT)?,
            counters: take(&mut ebpf, common::MAP_COUNTERS)?,
            ebpf,
            pin_path: pin_path.to_owned(),
            splice_sockets,
        };
        Ok((redirect, orig_dst, logger))
    }

    /// Attaches the kubelet probe marker to `kubelet` (its connections to enrolled pods get the
    /// probe source) and the bind guard to `host` (nobody else may bind the probe source), both
    /// cgroups relative to the cgroup v2 mount, pinned and replaced like the capture programs.
    pub fn attach_probes(&mut self, kubelet: &Path, host: &Path) -> Result<(), Error> {
        let links = self.pin_path.join("links");
        for (cgroup, names) in [
            (
                kubelet,
                [
                    common::program::PROBE_CONNECT4,
                    common::program::PROBE_CONNECT6,
                ],
            ),
            (
                host,
                [common::program::BIND_GUARD4, common::program::BIND_GUARD6],
            ),
        ] {
            let dir = cgroup::open(&cgroup::resolve(cgroup)?)?;
            for name in names {
                let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
                prog.load()
                    .map_err(|cause| Error::Program { name, cause })?;
                let id = prog
                    .attach(&dir, CgroupAttachMode::Single)
                    .map_err(|cause| Error::Program { name, cause })?;
                let link = prog
                    .take_link(id)
                    .map_err(|cause| Error::Program { name, cause })?;
                pin_replacing(name, FdLink::try_from(link), &links.join(name))?;
            }
        }
        info!(kubelet = %kubelet.display(), host = %host.display(), "kubelet probe marker and probe-source guard attached");
        Ok(())
    }

    /// Detaches what [`Redirect::attach_probes`] attached (probes no longer configured).
    pub fn detach_probes(&self) {
        for name in [
            common::program::PROBE_CONNECT4,
            common::program::PROBE_CONNECT6,
            common::program::BIND_GUARD4,
            common::program::BIND_GUARD6,
        ] {
            let _ = fs::remove_file(self.pin_path.join("links").join(name));
        }
    }

    /// Makes the probe marker's pod IPs exactly `ips` (the served pods').
    pub fn set_pod_ips(&mut self, ips: &[IpAddr]) -> Result<(), Error> {
        let want: Vec<IpKey> = ips.iter().map(|ip| IpKey { ip: ip_words(*ip) }).collect();
        sync_set(&mut self.pod_ips, common::MAP_POD_IPS, &want)
    }

    /// Writes the capture options into the maps, replacing what was there.
    pub fn set_options(&mut self, opts: &CaptureOptions<'_>) -> Result<(), Error> {
        sync_set(
            &mut self.excluded_in,
            common::MAP_EXCLUDED_IN,
            opts.inbound_excluded_ports,
        )?;
        sync_set(
            &mut self.excluded_out,
            common::MAP_EXCLUDED_OUT,
            opts.outbound_excluded_ports,
        )?;
        Ok(())
    }

    /// Enrolls a pod netns whose listeners are ready: registers the inbound listener for each pod
    /// IP, attaches `sk_lookup` to the netns, then turns on outbound capture. In this order, no
    /// connection is ever steered to a listener that does not exist yet.
    /// With `dns`, its UDP DNS goes to the agent's DNS listener in the netns, which must be
    /// bound by then.
    pub fn enroll(
        &mut self,
        netns: &Netns,
        pod_id: u32,
        ips: &[IpAddr],
        inbound_listener: &impl AsRawFd,
        dns: bool,
    ) -> Result<(), Error> {
        let name = common::MAP_INBOUND_LISTENERS;
        for ip in ips {
            self.inbound
                .insert(IpKey { ip: ip_words(*ip) }, inbound_listener.as_raw_fd(), 0)
                .map_err(|cause| Error::Map { name, cause })?;
            // Kubelet probes to it pass capture from now on.
            self.pod_ips
                .insert(IpKey { ip: ip_words(*ip) }, 1, 0)
                .map_err(|cause| Error::Map {
                    name: common::MAP_POD_IPS,
                    cause,
                })?;
        }
        let prog_name = common::program::SK_LOOKUP;
        let prog: &mut SkLookup = program(&mut self.ebpf, prog_name)?;
        let id = prog.attach(netns).map_err(|cause| Error::Program {
            name: prog_name,
            cause,
        })?;
        let link = prog.take_link(id).map_err(|cause| Error::Program {
            name: prog_name,
            cause,
        })?;
        pin_replacing(
            prog_name,
            Ok(link.into()),
            &self.pod_link_path(netns.cookie()),
        )?;
        let mut entry = enrolled_pod(pod_id, ips);
        if dns {
            entry.flags |= common::POD_DNS;
        }
        self.enrolled
            .insert(netns.cookie().0, entry, 0)
            .map_err(|cause| Error::Map {
                name: common::MAP_ENROLLED,
                cause,
            })?;
        Ok(())
    }

    /// Reverses [`Redirect::enroll`]: outbound capture off, `sk_lookup` detached, listeners
    /// unregistered. Works for netns that no longer exist (only the cookie is needed).
    pub fn unenroll(&mut self, cookie: NetnsCookie, ips: &[IpAddr]) -> Result<(), Error> {
        match self.enrolled.remove(&cookie.0) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(cause) => {
                return Err(Error::Map {
                    name: common::MAP_ENROLLED,
                    cause,
                });
            }
        }
        let link = self.pod_link_path(cookie);
        match fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(cause) => return Err(Error::Pin { path: link, cause }),
        }
        for ip in ips {
            // Closing the listener removes it from the map too; this covers a listener that is
            // kept open for draining.
            let _ = self.inbound.remove(&IpKey { ip: ip_words(*ip) });
            let _ = self.pod_ips.remove(&IpKey { ip: ip_words(*ip) });
        }
        Ok(())
    }

    /// Forgets the inbound listeners of `ips` (a pod re-enrolled without them).
    pub fn unregister_inbound(&mut self, ips: &[IpAddr]) {
        for ip in ips {
            let _ = self.inbound.remove(&IpKey { ip: ip_words(*ip) });
            let _ = self.pod_ips.remove(&IpKey { ip: ip_words(*ip) });
        }
    }

    /// Cookies currently in the enrollment map (including ones left by an earlier agent).
    pub fn enrolled_cookies(&self) -> Vec<NetnsCookie> {
        self.enrolled
            .keys()
            .filter_map(Result::ok)
            .map(NetnsCookie)
            .collect()
    }

    /// Cookies that have a pinned `sk_lookup` link.
    pub fn pinned_pod_links(&self) -> Vec<NetnsCookie> {
        let Ok(dir) = fs::read_dir(self.pin_path.join("pods")) else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// Removes enrollment state for every cookie not in `keep` (left by an earlier agent for pods
    /// that are gone or no longer enrolled).
    pub fn prune(&mut self, keep: &[NetnsCookie]) -> Result<Vec<NetnsCookie>, Error> {
        let mut stale: Vec<NetnsCookie> = self
            .enrolled_cookies()
            .into_iter()
            .chain(self.pinned_pod_links())
            .filter(|c| !keep.contains(c))
            .collect();
        stale.sort_unstable();
        stale.dedup();
        for cookie in &stale {
            self.unenroll(*cookie, &[])?;
        }
        Ok(stale)
    }

    /// Loads the same-node splice (its verdict program and maps; see [`splice`]). Fails on a
    /// kernel without `sk_skb` programs or sockhash maps.
    pub fn splicer(&mut self) -> Result<Splicer, Error> {
        Splicer::load(&mut self.ebpf, self.splice_sockets)
    }

    /// The programs' event counters, summed over CPUs.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        Counter::ALL
            .iter()
            .map(|c| {
                let total = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (c.name(), total)
            })
            .collect()
    }

    fn pod_link_path(&self, cookie: NetnsCookie) -> PathBuf {
        self.pin_path.join("pods").join(cookie.to_string())
    }
}

/// The enrollment entry for a pod: its id and its first IPv4 and IPv6 address (what
/// `getsockname` reports to the app for a redirected socket).
fn enrolled_pod(pod_id: u32, ips: &[IpAddr]) -> EnrolledPod {
    let ip4 = ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(_) => None,
    });
    let ip6 = ips.iter().find(|ip| ip.is_ipv6()).map(|ip| ip_words(*ip));
    EnrolledPod {
        pod_id,
        flags: 0,
        ip4: ip4.unwrap_or(0),
        ip6: ip6.unwrap_or([0; 4]),
    }
}

/// Removes every pinned map and link under `pin_path`: all programs detach and every pod of this
/// node is released (its traffic flows directly). Missing state is not an error.
pub fn cleanup(pin_path: &Path) -> Result<usize, Error> {
    if !pin_path.exists() {
        return Ok(0);
    }
    let mut removed = 0;
    for sub in ["links", "pods"] {
        let dir = pin_path.join(sub);
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                let path = e.path();
                fs::remove_file(&path).map_err(|cause| Error::Pin { path, cause })?;
                removed += 1;
            }
        }
        let _ = fs::remove_dir(&dir);
    }
    if let Ok(entries) = fs::read_dir(pin_path) {
        for e in entries.flatten() {
            let path = e.path();
            if path.is_file() || !path.is_dir() {
                fs::remove_file(&path).map_err(|cause| Error::Pin { path, cause })?;
                removed += 1;
            }
        }
    }
    fs::remove_dir(pin_path).map_err(|cause| Error::Pin {
        path: pin_path.to_owned(),
        cause,
    })?;
    Ok(removed)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram(name))?
        .try_into()
        .map_err(|cause| Error::Program { name, cause })
}

/// Pins `link` at `path`, atomically replacing (and so detaching) a link pinned there before.
fn pin_replacing(
    name: &'static str,
    link: Result<FdLink, LinkError>,
    path: &Path,
) -> Result<(), Error> {
    let link = link.map_err(|cause| Error::Link { name, cause })?;
    // bpffs refuses names with a dot.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push("_new");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let pinned = link.pin(&tmp).map_err(|e| Error::Pin {
        path: tmp.clone(),
        cause: io::Error::other(format!("{e:?}")),
    })?;
    fs::rename(&tmp, path).map_err(|cause| Error::Pin {
        path: path.to_owned(),
        cause,
    })?;
    // The pin is now the link's only owner; closing our fd leaves it attached.
    drop(pinned);
    debug!(path = %path.display(), "pinned eBPF link");
    Ok(())
}

/// Makes `map` hold exactly the keys in `want`.
fn sync_set<K: aya::Pod + PartialEq>(
    map: &mut HashMap<MapData, K, u8>,
    name: &'static str,
    want: &[K],
) -> Result<(), Error> {
    let have: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for k in have.iter().filter(|k| !want.contains(k)) {
        map.remove(k).map_err(|cause| Error::Map { name, cause })?;
    }
    for k in want {
        map.insert(*k, 1, 0)
            .map_err(|cause| Error::Map { name, cause })?;
    }
    Ok(())
}

/// Brings pins left by an earlier agent version in line with this one's object: a map whose
/// pinned definition no longer matches is unpinned (the loader then pins a fresh one; programs
/// still attached keep their own reference until their links are replaced), and maps no longer
/// used are unpinned.
fn migrate_pins(pin_path: &Path) {
    let _ = fs::remove_file(pin_path.join(common::LEGACY_MAP_NODE_ADDRS));
    let counters = pin_path.join(common::MAP_COUNTERS);
    if let Ok(map) = MapData::from_pin(&counters) {
        let entries = map.info().map(|i| i.max_entries()).unwrap_or(0);
        if entries != Counter::COUNT {
            info!(
                entries,
                now = Counter::COUNT,
                "the pinned counters map is from another version; starting new counters"
            );
            let _ = fs::remove_file(&counters);
        }
    }
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there (containers often lack it).
fn ensure_bpffs() -> Result<(), Error> {
    let mounted = fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            m.lines()
                .any(|l| l.split(" - ").nth(1).is_some_and(|r| r.starts_with("bpf ")))
        })
        .unwrap_or(false);
    if mounted {
        return Ok(());
    }
    warn!("no bpffs mounted; mounting one at /sys/fs/bpf");
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(Error::MountBpffs)
}

/// Whether `ip` is the kubelet probe source (IPv4 or IPv6), which pods let through uncaptured.
pub fn is_probe_source(ip: IpAddr) -> bool {
    let words = ip_words(ip);
    words == [0, 0, common::V4_MAPPED_WORD, common::PROBE_SOURCE4] || words == common::PROBE_SOURCE6
}

/// An IP as the programs store it: IPv6 bytes (IPv4 mapped) in four network-order words.
pub fn ip_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let b = v6.octets();
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// The inverse of [`ip_words`] plus the port; IPv4-mapped addresses come back as IPv4.
pub fn addr_to_std(a: &Addr) -> SocketAddr {
    let mut bytes = [0u8; 16];
    for (i, w) in a.ip.iter().enumerate() {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    SocketAddr::new(Ipv6Addr::from(bytes).to_canonical(), a.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_words_round_trip() {
        for s in ["10.1.0.2:8080", "[fd00:1::2]:443", "127.0.0.1:15001"] {
            let sa: SocketAddr = s.parse().expect("test address");
            let a = Addr::v6(ip_words(sa.ip()), sa.port());
            assert_eq!(addr_to_std(&a), sa);
        }
        // What connect4 stores for 10.1.0.2 (user_ip4 holds the bytes in network order).
        let a = Addr::v4(u32::from_ne_bytes([10, 1, 0, 2]), 80);
        assert_eq!(
            addr_to_std(&a),
            "10.1.0.2:80".parse::<SocketAddr>().expect("addr")
        );
    }
}
