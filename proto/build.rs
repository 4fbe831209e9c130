//! Generates Rust types, gRPC clients and gRPC servers from the `.proto` files of this crate.
//!
//! The files live under `proto/<package path>/`, and imports are relative to the crate root
//! (`import "istio/security/v1alpha1/ca.proto"`). Well-known types (`google/protobuf/*.proto`)
//! come with `protoc` (Debian: `protobuf-compiler` and `libprotobuf-dev`, installed by
//! `cargo xtask setup`) and map to `prost-types`.

use std::{env, path::PathBuf};

/// Every file to compile. Add new files here; the generated code is one file per package,
/// included by `src/lib.rs`.
const PROTOS: &[&str] = &["istio/security/v1alpha1/ca.proto"];

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
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .compile_protos(&protos, &[root])?;
    Ok(())
}
