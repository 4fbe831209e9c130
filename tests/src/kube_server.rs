//! A small stand-in for the Kubernetes API server, for tests of the agent's and the waypoint's
//! Kubernetes mode: it serves the real list and watch JSON of the collections in [`KINDS`]
//! (watch events as a chunked stream, replayed from the requested resource version) and applies
//! JSON merge patches to pods and to the `status` of HTTPRoutes, GRPCRoutes and Gateways. It listens on
//! loopback inside a network namespace of the bed (where the agent runs), over plain HTTP,
//! which the agent allows only to loopback.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};

/// The collections served: (kind's plural, the path it is listed and watched at).
pub const KINDS: [(&str, &str); 8] = [
    ("namespaces", "/api/v1/namespaces"),
    ("pods", "/api/v1/pods"),
    ("services", "/api/v1/services"),
    (
        "httproutes",
        "/apis/gateway.networking.k8s.io/v1/httproutes",
    ),
    ("gateways", "/apis/gateway.networking.k8s.io/v1/gateways"),
    (
        "grpcroutes",
        "/apis/gateway.networking.k8s.io/v1/grpcroutes",
    ),
    (
        "destinationrules",
        "/apis/networking.istio.io/v1/destinationrules",
    ),
    (
        "authorizationpolicies",
        "/apis/security.istio.io/v1/authorizationpolicies",
    ),
];

#[derive(Default)]
struct State {
    version: u64,
    /// Kind's plural -> `namespace/name` (or `name`) -> object.
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// `(resource version, kind's plural, event)`, for watches to replay.
    events: Vec<(u64, &'static str, Value)>,
    /// Every request line and its Authorization header, in order.
    requests: Vec<(String, Option<String>)>,
    /// `(object key, patch)` of every PATCH.
    patches: Vec<(String, Value)>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    /// An outage: connections are closed unanswered and open watches end.
    down: AtomicBool,
}

/// The fake API server. Stops (and closes its watches) when dropped.
pub struct KubeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl KubeApi {
    /// Starts listening on 127.0.0.1 inside the netns at `netns`.
    pub fn start_in(netns: &Path) -> Result<KubeApi> {
        let netns = netns.to_owned();
        let listener = std::thread::spawn(move || -> Result<TcpListener> {
            let f = std::fs::File::open(&netns)
                .with_context(|| format!("open netns {}", netns.display()))?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(TcpListener::bind("127.0.0.1:0")?)
        })
        .join()
        .map_err(|_| anyhow!("the listener thread panicked"))??;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            down: AtomicBool::new(false),
        });
        let s = shared.clone();
        listener.set_nonblocking(true)?;
        std::thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) if s.down.load(Ordering::SeqCst) => drop(stream),
                    Ok((stream, _)) => {
                        let s = s.clone();
                        std::thread::spawn(move || {
                            let _ = serve(&s, stream);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(KubeApi { addr, shared })
    }

    /// Simulates an outage (`true`) or its end: while down, every connection is closed without
    /// an answer and open watches are cut, as when the API server is unreachable.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        self.shared.changed.notify_all();
    }

    /// What the agent's `kubernetes.apiServer` should be.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Puts `config` in Kubernetes mode against this server: a token file in the bed's
    /// directory, and (for a node agent) pod netns found under the bed's own prefix (other beds
    /// running in parallel use the same pod IPs in their own netns).
    pub fn configure(&self, bed: &crate::TestBed, config: &mut crate::AgentConfig) {
        let token = bed.tmp_dir().join("kube-token");
        std::fs::write(&token, "test-token\n")
            .unwrap_or_else(|e| panic!("write {}: {e}", token.display()));
        let mut section = json!({"apiServer": self.url(), "tokenPath": token});
        // A waypoint finds no pods.
        if !config.extra.contains_key("waypoint") {
            section["netnsPathPrefix"] = json!(format!("/run/netns/ab-{}-", bed.id()));
        }
        config.extra.insert("kubernetes".into(), section);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.lock()
    }

    fn change(
        &self,
        kind: &'static str,
        event: &str,
        object: Value,
        store: impl FnOnce(&mut State, Value),
    ) {
        self.shared.change(kind, event, object, store)
    }

    /// Creates or replaces namespace `name` with `labels`.
    pub fn set_namespace(&self, name: &str, labels: Value) {
        let object = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "uid": format!("ns-{name}"), "labels": labels}});
        self.set_object("namespaces", name, object);
    }

    /// Creates or replaces the object of `kind` (a plural of [`KINDS`]) at `key`
    /// (`namespace/name`, or `name`); its `metadata.generation` counts its versions.
    pub fn set_object(&self, kind: &str, key: &str, mut object: Value) {
        let kind = kind_of(kind);
        let previous = self.object(kind, key);
        let generation = previous
            .as_ref()
            .and_then(|p| p["metadata"]["generation"].as_u64())
            .unwrap_or(0)
            + 1;
        object["metadata"]["generation"] = json!(generation);
        let key = key.to_owned();
        self.change(
            kind,
            if previous.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            },
            object,
            |st, o| {
                st.objects.entry(kind).or_default().insert(key, o);
            },
        );
    }

    /// Deletes the object of `kind` at `key`, if there is one.
    pub fn delete_object(&self, kind: &str, key: &str) {
        let kind = kind_of(kind);
        let Some(object) = self.object(kind, key) else {
            return;
        };
        let key = key.to_owned();
        self.change(kind, "DELETED", object, |st, _| {
            st.objects.entry(kind).or_default().remove(&key);
        });
    }

    /// The object of `kind` at `key`, as the server holds it now.
    pub fn object(&self, kind: &str, key: &str) -> Option<Value> {
        self.lock().objects.get(kind)?.get(key).cloned()
    }

    /// Creates or replaces a running pod on `node`.
    pub fn set_pod(&self, node: &str, pod: &crate::Pod, labels: Value) {
        let key = format!("{}/{}", pod.namespace(), pod.name());
        let annotations = self
            .object("pods", &key)
            .map(|p| p["metadata"]["annotations"].clone())
            .unwrap_or_else(|| json!({}));
        let object = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name(), "namespace": pod.namespace(),
                         "uid": format!("uid-{}", pod.name()), "labels": labels,
                         "annotations": annotations},
            "spec": {"nodeName": node, "serviceAccountName": pod.service_account()},
            "status": {"phase": "Running", "podIP": pod.ipv4().to_string(),
                       "podIPs": [{"ip": pod.ipv4().to_string()}, {"ip": pod.ipv6().to_string()}]}});
        self.set_pod_object(&key, object);
    }

    /// Creates or replaces the pod object at `namespace/name` with `object` as given (for
    /// objects the agent must cope with, not only ones [`KubeApi::set_pod`] makes).
    pub fn set_pod_object(&self, key: &str, object: Value) {
        self.set_object("pods", key, object);
    }

    /// The patches received, by object key.
    pub fn patches(&self) -> Vec<(String, Value)> {
        self.lock().patches.clone()
    }

    /// The pod's annotation `name`, as the server holds it now.
    pub fn annotation(&self, key: &str, name: &str) -> Option<String> {
        self.object("pods", key)?["metadata"]["annotations"][name]
            .as_str()
            .map(str::to_owned)
    }

    /// Request lines received, with their Authorization header.
    pub fn requests(&self) -> Vec<(String, Option<String>)> {
        self.lock().requests.clone()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn change(
        &self,
        kind: &'static str,
        event: &str,
        mut object: Value,
        store: impl FnOnce(&mut State, Value),
    ) {
        let mut st = self.lock();
        st.version += 1;
        let v = st.version;
        object["metadata"]["resourceVersion"] = json!(v.to_string());
        st.events
            .push((v, kind, json!({"type": event, "object": object.clone()})));
        store(&mut st, object);
        drop(st);
        self.changed.notify_all();
    }

    /// Merges `patch` into the object of `kind` at `key`; a `status` patch changes only the
    /// status (and, like the real server, not the generation).
    fn patch(&self, kind: &'static str, key: &str, patch: Value, status: bool) -> Option<Value> {
        let mut object = self.lock().objects.get(kind)?.get(key)?.clone();
        let patch = if status {
            json!({"status": patch.get("status").cloned().unwrap_or(Value::Null)})
        } else {
            patch
        };
        merge(&mut object, &patch);
        self.lock().patches.push((key.to_owned(), patch));
        let k = key.to_owned();
        self.change(kind, "MODIFIED", object.clone(), |st, o| {
            st.objects.entry(kind).or_default().insert(k, o);
        });
        Some(object)
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
    }
}

/// A `v1.Service` of namespace `default` with `labels`, port 80 to `target_port`.
pub fn service(name: &str, labels: Value, target_port: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "default", "uid": format!("svc-{name}"),
                        "labels": labels},
           "spec": {"ports": [{"port": 80, "targetPort": target_port}]}})
}

/// An HTTPRoute of namespace `default` for Service `parent` sending every request to
/// `backends` (`(service, weight)`, port 80), as `kubectl apply` would leave it (the API
/// server's defaults filled in); `rule` adds fields to its one rule.
pub fn http_route(name: &str, parent: &str, backends: &[(&str, u32)], rule: Value) -> Value {
    let refs: Vec<Value> = backends
        .iter()
        .map(|(b, w)| json!({"group": "", "kind": "Service", "name": b, "port": 80, "weight": w}))
        .collect();
    let mut r = json!({"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                       "backendRefs": refs});
    if let (Some(r), Some(extra)) = (r.as_object_mut(), rule.as_object()) {
        r.extend(extra.clone());
    }
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
           "metadata": {"name": name, "namespace": "default", "uid": format!("route-{name}")},
           "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent}],
                    "rules": [r]}})
}

/// Waypoint `name`'s Gateway in namespace `default`: class `ambit-waypoint`, the HBONE
/// listener on 15008.
pub fn waypoint_gateway(name: &str) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"gatewayClassName": "ambit-waypoint",
                    "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
}

/// The `'static` name of a kind in [`KINDS`].
fn kind_of(kind: &str) -> &'static str {
    KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(k, _)| *k)
        .unwrap_or_else(|| panic!("the fake API server serves no {kind:?}; add it to KINDS"))
}

/// RFC 7386 merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn serve(shared: &Arc<Shared>, stream: TcpStream) -> std::io::Result<()> {
    let api = shared;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let request = line.trim_end().to_owned();
    let mut auth = None;
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                auth = Some(v.trim().to_owned());
            } else if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    api.lock().requests.push((request.clone(), auth));
    let mut parts = request.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
    };
    let mut out = stream;
    let listed = KINDS.iter().find(|(_, p)| *p == path).map(|(k, _)| *k);
    let kind: &'static str = match listed {
        Some(kind) if method == "GET" => kind,
        _ if method == "PATCH" => {
            let patch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let rest: Vec<&str> = path.split('/').collect();
            let answer = match rest.as_slice() {
                ["", "api", "v1", "namespaces", ns, "pods", name] => {
                    api.patch("pods", &format!("{ns}/{name}"), patch, false)
                }
                [
                    "",
                    "apis",
                    "gateway.networking.k8s.io",
                    "v1",
                    "namespaces",
                    ns,
                    kind @ ("httproutes" | "grpcroutes" | "gateways"),
                    name,
                    "status",
                ] => api.patch(kind_of(kind), &format!("{ns}/{name}"), patch, true),
                _ => None,
            };
            return match answer {
                Some(o) => respond(&mut out, 200, &o),
                None => respond(
                    &mut out,
                    404,
                    &json!({"kind": "Status", "message": "not found", "code": 404}),
                ),
            };
        }
        _ => {
            return respond(
                &mut out,
                404,
                &json!({"kind": "Status", "message": "not found", "code": 404}),
            );
        }
    };
    if param("watch").as_deref() != Some("true") {
        let st = api.lock();
        let items: Vec<Value> = st
            .objects
            .get(kind)
            .into_iter()
            .flat_map(|o| o.values().cloned())
            .collect();
        let list = json!({"apiVersion": "v1", "kind": "List",
            "metadata": {"resourceVersion": st.version.to_string()}, "items": items});
        drop(st);
        return respond(&mut out, 200, &list);
    }
    let mut from: u64 = param("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    out.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    loop {
        let pending: Vec<(u64, Value)> = {
            let mut st = api.lock();
            loop {
                if shared.stop.load(Ordering::SeqCst) || shared.down.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let p: Vec<(u64, Value)> = st
                    .events
                    .iter()
                    .filter(|(v, k, _)| *v > from && *k == kind)
                    .map(|(v, _, e)| (*v, e.clone()))
                    .collect();
                if !p.is_empty() {
                    break p;
                }
                st = shared
                    .changed
                    .wait_timeout(st, Duration::from_millis(200))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        };
        for (v, event) in pending {
            let text = format!("{event}\n");
            out.write_all(format!("{:x}\r\n{text}\r\n", text.len()).as_bytes())?;
            from = v;
        }
        out.flush()?;
    }
}

fn respond(out: &mut TcpStream, status: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    write!(
        out,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )
}
