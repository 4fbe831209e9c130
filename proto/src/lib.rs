//! Protobuf and gRPC types Ambit speaks on the wire, generated at build time from the `.proto`
//! files in this crate (`proto/<package path>/*.proto`).
//!
//! The modules mirror the protobuf packages, so a type's path says which package it is on the
//! wire: `istio.v1.auth.IstioCertificateRequest` is
//! [`istio::v1::auth::IstioCertificateRequest`]. Each package has its messages, a
//! `<service>_client` module (tonic client) and a `<service>_server` module (tonic server trait).
//!
//! Kept in its own crate so the agent does not rebuild generated code.

#![forbid(unsafe_code)]

/// Re-exported so users name the same versions the generated code was built against.
pub use prost;
pub use prost_types;

pub mod istio {
    pub mod v1 {
        /// Istio's certificate signing API (`istio/security/v1alpha1/ca.proto`), the API istiod
        /// serves on port 15012.
        #[allow(
            clippy::all,
            clippy::pedantic,
            clippy::nursery,
            missing_docs,
            unreachable_pub,
            unused_qualifications,
            rustdoc::all
        )]
        pub mod auth {
            include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
        }
    }
}
