//! The server certificate of one workload identity, swapped in place on rotation: the certificate
//! manager calls [`CertResolver::update`] and the next handshake on the pod's HBONE listener
//! presents the new certificate; open connections keep theirs.

use std::{fmt, sync::Arc};

use arc_swap::ArcSwap;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use super::{Error, check_own_cert, provider};
use crate::identity::{Identity, WorkloadCert};

/// Holds the current certificate of one identity and hands it to rustls for every handshake (SNI
/// is ignored: a pod's listener serves one identity, and HBONE clients dial by IP).
pub struct CertResolver {
    identity: Identity,
    current: ArcSwap<Current>,
}

struct Current {
    key: Arc<CertifiedKey>,
    serial: String,
}

impl CertResolver {
    /// Loads `cert`; fails if its chain is empty, its leaf does not carry `cert.identity`, or the
    /// key does not match the leaf.
    pub fn new(cert: &WorkloadCert) -> Result<CertResolver, Error> {
        Ok(CertResolver {
            identity: cert.identity.clone(),
            current: ArcSwap::from_pointee(load(cert)?),
        })
    }

    /// Replaces the certificate for new handshakes. The identity must stay the same; on error the
    /// previous certificate stays in use.
    pub fn update(&self, cert: &WorkloadCert) -> Result<(), Error> {
        if cert.identity != self.identity {
            return Err(Error::IdentityChanged {
                holds: self.identity.to_string(),
                got: cert.identity.to_string(),
            });
        }
        self.current.store(Arc::new(load(cert)?));
        Ok(())
    }

    /// The hex serial of the certificate new handshakes get.
    pub fn serial(&self) -> String {
        self.current.load().serial.clone()
    }

    /// The identity this resolver serves.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}

fn load(cert: &WorkloadCert) -> Result<Current, Error> {
    check_own_cert(cert)?;
    let key = CertifiedKey::from_der(cert.chain.clone(), cert.key.clone_key(), &provider())
        .map_err(|cause| Error::Key {
            identity: cert.identity.to_string(),
            cause,
        })?;
    Ok(Current {
        key: Arc::new(key),
        serial: cert.serial.clone(),
    })
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial())
            .finish()
    }
}
