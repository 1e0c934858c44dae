//! Turning the raw `target_host` and `target_port` template values into a [`Target`]
//! (RFC 9298 §3). The values arrive exactly as the client percent-encoded them;
//! [`parse_target`] decodes each one once and validates the result.
//!
//! Decisions, each explained where implemented:
//!
//! - **Decoding** happens exactly once, with hex digits in either case (`%3a` is `%3A`). A `%`
//!   that comes out of decoding stays a literal `%`: `%253A` is the three characters `%3A`, an
//!   invalid host, never a colon. A `%` not followed by two hex digits is
//!   [`TargetError::BadPercentEncoding`].
//! - **IPv6** literals arrive without brackets, colons percent-encoded (`2001%3Adb8%3A%3A42`).
//!   Raw colons are accepted too: the MUST to encode them binds the client, and a raw colon can
//!   only mean an IPv6 literal (the default template's matcher never lets one through anyway).
//!   Brackets, encoded or not, are refused ([`TargetError::Bracketed`]), and so are zone IDs
//!   ([`TargetError::ZoneId`]). IPv4-mapped addresses stay IPv6; the target policy decides about
//!   them.
//! - **IPv4** is the strict dotted quad only. Other numeric spellings (`127.1`, `0x7f.1`,
//!   `017.0.0.1`, `2130706433`) are refused rather than passed on as names, because a resolver
//!   would quietly read them as addresses.
//! - **Names** must be DNS host names: letter-digit-hyphen labels of 1 to 63 characters, not
//!   starting or ending with a hyphen, at most 253 characters without the optional trailing dot.
//!   Underscores are refused (they are not valid in host names, RFC 952/1123). Case is kept.
//! - **Ports** are 1 to 65535 in ASCII digits after decoding; leading zeros are accepted
//!   (`0443` represents 443), signs and spaces are not.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Where a flow goes: a literal address, or a name still to be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetHost {
    Ip(IpAddr),
    /// A syntactically valid DNS name, case preserved, trailing dot kept if the client sent one.
    Name(String),
}

/// A validated CONNECT-UDP target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: TargetHost,
    pub port: u16,
}

impl Target {
    /// The socket address, when the host is an IP literal (names must be resolved first).
    pub fn ip_socket_addr(&self) -> Option<SocketAddr> {
        match self.host {
            TargetHost::Ip(ip) => Some(SocketAddr::new(ip, self.port)),
            TargetHost::Name(_) => None,
        }
    }
}

/// `host:port`, with the IPv6 literal in brackets (`[2001:db8::42]:443`).
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            TargetHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            TargetHost::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            TargetHost::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

/// Why the target variables were refused. Every variant means 400 (Bad Request).
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum TargetError {
    #[error("the target_host variable is missing")]
    MissingHost,
    #[error("the target_port variable is missing")]
    MissingPort,
    #[error("the target_host variable is empty")]
    EmptyHost,
    #[error("the target_port variable is empty")]
    EmptyPort,
    #[error("target_port is not an integer between 1 and 65535")]
    BadPort,
    #[error("malformed percent-encoding in a target variable")]
    BadPercentEncoding,
    #[error("IPv6 zone identifiers are not supported")]
    ZoneId,
    #[error("target_host must not be in brackets")]
    Bracketed,
    #[error("target_host is neither an IP address nor a valid DNS name")]
    BadHost,
}

/// Decodes the raw template values into a [`Target`].
pub fn parse_target(raw_host: Option<&str>, raw_port: Option<&str>) -> Result<Target, TargetError> {
    let raw_host = raw_host.ok_or(TargetError::MissingHost)?;
    let raw_port = raw_port.ok_or(TargetError::MissingPort)?;
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3
    //# *  both the "target_host" and "target_port" variables MUST NOT be
    //#    empty.
    if raw_host.is_empty() {
        return Err(TargetError::EmptyHost);
    }
    if raw_port.is_empty() {
        return Err(TargetError::EmptyPort);
    }
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3.1
    //# It extracts the
    //# "target_host" and "target_port" variables from the URI it has
    //# reconstructed from the request headers, decodes their percent-
    //# encoding, and establishes a tunnel by directly opening a UDP
    //# socket to the requested target.
    let host = parse_host(&percent_decode(raw_host)?)?;
    let port = parse_port(&percent_decode(raw_port)?)?;
    Ok(Target { host, port })
}

/// Decodes `%XX` escapes in a single pass; every other byte is copied as it is.
pub fn percent_decode(raw: &str) -> Result<Vec<u8>, TargetError> {
    //= https://www.rfc-editor.org/rfc/rfc3986#section-2.4
    //# Implementations must not percent-encode or decode the same string
    //# more than once, as decoding an already decoded string might lead to
    //# misinterpreting a percent data octet as the beginning of a percent-
    //# encoding, or vice versa in the case of percent-encoding an already
    //# percent-encoded string.
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            //= https://www.rfc-editor.org/rfc/rfc3986#section-2.1
            //# The uppercase hexadecimal digits 'A' through 'F' are equivalent to
            //# the lowercase digits 'a' through 'f', respectively.
            let hi = b.get(i + 1).and_then(|&c| hex_value(c));
            let lo = b.get(i + 2).and_then(|&c| hex_value(c));
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(TargetError::BadPercentEncoding);
            };
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn hex_value(c: u8) -> Option<u8> {
    // `to_digit(16)` is below 16, so the narrowing cannot lose anything.
    char::from(c).to_digit(16).map(|d| d as u8)
}

//= https://www.rfc-editor.org/rfc/rfc9298#section-3
//# "target_host" supports using DNS names, IPv6 literals and IPv4
//# literals.  Note that IPv6 scoped addressing zone identifiers are not
//# supported.  Using the terms IPv6address, IPv4address, reg-name, and
//# port from [URI], the "target_host" and "target_port" variables MUST
//# adhere to the format in Figure 2, using notation from [ABNF].

/// Classifies a decoded host. Nothing here decodes again: a `%` in `decoded` is data.
fn parse_host(decoded: &[u8]) -> Result<TargetHost, TargetError> {
    // Every valid form is ASCII; anything else (including invalid UTF-8) is not a host.
    let host = std::str::from_utf8(decoded)
        .ok()
        .filter(|s| s.is_ascii())
        .ok_or(TargetError::BadHost)?;
    // Figure 2 has IPv6address, not IP-literal: the brackets of a URI authority do not belong
    // in the variable, and accepting them would give one address two spellings.
    if host.contains(['[', ']']) {
        return Err(TargetError::Bracketed);
    }
    if let Some((addr, _zone)) = host.split_once('%') {
        // A decoded '%' after an IPv6 address is a zone ID (RFC 6874's "%25" form decodes to
        // exactly this). Anywhere else it is a double encoding or garbage.
        return Err(if addr.parse::<Ipv6Addr>().is_ok() {
            TargetError::ZoneId
        } else {
            TargetError::BadHost
        });
    }
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3
    //# *  if "target_host" contains an IPv6 literal, the colons (":") MUST
    //#    be percent-encoded.
    // By here we cannot tell "%3A" from a raw ':' and do not need to: reg-name and IPv4address
    // have no colon, so either way only IPv6address is left.
    if host.contains(':') {
        return host
            .parse::<Ipv6Addr>()
            .map(|ip| TargetHost::Ip(IpAddr::V6(ip)))
            .map_err(|_| TargetError::BadHost);
    }
    // The standard library's parser takes exactly the dotted quad with no leading zeros.
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(TargetHost::Ip(IpAddr::V4(ip)));
    }
    if is_dns_name(host) {
        Ok(TargetHost::Name(host.to_owned()))
    } else {
        Err(TargetError::BadHost)
    }
}

/// Letter-digit-hyphen host names (RFC 1123 §2.1), with an optional trailing dot.
fn is_dns_name(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    // 253 characters is the longest name that fits the 255-octet wire form (RFC 1035 §2.3.4).
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let labels_ok = name.split('.').all(|label| {
        let b = label.as_bytes();
        (1..=63).contains(&b.len())
            && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    });
    // A name whose last label reads as a number (`127.1`, `0x7f.1`, `10.0.0.010`) is an address
    // in disguise: getaddrinfo and browsers parse such legacy forms as IPv4. RFC 3696 §2 also
    // rules out all-numeric top-level domains.
    labels_ok && !name.rsplit('.').next().is_some_and(is_numeric_label)
}

fn is_numeric_label(label: &str) -> bool {
    let hex = label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"));
    match hex {
        Some(digits) => digits.bytes().all(|c| c.is_ascii_hexdigit()),
        None => label.bytes().all(|c| c.is_ascii_digit()),
    }
}

/// Parses a decoded port.
fn parse_port(decoded: &[u8]) -> Result<u16, TargetError> {
    //= https://www.rfc-editor.org/rfc/rfc9298#section-3
    //# *  "target_port" MUST represent an integer between 1 and 65535
    //#    inclusive.
    // RFC 3986 §3.2.3 has `port = *DIGIT`, so leading zeros are well-formed and "0443" represents
    // 443. Only ASCII digits count: no sign, no whitespace, no other numerals. Accumulating with
    // an early exit above 65535 means no length is too long to parse safely.
    if decoded.is_empty() || !decoded.iter().all(u8::is_ascii_digit) {
        return Err(TargetError::BadPort);
    }
    let mut value: u32 = 0;
    for &d in decoded {
        value = value * 10 + u32::from(d - b'0');
        if value > u32::from(u16::MAX) {
            return Err(TargetError::BadPort);
        }
    }
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(TargetError::BadPort),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(host: &str, port: &str) -> Target {
        parse_target(Some(host), Some(port)).unwrap_or_else(|e| panic!("{host:?} {port:?}: {e}"))
    }

    fn host_err(host: &str) -> TargetError {
        parse_target(Some(host), Some("443")).unwrap_err()
    }

    fn port_err(port: &str) -> TargetError {
        parse_target(Some("192.0.2.6"), Some(port)).unwrap_err()
    }

    fn ip(s: &str) -> TargetHost {
        TargetHost::Ip(s.parse().unwrap())
    }

    #[test]
    fn ipv4() {
        assert_eq!(
            ok("192.0.2.6", "443"),
            Target {
                host: ip("192.0.2.6"),
                port: 443
            }
        );
        assert_eq!(ok("127.0.0.1", "53").host, ip("127.0.0.1"));
        assert_eq!(ok("%31%32%37.0.0.1", "53").host, ip("127.0.0.1"));
        assert_eq!(ok("0.0.0.0", "1").host, ip("0.0.0.0"));
    }

    #[test]
    fn ipv6() {
        assert_eq!(ok("%3A%3A1", "443").host, ip("::1"));
        assert_eq!(ok("2001%3Adb8%3A%3A42", "443").host, ip("2001:db8::42"));
        // Hex digits of the escapes and of the address in either case.
        assert_eq!(ok("2001%3adb8%3A%3a42", "443").host, ip("2001:db8::42"));
        assert_eq!(ok("2001%3ADB8%3A%3A42", "443").host, ip("2001:db8::42"));
        // Raw colons are accepted (see the module notes).
        assert_eq!(ok("2001:db8::42", "443").host, ip("2001:db8::42"));
        assert_eq!(ok("2001:db8%3A%3A42", "443").host, ip("2001:db8::42"));
        // IPv4-mapped stays IPv6; the policy handles mapped forms.
        assert_eq!(
            ok("%3A%3Affff%3A127.0.0.1", "443").host,
            ip("::ffff:127.0.0.1")
        );
        assert!(matches!(
            ok("%3A%3Affff%3A127.0.0.1", "443").host,
            TargetHost::Ip(IpAddr::V6(_))
        ));
        for bad in [
            "%3A%3A%3A1",
            "1%3A2",
            "2001%3Adb8%3A%3A42%3A%3A1",
            "%3A%3Agggg",
            "%3A",
        ] {
            assert_eq!(host_err(bad), TargetError::BadHost, "{bad}");
        }
    }

    #[test]
    fn brackets_and_zone_ids() {
        for bad in [
            "[%3A%3A1]",
            "%5B%3A%3A1%5D",
            "%5b%3A%3A1%5d",
            "[::1]",
            "%5B::1]",
        ] {
            assert_eq!(host_err(bad), TargetError::Bracketed, "{bad}");
        }
        for bad in [
            "fe80%3A%3A1%25eth0",
            "fe80::1%25eth0",
            "fe80%3A%3A1%251",
            "%3A%3A1%25",
        ] {
            assert_eq!(host_err(bad), TargetError::ZoneId, "{bad}");
        }
        assert_eq!(host_err("[fe80%3A%3A1%25eth0]"), TargetError::Bracketed);
    }

    #[test]
    fn names() {
        assert_eq!(
            ok("example.com", "53").host,
            TargetHost::Name("example.com".into())
        );
        assert_eq!(
            ok("Example.COM.", "53").host,
            TargetHost::Name("Example.COM.".into())
        );
        assert_eq!(
            ok("localhost", "53").host,
            TargetHost::Name("localhost".into())
        );
        assert_eq!(
            ok("xn--bcher-kva.example", "53").host,
            TargetHost::Name("xn--bcher-kva.example".into())
        );
        assert_eq!(ok("a-b.c0", "53").host, TargetHost::Name("a-b.c0".into()));
        assert_eq!(
            ok("1.2.3.com", "53").host,
            TargetHost::Name("1.2.3.com".into())
        );
        // Percent-encoded unreserved characters decode to the same name.
        assert_eq!(
            ok("%65xample.com", "53").host,
            TargetHost::Name("example.com".into())
        );
        let label63 = "a".repeat(63);
        let long = [label63.as_str(); 4].join(".")[..253].to_owned();
        assert_eq!(ok(&long, "1").host, TargetHost::Name(long.clone()));
        assert_eq!(
            ok(&format!("{long}."), "1").host,
            TargetHost::Name(format!("{long}."))
        );
    }

    #[test]
    fn bad_names() {
        let label64 = "a".repeat(64);
        let too_long = [&"a".repeat(63)[..]; 4].join(".")[..254].to_owned();
        for bad in [
            ".",
            "..",
            ".example.com",
            "example..com",
            "example.com..",
            "-example.com",
            "example-.com",
            "ex_ample.com",
            "_srv.example.com",
            "exa mple.com",
            "exa%20mple.com",
            "example.com%2F",
            "a/b",
            "a%2Fb",
            "h%C3%A9llo.example",
            "h\u{e9}llo.example",
            "%FF",
            "%00",
            "example.com%00",
            "*.example.com",
            label64.as_str(),
            too_long.as_str(),
            // Numeric forms that are not dotted quads.
            "127.1",
            "0x7f.0.0.1",
            "0x7f000001",
            "2130706433",
            "017.0.0.1",
            "127.0.0.1.",
            "256.0.0.1",
            "1.2.3.4.5",
            "example.0X1f",
        ] {
            assert_eq!(host_err(bad), TargetError::BadHost, "{bad:?}");
        }
    }

    #[test]
    fn double_encoding_is_not_decoded_twice() {
        // "%253A" is "%3A" after the one decode: data, not a colon.
        assert_eq!(host_err("%253A%253A1"), TargetError::BadHost);
        assert_eq!(host_err("2001%253Adb8%253A%253A42"), TargetError::BadHost);
        assert_eq!(host_err("%2531%2532%2537.0.0.1"), TargetError::BadHost);
        assert_eq!(port_err("%2534%2534%2533"), TargetError::BadPort);
        assert_eq!(percent_decode("%253A").unwrap(), b"%3A");
    }

    #[test]
    fn bad_percent_encoding() {
        for bad in [
            "%zz",
            "%4",
            "%",
            "a%",
            "%%41",
            "%g1",
            "%1g",
            "%-1",
            "%+1",
            "example%2",
        ] {
            assert_eq!(host_err(bad), TargetError::BadPercentEncoding, "{bad}");
            assert_eq!(
                percent_decode(bad),
                Err(TargetError::BadPercentEncoding),
                "{bad}"
            );
        }
        assert_eq!(port_err("44%3"), TargetError::BadPercentEncoding);
    }

    #[test]
    fn percent_decode_basics() {
        assert_eq!(percent_decode("").unwrap(), b"");
        assert_eq!(percent_decode("abc").unwrap(), b"abc");
        assert_eq!(percent_decode("%3a%3A%41%7e%7E").unwrap(), b"::A~~");
        assert_eq!(percent_decode("%00%ff").unwrap(), [0, 0xff]);
        assert_eq!(percent_decode("h\u{e9}").unwrap(), "h\u{e9}".as_bytes());
    }

    #[test]
    fn ports() {
        for (raw, want) in [
            ("1", 1),
            ("53", 53),
            ("443", 443),
            ("65535", 65535),
            ("0443", 443),
            ("00000000000000000000001", 1),
            ("%34%34%33", 443),
        ] {
            assert_eq!(ok("192.0.2.6", raw).port, want, "{raw}");
        }
        for bad in [
            "0",
            "00",
            "65536",
            "99999",
            "4294967297",
            "18446744073709551617",
            "-1",
            "+1",
            "12a",
            "a",
            " 443",
            "443 ",
            "%20443",
            "44 3",
            "4.4",
            "0x1bb",
            "\u{663}",
            "%2B443",
            "1e3",
        ] {
            assert_eq!(port_err(bad), TargetError::BadPort, "{bad:?}");
        }
    }

    #[test]
    fn missing_and_empty() {
        assert_eq!(
            parse_target(None, Some("443")),
            Err(TargetError::MissingHost)
        );
        assert_eq!(parse_target(Some("h"), None), Err(TargetError::MissingPort));
        assert_eq!(parse_target(None, None), Err(TargetError::MissingHost));
        assert_eq!(
            parse_target(Some(""), Some("443")),
            Err(TargetError::EmptyHost)
        );
        assert_eq!(
            parse_target(Some("h"), Some("")),
            Err(TargetError::EmptyPort)
        );
        assert_eq!(
            parse_target(Some(""), Some("")),
            Err(TargetError::EmptyHost)
        );
    }

    #[test]
    fn display() {
        assert_eq!(ok("192.0.2.6", "443").to_string(), "192.0.2.6:443");
        assert_eq!(
            ok("2001%3Adb8%3A%3A42", "443").to_string(),
            "[2001:db8::42]:443"
        );
        assert_eq!(ok("Example.com", "53").to_string(), "Example.com:53");
        assert_eq!(
            TargetError::ZoneId.to_string(),
            "IPv6 zone identifiers are not supported"
        );
    }

    #[test]
    fn ip_socket_addr() {
        assert_eq!(
            ok("%3A%3A1", "443").ip_socket_addr(),
            Some("[::1]:443".parse().unwrap())
        );
        assert_eq!(ok("example.com", "443").ip_socket_addr(), None);
    }

    // --- property tests ------------------------------------------------------------------

    fn is_unreserved(c: u8) -> bool {
        c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
    }

    /// Percent-encodes every byte outside `unreserved`, plus the bytes `extra` selects (encoding
    /// an unreserved character is legal, if unusual), with random hex case.
    fn encode(s: &str, extra: &[bool], lower: bool) -> String {
        let mut out = String::new();
        for (i, &c) in s.as_bytes().iter().enumerate() {
            if is_unreserved(c) && !extra.get(i).copied().unwrap_or(false) {
                out.push(char::from(c));
            } else if lower {
                out.push_str(&format!("%{c:02x}"));
            } else {
                out.push_str(&format!("%{c:02X}"));
            }
        }
        out
    }

    fn host_strategy() -> impl Strategy<Value = TargetHost> {
        let label = "[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?";
        let last = "[a-zA-Z]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?";
        let name = (proptest::collection::vec(label, 0..4), last, any::<bool>()).prop_map(
            |(mut labels, last, dot)| {
                labels.push(last);
                let mut name = labels.join(".");
                if dot {
                    name.push('.');
                }
                TargetHost::Name(name)
            },
        );
        prop_oneof![
            any::<u32>().prop_map(|v| TargetHost::Ip(IpAddr::V4(Ipv4Addr::from(v)))),
            any::<u128>().prop_map(|v| TargetHost::Ip(IpAddr::V6(Ipv6Addr::from(v)))),
            name,
        ]
    }

    fn host_text(h: &TargetHost) -> String {
        match h {
            TargetHost::Ip(ip) => ip.to_string(),
            TargetHost::Name(n) => n.clone(),
        }
    }

    proptest! {
        #[test]
        fn encode_then_parse_round_trips(
            host in host_strategy(),
            port in 1..=u16::MAX,
            zeros in 0..3usize,
            extra in proptest::collection::vec(any::<bool>(), 0..300),
            lower in any::<bool>(),
        ) {
            let raw_host = encode(&host_text(&host), &extra, lower);
            let raw_port = encode(&format!("{}{port}", "0".repeat(zeros)), &extra, lower);
            let want = Target { host, port };
            prop_assert_eq!(parse_target(Some(&raw_host), Some(&raw_port)), Ok(want.clone()));
            // Display puts the host back in URI authority form.
            let suffix = format!(":{}", port);
            prop_assert!(want.to_string().ends_with(&suffix));
        }

        #[test]
        fn percent_decode_inverts_encoding(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let raw: String = bytes.iter().map(|b| format!("%{b:02X}")).collect();
            prop_assert_eq!(percent_decode(&raw), Ok(bytes));
        }

        #[test]
        fn percent_decode_never_panics(s in any::<String>(), t in "[%0-9a-fA-FgxZ:]{0,24}") {
            let _ = percent_decode(&s);
            if let Ok(d) = percent_decode(&t) {
                // One pass: the output is never longer than the input.
                prop_assert!(d.len() <= t.len());
            }
        }

        #[test]
        fn parse_target_never_panics(h in any::<String>(), p in any::<String>(), t in "[%0-9a-fA-F:.\\[\\]-]{0,40}") {
            let _ = parse_target(Some(&h), Some(&p));
            let _ = parse_target(Some(&t), Some(&t));
            let _ = parse_target(Some(&t), Some("443"));
        }

        #[test]
        fn accepted_ports_are_in_range(p in "[0-9]{1,8}") {
            match parse_target(Some("h"), Some(&p)) {
                Ok(t) => prop_assert_eq!(u64::from(t.port), p.parse::<u64>().unwrap()),
                Err(e) => {
                    prop_assert_eq!(e, TargetError::BadPort);
                    let v = p.parse::<u64>().unwrap();
                    prop_assert!(v == 0 || v > 65535);
                }
            }
        }
    }
}
