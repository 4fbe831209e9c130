//! The human (table) form of each admin API answer. `-o json|yaml` bypasses this module and
//! prints what the agent sent, so everything left out here for width is still one flag away.

use ambit_agent::admin::api;

use crate::render::{
    self, Cell, Painter, Style, Table, bytes, duration, fields, short_identity, short_time,
};

fn or_dash(v: Option<&str>) -> String {
    v.unwrap_or("-").to_owned()
}

pub fn status(s: api::Status, p: Painter) -> String {
    let ready = if s.ready {
        p.paint("yes", Style::Good)
    } else {
        let mut text = p.paint("NO", Style::Bad);
        for reason in &s.not_ready {
            text.push_str(&format!("\n- {reason}"));
        }
        text
    };
    let xds = match &s.xds {
        None => "not configured (workloads and policies from the local config only)".to_owned(),
        Some(x) => {
            let connected = if x.connected {
                p.paint("connected", Style::Good)
            } else {
                p.paint("DISCONNECTED", Style::Bad)
            };
            let ready = if x.ready {
                "full state received"
            } else {
                "waiting for the first full state"
            };
            let last_push = match &x.last_push {
                Some(ts) => when(ts),
                None => "never".to_owned(),
            };
            let rejected: u64 = x.rejected.values().sum();
            let nacks = if rejected > 0 {
                format!(
                    "NACKs {} ({rejected} resources rejected: {})",
                    x.nacks,
                    x.rejected
                        .iter()
                        .map(|(t, n)| format!("{n} {t}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            } else {
                format!("NACKs {}", x.nacks)
            };
            let nacks = p.paint(
                &nacks,
                if x.nacks > 0 {
                    Style::Warn
                } else {
                    Style::Plain
                },
            );
            let mut text = format!(
                "{} {connected}, {ready}\npushes {}, {nacks}, streams {}; last push {last_push}\n\
                 holding {} addresses, {} policies",
                x.address, x.pushes, x.streams, x.addresses, x.policies
            );
            if let Some(e) = &x.last_error {
                let style = if x.connected { Style::Warn } else { Style::Bad };
                text.push_str(&format!("\nlast error: {}", p.paint(e, style)));
            }
            if !x.last_rejected.is_empty() {
                text.push_str("\nrejected (the rest of their push applied):");
                for r in &x.last_rejected {
                    text.push_str(&format!("\n- {r}"));
                }
            }
            text
        }
    };
    let ca = &s.ca;
    let certs = format!(
        "{}/{} certificates ready",
        ca.certificates_ready, ca.certificates_total
    );
    let mut ca_text = format!(
        "{} ({}); {}",
        ca.kind,
        ca.location,
        p.paint(
            &certs,
            ok_style(ca.certificates_ready == ca.certificates_total)
        )
    );
    if ca.certificates_ready < ca.certificates_total {
        ca_text.push_str("\n`ambitctl certificates` shows which and why");
    }
    let mut pods = format!("{} enrolled", s.enrolled_pods);
    if let Some(source) = &s.waiting_for {
        let waiting = format!("waiting for the {source} source to sync");
        pods.push_str(&format!(
            "; {}: nothing an earlier agent enrolled is released before",
            p.paint(&waiting, Style::Warn)
        ));
        if !s.adopted_pods.is_empty() {
            pods.push_str(&format!(
                "\n- served as the earlier agent left them: {}",
                s.adopted_pods.join(", ")
            ));
        }
        if !s.held_netns.is_empty() {
            pods.push_str(&format!(
                "\n- {} netns captured without a record (connections refused): cookies {}",
                s.held_netns.len(),
                s.held_netns
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    if !s.failed_pods.is_empty() {
        let failed = format!("{} FAILED", s.failed_pods.len());
        pods.push_str(&format!(", {}:", p.paint(&failed, Style::Bad)));
        for f in &s.failed_pods {
            pods.push_str(&format!("\n- {}: {}", f.pod, f.error));
        }
    }
    fields(&[
        (
            "Agent",
            format!("ambit-agent {} (pid {})", s.version, s.pid),
        ),
        ("Node", s.node),
        ("Uptime", duration(s.uptime_seconds)),
        ("Ready", ready),
        (
            "Config",
            match &s.config_refused {
                None => format!("{} (trust domain {})", s.config_file, s.trust_domain),
                Some(why) => format!(
                    "{} (trust domain {}), {}: {why}; the previous config stays in force",
                    s.config_file,
                    s.trust_domain,
                    p.paint("last change refused", Style::Bad)
                ),
            },
        ),
        ("xDS", xds),
        ("CA", ca_text),
        ("Pods", pods),
        (
            "Mesh",
            format!(
                "{} workloads, {} services, {} policies, {} open connections",
                s.workloads, s.services, s.policies, s.connections
            ),
        ),
    ])
}

fn ok_style(ok: bool) -> Style {
    if ok { Style::Good } else { Style::Bad }
}

/// `3m12s ago (2026-05-01T12:00:00Z)`, or the time alone if it does not parse.
fn when(ts: &str) -> String {
    match render::seconds_until(ts) {
        Some(secs) => format!("{} ({})", render::relative(secs), short_time(ts)),
        None => ts.to_owned(),
    }
}

pub fn workloads(mut list: Vec<api::WorkloadView>, p: Painter) -> String {
    list.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut t = Table::new(&[
        "NAMESPACE",
        "NAME",
        "CANONICAL",
        "IPS",
        "IDENTITY",
        "NODE",
        "HBONE",
        "LOCAL",
        "ENROLLED",
        "HEALTHY",
        "CLUSTER",
        "NETWORK",
        "LOCALITY",
        "SOURCE",
    ]);
    for w in list {
        let canonical = match (w.canonical_name.as_str(), w.canonical_revision.as_str()) {
            ("", _) => "-".to_owned(),
            (name, "") => name.to_owned(),
            (name, rev) => format!("{name}:{rev}"),
        };
        t.row(vec![
            w.namespace.into(),
            w.name.into(),
            canonical.into(),
            w.ips.join(",").into(),
            short_identity(&w.identity).into(),
            w.node.into(),
            Cell::yes_no(w.hbone, Style::Plain),
            Cell::yes_no(w.local, Style::Plain),
            if w.local {
                Cell::yes_no(w.enrolled, Style::Bad)
            } else {
                "-".into()
            },
            Cell::yes_no(w.healthy, Style::Bad),
            or_dash(Some(w.cluster.as_str()).filter(|s| !s.is_empty())).into(),
            or_dash(Some(w.network.as_str()).filter(|s| !s.is_empty())).into(),
            or_dash(Some(w.locality.as_str()).filter(|s| !s.is_empty())).into(),
            w.source.into(),
        ]);
    }
    t.render(p, "no workloads")
}

pub fn services(mut list: Vec<api::ServiceView>, p: Painter) -> String {
    list.sort_by(|a, b| a.key.cmp(&b.key));
    let mut t = Table::new(&["KEY", "VIPS", "PORTS", "ENDPOINTS", "SOURCE", "WAYPOINT"]);
    for s in list {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| match p.target_port {
                0 => p.port.to_string(),
                t if t == p.port => p.port.to_string(),
                t => format!("{}->{t}", p.port),
            })
            .collect();
        let healthy = s.endpoints.iter().filter(|e| e.healthy).count();
        let total = s.endpoints.len();
        let style = match () {
            // A VIP with no healthy endpoint refuses connections.
            _ if healthy == 0 => Style::Bad,
            _ if healthy < total => Style::Warn,
            _ => Style::Plain,
        };
        t.row(vec![
            s.key.into(),
            s.vips.join(",").into(),
            ports.join(",").into(),
            Cell::styled(format!("{healthy}/{total}"), style),
            s.source.into(),
            or_dash(s.waypoint.as_deref()).into(),
        ]);
    }
    t.render(p, "no services")
}

pub fn policies(mut list: Vec<api::PolicyView>, p: Painter) -> String {
    list.sort_by(|a, b| a.name.cmp(&b.name));
    let mut t = Table::new(&["NAME", "SCOPE", "ACTION", "DRYRUN", "RULES", "SOURCE"]);
    for pol in list {
        let action_style = if pol.action == "DENY" {
            Style::Warn
        } else {
            Style::Plain
        };
        t.row(vec![
            pol.name.into(),
            pol.scope.into(),
            Cell::styled(pol.action, action_style),
            if pol.dry_run {
                Cell::styled("yes", Style::Warn)
            } else {
                "no".into()
            },
            pol.rules.to_string().into(),
            pol.source.into(),
        ]);
    }
    t.render(p, "no policies")
}

pub fn certificates(mut list: Vec<api::CertView>, p: Painter) -> String {
    list.sort_by(|a, b| a.identity.cmp(&b.identity));
    let mut t = Table::new(&[
        "IDENTITY",
        "STATE",
        "SERIAL",
        "NOT-AFTER",
        "EXPIRES-IN",
        "NEXT-ROTATION",
        "LAST-ERROR",
    ]);
    for c in list {
        let state_style = match c.state.as_str() {
            "ready" => Style::Good,
            "failing" => Style::Bad,
            "pending" => Style::Warn,
            _ => Style::Plain,
        };
        let expires = match c.expires_in_seconds {
            None => "-".into(),
            Some(s) if s <= 0 => Cell::styled("EXPIRED", Style::Bad),
            Some(s) if s < 3600 => Cell::styled(duration(s.unsigned_abs()), Style::Warn),
            Some(s) => duration(s.unsigned_abs()).into(),
        };
        // In the past: the renewal is overdue (the CA keeps failing, or the agent is stuck).
        let next = match c.next_rotation.as_deref() {
            None => "-".into(),
            Some(ts) => match render::seconds_until(ts) {
                None => short_time(ts).into(),
                Some(s) if s < 0 => Cell::styled(render::relative(s), Style::Warn),
                Some(s) => render::relative(s).into(),
            },
        };
        let error_style = if c.state == "failing" {
            Style::Bad
        } else {
            Style::Plain
        };
        t.row(vec![
            c.identity.into(),
            Cell::styled(c.state, state_style),
            render::truncate(c.serial.as_deref().unwrap_or(""), 17).into(),
            c.not_after
                .as_deref()
                .map(short_time)
                .unwrap_or_default()
                .into(),
            expires,
            next,
            Cell::styled(
                render::truncate(c.last_error.as_deref().unwrap_or(""), 80),
                error_style,
            ),
        ]);
    }
    t.render(p, "no certificates (no local workload needs one)")
}

pub fn connections(mut list: Vec<api::ConnectionView>, p: Painter) -> String {
    list.sort_by_key(|c| c.id);
    let mut t = Table::new(&[
        "ID",
        "DIR",
        "PATH",
        "SRC",
        "SRC-IDENTITY",
        "DST",
        "DST-IDENTITY",
        "SERVICE",
        "SENT",
        "RECEIVED",
        "AGE",
    ]);
    let identity = |id: Option<&str>| id.map(short_identity).unwrap_or_default();
    for c in list {
        let dir = match c.direction.as_str() {
            "inbound" => "in".to_owned(),
            "outbound" => "out".to_owned(),
            _ => c.direction,
        };
        t.row(vec![
            c.id.to_string().into(),
            dir.into(),
            c.path.into(),
            c.src.into(),
            identity(c.src_identity.as_deref()).into(),
            c.dst.into(),
            identity(c.dst_identity.as_deref()).into(),
            or_dash(c.service.as_deref()).into(),
            bytes(c.bytes_sent).into(),
            bytes(c.bytes_received).into(),
            duration(c.age_seconds.max(0.0) as u64).into(),
        ]);
    }
    t.render(p, "no open connections")
}

pub fn bpf(b: api::BpfView, p: Painter) -> String {
    let mut head = vec![("Pin path", b.pin_path), ("Cgroup", b.cgroup)];
    if let Some(splice) = b.splice {
        head.push(("Same-node splice", splice));
    }
    let mut out = fields(&head);

    let mut programs = Table::new(&["PROGRAM", "KIND", "ATTACHED-TO"]);
    for prog in b.programs {
        let attached = match prog.attached_to.len() {
            0 => Cell::styled("NOT ATTACHED", Style::Bad),
            1 | 2 => prog.attached_to.join(", ").into(),
            n => format!("{}, … ({n} in all)", prog.attached_to[0]).into(),
        };
        programs.row(vec![prog.name.into(), prog.kind.into(), attached]);
    }
    out.push('\n');
    out.push_str(&programs.render(p, "no programs loaded"));

    let mut enrolled = Table::new(&["NETNS-COOKIE", "POD", "IPS"]);
    for e in b.enrolled {
        let pod = match e.pod {
            Some(pod) => pod.into(),
            None => Cell::styled("(no pod: stale)", Style::Warn),
        };
        enrolled.row(vec![
            e.netns_cookie.to_string().into(),
            pod,
            e.ips.join(",").into(),
        ]);
    }
    out.push('\n');
    out.push_str(&enrolled.render(p, "no enrolled network namespaces"));

    let mut maps = Table::new(&["MAP", "ENTRIES", "MAX", "FILL"]);
    for m in b.maps {
        let fill = match m.entries {
            None => "-".into(),
            Some(n) => {
                let pct = u64::from(n) * 100 / u64::from(m.max_entries.max(1));
                let style = match pct {
                    95.. => Style::Bad,
                    80.. => Style::Warn,
                    _ => Style::Plain,
                };
                Cell::styled(format!("{pct}%"), style)
            }
        };
        maps.row(vec![
            m.name.into(),
            or_dash(m.entries.map(|n| n.to_string()).as_deref()).into(),
            m.max_entries.to_string().into(),
            fill,
        ]);
    }
    out.push('\n');
    out.push_str(&maps.render(p, "no maps"));

    out.push('\n');
    out.push_str(&counters(
        b.counters.iter().map(|(k, v)| (k.as_str(), *v)),
        p,
    ));
    out
}

/// The `COUNTER VALUE` table (also used by `bpf --offline`).
pub fn counters<'a>(counters: impl Iterator<Item = (&'a str, u64)>, p: Painter) -> String {
    let mut t = Table::new(&["COUNTER", "VALUE"]);
    for (name, value) in counters {
        t.row(vec![name.into(), value.to_string().into()]);
    }
    t.render(p, "no counters")
}

pub fn explain(e: &api::Explain, p: Painter) -> String {
    let mut source = e.src.clone();
    if let Some(ip) = e.src_ip.as_deref().filter(|ip| *ip != e.src) {
        source.push_str(&format!(" ({ip})"));
    }
    let mut rows = vec![
        ("Source", source),
        ("Identity", or_dash(e.src_identity.as_deref())),
        ("Captured", if e.captured { "yes" } else { "no" }.to_owned()),
        ("Destination", e.dst.clone()),
    ];
    if let Some(service) = &e.service {
        let endpoint = or_dash(e.endpoint.as_deref());
        rows.push(("Service", format!("{service}, endpoint {endpoint}")));
    }
    if let Some(w) = &e.dst_workload {
        rows.push(("Workload", w.clone()));
    }
    if let Some(id) = &e.dst_identity {
        rows.push(("Dst identity", id.clone()));
    }
    rows.push(("Path", e.path.clone()));
    if let Some(a) = &e.authorization {
        // The reason says the decision and names the policy and rule that made it.
        let mut text = p.paint(&a.reason, ok_style(a.allowed));
        for d in &a.dry_run {
            text.push('\n');
            text.push_str(d);
        }
        rows.push(("Authorization", text));
    }
    let mut out = fields(&rows);

    out.push_str("\nSteps:\n");
    for (i, step) in e.steps.iter().enumerate() {
        out.push_str(&format!("  {}. {step}\n", i + 1));
    }

    let allowed = e.verdict == "allow";
    let why = match &e.authorization {
        Some(a) if !a.allowed => a.reason.clone(),
        _ if !allowed => e.steps.last().cloned().unwrap_or_default(),
        _ => format!("via {}", e.path),
    };
    let verdict = p.paint(&e.verdict.to_uppercase(), ok_style(allowed));
    out.push_str(&format!(
        "\nVerdict: {verdict}: {} -> {}: {why}\n",
        e.src, e.dst
    ));
    out
}
