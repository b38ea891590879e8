//! URL patterns of the `urls:` rules, such as `*/api/echo*` or `echo.shop:8080/admin/*`.
//!
//! A pattern is `[http://|https://]HOST[:PORT][/PATH]`. `*` matches any run of characters,
//! including none, in each part. A missing port matches every port and a missing path
//! matches every path. The scheme is accepted and ignored, because the agent handles only
//! plain HTTP/1.x requests and TLS passes through as TCP. The host matches either the
//! request's `Host` header (without its port, case-insensitively) or the destination IP
//! address.

use std::{fmt, net::IpAddr};

/// The parts of a request that patterns match.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The `Host` header without its port, when the request has one.
    pub host: Option<&'a str>,
    pub ip: IpAddr,
    pub port: u16,
    /// The request path without the query; empty for a TCP flow.
    pub path: &'a str,
}

/// A parsed URL pattern.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    host: Glob,
    port: Option<Glob>,
    path: Glob,
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.text)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Pattern {
    /// Parses `text`. The error names the part that is invalid.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err("is empty; use * to match every request".into());
        }

        let rest = match trimmed.split_once("://") {
            Some(("http" | "https", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "{text:?} has scheme {scheme:?}; only http:// or https:// may start a pattern"
                ));
            }
            None => trimmed,
        };

        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, "*"),
        };
        if authority.is_empty() {
            return Err(format!(
                "{text:?} has no host part; start with * to match any host, as in */api/*"
            ));
        }

        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        if host.is_empty() {
            return Err(format!("{text:?} has an empty host before the port"));
        }
        if let Some(port) = port
            && (port.is_empty() || !port.chars().all(|c| c.is_ascii_digit() || c == '*'))
        {
            return Err(format!("{text:?} has port {port:?}; a port is digits or *"));
        }
        if let Some(port) = port
            && !port.contains('*')
            && port.parse::<u16>().is_err()
        {
            return Err(format!("{text:?} has port {port}; ports go up to 65535"));
        }
        if host
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '?' | '#' | '[' | ']' | '/'))
        {
            return Err(format!("{text:?} has a character a host cannot contain"));
        }

        Ok(Pattern {
            text: trimmed.to_string(),
            host: Glob::new(&host.to_ascii_lowercase()),
            port: port.map(Glob::new),
            path: Glob::new(path),
        })
    }

    /// True when the host (by name or IP), the port and the path all match.
    pub fn matches(&self, target: &Target<'_>) -> bool {
        let host_matches = target
            .host
            .is_some_and(|host| self.host.matches(&host.to_ascii_lowercase()))
            || self.host.matches(&target.ip.to_string());
        let port_matches = self
            .port
            .as_ref()
            .is_none_or(|glob| glob.matches(&target.port.to_string()));
        host_matches && port_matches && self.path.matches(target.path)
    }
}

/// A wildcard pattern where `*` matches any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Glob {
    /// The literal pieces between the stars.
    pieces: Vec<String>,
    starts_with_star: bool,
    ends_with_star: bool,
}

impl Glob {
    fn new(text: &str) -> Glob {
        Glob {
            pieces: text
                .split('*')
                .filter(|piece| !piece.is_empty())
                .map(str::to_string)
                .collect(),
            starts_with_star: text.starts_with('*'),
            ends_with_star: text.ends_with('*'),
        }
    }

    fn matches(&self, text: &str) -> bool {
        let Some((first, rest)) = self.pieces.split_first() else {
            // Only stars (matches anything) or the empty pattern (matches "").
            return self.starts_with_star || text.is_empty();
        };
        let mut remaining = text;
        if self.starts_with_star {
            match remaining.find(first.as_str()) {
                Some(at) => remaining = &remaining[at + first.len()..],
                None => return false,
            }
        } else if let Some(stripped) = remaining.strip_prefix(first.as_str()) {
            remaining = stripped;
        } else {
            return false;
        }
        let Some((last, middle)) = rest.split_last() else {
            return self.ends_with_star || remaining.is_empty();
        };
        for piece in middle {
            match remaining.find(piece.as_str()) {
                Some(at) => remaining = &remaining[at + piece.len()..],
                None => return false,
            }
        }
        // The last piece is matched as far right as possible so a trailing literal
        // anchors at the end.
        if self.ends_with_star {
            remaining.contains(last.as_str())
        } else {
            remaining.ends_with(last.as_str())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target<'a>(host: Option<&'a str>, ip: &str, port: u16, path: &'a str) -> Target<'a> {
        Target {
            host,
            ip: ip.parse().unwrap(),
            port,
            path,
        }
    }

    #[test]
    fn pattern_table() {
        let echo = target(Some("echo.shop"), "10.0.0.3", 8080, "/api/echo/x");
        let cases: &[(&str, Target<'_>, bool)] = &[
            ("*", echo, true),
            ("*/api/echo*", echo, true),
            ("*/api/echo", echo, false),
            ("*/api/*/x", echo, true),
            ("*/API/echo*", echo, false),
            ("echo.shop/*", echo, true),
            ("ECHO.SHOP/*", echo, true),
            ("echo.*/*", echo, true),
            ("*.shop:8080/api/*", echo, true),
            ("*.shop:9090/api/*", echo, false),
            ("*:80*/*", echo, true),
            ("10.0.0.3/*", echo, true),
            ("10.0.0.*:8080", echo, true),
            ("10.0.1.*", echo, false),
            ("http://echo.shop/api/*", echo, true),
            ("https://*/api/echo/x", echo, true),
            ("other.shop/*", echo, false),
            ("*/api/echo/x*", echo, true),
            ("*/", echo, false),
            ("*", target(None, "10.0.0.3", 8080, ""), true),
            ("*/api/*", target(None, "10.0.0.3", 8080, ""), false),
            ("echo.shop/*", target(None, "10.0.0.3", 8080, "/a"), false),
            ("*/a*b*c", target(None, "10.0.0.3", 1, "/axbxc"), true),
            ("*/a*b*c", target(None, "10.0.0.3", 1, "/axbxcx"), false),
            ("*/a*b*c", target(None, "10.0.0.3", 1, "/abcbc"), true),
        ];
        for (text, target, expected) in cases {
            let pattern = Pattern::parse(text).unwrap();
            assert_eq!(
                pattern.matches(target),
                *expected,
                "{text} against {target:?}"
            );
        }
    }

    #[test]
    fn invalid_patterns_rejected() {
        let cases = [
            ("", "is empty"),
            ("/api/*", "no host part"),
            (":8080/api", "empty host"),
            ("*:http/api", "a port is digits or *"),
            ("*:/api", "a port is digits or *"),
            ("a b/api", "cannot contain"),
            ("ftp://x/y", "scheme \"ftp\""),
            ("*:99999/x", "ports go up to 65535"),
            ("http://[::1/healthz", "cannot contain"),
        ];
        for (text, message) in cases {
            let error = Pattern::parse(text).unwrap_err();
            assert!(error.contains(message), "{text:?}: {error}");
        }
    }
}
