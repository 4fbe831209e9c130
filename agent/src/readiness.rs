//! The readiness endpoint (`GET /healthz/ready`, port 15021 by default), for the kubelet's probe
//! and for operators: ready only when the capture programs are attached, the first config has been
//! applied, the control plane's first full state has arrived (when xDS is configured), and every
//! local workload identity has a certificate. A `503` body lists what is missing.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    http::{Request, Response},
    identity::manager::CertManager,
    xds::XdsClient,
};

/// What readiness depends on.
pub struct Readiness {
    /// Programs attached and the first config applied.
    pub started: AtomicBool,
    pub certs: Arc<CertManager>,
    /// Set once the xDS client exists (when xDS is configured).
    pub xds: std::sync::OnceLock<Arc<XdsClient>>,
    /// Kubernetes mode: the watches' state (ready once both lists have arrived).
    pub kube: std::sync::OnceLock<tokio::sync::watch::Receiver<Arc<crate::kube::KubeState>>>,
    /// The pods' side, published by the pod manager (what stays captured while a source is
    /// away).
    pub pods: Arc<arc_swap::ArcSwap<crate::pods::PodsState>>,
}

impl Readiness {
    /// `Ok` when ready, else what is missing.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut missing = Vec::new();
        if !self.started.load(Ordering::Acquire) {
            missing.push("eBPF capture not attached or first config not applied yet".to_owned());
        }
        if self.kube.get().is_some_and(|k| !k.borrow().synced) {
            let pods = self.pods.load();
            let adopted = pods.enrolled.iter().filter(|p| p.adopted).count();
            let held = pods.held_netns.len();
            let mut why = "no namespaces and pods from the Kubernetes API yet (is the API server \
                           reachable?)"
                .to_owned();
            if adopted + held > 0 {
                why.push_str(&format!(
                    "; the {} pods an earlier agent enrolled stay captured until it answers \
                     ({adopted} served as they were, {held} without a record refuse connections)",
                    adopted + held
                ));
            }
            missing.push(why);
        }
        if self.xds.get().is_some_and(|x| !x.is_ready()) {
            missing.push("no full state from the xDS control plane yet".to_owned());
        }
        if !self.certs.all_ready() {
            missing.push(
                "certificates missing for some local workload identities (is the CA reachable?)"
                    .to_owned(),
            );
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing)
        }
    }
}

/// Serves readiness on `addr` until `shutdown`.
pub async fn serve(addr: SocketAddr, readiness: Arc<Readiness>, shutdown: CancellationToken) {
    let listener = match crate::http::bind_shared(addr) {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "cannot serve readiness (is another agent using the port?)");
            return;
        }
    };
    let accept = || async { listener.accept().await.map(|(s, _)| s) };
    let handle = move |r: Request| {
        let response = answer(&r, &readiness);
        async move { response }
    };
    crate::http::serve(accept, handle, crate::http::TIMEOUT, shutdown).await
}

fn answer(request: &Request, readiness: &Readiness) -> Response {
    if request.path != "/healthz/ready" {
        return Response::text(404, "try /healthz/ready\n");
    }
    match readiness.check() {
        Ok(()) => Response::text(200, "ready\n"),
        Err(missing) => Response::text(503, format!("not ready:\n- {}\n", missing.join("\n- "))),
    }
}
