//! The request as an endpoint gets it from the waypoint: HTTP/1.1 or HTTP/2 as the port
//! declares (or gRPC by its content type), the path as it was judged and routed, the Host it was
//! judged by, hop-by-hop headers gone, `x-request-id` and `x-forwarded-for` set. Pure functions
//! of the request, tested here; `server::route_request` calls them.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderValue, Uri, Version, header, request::Parts};

use super::path;
use crate::config::AppProtocol;

/// How the request goes to the endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protocol {
    /// HTTP/2 (else HTTP/1.1).
    pub h2: bool,
    /// gRPC: trailers end to end (`te: trailers`).
    pub trailers: bool,
}

/// The port's declared protocol decides HTTP/1.1 or HTTP/2 to the endpoints; without one, gRPC
/// (which needs HTTP/2 and trailers end to end) is recognised by its content type and everything
/// else goes as HTTP/1.1, which every HTTP server speaks.
pub fn protocol(declared: Option<AppProtocol>, parts: &Parts) -> Protocol {
    let looks_grpc = parts.version == Version::HTTP_2
        && parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("application/grpc"));
    Protocol {
        h2: declared.and_then(AppProtocol::http2).unwrap_or(looks_grpc),
        trailers: looks_grpc || declared == Some(AppProtocol::Grpc),
    }
}

/// Rewrites `parts` for the endpoint: `path` (normalized, as judged) with the original query,
/// the authority it was judged by as Host (or `:authority` for HTTP/2), no hop-by-hop headers,
/// `x-request-id: request_id`, `client` appended to `x-forwarded-for`. `dst` is the authority
/// when the request named none.
pub fn rewrite(
    parts: &mut Parts,
    protocol: Protocol,
    path: &str,
    request_id: &str,
    client: IpAddr,
    dst: SocketAddr,
) {
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| dst.to_string());
    let authority = path::without_trailing_dot(&authority);
    // The authority the request was judged and routed by is the Host the endpoint sees (a
    // differing Host header would otherwise pick another virtual host behind the policy's back),
    // without a trailing dot, as it was judged.
    if let Ok(v) = HeaderValue::from_str(&authority) {
        parts.headers.insert(header::HOST, v);
    }
    strip_hop_by_hop(&mut parts.headers);
    if protocol.h2 {
        if protocol.trailers {
            // The one TE value HTTP/2 allows, and gRPC requires.
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        parts.headers.remove(header::HOST);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        parts.headers.insert("x-request-id", v);
    }
    let client = client.to_string();
    let forwarded_for = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(earlier) => format!("{earlier}, {client}"),
        None => client,
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        parts.headers.insert("x-forwarded-for", v);
    }
    let mut target = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    if protocol.h2 {
        // HTTP/2 carries the authority in the URI (`:authority`), not in Host.
        target = format!("http://{authority}{target}");
    }
    parts.uri = target
        .parse::<Uri>()
        .unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = if protocol.h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
}

/// Hop-by-hop headers (RFC 9110 7.6.1), never forwarded (an `Upgrade: h2c` the waypoint did not
/// take, e.g. with a body, is answered over HTTP/1.1, as RFC 7540 section 3.2 allows).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes the headers that belong to one hop (RFC 9110 7.6.1), and those `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for h in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        headers.remove(h);
    }
    headers.remove("http2-settings");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: http::request::Builder) -> Parts {
        req.body(()).expect("request").into_parts().0
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, 2));
    const DST: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 1)), 80);

    #[test]
    fn http1_gets_the_judged_path_and_host_and_loses_hop_by_hop_headers() {
        let mut p = parts(
            http::Request::get("/a/../admin?x=1")
                .header("host", "echo.default.svc.cluster.local.")
                .header("connection", "keep-alive, x-secret")
                .header("x-secret", "hop")
                .header("keep-alive", "timeout=5")
                .header("x-forwarded-for", "192.0.2.1"),
        );
        let proto = protocol(None, &p);
        assert_eq!(
            proto,
            Protocol {
                h2: false,
                trailers: false
            }
        );
        rewrite(&mut p, proto, "/admin", "req-1", CLIENT, DST);
        assert_eq!(p.uri, "/admin?x=1");
        assert_eq!(p.version, Version::HTTP_11);
        assert_eq!(p.headers["host"], "echo.default.svc.cluster.local");
        for h in ["connection", "x-secret", "keep-alive"] {
            assert!(
                !p.headers.contains_key(h),
                "{h} must not reach the endpoint"
            );
        }
        assert_eq!(p.headers["x-request-id"], "req-1");
        assert_eq!(p.headers["x-forwarded-for"], "192.0.2.1, 10.1.0.2");
    }

    #[test]
    fn grpc_goes_as_http2_with_trailers_and_the_authority_in_the_uri() {
        let mut p = parts(
            http::Request::post("http://echo:50051/pkg.Svc/Call")
                .version(Version::HTTP_2)
                .header("content-type", "application/grpc+proto"),
        );
        let proto = protocol(None, &p);
        assert_eq!(
            proto,
            Protocol {
                h2: true,
                trailers: true
            }
        );
        rewrite(&mut p, proto, "/pkg.Svc/Call", "r", CLIENT, DST);
        assert_eq!(p.uri, "http://echo:50051/pkg.Svc/Call");
        assert_eq!(p.headers["te"], "trailers");
        assert!(!p.headers.contains_key("host"));
    }

    #[test]
    fn a_declared_port_protocol_wins_over_content_type() {
        let grpc_looking = parts(
            http::Request::post("/x")
                .version(Version::HTTP_2)
                .header("content-type", "application/grpc"),
        );
        assert!(!protocol(Some(AppProtocol::Http), &grpc_looking).h2);
        let plain = parts(http::Request::get("/x"));
        assert_eq!(
            protocol(Some(AppProtocol::Http2), &plain),
            Protocol {
                h2: true,
                trailers: false
            }
        );
        // No authority and no Host: the destination it was sent to.
        let mut p = plain;
        p.headers.remove("host");
        rewrite(
            &mut p,
            Protocol {
                h2: false,
                trailers: false,
            },
            "/x",
            "r",
            CLIENT,
            DST,
        );
        assert_eq!(p.headers["host"], "10.96.0.1:80");
    }
}
