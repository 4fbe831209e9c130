//! Giving memory back to the kernel: what start-up touched once, and the heap a burst of load
//! freed but glibc kept.
//!
//! An idle agent's resident set is mostly not its own data: of ~15 MiB after start, under 4 MiB
//! are anonymous (heap, stacks); the rest are pages of the executable that start-up ran or read
//! once (config parsing, the eBPF object and its loader, TLS and CLI setup) and that stay mapped.
//! Once ready, the agent asks the kernel to reclaim them ([`release_startup_pages`]); the code
//! the data path runs faults back in on first use. And glibc keeps freed heap pages between
//! arenas' chunks in use, so after a load burst the resident set stays at its peak: when no
//! connection is open, [`trim_when_idle`] hands the free pages back.

use std::{fs, io, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// The allocator's view of the heap, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Heap {
    pub in_use: usize,
    pub free: usize,
    pub mmapped: usize,
}

/// What glibc says now (`None` where the allocator is not glibc's).
pub fn heap() -> Option<Heap> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's bookkeeping, under its own locks.
        #[allow(unsafe_code)]
        let m = unsafe { libc::mallinfo2() };
        Some(Heap {
            in_use: m.uordblks,
            free: m.fordblks,
            mmapped: m.hblkhd,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    None
}

/// Returns the heap's free pages to the kernel (glibc's `malloc_trim`): the heap before and
/// after.
pub fn release_free_heap() -> Option<(Heap, Heap)> {
    let before = heap()?;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim walks the allocator's own free lists under its locks and touches no
    // memory the program owns.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
    Some((before, heap()?))
}

/// Free heap worth handing back when idle.
const IDLE_TRIM_FREE: usize = 1 << 20;
const IDLE_TRIM_EVERY: Duration = Duration::from_secs(1);

/// When an idle agent's heap is worth trimming: no connection is open, and either connections
/// have come and gone since the last trim, or over 1 MiB more of the heap is free than at its
/// lowest since (what the HBONE pool frees when it closes idle connections, after the last app
/// connection ended: trimming leaves chunks free and hands back only their pages, so `free`
/// grows only with what was freed since, and those pages are resident again).
#[derive(Debug)]
struct IdleTrim {
    /// Connections opened so far, at the last trim.
    trimmed_at: u64,
    /// The lowest free heap seen while idle since the last trim.
    free_low: usize,
}

impl IdleTrim {
    fn due(&mut self, open: usize, opened: u64, free: usize) -> bool {
        if open != 0 {
            return false;
        }
        self.free_low = self.free_low.min(free);
        let freed_since = free - self.free_low >= IDLE_TRIM_FREE;
        if opened == self.trimmed_at && !freed_since {
            return false;
        }
        self.trimmed_at = opened;
        self.free_low = free;
        free >= IDLE_TRIM_FREE
    }
}

/// Every second, returns the free heap's pages to the kernel when [`IdleTrim`] says so
/// (`activity()`: connections open now, connections opened so far). The look reads the
/// allocator's counters (microseconds); trimming walks the heap (well under a millisecond at
/// these sizes), at most once per change, never while connections are open: their buffers
/// would be freed and allocated again.
pub async fn trim_when_idle(activity: impl Fn() -> (usize, u64), shutdown: CancellationToken) {
    let mut every = tokio::time::interval(IDLE_TRIM_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // `after_start` has just trimmed.
    let mut trim = IdleTrim {
        trimmed_at: activity().1,
        free_low: heap().map_or(0, |h| h.free),
    };
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let (open, opened) = activity();
        let Some(now) = heap() else { return };
        if !trim.due(open, opened, now.free) {
            continue;
        }
        if let Some((_, after)) = release_free_heap() {
            trim.free_low = after.free;
            debug!(
                heap_in_use_bytes = after.in_use,
                heap_free_bytes = after.free,
                rss_kib_after = resident_kib(),
                "no connection open: returned free heap memory to the kernel"
            );
        }
    }
}

/// Asks the kernel to reclaim the pages of this executable that are mapped now
/// (`MADV_PAGEOUT` on its read-only and executable mappings): once the agent is ready, those
/// are mostly start-up's. Nothing is lost: clean file pages are read again when next used, and
/// the kernel keeps pages another process maps (a second agent on a test bed). Returns the
/// bytes of mappings advised.
pub fn release_startup_pages() -> io::Result<u64> {
    let exe = fs::read_link("/proc/self/exe")?;
    let maps = fs::read_to_string("/proc/self/maps")?;
    let mut advised = 0;
    for (start, end) in executable_mappings(&maps, &exe.to_string_lossy()) {
        let len = end - start;
        // SAFETY: MADV_PAGEOUT never discards data (a dirty or anonymous page is written out or
        // kept, never dropped), so any range of our own mappings is sound to pass; these are
        // the executable's read-only ones, from the kernel's own list.
        #[allow(unsafe_code)]
        let r = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_PAGEOUT) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        advised += len as u64;
    }
    Ok(advised)
}

/// Logs the outcome of [`release_startup_pages`] and [`release_free_heap`] after start.
pub fn after_start() {
    let rss_before = resident_kib();
    let pages = release_startup_pages();
    let heap = release_free_heap();
    match pages {
        Ok(advised) => info!(
            rss_kib_before = rss_before,
            rss_kib_after = resident_kib(),
            advised_bytes = advised,
            heap_free_bytes = heap.map(|(_, h)| h.free),
            "returned start-up pages to the kernel"
        ),
        // EPERM without CAP_SYS_ADMIN-equivalent rights on the file; EINVAL before Linux 5.4.
        Err(e) => {
            debug!(error = %e, "cannot return start-up pages to the kernel; they stay mapped")
        }
    }
}

/// `VmRSS` of this process, KiB.
fn resident_kib() -> Option<u64> {
    fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()
}

/// `(start, end)` of the mappings of `exe` in `/proc/self/maps` that are not writable.
fn executable_mappings(maps: &str, exe: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let path = f.nth(3)?;
            if path != exe || perms.as_bytes().get(1) != Some(&b'-') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some((
                usize::from_str_radix(start, 16).ok()?,
                usize::from_str_radix(end, 16).ok()?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_agent_trims_once_per_burst_and_again_when_more_is_freed() {
        const MIB: usize = 1 << 20;
        let mut t = IdleTrim {
            trimmed_at: 0,
            free_low: 0,
        };
        // Connections open: never.
        assert!(!t.due(3, 10, 8 * MIB));
        // All closed: once.
        assert!(t.due(0, 10, 8 * MIB));
        assert!(!t.due(0, 10, 8 * MIB));
        // The pool closes idle connections later: another 2 MiB free, one more trim.
        assert!(t.due(0, 10, 10 * MIB));
        assert!(!t.due(0, 10, 10 * MIB));
        // Something allocated and freed under 1 MiB: not worth a walk.
        assert!(!t.due(0, 10, 9 * MIB));
        assert!(!t.due(0, 10, 9 * MIB + MIB / 2));
        // A burst with little free memory left over: counted, not trimmed.
        assert!(!t.due(0, 11, MIB / 2));
        assert!(!t.due(0, 11, MIB / 2));
    }

    #[test]
    fn only_the_executables_read_only_mappings_are_advised() {
        let maps = "\
55aa00000000-55aa00001000 r--p 00000000 fd:01 12 /usr/bin/ambit-agent
55aa00001000-55aa00004000 r-xp 00001000 fd:01 12 /usr/bin/ambit-agent
55aa00004000-55aa00005000 rw-p 00004000 fd:01 12 /usr/bin/ambit-agent
55aa00005000-55aa00006000 r--p 00000000 fd:01 13 /usr/bin/ambit-agent-old
55aa00010000-55aa00020000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000001000 r-xp 00000000 fd:01 14 /usr/lib/libc.so.6
";
        assert_eq!(
            executable_mappings(maps, "/usr/bin/ambit-agent"),
            [
                (0x55aa_0000_0000, 0x55aa_0000_1000),
                (0x55aa_0000_1000, 0x55aa_0000_4000)
            ]
        );
    }

    #[test]
    fn releasing_this_processs_startup_pages_keeps_it_running() {
        let advised = release_startup_pages().expect("madvise");
        assert!(advised > 0);
        // The code runs on, read back from the file where it was reclaimed.
        let exe = fs::read_link("/proc/self/exe").expect("exe");
        let maps = fs::read_to_string("/proc/self/maps").expect("maps");
        let found: usize = executable_mappings(&maps, &exe.to_string_lossy())
            .iter()
            .map(|(s, e)| e - s)
            .sum();
        assert_eq!(found as u64, advised);
    }
}
