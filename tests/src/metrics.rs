//! Reading an agent's Prometheus endpoint from the test bed: a plain HTTP GET from inside a
//! node's netns, and a strict parser of the text exposition (a malformed line fails the test).

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use crate::Node;

const WAIT: Duration = Duration::from_secs(15);

/// The agent's metrics on `node` (`127.0.0.1:15020/metrics` in the node's netns), parsed.
///
/// # Panics
/// If the endpoint does not answer 200 with Prometheus text, or a line is malformed.
pub fn of_node(node: &Node) -> HashMap<String, f64> {
    let raw = http_get_in(
        &node.netns_path(),
        SocketAddr::from(([127, 0, 0, 1], 15020)),
        "/metrics",
    );
    let (head, body) = raw.split_once("\r\n\r\n").expect("http answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    parse_exposition(body)
}

/// `GET path` on `addr` from inside the network namespace at `netns` (a thread of our own
/// joins it, so the test's other threads stay where they are).
pub fn http_get_in(netns: &Path, addr: SocketAddr, path: &str) -> String {
    let netns = netns.to_owned();
    let path = path.to_owned();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&netns).expect("open netns");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let mut s = TcpStream::connect_timeout(&addr, WAIT).expect("connect to metrics");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    })
    .join()
    .expect("metrics thread")
}

/// Parses the OpenMetrics text exposition strictly enough to catch a malformed line: every
/// sample's family was declared with `# TYPE` before it (a counter `x` is sampled as `x_total`,
/// a histogram as `x_bucket`, `x_sum`, `x_count`), label values are quoted and escaped, values
/// are numbers, and the text ends with `# EOF`. Returns `name{labels}` -> value.
pub fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let mut typed: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    let body = text
        .strip_suffix("# EOF\n")
        .unwrap_or_else(|| panic!("the exposition does not end with # EOF:\n{text}"));
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                typed.insert(name.to_owned(), kind.to_owned()).is_none(),
                "twice: {line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value: {line}"));
        let name = series.split('{').next().expect("name");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        let family = [
            ("counter", "_total"),
            ("histogram", "_bucket"),
            ("histogram", "_sum"),
            ("histogram", "_count"),
        ]
        .iter()
        .find_map(|(kind, suffix)| {
            let family = name.strip_suffix(suffix)?;
            (typed.get(family).map(String::as_str) == Some(*kind)).then_some(family)
        })
        .unwrap_or(name);
        assert!(
            typed
                .get(family)
                .is_some_and(|kind| family != name || kind == "gauge" || kind == "untyped"),
            "sample before its TYPE (or without its type's suffix): {line}"
        );
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("labels: {line}"));
            // key="value" pairs with \" \\ \n escapes.
            let mut chars = inner.chars().peekable();
            while chars.peek().is_some() {
                let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                assert!(
                    !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                assert_eq!(chars.next(), Some('"'), "{line}");
                loop {
                    match chars.next() {
                        Some('\\') => {
                            assert!(matches!(chars.next(), Some('"' | '\\' | 'n')), "{line}")
                        }
                        Some('"') => break,
                        Some(_) => {}
                        None => panic!("unterminated label value: {line}"),
                    }
                }
                match chars.next() {
                    Some(',') | None => {}
                    Some(c) => panic!("unexpected {c:?}: {line}"),
                }
            }
        }
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "duplicate: {line}"
        );
    }
    samples
}

/// The sum of the samples of `name` whose labels include all of `labels`.
pub fn sum(samples: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            series.split('{').next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v)
        .sum()
}
