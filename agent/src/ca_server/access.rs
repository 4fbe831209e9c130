//! Who may ask the CA server ([`super`]) for which certificates, as istiod's node
//! authorizer decides it for ztunnel: each caller proves which node it is with that node's own
//! token, and gets certificates only for the identities of workloads on that node; a lifetime
//! longer than the configured maximum is cut to it. Only a server on loopback may take callers
//! without a token (one machine, nothing else can reach it).
//!
//! The CA server's config (`ambit-agent ca-server --config FILE`):
//!
//! ```yaml
//! dir: /var/lib/ambit/ca              # the CA's root and the server's TLS certificate
//! trustDomain: cluster.local
//! listen: 0.0.0.0:15012
//! maxCertLifetimeSeconds: 86400       # longer requests are cut to this (default 24 h)
//! nodes:
//!   - name: node-a
//!     tokenFile: /etc/ambit/ca/node-a.token   # the node agent's ca.istio.tokenPath holds the same
//!     agentConfig: /etc/ambit/node-a.yaml     # its enrolled pods (and waypoint) are its workloads
//!     identities: []                          # further identities it may get
//! ```
//!
//! Token files and agent configs are read again when they change (by mtime), so a rotated token
//! or a new pod on a node needs no restart. A file that cannot be read fails closed: that node
//! is not authenticated, or gets no identity from it.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use serde::Deserialize;
use tonic::{Status, metadata::MetadataMap};
use tracing::warn;

use crate::identity::{Identity, istio::AUTHORIZATION_HEADER};

/// The longest lifetime granted when the config does not say (istiod's default maximum).
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// Token files and agent configs larger than this are refused.
const MAX_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the CA server config {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("CA server config {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// The CA server's settings.
#[derive(Debug)]
pub struct CaServerConfig {
    pub dir: PathBuf,
    pub trust_domain: String,
    pub listen: SocketAddr,
    pub callers: Callers,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    dir: PathBuf,
    #[serde(default)]
    trust_domain: Option<String>,
    listen: SocketAddr,
    #[serde(default)]
    max_cert_lifetime_seconds: Option<u64>,
    #[serde(default)]
    nodes: Vec<RawNode>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawNode {
    name: String,
    token_file: PathBuf,
    #[serde(default)]
    agent_config: Option<PathBuf>,
    #[serde(default)]
    identities: Vec<String>,
}

impl CaServerConfig {
    pub fn load(path: &Path) -> Result<CaServerConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|cause| Error::Read {
            path: path.to_owned(),
            cause,
        })?;
        let invalid = |field: String, message: String| Error::Invalid {
            path: path.to_owned(),
            field,
            message,
        };
        let de = serde_norway::Deserializer::from_str(&text);
        let raw: RawConfig = serde_path_to_error::deserialize(de)
            .map_err(|e| invalid(e.path().to_string(), e.into_inner().to_string()))?;
        let trust_domain = raw
            .trust_domain
            .unwrap_or_else(|| "cluster.local".to_owned());
        Identity::new(trust_domain.clone(), "default", "default")
            .map_err(|e| invalid("trustDomain".into(), e.to_string()))?;
        let max_lifetime = match raw.max_cert_lifetime_seconds {
            None => DEFAULT_MAX_LIFETIME,
            Some(s) if (60..=365 * 24 * 3600).contains(&s) => Duration::from_secs(s),
            Some(s) => {
                return Err(invalid(
                    "maxCertLifetimeSeconds".into(),
                    format!("{s} is not between 60 and 31536000 (a year)"),
                ));
            }
        };
        let mut nodes = Vec::with_capacity(raw.nodes.len());
        let mut names = HashSet::new();
        let mut token_files = HashSet::new();
        for (i, n) in raw.nodes.into_iter().enumerate() {
            let field = |f: &str| format!("nodes[{i}].{f}");
            if n.name.is_empty() || !names.insert(n.name.clone()) {
                return Err(invalid(
                    field("name"),
                    format!("{:?} is empty or named twice", n.name),
                ));
            }
            if !token_files.insert(n.token_file.clone()) {
                return Err(invalid(
                    field("tokenFile"),
                    format!(
                        "{} is another node's too: each node needs its own credential",
                        n.token_file.display()
                    ),
                ));
            }
            read_token(&n.token_file).map_err(|e| invalid(field("tokenFile"), e))?;
            let identities = n
                .identities
                .iter()
                .enumerate()
                .map(|(j, s)| {
                    let id: Identity = s
                        .parse()
                        .map_err(|e| invalid(field(&format!("identities[{j}]")), format!("{e}")))?;
                    if id.trust_domain() != trust_domain {
                        return Err(invalid(
                            field(&format!("identities[{j}]")),
                            format!("{s} is not in trust domain {trust_domain}"),
                        ));
                    }
                    Ok(id)
                })
                .collect::<Result<Vec<_>, _>>()?;
            nodes.push(NodeCaller::new(
                n.name,
                n.token_file,
                n.agent_config,
                identities,
            ));
        }
        if nodes.is_empty() && !raw.listen.ip().is_loopback() {
            return Err(invalid(
                "nodes".into(),
                format!(
                    "the server listens on {}, which other hosts can reach, so every caller must \
                     be authenticated: list each node with its own tokenFile (or listen on \
                     loopback)",
                    raw.listen
                ),
            ));
        }
        Ok(CaServerConfig {
            dir: raw.dir,
            trust_domain,
            listen: raw.listen,
            callers: if nodes.is_empty() {
                Callers::open(max_lifetime)
            } else {
                Callers::nodes(nodes, max_lifetime)
            },
        })
    }
}

/// Who may ask for what, and for how long.
#[derive(Debug)]
pub struct Callers {
    /// Empty: any caller, any identity (loopback only).
    nodes: Vec<NodeCaller>,
    max_lifetime: Duration,
}

/// An authenticated caller.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    /// A server on loopback takes callers without a token.
    Local,
    Node(&'a NodeCaller),
}

impl Caller<'_> {
    /// For logs: the node's name, or `local`.
    pub fn name(&self) -> &str {
        match self {
            Caller::Local => "local",
            Caller::Node(n) => &n.name,
        }
    }
}

impl Callers {
    /// No authentication, any identity: for a server that only loopback can reach.
    pub fn open(max_lifetime: Duration) -> Callers {
        Callers {
            nodes: Vec::new(),
            max_lifetime,
        }
    }

    pub fn nodes(nodes: Vec<NodeCaller>, max_lifetime: Duration) -> Callers {
        Callers {
            nodes,
            max_lifetime,
        }
    }

    /// Whether callers need no token.
    pub fn is_open(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Which node the request's bearer token belongs to.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller<'_>, Status> {
        if self.nodes.is_empty() {
            return Ok(Caller::Local);
        }
        let bearer = metadata
            .get(AUTHORIZATION_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "missing token: send authorization: Bearer <the node's token> (ca.istio.tokenPath)",
                )
            })?;
        let mut matched = self.nodes.iter().filter(|n| n.token_is(bearer));
        match (matched.next(), matched.next()) {
            (Some(node), None) => Ok(Caller::Node(node)),
            (Some(_), Some(_)) => Err(Status::unauthenticated(
                "the token is more than one node's: give every node its own token",
            )),
            (None, _) => Err(Status::unauthenticated(
                "invalid token: it is no node's (check the node's ca.istio.tokenPath and its tokenFile in the CA server config)",
            )),
        }
    }

    /// Whether `caller` may obtain a certificate for `identity`.
    pub fn authorize(&self, caller: Caller<'_>, identity: &Identity) -> Result<(), Status> {
        match caller {
            Caller::Local => Ok(()),
            Caller::Node(node) if node.holds(identity) => Ok(()),
            Caller::Node(node) => Err(Status::permission_denied(format!(
                "node {} may not obtain a certificate for {identity}: no workload of that node has \
                 that identity (its agentConfig's enrolled pods and its identities list decide)",
                node.name
            ))),
        }
    }

    /// The lifetime to sign for a request asking for `requested` (none: the maximum), and
    /// whether it was cut.
    pub fn lifetime(&self, requested: Option<Duration>) -> (Duration, bool) {
        match requested {
            Some(d) if d <= self.max_lifetime => (d, false),
            Some(_) => (self.max_lifetime, true),
            None => (self.max_lifetime, false),
        }
    }
}

/// One node's credential and workloads.
#[derive(Debug)]
pub struct NodeCaller {
    name: String,
    token_file: PathBuf,
    agent_config: Option<PathBuf>,
    identities: Vec<Identity>,
    cache: Mutex<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    token: Option<(Option<SystemTime>, String)>,
    config: Option<(Option<SystemTime>, HashSet<Identity>)>,
}

impl NodeCaller {
    pub fn new(
        name: String,
        token_file: PathBuf,
        agent_config: Option<PathBuf>,
        identities: Vec<Identity>,
    ) -> NodeCaller {
        NodeCaller {
            name,
            token_file,
            agent_config,
            identities,
            cache: Mutex::default(),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn token_is(&self, bearer: &str) -> bool {
        let mtime = modified(&self.token_file);
        let mut cache = self.cache();
        if cache
            .token
            .as_ref()
            .is_none_or(|(at, _)| *at != mtime || mtime.is_none())
        {
            match read_token(&self.token_file) {
                Ok(t) => cache.token = Some((mtime, t)),
                Err(e) => {
                    warn!(node = %self.name, error = %e, "cannot read the node's token; it cannot be authenticated");
                    cache.token = None;
                    return false;
                }
            }
        }
        cache
            .token
            .as_ref()
            .is_some_and(|(_, t)| constant_time_eq(t.as_bytes(), bearer.as_bytes()))
    }

    fn holds(&self, identity: &Identity) -> bool {
        if self.identities.contains(identity) {
            return true;
        }
        let Some(path) = &self.agent_config else {
            return false;
        };
        let mtime = modified(path);
        let mut cache = self.cache();
        if cache
            .config
            .as_ref()
            .is_none_or(|(at, _)| *at != mtime || mtime.is_none())
        {
            let ids = match load_identities(path) {
                Ok(ids) => ids,
                Err(e) => {
                    warn!(node = %self.name, config = %path.display(), error = %e, "cannot read the node's agent config; it gets no identity from it");
                    HashSet::new()
                }
            };
            cache.config = Some((mtime, ids));
        }
        cache
            .config
            .as_ref()
            .is_some_and(|(_, ids)| ids.contains(identity))
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// A node's token: the file's content without surrounding whitespace, not empty.
fn read_token(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!("{} is larger than 1 MiB", path.display()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(token.to_owned())
}

/// The identities a node agent's config serves: its enrolled pods' (and a waypoint's own).
fn load_identities(path: &Path) -> Result<HashSet<Identity>, String> {
    if modified(path).is_none() {
        return Err(format!("{} does not exist (yet)", path.display()));
    }
    let config = crate::config::Config::load(path).map_err(|e| e.to_string())?;
    let mut ids: HashSet<Identity> = config.enrolled_pods().map(|p| p.identity.clone()).collect();
    if let Some(w) = &config.waypoint {
        ids.insert(w.identity().clone());
    }
    Ok(ids)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Dir {
            let d = std::env::temp_dir().join(format!(
                "ambit-ca-access-{}-{:x}",
                std::process::id(),
                fastrand::u64(..)
            ));
            std::fs::create_dir_all(&d).expect("dir");
            Dir(d)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).expect("write");
            p
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn load(dir: &Dir, yaml: &str) -> Result<CaServerConfig, Error> {
        CaServerConfig::load(&dir.write("ca.yaml", yaml))
    }

    #[test]
    fn the_config_is_checked_and_open_callers_only_on_loopback() {
        let dir = Dir::new();
        let a = dir.write("a.token", "token-a\n");
        let b = dir.write("b.token", "token-b\n");
        let ok = load(
            &dir,
            &format!(
                "dir: /ca\nlisten: 0.0.0.0:15012\nmaxCertLifetimeSeconds: 3600\nnodes:\n\
                 - {{name: node-a, tokenFile: {}}}\n\
                 - {{name: node-b, tokenFile: {}, identities: [spiffe://cluster.local/ns/x/sa/y]}}\n",
                a.display(),
                b.display()
            ),
        )
        .expect("valid");
        assert!(!ok.callers.is_open());
        assert_eq!(
            ok.callers.lifetime(Some(Duration::from_secs(7200))),
            (Duration::from_secs(3600), true)
        );
        assert_eq!(
            ok.callers.lifetime(None),
            (Duration::from_secs(3600), false)
        );

        let open = load(&dir, "dir: /ca\nlisten: 127.0.0.1:15012\n").expect("loopback");
        assert!(open.callers.is_open());
        for (yaml, field, why) in [
            (
                "dir: /ca\nlisten: 0.0.0.0:15012\n",
                "nodes",
                "other hosts can reach",
            ),
            (
                &format!(
                    "dir: /ca\nlisten: 0.0.0.0:1\nnodes:\n- {{name: a, tokenFile: {0}}}\n- {{name: b, tokenFile: {0}}}\n",
                    a.display()
                ),
                "nodes[1].tokenFile",
                "own credential",
            ),
            (
                &format!(
                    "dir: /ca\nlisten: 0.0.0.0:1\nnodes:\n- {{name: a, tokenFile: {}}}\n- {{name: a, tokenFile: {}}}\n",
                    a.display(),
                    b.display()
                ),
                "nodes[1].name",
                "named twice",
            ),
            (
                "dir: /ca\nlisten: 0.0.0.0:1\nnodes:\n- {name: a, tokenFile: /nonexistent/token}\n",
                "nodes[0].tokenFile",
                "/nonexistent/token",
            ),
            (
                &format!(
                    "dir: /ca\nlisten: 0.0.0.0:1\nnodes:\n- {{name: a, tokenFile: {}, identities: [spiffe://other.td/ns/x/sa/y]}}\n",
                    a.display()
                ),
                "nodes[0].identities[0]",
                "not in trust domain",
            ),
            (
                "dir: /ca\nlisten: 127.0.0.1:1\nmaxCertLifetimeSeconds: 999999999\n",
                "maxCertLifetimeSeconds",
                "a year",
            ),
        ] {
            match load(&dir, yaml) {
                Err(Error::Invalid {
                    field: f, message, ..
                }) => {
                    assert_eq!(f, field, "{yaml}: {message}");
                    assert!(message.contains(why), "{yaml}: {message}");
                }
                other => panic!("{yaml}: expected an error on {field}, got {other:?}"),
            }
        }
    }
}
