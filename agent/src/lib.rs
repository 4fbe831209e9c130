//! Ambit's node agent. `main.rs` parses arguments; [`app`] wires the parts together and
//! [`lifecycle`] follows the config and drains. The layers, each importing only those below it
//! (`tests/module_layers.rs` keeps it so):
//!
//! ```text
//! data path:  redirect (eBPF, pod netns) ─> proxy (outbound; inbound over 15006 or HBONE)
//!                                            ├─> tunnel (HBONE client, server framing, pool)
//!                                            │     └─> tls ─> identity (SPIFFE ids, CAs, certs)
//!                                            └─> copy (byte-counted copy), sockets (listen, connect)
//! state:      xds ─> state (StateStore, StateWriter) ─> policy          config (every setting)
//! control:    app ─> pods (desired pods, PodManager) ─> redirect, proxy
//!             admin (API over api.rs types), readiness, metrics, kube, ca_server, waypoint
//! ```
//!
//! See ARCHITECTURE.md for the data path and the runtime layout.

pub mod addrs;
pub mod admin;
pub mod api;
pub mod app;
pub mod ca_server;
pub mod config;
pub mod copy;
pub mod dns;
pub mod grpc;
pub mod http;
pub mod identity;
pub mod kube;
pub mod lifecycle;
pub mod memory;
pub mod metrics;
pub mod pods;
pub mod policy;
pub mod proxy;
pub mod readiness;
pub mod redirect;
pub mod sockets;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod tunnel;
pub mod waypoint;
pub mod xds;
