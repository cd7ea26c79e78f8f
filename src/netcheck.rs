//! Destination safety and URL handling: webhooks must not become a way to reach the database
//! host's own network (SSRF), and URLs shown in logs and errors must not leak credentials.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::Url;

/// Why a webhook must not be delivered to `ip` unless private networks are allowed, as a short
/// word such as `"loopback"` or `"private"`; `None` for a public address. IPv6 addresses that
/// embed an IPv4 one (mapped `::ffff:0:0/96`, compatible `::/96`, NAT64 `64:ff9b::/96`) are
/// judged by that IPv4 address.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    const METADATA: [Ipv4Addr; 2] = [
        Ipv4Addr::new(169, 254, 169, 254),
        Ipv4Addr::new(100, 100, 100, 200),
    ];
    let [a, b, ..] = ip.octets();
    Some(if METADATA.contains(&ip) {
        "metadata"
    } else if ip.is_unspecified() {
        "unspecified"
    } else if ip.is_loopback() {
        "loopback"
    } else if ip.is_private() {
        "private"
    } else if ip.is_link_local() {
        "link-local"
    } else if a == 100 && b & 0xc0 == 64 {
        "cgnat"
    } else if ip.is_broadcast() {
        "broadcast"
    } else if ip.is_multicast() {
        "multicast"
    } else if a == 0 || a >= 240 || ip.is_documentation() || (a == 198 && b & 0xfe == 18) {
        // 0/8 "this network", 240/4 future use, TEST-NETs, 198.18/15 benchmarking.
        "reserved"
    } else {
        return None;
    })
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    const METADATA: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    let segments = ip.segments();
    let embedded_v4 = || {
        let [.., a, b, c, d] = ip.octets();
        Ipv4Addr::new(a, b, c, d)
    };
    Some(if ip == METADATA {
        "metadata"
    } else if ip.is_unspecified() {
        "unspecified"
    } else if ip.is_loopback() {
        "loopback"
    } else if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    } else if segments[..6] == [0; 6] || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return forbidden_v4(embedded_v4());
    } else if ip.is_unicast_link_local() {
        "link-local"
    } else if ip.is_unique_local() {
        "unique-local"
    } else if ip.is_multicast() {
        "multicast"
    } else if segments[..2] == [0x2001, 0xdb8] {
        "reserved"
    } else {
        return None;
    })
}

/// Why a webhook URL was refused; the messages are meant for the user and never contain a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlError {
    /// The text is not a URL; holds the parser's description of the problem.
    Malformed(String),
    /// The scheme is neither `https` nor `http`; holds the scheme.
    Scheme(String),
    /// The URL has no host to deliver to.
    NoHost,
    /// The scheme is `http` but plain http is not allowed.
    HttpNotAllowed,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(problem) => write!(f, "not a valid URL ({problem})"),
            Self::Scheme(scheme) => write!(f, "scheme \"{scheme}\" is not supported, use https"),
            Self::NoHost => write!(f, "the URL has no host"),
            Self::HttpNotAllowed => write!(f, "plain http is not allowed, use https"),
        }
    }
}

impl std::error::Error for UrlError {}

/// Parses a webhook URL: it must be `https` (or `http` when `allow_http`) and name a host.
pub fn validate_url(raw: &str, allow_http: bool) -> Result<Url, UrlError> {
    // The URL parser silently drops tabs and newlines (WHATWG): "https://a/\r\nX: y" would
    // become another path. Refused instead, as any other control character.
    if raw.chars().any(|c| c.is_control()) {
        return Err(UrlError::Malformed(
            "it contains a control character such as CR or LF".into(),
        ));
    }
    let url = Url::parse(raw).map_err(|e| UrlError::Malformed(e.to_string()))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_http => {}
        "http" => return Err(UrlError::HttpNotAllowed),
        other => return Err(UrlError::Scheme(other.to_owned())),
    }
    if url.host().is_none() {
        return Err(UrlError::NoHost);
    }
    Ok(url)
}

/// Query parameter names (lowercase substrings) whose values are treated as credentials.
const SENSITIVE_PARAMS: [&str; 6] = ["token", "secret", "key", "sig", "password", "auth"];

/// `raw` with any password and credential-looking query values (names containing `token`,
/// `secret`, `key`, `sig`, `password` or `auth`) replaced by `***`; `<invalid url>` if it does
/// not parse.
pub fn mask_url(raw: &str) -> String {
    masked(raw).unwrap_or_else(|| "<invalid url>".to_owned())
}

fn masked(raw: &str) -> Option<String> {
    let mut url = Url::parse(raw).ok()?;
    if url.password().is_some() {
        url.set_password(Some("***")).ok()?;
    }
    if let Some(query) = url.query() {
        let query = query
            .split('&')
            .map(mask_query_pair)
            .collect::<Vec<_>>()
            .join("&");
        url.set_query(Some(&query));
    }
    Some(url.into())
}

/// One raw `name=value` query pair, with the value masked if the decoded name looks sensitive.
fn mask_query_pair(pair: &str) -> String {
    let Some((raw_name, _)) = pair.split_once('=') else {
        return pair.to_owned();
    };
    let name = url::form_urlencoded::parse(raw_name.as_bytes())
        .next()
        .map(|(name, _)| name.to_lowercase())
        .unwrap_or_default();
    if SENSITIVE_PARAMS.iter().any(|word| name.contains(word)) {
        format!("{raw_name}=***")
    } else {
        pair.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(ip: &str) -> Option<&'static str> {
        forbidden_reason(ip.parse().expect(ip))
    }

    #[test]
    fn public_addresses_are_allowed() {
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "1.1.1.1",
            "2606:2800:220:1::",
            "2001:4860:4860::8888",
        ] {
            assert_eq!(reason(ip), None, "{ip}");
        }
    }

    #[test]
    fn unspecified_addresses_are_refused() {
        assert_eq!(reason("0.0.0.0"), Some("unspecified"));
        assert_eq!(reason("::"), Some("unspecified"));
    }

    #[test]
    fn loopback_addresses_are_refused() {
        assert_eq!(reason("127.0.0.1"), Some("loopback"));
        assert_eq!(reason("127.255.255.254"), Some("loopback"));
        assert_eq!(reason("::1"), Some("loopback"));
    }

    #[test]
    fn private_ipv4_ranges_are_refused() {
        for ip in [
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.0.1",
            "192.168.255.255",
        ] {
            assert_eq!(reason(ip), Some("private"), "{ip}");
        }
        assert_eq!(reason("172.15.255.255"), None);
        assert_eq!(reason("172.32.0.0"), None);
    }

    #[test]
    fn link_local_addresses_are_refused() {
        assert_eq!(reason("169.254.0.1"), Some("link-local"));
        assert_eq!(reason("fe80::1"), Some("link-local"));
        assert_eq!(reason("febf::1"), Some("link-local"));
    }

    #[test]
    fn cgnat_range_is_refused() {
        assert_eq!(reason("100.64.0.1"), Some("cgnat"));
        assert_eq!(reason("100.127.255.255"), Some("cgnat"));
        assert_eq!(reason("100.63.255.255"), None);
        assert_eq!(reason("100.128.0.0"), None);
    }

    #[test]
    fn unique_local_ipv6_is_refused() {
        assert_eq!(reason("fc00::1"), Some("unique-local"));
        assert_eq!(reason("fd12:3456:789a::1"), Some("unique-local"));
    }

    #[test]
    fn cloud_metadata_addresses_are_refused() {
        assert_eq!(reason("169.254.169.254"), Some("metadata"));
        assert_eq!(reason("100.100.100.200"), Some("metadata"));
        assert_eq!(reason("fd00:ec2::254"), Some("metadata"));
        assert_eq!(reason("::ffff:169.254.169.254"), Some("metadata"));
    }

    #[test]
    fn broadcast_and_multicast_are_refused() {
        assert_eq!(reason("255.255.255.255"), Some("broadcast"));
        assert_eq!(reason("224.0.0.1"), Some("multicast"));
        assert_eq!(reason("239.255.255.250"), Some("multicast"));
        assert_eq!(reason("ff02::1"), Some("multicast"));
    }

    #[test]
    fn reserved_and_documentation_ranges_are_refused() {
        for ip in [
            "0.1.2.3",
            "240.0.0.1",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.1",
            "198.18.0.1",
            "2001:db8::1",
        ] {
            assert_eq!(reason(ip), Some("reserved"), "{ip}");
        }
    }

    #[test]
    fn ipv4_mapped_addresses_are_judged_by_the_ipv4_address() {
        assert_eq!(reason("::ffff:127.0.0.1"), Some("loopback"));
        assert_eq!(reason("::ffff:10.1.2.3"), Some("private"));
        assert_eq!(reason("::ffff:0.0.0.0"), Some("unspecified"));
        assert_eq!(reason("::ffff:93.184.216.34"), None);
    }

    #[test]
    fn ipv4_compatible_and_nat64_addresses_are_judged_by_the_ipv4_address() {
        assert_eq!(reason("::127.0.0.1"), Some("loopback"));
        assert_eq!(reason("::192.168.1.1"), Some("private"));
        assert_eq!(reason("64:ff9b::169.254.169.254"), Some("metadata"));
        assert_eq!(reason("64:ff9b::100.64.0.1"), Some("cgnat"));
        assert_eq!(reason("64:ff9b::93.184.216.34"), None);
    }

    #[test]
    fn https_urls_are_accepted() {
        let url = validate_url("https://hooks.example.com/in?x=1#frag", false).expect("valid");
        assert_eq!(url.host_str(), Some("hooks.example.com"));
        assert_eq!(url.fragment(), Some("frag"));
    }

    #[test]
    fn http_urls_need_allow_http() {
        assert_eq!(
            validate_url("http://hooks.example.com/", false),
            Err(UrlError::HttpNotAllowed)
        );
        assert!(validate_url("http://hooks.example.com/", true).is_ok());
    }

    #[test]
    fn other_schemes_are_refused() {
        assert_eq!(
            validate_url("ftp://example.com/", true),
            Err(UrlError::Scheme("ftp".into()))
        );
        assert_eq!(
            validate_url("file:///etc/passwd", true),
            Err(UrlError::Scheme("file".into()))
        );
    }

    #[test]
    fn urls_without_a_host_are_refused() {
        assert_eq!(UrlError::NoHost.to_string(), "the URL has no host");
        assert!(matches!(
            validate_url("https://", false),
            Err(UrlError::Malformed(_))
        ));
    }

    #[test]
    fn malformed_urls_are_refused_without_echoing_the_password() {
        let err = validate_url("https://bob:s3cret@exa mple.com/", false).expect_err("malformed");
        assert!(matches!(err, UrlError::Malformed(_)));
        assert!(!err.to_string().contains("s3cret"));
        assert!(matches!(
            validate_url("not a url", false),
            Err(UrlError::Malformed(_))
        ));
    }

    #[test]
    fn control_characters_are_refused_not_dropped() {
        for raw in [
            "https://example.com/\r\nX-Injected: 1",
            "https://example.com/a\tb",
            "https://exa\nmple.com/",
            "https://example.com/\u{7f}",
        ] {
            let err = validate_url(raw, false).expect_err(raw);
            assert!(
                err.to_string().contains("control character"),
                "{raw:?}: {err}"
            );
        }
    }

    #[test]
    fn scheme_errors_do_not_echo_the_password() {
        let err = validate_url("ftp://bob:s3cret@example.com/", false).expect_err("bad scheme");
        assert!(!err.to_string().contains("s3cret"));
    }

    #[test]
    fn mask_url_hides_the_password_but_keeps_the_username() {
        assert_eq!(
            mask_url("https://bob:s3cret@h.example/x?y=1"),
            "https://bob:***@h.example/x?y=1"
        );
        assert_eq!(
            mask_url("https://bob@h.example/x"),
            "https://bob@h.example/x"
        );
    }

    #[test]
    fn mask_url_hides_credential_looking_query_values() {
        assert_eq!(
            mask_url("https://h.example/x?api_KEY=abc&page=2&access_token=t0k&Signature=zz&client_secret=s&password=p&Authorization=a"),
            "https://h.example/x?api_KEY=***&page=2&access_token=***&Signature=***&client_secret=***&password=***&Authorization=***"
        );
    }

    #[test]
    fn mask_url_keeps_other_query_text_as_written() {
        assert_eq!(
            mask_url("https://h.example/?q=a%20b&flag&tok%65n=x"),
            "https://h.example/?q=a%20b&flag&tok%65n=***"
        );
    }

    #[test]
    fn mask_url_replaces_unparseable_input() {
        assert_eq!(
            mask_url("https://bob:s3cret@exa mple.com/"),
            "<invalid url>"
        );
        assert_eq!(mask_url(""), "<invalid url>");
    }
}
