//! Every fuzz target for a short, fixed time, as part of the test suite: first the crashers kept
//! from earlier runs (`fuzz/regressions/<target>/`, each a bug that was fixed) and the seed corpus
//! (`fuzz/corpus/<target>/`), then mutations of the seeds and random inputs from a fixed seed,
//! until the time is up. Long, coverage-guided runs are `cargo xtask fuzz`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// How long each target runs here.
const BUDGET: Duration = Duration::from_secs(2);

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let p = e.ok()?.path();
            let data = std::fs::read(&p).ok()?;
            Some((p, data))
        })
        .collect();
    out.sort();
    out
}

fn smoke(name: &str) {
    let (_, target) = ambit_fuzz::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no target {name}"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let regressions = files(&root.join("regressions").join(name));
    let corpus = files(&root.join("corpus").join(name));
    for (path, data) in regressions.iter().chain(&corpus) {
        eprintln!("{name}: {}", path.display());
        target(data);
    }
    let seeds: Vec<&[u8]> = corpus.iter().map(|(_, d)| d.as_slice()).collect();
    let mut rng = fastrand::Rng::with_seed(0x5eed_0000 ^ name.len() as u64);
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < BUDGET && runs < 1_000_000 {
        let mut data: Vec<u8> = match seeds.get(rng.usize(..seeds.len().max(1))) {
            Some(seed) if rng.bool() => seed.to_vec(),
            _ => (0..rng.usize(..256)).map(|_| rng.u8(..)).collect(),
        };
        for _ in 0..rng.usize(..4) {
            if data.is_empty() {
                break;
            }
            let at = rng.usize(..data.len());
            data[at] = rng.u8(..);
        }
        if std::panic::catch_unwind(|| target(&data)).is_err() {
            // Keep the input, to add to `regressions/` once the bug is fixed.
            let dir = root.join("../target/fuzz-smoke");
            let _ = std::fs::create_dir_all(&dir);
            let file = dir.join(format!("{name}-crash-{runs}"));
            let _ = std::fs::write(&file, &data);
            panic!(
                "{name} failed on {} (saved in {})",
                hex(&data),
                file.display()
            );
        }
        runs += 1;
    }
    eprintln!("{name}: {runs} inputs in {:?}", start.elapsed());
    assert!(runs > 0);
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

macro_rules! smoke {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() {
            smoke(stringify!($name));
        }
    )*};
}

smoke!(
    policy, xds, ads, path, hbone, http, identity, config, cni, dns
);

/// `cargo xtask fuzz` and cargo-fuzz know the same targets as this test (xtask keeps its own list,
/// the fuzz crate declares a `[[bin]]` for each).
#[test]
fn every_target_has_a_libfuzzer_binary_and_an_xtask_entry() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("fuzz/Cargo.toml");
    let xtask =
        std::fs::read_to_string(root.join("../xtask/src/fuzz.rs")).expect("xtask/src/fuzz.rs");
    for (name, _) in ambit_fuzz::TARGETS {
        assert!(
            manifest.contains(&format!(
                "name = \"{name}\"\npath = \"fuzz_targets/{name}.rs\""
            )),
            "fuzz/Cargo.toml has no [[bin]] {name}"
        );
        assert!(
            root.join(format!("fuzz_targets/{name}.rs")).is_file(),
            "no fuzz_targets/{name}.rs"
        );
        assert!(
            xtask.contains(&format!("\"{name}\"")),
            "xtask/src/fuzz.rs does not list {name}"
        );
        assert!(
            root.join("corpus").join(name).is_dir(),
            "no seed corpus for {name}"
        );
    }
}
