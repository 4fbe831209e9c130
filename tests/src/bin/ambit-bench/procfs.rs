//! What the harness reads about the agents from `/proc`: CPU time (user + system, all threads)
//! and resident memory (now and peak).

use std::{fs, time::Duration};

use anyhow::{Context, Result, anyhow};

use crate::os;

/// CPU time of a process (all its threads): user and system.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    pub user: Duration,
    pub system: Duration,
}

impl CpuTime {
    pub fn total(self) -> Duration {
        self.user + self.system
    }

    pub fn since(self, earlier: CpuTime) -> CpuTime {
        CpuTime {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

impl std::iter::Sum for CpuTime {
    fn sum<I: Iterator<Item = CpuTime>>(iter: I) -> CpuTime {
        iter.fold(CpuTime::default(), |a, b| CpuTime {
            user: a.user + b.user,
            system: a.system + b.system,
        })
    }
}

/// User and system CPU time of process `pid` so far.
pub fn cpu_time(pid: u32) -> Result<CpuTime> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let (user, system) =
        parse_stat_cpu_ticks(&text).ok_or_else(|| anyhow!("cannot parse {path}"))?;
    let hz = os::clock_ticks_per_second();
    Ok(CpuTime {
        user: Duration::from_secs_f64(user as f64 / hz),
        system: Duration::from_secs_f64(system as f64 / hz),
    })
}

/// utime and stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field 2)
/// is in parentheses and may hold spaces or parentheses, so fields are counted after the last
/// `)`.
fn parse_stat_cpu_ticks(text: &str) -> Option<(u64, u64)> {
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state).
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some((utime, stime))
}

/// Resident memory of process `pid`: (VmRSS, VmHWM) in bytes.
pub fn rss(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |name: &str| {
        parse_status_kib(&text, name)
            .map(|kib| kib * 1024)
            .ok_or_else(|| anyhow!("{path} has no {name}"))
    };
    Ok((field("VmRSS")?, field("VmHWM")?))
}

fn parse_status_kib(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// VmRSS of `pid` sampled `n` times, `every` apart (to take a median of a quiet process).
pub fn rss_samples(pid: u32, n: usize, every: Duration) -> Result<Vec<f64>> {
    Ok(memory_samples(pid, n, every)?.0)
}

/// The anonymous part of VmRSS (`RssAnon`: heap, stacks; the rest is mapped files, the
/// executable's code above all), bytes.
pub fn rss_anon(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_status_kib(&text, "RssAnon")
        .map(|kib| kib * 1024)
        .ok_or_else(|| anyhow!("{path} has no RssAnon"))
}

/// `n` samples of (VmRSS, RssAnon), `every` apart, in bytes.
pub fn memory_samples(pid: u32, n: usize, every: Duration) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut rss_all, mut anon) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        if i > 0 {
            std::thread::sleep(every);
        }
        rss_all.push(rss(pid)?.0 as f64);
        anon.push(rss_anon(pid)? as f64);
    }
    Ok((rss_all, anon))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_ticks_after_an_odd_command_name() {
        let stat = "4242 (ambit (x) agent) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 40 0 0 20 0 6 0 12345 100000000 2000 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some((250, 40)));
    }

    #[test]
    fn reads_status_fields() {
        let status = "Name:\tambit-agent\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(10240));
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(20480));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
    }
}
