//! The xDS client: how a control plane (istiod, or anything speaking its delta ADS protocol)
//! drives the agent's workload, service and policy state.
//!
//! ```text
//! istiod :15012 ──DeltaDiscoveryResponse──> client (one ADS stream, TLS + bearer token)
//!   Address (Workload | Service)               │ push.rs: decode + validate each resource in
//!   Authorization                              │   turn (types.rs, authorization.rs); invalid
//!                                              │   ones are named in the NACK, the rest applied
//!                                              └─> XdsSink::apply_* (state's single writer) -> ACK
//! ```
//!
//! Plain types ([`XdsWorkload`], [`XdsService`], [`crate::policy::Policy`]) leave this module;
//! nothing outside it sees protobuf.

mod authorization;
mod client;
mod push;
mod types;

#[cfg(test)]
mod tests;

pub use authorization::policy_from_proto;
pub use client::{NodeInfo, XdsClient, XdsConfig, XdsStatus};
pub use push::{Push, Resources};
pub use types::{
    AddressResource, GatewayDestination, LbMode, LoadBalancing, Scope, WorkloadMeta,
    WorkloadService, XdsGateway, XdsService, XdsWorkload, address_from_proto,
};

/// The type URL of `istio.workload.Address` (workloads and services).
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// The type URL of `istio.security.Authorization` (L4 authorization policies).
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";

/// Where validated xDS changes go. Implemented by the agent's state updater (the one writer).
/// Each call carries one response's worth of changes, all already validated: the client calls
/// nothing for a response it NACKs.
pub trait XdsSink: Send + Sync + 'static {
    /// Workloads and services upserted and removed by one response. Names are xDS resource
    /// names: a workload's uid, a service's `namespace/hostname`.
    fn apply_addresses(&self, upserts: Vec<(String, AddressResource)>, removes: Vec<String>);
    /// Policies upserted and removed by one response. Names are xDS resource names
    /// (`namespace/name` from istiod).
    fn apply_policies(&self, upserts: Vec<(String, crate::policy::Policy)>, removes: Vec<String>);
}

/// xDS errors: configuration (reported by [`XdsClient::new`]), connection (logged, retried), and
/// resources that do not validate (sent back in a NACK).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid cluster id {0:?}: it is sent as the clusterid header, so it must be visible ASCII"
    )]
    ClusterId(String),
    #[error("invalid xDS node info: {0}")]
    Node(String),
    #[error(transparent)]
    Endpoint(#[from] crate::grpc::Error),
    #[error("cannot read the xDS token: {0}")]
    Token(String),
    #[error("cannot connect to the xDS server at {address}: {detail}")]
    Connect { address: String, detail: String },
    #[error("the xDS stream from {address} failed: {detail}")]
    Stream { address: String, detail: String },
    /// A resource that does not validate; `resource` names it (kind, name, uid), `why` names the
    /// field and what is wrong with it.
    #[error("{resource}: {why}")]
    Resource { resource: String, why: String },
}
