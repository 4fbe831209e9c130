//! What crosses between nodes: a packet capture on a node's underlay link (tcpdump, inside the
//! node's netns), and the test workload's payload, to look for it in the capture (plaintext on
//! the wire shows it; HBONE's TLS does not).

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{Node, Process, TestBed};

/// The test workload's payload (`ambit-testpod connect`): byte `i` of a connection is
/// `(i * 31 + 7) % 251`.
pub fn pattern(range: std::ops::Range<u64>) -> Vec<u8> {
    range.map(|i| ((i * 31 + 7) % 251) as u8).collect()
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// A capture of the TCP packets on a node's underlay link (`eth0` in the node's netns), running
/// until stopped (or until dropped, with the bed's other processes).
pub struct Capture {
    process: Process,
    file: PathBuf,
}

impl Capture {
    /// Starts tcpdump and waits until it captures.
    pub fn start(bed: &TestBed, node: &Node) -> Result<Capture> {
        let file = bed
            .tmp_dir()
            .join(format!("{}-{:x}.pcap", node.name(), next_capture_id()));
        let mut cmd = node.try_command("tcpdump")?;
        cmd.args(["-i", "eth0", "--immediate-mode", "-U", "-s", "0", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let process = bed.spawn(&mut cmd).context("start tcpdump")?;
        // tcpdump says "listening on eth0" on stderr once it captures.
        let mut stderr = process.take_stderr().context("tcpdump stderr")?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut stderr), &mut line)
            .context("read tcpdump stderr")?;
        if !line.contains("listening") {
            bail!("tcpdump did not start: {line}");
        }
        Ok(Capture { process, file })
    }

    /// Stops the capture; returns the packet summaries (`tcpdump -nn -r`) and the raw capture.
    pub fn stop(self) -> Result<(String, Vec<u8>)> {
        self.process
            .signal(nix::sys::signal::Signal::SIGINT)
            .context("stop tcpdump")?;
        let _ = self.process.wait_timeout(Duration::from_secs(5));
        let raw = std::fs::read(&self.file).context("read capture")?;
        let out = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .output()
            .context("read capture with tcpdump")?;
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), raw))
    }
}

/// A per-process unique suffix without a random-number dependency.
fn next_capture_id() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
