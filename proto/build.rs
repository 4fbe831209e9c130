//! Generates Rust types, gRPC clients and gRPC servers from the `.proto` files of this crate.
//!
//! The files live under `proto/<package path>/`, and imports are relative to the crate root
//! (`import "istio/security/v1alpha1/ca.proto"`). Well-known types (`google/protobuf/*.proto`)
//! come with `protoc` (Debian: `protobuf-compiler` and `libprotobuf-dev`, installed by
//! `cargo xtask setup`) and map to `prost-types` (prost-build's default extern path for
//! `.google.protobuf`; the wrappers become `Option<primitive>` and `Empty` becomes `()`).
//! `google/rpc/status.proto` is not shipped with protoc, so this crate carries its own.

use std::{env, path::PathBuf};

/// Every file to compile. Add new files here; the generated code is one file per package,
/// included by `src/lib.rs`.
const PROTOS: &[&str] = &[
    "istio/security/v1alpha1/ca.proto",
    "envoy/service/discovery/v3/ads.proto",
    "envoy/service/discovery/v3/discovery.proto",
    "envoy/config/core/v3/base.proto",
    "google/rpc/status.proto",
    "istio/workload/workload.proto",
    "istio/security/authorization.proto",
];

fn main() {
    if let Err(e) = generate() {
        // Printed with Display: `main` returning the error would show its Debug form.
        eprintln!("error: cannot generate code from ambit-proto's .proto files: {e}");
        eprintln!(
            "protoc and the well-known .proto files must be installed: run `cargo xtask setup` \
             (Debian packages protobuf-compiler and libprotobuf-dev), or set PROTOC"
        );
        std::process::exit(1);
    }
}

fn generate() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let protos: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    // `prost::Name` on every message: `Address::type_url()` is the xDS type URL
    // (type.googleapis.com/istio.workload.Address), and `prost_types::Any::{from_msg, to_msg}` work.
    let mut config = tonic_prost_build::Config::new();
    config
        .enable_type_names()
        .type_name_domain(["."], "type.googleapis.com");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .compile_with_config(config, &protos, &[root])?;
    Ok(())
}
