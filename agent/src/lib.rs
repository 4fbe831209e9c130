//! Ambit's node agent. `main.rs` parses arguments; [`app`] wires the parts together:
//!
//! ```text
//! config ──> app ──> redirect (eBPF load/attach/pin, enrollment maps, pod netns)
//!                └─> proxy (per-pod listeners: outbound 15001, inbound 15006) ──> telemetry (access log)
//! ```
//!
//! See ARCHITECTURE.md for the data path and the runtime layout.

pub mod admin;
pub mod app;
pub mod config;
pub mod grpc;
pub mod http;
pub mod identity;
pub mod kube;
pub mod lifecycle;
pub mod metrics;
pub mod pods;
pub mod policy;
pub mod proxy;
pub mod readiness;
pub mod redirect;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod tunnel;
pub mod waypoint;
pub mod xds;
