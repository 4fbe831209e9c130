//! Ambit's fuzz targets. Each is a function of the fuzzer's bytes that panics when it finds a
//! bug; `fuzz_targets/` wraps each for libFuzzer (`cargo xtask fuzz`), and `tests/smoke.rs` runs
//! each for a short, fixed time in the test suite, over the kept crashers and the seed corpus
//! first. Most targets read the bytes as choices among small sets of names, addresses and
//! shapes (see [`input::Input`]), so that the interesting collisions (two policies with one key,
//! two workloads with one IP) happen often; some also feed raw bytes to a decoder.
//!
//! | target | what it checks |
//! |---|---|
//! | [`policy`] | the indexed policy store decides exactly as a naive reading of the policies (a miss would be an authorization bypass), after inserts and removals |
//! | [`xds`] | xDS `Address` and `Authorization` decoding, and a sequence of incremental pushes gives the same state as the final set applied at once |
//! | [`ads`] | the ADS stream's decoder, walking a response resource by resource, never panics and agrees with prost's decoding of the whole response wherever that succeeds |
//! | [`path`] | the waypoint's path normalization is idempotent and never leaves dot segments, repeated slashes, parameters or escaped slashes |
//! | [`hbone`] | the HBONE server's HTTP/2 handling over an in-memory duplex: the connection ends within 2 s, no more streams than frames sent, no task left behind, no panic |
//! | [`http`] | the agent's HTTP/1.1 server answers every input with a bounded response |
//! | [`identity`] | SPIFFE identities parse and print back the same; certificate parsing never panics |
//! | [`config`] | any YAML is refused or accepted without a panic, and an accepted config prints |
//! | [`cni`] | the CNI plugin's network config, `CNI_ARGS` and `prevResult` parsing |
//! | [`dns`] | the DNS proxy: every datagram gets a mesh answer that parses with the query's id, a forward, or FORMERR/nothing; truncation keeps answers within the UDP limit |

pub mod input;
mod targets;

pub use targets::{ads, cni, config, dns, hbone, http, identity, path, policy, xds};

/// A fuzz target: panics on the bytes that show a bug.
pub type Target = fn(&[u8]);

/// The targets by name, for the smoke test and `cargo xtask fuzz`.
pub const TARGETS: [(&str, Target); 10] = [
    ("policy", policy),
    ("xds", xds),
    ("ads", ads),
    ("path", path),
    ("hbone", hbone),
    ("http", http),
    ("identity", identity),
    ("config", config),
    ("cni", cni),
    ("dns", dns),
];
