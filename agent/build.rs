//! Builds the eBPF programs (ebpf/ambit-ebpf) for the bpf target with the nightly toolchain and
//! bpf-linker, and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//! `cargo xtask setup` installs what this needs.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?
        .join("ebpf/ambit-ebpf");
    let root_dir = metadata_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", metadata_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ambit-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed: run `cargo xtask setup` (nightly rust-src, \
         bpf-linker built against LLVM 22)",
    )
}
