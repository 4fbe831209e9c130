//! The scale part: one agent, a test xDS server (istiod's Delta ADS wire protocol) pushing N
//! synthetic remote workloads in one push; the time from the push to the agent's ACK (as the
//! control plane sees it: encoding, transfer, decoding, applying) and the agent's resident memory
//! before and after. A fresh agent and server for every run, so each run starts from nothing.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use ambit_proto::{
    envoy::service::discovery::v3::Resource,
    istio::workload::{Address, TunnelProtocol, Workload, address},
    prost_types::Any,
};
use ambit_testbed::{
    TestBed,
    xds_server::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, XdsServer},
};
use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use serde_json::json;

use crate::{header, os, procfs, step, traffic::MIB};

const XDS_PORT: u16 = 15010;
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(30);
const APPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// One run of one step.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleRun {
    /// Push to ACK, milliseconds.
    pub push_apply_ms: f64,
    /// VmRSS with no workload (median of samples), bytes.
    pub rss_before: f64,
    /// VmRSS once the push is applied (median of samples), bytes.
    pub rss_after: f64,
    /// VmHWM after the push, bytes.
    pub peak_rss: f64,
    /// (rss_after - rss_before) / workloads.
    pub bytes_per_workload: f64,
}

/// All runs of one step.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleStep {
    pub workloads: usize,
    pub runs: Vec<ScaleRun>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// A synthetic remote workload `i`: its own IPv4 in 10.128.0.0/9 (never a traffic target:
/// nothing is sent to these), one of 1000 service accounts, one of 100 nodes, HBONE.
fn workload(i: usize) -> Result<Resource> {
    let ip = Ipv4Addr::from(0x0a80_0000u32 + u32::try_from(i)?);
    let w = Workload {
        uid: format!("Kubernetes//Pod/bench/w-{i}"),
        name: format!("w-{i}"),
        namespace: "bench".into(),
        addresses: vec![ip.octets().to_vec()],
        tunnel_protocol: TunnelProtocol::Hbone.into(),
        service_account: format!("sa-{}", i % 1000),
        node: format!("node-{}", i % 100),
        ..Default::default()
    };
    Ok(Resource {
        name: w.uid.clone(),
        version: "1".into(),
        resource: Some(
            Any::from_msg(&Address {
                r#type: Some(address::Type::Workload(w)),
            })
            .context("cannot encode a workload")?,
        ),
        ..Default::default()
    })
}

pub fn run(bed: &TestBed, steps: &[usize], runs: usize) -> Result<Vec<ScaleStep>> {
    if steps.is_empty() {
        return Ok(Vec::new());
    }
    header("bench: scale, one agent fed synthetic workloads by a test xDS server");
    let node = bed.add_node("node-scale")?;
    let mut out = Vec::new();
    let mut port = XDS_PORT;
    for &n in steps {
        let resources: Vec<Resource> = (0..n).map(workload).collect::<Result<_>>()?;
        let mut step_result = ScaleStep {
            workloads: n,
            runs: Vec::new(),
            errors: Vec::new(),
        };
        for round in 0..runs {
            os::check_stop()?;
            port += 1;
            match one_run(bed, &node, port, &resources) {
                Ok(r) => {
                    step(&format!(
                        "{n:>7} workloads, run {}/{runs}: push->ACK {:.1} ms, RSS {:.1} -> {:.1} MiB \
                         ({:.0} B/workload)",
                        round + 1,
                        r.push_apply_ms,
                        r.rss_before / MIB,
                        r.rss_after / MIB,
                        r.bytes_per_workload
                    ));
                    step_result.runs.push(r);
                }
                Err(e) => {
                    os::check_stop()?;
                    step(&format!(
                        "{n:>7} workloads, run {}: FAILED: {e:#}",
                        round + 1
                    ));
                    step_result.errors.push(format!("{e:#}"));
                }
            }
        }
        out.push(step_result);
    }
    Ok(out)
}

fn one_run(
    bed: &TestBed,
    node: &ambit_testbed::Node,
    port: u16,
    resources: &[Resource],
) -> Result<ScaleRun> {
    let addr = SocketAddr::new(node.underlay_v4().into(), port);
    let xds = XdsServer::start_in_netns(&node.netns_path(), addr)?;
    let root = bed.tmp_dir().join(format!("xds-root-{port}.pem"));
    std::fs::write(&root, xds.cert_pem())
        .with_context(|| format!("cannot write {}", root.display()))?;
    let mut config = bed.agent_config(node);
    config.node_addresses = vec![node.underlay_v4().into()];
    config.extra.insert(
        "xds".into(),
        json!({"address": format!("https://{addr}"), "rootCert": root}),
    );
    let agent = bed.start_agent_with_log_filter(&config, "info")?;
    // Subscribed to both types and ACKed their (empty) first state.
    let acked = ambit_testbed::poll(SUBSCRIBE_TIMEOUT, || {
        let requests = xds.requests();
        let acked = |t: &str| {
            requests
                .iter()
                .any(|r| r.type_url == t && !r.response_nonce.is_empty())
        };
        (acked(ADDRESS_TYPE_URL) && acked(AUTHORIZATION_TYPE_URL)).then_some(())
    });
    if acked.is_none() {
        bail!(
            "the agent did not subscribe to and ACK the test xDS server within \
             {SUBSCRIBE_TIMEOUT:?}; see {}",
            agent.log_path().display()
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = procfs::rss_samples(agent.pid(), 5, Duration::from_millis(100))?;
    let n = resources.len();
    let nonce = xds.push(ADDRESS_TYPE_URL, resources.to_vec(), Vec::new());
    let pushed = Instant::now();
    let (reply, acked_at) = xds.wait_reply_timed(&nonce, APPLY_TIMEOUT)?;
    if let Some(detail) = reply.error_detail {
        return Err(anyhow!(
            "the agent refused the push of {n} workloads (NACK): {}",
            detail.message
        ));
    }
    let push_apply = acked_at.saturating_duration_since(pushed);
    std::thread::sleep(Duration::from_millis(500));
    let after = procfs::rss_samples(agent.pid(), 5, Duration::from_millis(100))?;
    let (_, peak) = procfs::rss(agent.pid())?;
    let rss_before = crate::report::median(&before).unwrap_or(0.0);
    let rss_after = crate::report::median(&after).unwrap_or(0.0);
    let _ = agent.stop();
    Ok(ScaleRun {
        push_apply_ms: push_apply.as_secs_f64() * 1000.0,
        rss_before,
        rss_after,
        peak_rss: peak as f64,
        bytes_per_workload: (rss_after - rss_before) / n as f64,
    })
}
