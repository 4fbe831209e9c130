//! Workload identity: SPIFFE ids, certificate authorities, and the certificates the agent holds
//! for the workloads on its node.
//!
//! ```text
//! CertManager ──(CSR)──> CaClient (builtin::BuiltinCa | istio::IstioCa) ──> WorkloadCert
//!      └── one WorkloadCert per local identity, renewed at half its lifetime; read by tls/
//! ```

pub mod builtin;
pub mod ca;
pub mod istio;
pub mod manager;

use std::{fmt, str::FromStr};

pub use ca::{CaClient, WorkloadCert};

/// `der` as a PEM block labelled `label` (`CERTIFICATE`, ...): 64-character lines, `\n` line
/// endings, as rcgen writes them.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// A SPIFFE identity in Istio's form: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// One pointer wide and cheap to clone: the data path copies identities into pool keys, access
/// logs and connection records, and the workload state shares one allocation among all the
/// workloads of a service account.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(std::sync::Arc<Parts>);

#[derive(Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    trust_domain: Box<str>,
    namespace: Box<str>,
    service_account: Box<str>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("{0:?} is not a SPIFFE id: it must start with spiffe://")]
    Scheme(String),
    #[error(
        "{0:?} is not an Istio SPIFFE id: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Shape(String),
    #[error("{id:?}: invalid {part} {value:?}: {why}")]
    Part {
        id: String,
        part: &'static str,
        value: String,
        why: &'static str,
    },
}

impl Identity {
    /// Builds an identity from its parts, validating each.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Identity, ParseError> {
        let id = Identity(std::sync::Arc::new(Parts {
            trust_domain: trust_domain.into().into_boxed_str(),
            namespace: namespace.into().into_boxed_str(),
            service_account: service_account.into().into_boxed_str(),
        }));
        let shown = id.to_string();
        check_trust_domain(&shown, id.trust_domain())?;
        check_label(&shown, "namespace", id.namespace())?;
        check_label(&shown, "service account", id.service_account())?;
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.0.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.0.service_account
    }

    /// Whether another handle shares this one's allocation (for the state's interner, which
    /// drops identities nothing else uses).
    pub(crate) fn is_shared(&self) -> bool {
        std::sync::Arc::strong_count(&self.0) > 1
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.0.trust_domain, self.0.namespace, self.0.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Identity, ParseError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| ParseError::Scheme(s.to_owned()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => Identity::new(*td, *ns, *sa).map_err(|e| match e {
                ParseError::Part {
                    part, value, why, ..
                } => ParseError::Part {
                    id: s.to_owned(),
                    part,
                    value,
                    why,
                },
                other => other,
            }),
            _ => Err(ParseError::Shape(s.to_owned())),
        }
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Identity, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn check_trust_domain(id: &str, td: &str) -> Result<(), ParseError> {
    let bad = |why| ParseError::Part {
        id: id.to_owned(),
        part: "trust domain",
        value: td.to_owned(),
        why,
    };
    if td.is_empty() || td.len() > 255 {
        return Err(bad("must be 1 to 255 characters"));
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(bad(
            "only lowercase letters, digits, '-', '.' and '_' are allowed",
        ));
    }
    Ok(())
}

/// Namespaces and service accounts: Kubernetes names (DNS-1123 subdomain characters).
fn check_label(id: &str, part: &'static str, v: &str) -> Result<(), ParseError> {
    let bad = |why| ParseError::Part {
        id: id.to_owned(),
        part,
        value: v.to_owned(),
        why,
    };
    if v.is_empty() || v.len() > 253 {
        return Err(bad("must be 1 to 253 characters"));
    }
    if !v
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
    {
        return Err(bad(
            "only lowercase letters, digits, '-' and '.' are allowed",
        ));
    }
    if v.starts_with(['-', '.']) || v.ends_with(['-', '.']) {
        return Err(bad("must start and end with a letter or digit"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let s = "spiffe://cluster.local/ns/default/sa/sleep";
        let id: Identity = s.parse().expect("valid id");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "sleep");
        assert_eq!(id.to_string(), s);
    }

    #[test]
    fn refuses_malformed_ids_with_a_reason() {
        for (s, want) in [
            ("cluster.local/ns/a/sa/b", "must start with spiffe://"),
            ("spiffe://td/ns/a/sa", "expected spiffe://"),
            ("spiffe://td/ns/a/sa/b/extra", "expected spiffe://"),
            ("spiffe://td/namespace/a/sa/b", "expected spiffe://"),
            ("spiffe:///ns/a/sa/b", "trust domain"),
            ("spiffe://TD/ns/a/sa/b", "trust domain"),
            ("spiffe://td/ns//sa/b", "namespace"),
            ("spiffe://td/ns/A/sa/b", "namespace"),
            ("spiffe://td/ns/a/sa/-b", "service account"),
        ] {
            let e = s.parse::<Identity>().expect_err(s).to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
