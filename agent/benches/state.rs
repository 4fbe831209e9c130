//! The workload state under a big mesh, through the agent's real path: `istio.workload.Address`
//! resources converted by `xds::address_from_proto` and handed to `state::StateWriter` (the one
//! writer), which applies it to the snapshot and publishes it into a `state::StateStore`.
//!
//! Before the timing benches (only under `cargo bench`), it prints the memory the state holds per
//! workload at 100,000 workloads (the published snapshot, the writer and its interned strings:
//! everything, counted by a global allocator), and the one-off costs of a pod replaced and of a
//! config change when the mesh also has 10,000 services. Nothing is asserted: it is a report.
//!
//! Timed: one push of 10,000 workloads into an empty agent; the same with 1,000 services; one
//! push of 1 workload (a pod churning) on top of 100,000.
//!
//! `cargo bench -p ambit-agent --bench state`

// The counting allocator below is the only unsafe code, as `GlobalAlloc` requires.
#![allow(unsafe_code)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashMap,
    hint::black_box,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicIsize, Ordering},
    },
    time::Instant,
};

use ambit_agent::{
    config::Config,
    identity::Identity,
    state::{StateStore, StateWriter, Workload},
    xds::{XdsSink, address_from_proto},
};
use ambit_proto::{
    istio::workload::{
        Address, NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload as PbWorkload,
        WorkloadStatus, WorkloadType, address,
    },
    prost::Message,
};
use criterion::{BatchSize, Criterion, criterion_group};

/// Counts live heap bytes: as requested (`Layout::size`) and as glibc really holds them (the
/// usable size of each chunk plus its 8-byte header), and the number of live allocations. Only
/// while `COUNTING` is on (the memory report), so the timing benches run at `System`'s speed;
/// the counters are only read as differences taken while it is on.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);

static LIVE_REQUESTED: AtomicIsize = AtomicIsize::new(0);
static LIVE_CHUNK: AtomicIsize = AtomicIsize::new(0);
static LIVE_ALLOCS: AtomicIsize = AtomicIsize::new(0);

/// What malloc holds for the block at `p` (usable size plus the chunk header).
fn chunk(p: *mut u8) -> isize {
    // SAFETY: `p` is a live block returned by `System` (glibc malloc/posix_memalign/realloc),
    // which is what `malloc_usable_size` accepts.
    let usable = unsafe { libc::malloc_usable_size(p.cast()) };
    usable as isize + 8
}

fn counted(p: *mut u8, size: usize) {
    if !p.is_null() && COUNTING.load(Ordering::Relaxed) {
        LIVE_REQUESTED.fetch_add(size as isize, Ordering::Relaxed);
        LIVE_CHUNK.fetch_add(chunk(p), Ordering::Relaxed);
        LIVE_ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

fn uncounted(p: *mut u8, size: usize) {
    if !COUNTING.load(Ordering::Relaxed) {
        return;
    }
    LIVE_REQUESTED.fetch_sub(size as isize, Ordering::Relaxed);
    LIVE_CHUNK.fetch_sub(chunk(p), Ordering::Relaxed);
    LIVE_ALLOCS.fetch_sub(1, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s contract;
// the counters only observe the results.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours (non-zero-size layout, by the caller).
        let p = unsafe { System.alloc(layout) };
        counted(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        counted(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Read the chunk size while the block is still live.
        uncounted(ptr, layout.size());
        // SAFETY: `ptr` was allocated by us (so by `System`) with `layout`, by the caller.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let counting = COUNTING.load(Ordering::Relaxed);
        let old_chunk = if counting { chunk(ptr) } else { 0 };
        // SAFETY: `ptr` was allocated by us (so by `System`) with `layout`, and `new_size` is
        // valid for it, by the caller.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() && counting {
            LIVE_REQUESTED.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
            LIVE_CHUNK.fetch_add(chunk(p) - old_chunk, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[derive(Clone, Copy)]
struct Live {
    requested: isize,
    chunk: isize,
    allocs: isize,
}

fn live() -> Live {
    Live {
        requested: LIVE_REQUESTED.load(Ordering::Relaxed),
        chunk: LIVE_CHUNK.load(Ordering::Relaxed),
        allocs: LIVE_ALLOCS.load(Ordering::Relaxed),
    }
}

impl std::ops::Sub for Live {
    type Output = Live;
    fn sub(self, o: Live) -> Live {
        Live {
            requested: self.requested - o.requested,
            chunk: self.chunk - o.chunk,
            allocs: self.allocs - o.allocs,
        }
    }
}

impl Live {
    fn per(self, n: usize) -> String {
        let n = n as f64;
        format!(
            "{:.0} B requested, {:.0} B in malloc chunks, {:.2} allocations",
            self.requested as f64 / n,
            self.chunk as f64 / n,
            self.allocs as f64 / n
        )
    }
}

/// Ten workloads per service, a hundred namespaces, a hundred pods per node.
const PER_SERVICE: usize = 10;
const NAMESPACES: usize = 100;
const PODS_PER_NODE: usize = 100;

fn namespace_of(svc: usize) -> String {
    format!("ns-{}", svc % NAMESPACES)
}

fn hostname_of(svc: usize) -> String {
    format!("svc-{svc}.{}.svc.cluster.local", namespace_of(svc))
}

/// Workload `i` as istiod sends it: a Deployment's pod with one IPv4, HBONE, its own service
/// account, its node, and the one service it backs. `generation` changes its pod name, uid
/// and IP (a pod replaced by a new one).
fn workload(i: usize, generation: usize) -> Address {
    let svc = i / PER_SERVICE;
    let namespace = namespace_of(svc);
    let name = format!("svc-{svc}-7d9f8b6c5-{:05x}", i + (generation << 20));
    let ip = (10 << 24) + i as u32 + 1 + ((generation as u32 & 0x3f) << 17);
    decoded(Address {
        r#type: Some(address::Type::Workload(PbWorkload {
            uid: format!("Kubernetes//Pod/{namespace}/{name}"),
            addresses: vec![ip.to_be_bytes().to_vec()],
            tunnel_protocol: TunnelProtocol::Hbone.into(),
            trust_domain: "cluster.local".into(),
            service_account: format!("svc-{svc}"),
            node: format!("node-{}", i / PODS_PER_NODE),
            canonical_name: format!("svc-{svc}"),
            canonical_revision: "latest".into(),
            workload_type: WorkloadType::Deployment.into(),
            workload_name: format!("svc-{svc}"),
            services: HashMap::from([(
                format!("{namespace}/{}", hostname_of(svc)),
                PortList {
                    ports: vec![Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: 0,
                    }],
                },
            )]),
            status: WorkloadStatus::Healthy.into(),
            cluster_id: "Kubernetes".into(),
            name,
            namespace,
            ..Default::default()
        })),
    })
}

/// Service `j`: one VIP, port 80 -> 8080.
fn service(j: usize) -> Address {
    let vip = (10 << 24) + (96 << 16) + j as u32 + 1;
    decoded(Address {
        r#type: Some(address::Type::Service(Service {
            name: format!("svc-{j}"),
            namespace: namespace_of(j),
            hostname: hostname_of(j),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: vip.to_be_bytes().to_vec(),
                length: None,
            }],
            ports: vec![Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: 0,
            }],
            ..Default::default()
        })),
    })
}

/// `a` encoded and decoded again, as the client gets it off the wire: its strings then have
/// exactly their length as capacity (`format!` leaves slack), so the memory counted for what
/// is moved into the state is what the agent really holds.
fn decoded(a: Address) -> Address {
    Address::decode(a.encode_to_vec().as_slice()).expect("decodes")
}

fn resource_name(a: &Address) -> String {
    match &a.r#type {
        Some(address::Type::Workload(w)) => w.uid.clone(),
        Some(address::Type::Service(s)) => format!("{}/{}", s.namespace, s.hostname),
        None => String::new(),
    }
}

/// Resources as the client holds them after decoding a response: name and `Address`.
fn push(
    workloads: std::ops::Range<usize>,
    services: std::ops::Range<usize>,
) -> Vec<(String, Address)> {
    workloads
        .map(|i| workload(i, 0))
        .chain(services.map(service))
        .map(|a| (resource_name(&a), a))
        .collect()
}

/// What the client does with a validated response: convert every resource, then one
/// `apply_addresses`.
fn apply(sources: &StateWriter, resources: Vec<(String, Address)>, removes: Vec<String>) {
    let upserts = resources
        .into_iter()
        .map(|(name, a)| {
            let r = address_from_proto(&name, a).expect("valid resource");
            (name, r)
        })
        .collect();
    sources.apply_addresses(upserts, removes);
}

/// A `StateWriter` with a minimal config, publishing into `workloads` as the agent does.
fn new_sources(workloads: Arc<StateStore>) -> StateWriter {
    let config = Config::parse("node: n\ncgroup: /x\n", Path::new("b.yaml")).expect("config");
    StateWriter::new(Arc::new(config), move |snapshot, _policies| {
        workloads.replace(snapshot)
    })
}

/// Memory per workload at 100k, and the 1-workload push with 10k services (printed once).
fn report() {
    const N: usize = 100_000;
    COUNTING.store(true, Ordering::Relaxed);
    let before = live();
    let store = Arc::new(StateStore::default());
    let sources = new_sources(store.clone());
    let resources = push(0..N, 0..0);
    let t = Instant::now();
    apply(&sources, resources, Vec::new());
    let initial = t.elapsed();
    let held = live() - before;
    drop(sources);
    store.replace(Arc::default());
    drop(store);
    let leftover = live() - before;
    COUNTING.store(false, Ordering::Relaxed);

    eprintln!("state at {N} workloads (1 IPv4, 1 service each; no Service resources):");
    eprintln!("  first push of {N} (allocator counting, so slower): {initial:.2?}");
    eprintln!(
        "  everything the state holds (published snapshot, writer, interned strings): {}",
        held.per(N)
    );
    eprintln!(
        "  left after dropping it (should be ~0): {} B",
        leftover.requested
    );
    eprintln!(
        "  sizes: Workload {} B (Arc'd: {} B), Identity {} B, by_ip bucket {} B + 1 control byte",
        size_of::<Workload>(),
        size_of::<Workload>() + 2 * size_of::<usize>(),
        size_of::<Identity>(),
        size_of::<(std::net::IpAddr, Arc<Workload>)>(),
    );

    // The same mesh with its 10k services, and one pod's churn on top of it.
    const S: usize = N / PER_SERVICE;
    let store = Arc::new(StateStore::default());
    let sources = new_sources(store.clone());
    let t = Instant::now();
    apply(&sources, push(0..N, 0..S), Vec::new());
    let initial = t.elapsed();
    let t = Instant::now();
    let old = resource_name(&workload(7, 0));
    apply(
        &sources,
        vec![(resource_name(&workload(7, 1)), workload(7, 1))],
        vec![old],
    );
    let one = t.elapsed();
    let t = Instant::now();
    sources.set_config(Arc::new(
        Config::parse("node: n\ncgroup: /x\n", Path::new("b.yaml")).expect("config"),
    ));
    let rebuild = t.elapsed();
    eprintln!("state at {N} workloads and {S} services:");
    eprintln!("  first push of {} resources: {initial:.2?}", N + S);
    eprintln!("  one pod replaced on top: {one:.2?}");
    eprintln!("  a config change (every index rebuilt): {rebuild:.2?}");
    eprintln!();
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("xds_push");
    g.sample_size(10);

    g.bench_function("10k_workloads_into_empty", |b| {
        b.iter_batched(
            || {
                (
                    new_sources(Arc::new(StateStore::default())),
                    push(0..10_000, 0..0),
                )
            },
            |(s, resources)| {
                apply(&s, resources, Vec::new());
                s
            },
            BatchSize::PerIteration,
        );
    });

    g.bench_function("10k_workloads_1k_services_into_empty", |b| {
        b.iter_batched(
            || {
                (
                    new_sources(Arc::new(StateStore::default())),
                    push(0..10_000, 0..1_000),
                )
            },
            |(s, resources)| {
                apply(&s, resources, Vec::new());
                s
            },
            BatchSize::PerIteration,
        );
    });

    // One pod replaced by a new one (its old resource removed, the new one added) in a mesh of
    // 100k workloads. The old snapshot is dropped inside (no reader holds it), as in the agent.
    let store = Arc::new(StateStore::default());
    let s = new_sources(store.clone());
    apply(&s, push(0..100_000, 0..0), Vec::new());
    let mut generation = 0;
    g.bench_function("1_workload_onto_100k", |b| {
        b.iter(|| {
            let old = resource_name(&workload(7, generation));
            generation += 1;
            let new = workload(7, generation);
            apply(&s, vec![(resource_name(&new), new)], vec![old]);
            black_box(store.snapshot());
        });
    });
    g.finish();
}

criterion_group!(state, benches);

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs each bench once and skips this.
    if std::env::args().any(|a| a == "--bench") {
        report();
    }
    state();
    Criterion::default().configure_from_args().final_summary();
}
