//! What the waypoint judges a request by, normalized so it is what the endpoint will serve: the
//! path (RFC 3986 dot segments, repeated slashes, escapes, path parameters) and the host (no
//! trailing dot). Policies and routes see these, and the request is forwarded with them.

/// The path as an endpoint will resolve it (RFC 3986 dot segments removed, repeated slashes
/// merged, unreserved characters decoded, other escapes in upper case), so policies and routes
/// judge what the endpoint will serve. Escaped slashes and backslashes, and backslashes, are
/// refused: endpoints disagree on what they mean.
///
/// Path parameters (`;` in a segment, RFC 3986 3.3) are removed from every segment before the dot
/// segments are resolved, and the path is forwarded as judged: servlet containers and other
/// lenient servers drop them (`/admin;x` serves `/admin`, `/a/..;/b` serves `/b`) while strict
/// ones do not, so judging one reading and forwarding the other would let an exact-path DENY be
/// bypassed. An escaped `%3B` is data, not a parameter, and stays.
pub fn normalize(raw: &str) -> Result<String, &'static str> {
    if raw == "*" {
        return Ok(raw.to_owned());
    }
    if !raw.starts_with('/') {
        return Err("it does not start with /");
    }
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or("a truncated %-escape")?;
                // Two hex digits exactly (`from_str_radix` alone would take `%+e`).
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return Err("a bad %-escape");
                }
                let hex = std::str::from_utf8(hex).map_err(|_| "a bad %-escape")?;
                let v = u8::from_str_radix(hex, 16).map_err(|_| "a bad %-escape")?;
                if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                    decoded.push(char::from(v));
                } else if v == b'/' || v == b'\\' {
                    return Err("an escaped slash or backslash (%2F, %5C)");
                } else {
                    decoded.push('%');
                    decoded.push_str(&hex.to_ascii_uppercase());
                }
                i += 3;
            }
            b'\\' => return Err("a backslash"),
            // Bytes outside printable ASCII (UTF-8, controls) are escaped as a client would
            // have sent them, so the result is ASCII and normalizing it again changes nothing.
            b if !b.is_ascii_graphic() => {
                decoded.push_str(&format!("%{b:02X}"));
                i += 1;
            }
            b => {
                decoded.push(char::from(b));
                i += 1;
            }
        }
    }
    let mut segments: Vec<&str> = Vec::new();
    let mut ends_in_dir = false;
    for seg in decoded.split('/') {
        let seg = seg.split(';').next().unwrap_or_default();
        ends_in_dir = matches!(seg, "" | "." | "..");
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for s in &segments {
        path.push('/');
        path.push_str(s);
    }
    if path.is_empty() || ends_in_dir {
        path.push('/');
    }
    Ok(path)
}

/// `host[:port]` with a trailing dot removed from the host (`example.com.:80` is
/// `example.com:80`); IP literals and bracketed IPv6 are left as they are.
pub fn without_trailing_dot(authority: &str) -> String {
    let (host, port) = match authority.rsplit_once(':') {
        // A port after a name or a bracketed IPv6 literal (a bare IPv6 literal has colons too).
        Some((h, p))
            if p.bytes().all(|b| b.is_ascii_digit()) && (h.ends_with(']') || !h.contains(':')) =>
        {
            (h, Some(p))
        }
        _ => (authority, None),
    };
    let host = match host.strip_suffix('.') {
        Some(h) if !h.is_empty() && !h.starts_with('[') => h,
        _ => host,
    };
    match port {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::{normalize, without_trailing_dot};

    #[test]
    fn paths_are_judged_as_endpoints_resolve_them() {
        for (raw, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/public/../admin/users", "/admin/users"),
            ("/%61dmin/users", "/admin/users"),
            ("//admin///users", "/admin/users"),
            ("/./admin/.", "/admin/"),
            ("/../../admin", "/admin"),
            ("/a/..", "/"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            // Path parameters are dropped before dot segments, as lenient servers do.
            ("/admin;jsessionid=1", "/admin"),
            ("/admin;x/users", "/admin/users"),
            ("/public/..;/admin", "/admin"),
            ("/public/.;x/admin", "/public/admin"),
            ("/a;/", "/a/"),
            ("/a%3Bb", "/a%3Bb"),
            // Raw UTF-8 and controls are escaped, as a client would have sent them.
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/a b", "/a%20b"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
        }
        for (raw, want) in [
            ("example.com.", "example.com"),
            ("example.com.:8080", "example.com:8080"),
            ("example.com:8080", "example.com:8080"),
            ("10.0.0.1:80", "10.0.0.1:80"),
            ("[fd00::1]:80", "[fd00::1]:80"),
            (".", "."),
        ] {
            assert_eq!(without_trailing_dot(raw), want, "{raw}");
        }
        for bad in [
            "/admin%2Fusers",
            "/a%5cb",
            "/a\\b",
            "/a%2",
            "/a%zz",
            "/a%+e",
            "admin",
        ] {
            assert!(normalize(bad).is_err(), "{bad}");
        }
    }
}
