//! What the agent's gRPC clients (the Istio CA and the xDS control plane) share: a TLS endpoint
//! that trusts only the configured roots and checks a chosen server name.

use std::time::Duration;

use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// How long the TCP connect may take (a black-holed address, not a refused one).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Configuration errors; nothing here needs the server to be up. `peer` names the server in the
/// message ("CA", "xDS server").
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {peer} address {address:?}: {why}")]
    Address {
        peer: &'static str,
        address: String,
        why: String,
    },
    #[error("the {peer}'s TLS root certificate is not usable: {why}")]
    RootCert { peer: &'static str, why: String },
    #[error("invalid {peer} TLS server name {name:?}: it must be a DNS name or an IP address")]
    ServerName { peer: &'static str, name: String },
    #[error("cannot set up TLS to the {peer} at {address}: {cause}")]
    Tls {
        peer: &'static str,
        address: String,
        cause: tonic::transport::Error,
    },
}

/// An `https://` endpoint whose certificate must chain to `root_pem` and carry `server_name`
/// (default: the host of `address`). Does not connect.
pub fn tls_endpoint(
    peer: &'static str,
    address: &str,
    root_pem: &[u8],
    server_name: Option<String>,
) -> Result<Endpoint, Error> {
    let bad_address = |why: &str| Error::Address {
        peer,
        address: address.to_owned(),
        why: why.to_owned(),
    };
    let uri: http::Uri = address
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad_address(&e.to_string()))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad_address(
            "it must start with https:// (it is always reached over TLS)",
        ));
    }
    let host = uri
        .host()
        .ok_or_else(|| bad_address("it has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let server_name = server_name.unwrap_or(host);
    rustls::pki_types::ServerName::try_from(server_name.as_str()).map_err(|_| {
        Error::ServerName {
            peer,
            name: server_name.clone(),
        }
    })?;
    check_roots(peer, root_pem)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name(server_name);
    Endpoint::from_shared(address.to_owned())
        .map_err(|e| bad_address(&e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tls_config(tls)
        .map_err(|cause| Error::Tls {
            peer,
            address: address.to_owned(),
            cause,
        })
}

/// The roots parse and are usable as trust anchors.
fn check_roots(peer: &'static str, pem: &[u8]) -> Result<(), Error> {
    let bad = |why: String| Error::RootCert { peer, why };
    let mut store = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| bad(format!("bad PEM: {e}")))?;
        store.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if store.is_empty() {
        return Err(bad("no PEM CERTIFICATE block found".to_owned()));
    }
    Ok(())
}
