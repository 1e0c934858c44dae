//! Target policy: which *resolved* target addresses a CONNECT-UDP flow may reach.
//!
//! A relay is an open door for whoever reaches it, so by default it refuses every destination that
//! is not a globally reachable unicast address (SECURITY.md item 1, RFC 9298 §7): loopback,
//! private, link-local, shared (CGNAT), multicast, broadcast, unspecified and the special-purpose
//! ranges of the IANA registries, plus the relay's own listening addresses. The caller resolves
//! host names and calls [`TargetPolicy::check`] with the resolved address, so a name that resolves
//! to `127.0.0.1` is refused like the literal; this module does no I/O.
//!
//! # Order of evaluation ([`TargetPolicy::check`])
//!
//! 1. port 0 → [`DenyReason::PortZero`];
//! 2. an operator deny rule matches → [`DenyReason::Operator`] (wins over everything);
//! 3. one of the relay's own addresses → [`DenyReason::OwnAddress`] (even if allowed: relaying to
//!    itself is a loop that amplifies);
//! 4. an operator allow rule matches → allowed (this is how tests and benchmarks reach loopback);
//! 5. the default deny list ([`default_deny`]) → its reason;
//! 6. otherwise allowed.
//!
//! # IPv4 inside IPv6
//!
//! An IPv6 address that carries an IPv4 address is judged by the IPv4 address, because that is
//! where the packets end up; otherwise `::ffff:127.0.0.1` or `64:ff9b::10.0.0.1` would slip past a
//! list written in IPv4 terms. The forms recognised, with where the IPv4 address sits:
//!
//! | form | prefix | IPv4 bits | default when the IPv4 address is public |
//! |---|---|---|---|
//! | IPv4-mapped (RFC 4291 §2.5.5.2) | `::ffff:0:0/96` | 96..128 | allowed (it *is* the IPv4 address) |
//! | IPv4-compatible (RFC 4291 §2.5.5.1, deprecated) | `::/96` minus `::`, `::1` | 96..128 | `Reserved` |
//! | NAT64 well-known (RFC 6052) | `64:ff9b::/96` | 96..128 | allowed |
//! | NAT64 local-use (RFC 8215) | `64:ff9b:1::/48` | 96..128 (the /96 layout) | `Private` |
//! | 6to4 (RFC 3056) | `2002::/16` | 16..48 | allowed |
//!
//! Teredo (`2001::/32`, RFC 4380) carries the *client's* IPv4 address obfuscated and reaches it
//! through whatever NAT mapping the client has, so it cannot be judged; the whole prefix is denied
//! as [`DenyReason::Reserved`] (Teredo is practically retired anyway). An operator who wants it
//! can allow `2001::/32`.
//!
//! Rules apply to these forms as follows:
//! - **deny rules** and the **own-address** check match the literal address *or* the embedded IPv4
//!   address of any form above (denying `203.0.113.0/24` also denies its NAT64 and 6to4 aliases);
//! - **allow rules** match the literal address, and IPv4-mapped addresses as their IPv4 address
//!   ([`AddrRule::matches`]), so `127.0.0.0/8` also allows `::ffff:127.0.0.1`. They do *not* follow
//!   NAT64/6to4/compatible forms: those go through a translator or tunnel, not straight to the
//!   allowed network, so an operator has to allow the IPv6 prefix itself for that.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::str::FromStr;

use ipnet::IpNet;

/// Every valid UDP target port; a rule without a port part covers this range.
const ALL_PORTS: RangeInclusive<u16> = 1..=65535;

/// Why a string is not a valid [`AddrRule`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The rule is the empty string.
    #[error("empty address rule")]
    Empty,
    /// The address part is not an IPv4 or IPv6 address (zone IDs are not accepted).
    #[error("{0:?} is not an IP address")]
    Address(String),
    /// The prefix length is not a number or is too long for the address family.
    #[error("invalid prefix length {0:?} (0-32 for IPv4, 0-128 for IPv6)")]
    PrefixLen(String),
    /// A port is not a decimal number in 0-65535.
    #[error("invalid port {0:?} (expected 1-65535)")]
    Port(String),
    /// Port 0 is never a valid UDP destination.
    #[error("port 0 is not a valid target port")]
    PortZero,
    /// A port range whose start is above its end.
    #[error("port range {start}-{end} is reversed")]
    ReversedRange {
        /// First port as written.
        start: u16,
        /// Last port as written.
        end: u16,
    },
    /// Anything else that does not follow `CIDR[:PORT|:PORT-PORT]`, e.g. an unclosed bracket.
    #[error("{0:?} is not CIDR[:PORT|:PORT-PORT]")]
    Syntax(String),
}

/// A network and a port range, written `CIDR[:PORT|:PORT-PORT]`.
///
/// Accepted forms: `127.0.0.0/8`, `127.0.0.1/32:9000-9100`, `1.2.3.4:53`, `::1/128:53`,
/// `[::1]/128:53`, `[::1]:53`, `[2001:db8::]/32`, and bare addresses `127.0.0.1` / `::1`, which are
/// host routes (/32, /128). Without a port part the rule covers ports 1-65535.
///
/// Decisions:
/// - An unbracketed IPv6 address *without* a prefix length never has a port: `::1:53` is the
///   address `::0.1.0.83` on all ports, because it cannot be told apart from one. Write `[::1]:53`.
/// - Host bits set below the prefix (`10.1.2.3/8`) are accepted and cleared (`10.0.0.0/8`): the
///   meaning is unambiguous and operators often paste an interface address with its prefix.
/// - Port 0, reversed ranges, ports above 65535 and prefix lengths above 32/128 are rejected.
///
/// [`Display`](fmt::Display) writes a form [`FromStr`] parses back to an equal rule (IPv6 with a
/// port part is bracketed). (De)serialises through the same string form, so a TOML configuration
/// can hold `allow_targets = ["127.0.0.0/8:1-65535"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrRule {
    /// The network, with host bits cleared when built by [`FromStr`] or [`AddrRule::new`].
    pub net: IpNet,
    /// Ports the rule covers, inclusive.
    pub ports: RangeInclusive<u16>,
}

impl AddrRule {
    /// Builds a rule, clearing host bits of `net` and checking the port range like the parser
    /// (no port 0, not reversed).
    pub fn new(net: IpNet, ports: RangeInclusive<u16>) -> Result<Self, RuleError> {
        let (start, end) = (*ports.start(), *ports.end());
        if start == 0 {
            return Err(RuleError::PortZero);
        }
        if start > end {
            return Err(RuleError::ReversedRange { start, end });
        }
        Ok(Self {
            net: net.trunc(),
            ports: start..=end,
        })
    }

    /// Whether `addr` is inside the network and the port range. An IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`) and its IPv4 address are the same destination, so each matches a rule
    /// written in the other form; no other IPv6 form is translated here.
    pub fn matches(&self, addr: SocketAddr) -> bool {
        self.ports.contains(&addr.port()) && self.matches_ip(addr.ip())
    }

    fn matches_ip(&self, ip: IpAddr) -> bool {
        self.net.contains(&ip)
            || match ip {
                IpAddr::V4(v4) => self.net.contains(&IpAddr::V6(v4.to_ipv6_mapped())),
                IpAddr::V6(v6) => v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| self.net.contains(&IpAddr::V4(v4))),
            }
    }
}

impl FromStr for AddrRule {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, RuleError> {
        if s.is_empty() {
            return Err(RuleError::Empty);
        }
        let (ip, prefix, ports): (IpAddr, Option<&str>, Option<&str>) =
            if let Some(rest) = s.strip_prefix('[') {
                // Bracketed IPv6: `[addr]`, `[addr]/len`, `[addr]:ports`, `[addr]/len:ports`.
                let (inside, after) = rest
                    .split_once(']')
                    .ok_or_else(|| RuleError::Syntax(s.to_owned()))?;
                let v6 = Ipv6Addr::from_str(inside)
                    .map_err(|_| RuleError::Address(inside.to_owned()))?;
                let (prefix, ports) = if let Some(p) = after.strip_prefix('/') {
                    split_ports(p)
                } else if let Some(p) = after.strip_prefix(':') {
                    (None, Some(p))
                } else if after.is_empty() {
                    (None, None)
                } else {
                    return Err(RuleError::Syntax(s.to_owned()));
                };
                (IpAddr::V6(v6), prefix, ports)
            } else if let Some((addr, rest)) = s.split_once('/') {
                // With a prefix length the port part is unambiguous even for IPv6: the prefix
                // length has no colon, so the first colon after `/` starts the ports.
                let ip = IpAddr::from_str(addr).map_err(|_| RuleError::Address(addr.to_owned()))?;
                let (prefix, ports) = split_ports(rest);
                (ip, prefix, ports)
            } else if let Ok(ip) = IpAddr::from_str(s) {
                (ip, None, None)
            } else if let Some((v4, ports)) = s
                .split_once(':')
                .and_then(|(a, p)| Some((Ipv4Addr::from_str(a).ok()?, p)))
            {
                // `a.b.c.d:ports`; IPv6 needs brackets to carry a port without a prefix length.
                (IpAddr::V4(v4), None, Some(ports))
            } else {
                return Err(RuleError::Address(s.to_owned()));
            };
        let max_len = if ip.is_ipv4() { 32 } else { 128 };
        let len = match prefix {
            None => max_len,
            Some(p) => parse_prefix_len(p, max_len)?,
        };
        let net = IpNet::new(ip, len).map_err(|_| RuleError::PrefixLen(len.to_string()))?;
        let ports = match ports {
            None => ALL_PORTS,
            Some(p) => parse_ports(p)?,
        };
        Self::new(net, ports)
    }
}

/// Splits `len[:ports]` (what follows a `/`) into its two parts.
fn split_ports(s: &str) -> (Option<&str>, Option<&str>) {
    match s.split_once(':') {
        Some((len, ports)) => (Some(len), Some(ports)),
        None => (Some(s), None),
    }
}

fn parse_prefix_len(s: &str, max_len: u8) -> Result<u8, RuleError> {
    // Digits only: `u8::from_str` would also take a leading `+`.
    match s.parse::<u8>() {
        Ok(len) if s.bytes().all(|b| b.is_ascii_digit()) && len <= max_len => Ok(len),
        _ => Err(RuleError::PrefixLen(s.to_owned())),
    }
}

fn parse_port(s: &str) -> Result<u16, RuleError> {
    match s.parse::<u16>() {
        Ok(0) if s.bytes().all(|b| b.is_ascii_digit()) => Err(RuleError::PortZero),
        Ok(port) if s.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
        _ => Err(RuleError::Port(s.to_owned())),
    }
}

fn parse_ports(s: &str) -> Result<RangeInclusive<u16>, RuleError> {
    let (start, end) = match s.split_once('-') {
        Some((a, b)) => (parse_port(a)?, parse_port(b)?),
        None => {
            let port = parse_port(s)?;
            (port, port)
        }
    };
    if start > end {
        return Err(RuleError::ReversedRange { start, end });
    }
    Ok(start..=end)
}

impl fmt::Display for AddrRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (start, end) = (*self.ports.start(), *self.ports.end());
        let all_ports = start == *ALL_PORTS.start() && end == *ALL_PORTS.end();
        match self.net {
            // Brackets are not needed to parse `::1/128:53` back, but they make it readable.
            IpNet::V6(n) if !all_ports => write!(f, "[{}]/{}", n.addr(), n.prefix_len())?,
            net => write!(f, "{net}")?,
        }
        if all_ports {
            Ok(())
        } else if start == end {
            write!(f, ":{start}")
        } else {
            write!(f, ":{start}-{end}")
        }
    }
}

impl serde::Serialize for AddrRule {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for AddrRule {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RuleVisitor;
        impl serde::de::Visitor<'_> for RuleVisitor {
            type Value = AddrRule;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address rule `CIDR[:PORT|:PORT-PORT]`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AddrRule, E> {
                v.parse()
                    .map_err(|e: RuleError| E::custom(format!("{v:?}: {e}")))
            }
        }
        deserializer.deserialize_str(RuleVisitor)
    }
}

/// Why a target was refused. Every reason maps to 403 with
/// `Proxy-Status: ...; error=destination_ip_prohibited`; the reason is for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum DenyReason {
    /// `127.0.0.0/8`, `::1`.
    #[error("target is a loopback address")]
    Loopback,
    /// RFC 1918 ranges, unique local `fc00::/7`, deprecated site-local `fec0::/10`, NAT64
    /// local-use `64:ff9b:1::/48`.
    #[error("target is a private address")]
    Private,
    /// `169.254.0.0/16`, `fe80::/10`.
    #[error("target is a link-local address")]
    LinkLocal,
    /// `100.64.0.0/10` (RFC 6598, carrier-grade NAT).
    #[error("target is in the shared address space (CGNAT)")]
    SharedAddressSpace,
    /// `224.0.0.0/4`, `ff00::/8`.
    #[error("target is a multicast address")]
    Multicast,
    /// `255.255.255.255`.
    #[error("target is the limited broadcast address")]
    Broadcast,
    /// `0.0.0.0`, `::` (Linux delivers these to the local host).
    #[error("target is the unspecified address")]
    Unspecified,
    /// Any other special-purpose or non-global range; see [`default_deny`].
    #[error("target is a reserved or special-purpose address")]
    Reserved,
    /// One of the relay's own listening addresses.
    #[error("target is the relay itself")]
    OwnAddress,
    /// Matched an operator deny rule.
    #[error("target is denied by an operator rule")]
    Operator,
    /// Port 0.
    #[error("target port is 0")]
    PortZero,
}

impl DenyReason {
    /// A stable snake_case name for log fields and metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link_local",
            Self::SharedAddressSpace => "shared_address_space",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Unspecified => "unspecified",
            Self::Reserved => "reserved",
            Self::OwnAddress => "own_address",
            Self::Operator => "operator",
            Self::PortZero => "port_zero",
        }
    }
}

/// Which operator rules and which own addresses apply on top of the default deny list.
///
/// [`Default`] is the default deny list alone: no allow or deny rules, no own addresses.
#[derive(Debug, Clone, Default)]
pub struct TargetPolicy {
    allow: Vec<AddrRule>,
    deny: Vec<AddrRule>,
    own: Vec<SocketAddr>,
}

impl TargetPolicy {
    /// - `allow`: operator allow-list; a match overrides the default deny list (not deny rules, not
    ///   own addresses).
    /// - `deny`: operator deny-list; wins over everything.
    /// - `own`: the relay's listening addresses; a target equal to one is refused. An own address
    ///   with the unspecified IP (`0.0.0.0:P` or `[::]:P`) listens on every local address, which
    ///   this module cannot enumerate (no I/O): it refuses port `P` on loopback and unspecified
    ///   targets of either family (a `[::]` socket is usually dual-stack). The caller should also
    ///   pass the host's concrete interface addresses with that port if it wants those refused
    ///   when an allow rule would otherwise let them through.
    pub fn new(allow: Vec<AddrRule>, deny: Vec<AddrRule>, own: Vec<SocketAddr>) -> Self {
        // Store own addresses as plain IPv4 when given IPv4-mapped, so one comparison covers both.
        let own = own
            .into_iter()
            .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
            .collect();
        Self { allow, deny, own }
    }

    /// Decides whether a flow may send to `target` (an already resolved address). The order of the
    /// checks is described in the [module documentation](self).
    pub fn check(&self, target: SocketAddr) -> Result<(), DenyReason> {
        let port = target.port();
        if port == 0 {
            return Err(DenyReason::PortZero);
        }
        let ip = target.ip();
        let embedded = match ip {
            IpAddr::V6(v6) => embedded_v4(v6),
            IpAddr::V4(_) => None,
        };
        // The literal address and, if any, the IPv4 address it carries.
        let views = std::iter::once(ip).chain(embedded.map(|(v4, _)| IpAddr::V4(v4)));

        for view in views {
            let as_target = SocketAddr::new(view, port);
            if self.deny.iter().any(|r| r.matches(as_target)) {
                return Err(DenyReason::Operator);
            }
            if self.own.iter().any(|own| is_own(*own, view, port)) {
                return Err(DenyReason::OwnAddress);
            }
        }
        // Allow rules see the literal address; `matches` already folds IPv4-mapped addresses.
        if self.allow.iter().any(|r| r.matches(target)) {
            return Ok(());
        }
        match default_deny(ip) {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }
}

fn is_own(own: SocketAddr, ip: IpAddr, port: u16) -> bool {
    if own.port() != port {
        return false;
    }
    if own.ip().is_unspecified() {
        ip.is_loopback() || ip.is_unspecified()
    } else {
        own.ip() == ip
    }
}

/// How an IPv6 address carries an IPv4 address (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Embedding {
    Mapped,
    Compatible,
    Nat64,
    Nat64Local,
    SixToFour,
}

/// The IPv4 address an IPv6 address carries, and how.
fn embedded_v4(ip: Ipv6Addr) -> Option<(Ipv4Addr, Embedding)> {
    let s = ip.segments();
    let o = ip.octets();
    let last32 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some((last32, Embedding::Mapped)),
        // `::` and `::1` are the IPv6 unspecified and loopback addresses, not compatible forms.
        [0, 0, 0, 0, 0, 0, _, _] if !ip.is_unspecified() && !ip.is_loopback() => {
            Some((last32, Embedding::Compatible))
        }
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some((last32, Embedding::Nat64)),
        [0x64, 0xff9b, 1, ..] => Some((last32, Embedding::Nat64Local)),
        [0x2002, ..] => Some((Ipv4Addr::new(o[2], o[3], o[4], o[5]), Embedding::SixToFour)),
        _ => None,
    }
}

/// IPv4 ranges refused by default, first match wins (so the /32s come before their /8 and /4).
const V4_DENY: &[(Ipv4Addr, u8, DenyReason)] = &[
    // RFC 1122 §3.2.1.3; Linux connects 0.0.0.0 to the local host.
    (Ipv4Addr::new(0, 0, 0, 0), 32, DenyReason::Unspecified),
    // RFC 919, RFC 8190: limited broadcast.
    (Ipv4Addr::new(255, 255, 255, 255), 32, DenyReason::Broadcast),
    // RFC 791, RFC 1122: "this network".
    (Ipv4Addr::new(0, 0, 0, 0), 8, DenyReason::Reserved),
    // RFC 1918.
    (Ipv4Addr::new(10, 0, 0, 0), 8, DenyReason::Private),
    // RFC 6598: shared address space (carrier-grade NAT).
    (
        Ipv4Addr::new(100, 64, 0, 0),
        10,
        DenyReason::SharedAddressSpace,
    ),
    // RFC 1122.
    (Ipv4Addr::new(127, 0, 0, 0), 8, DenyReason::Loopback),
    // RFC 3927.
    (Ipv4Addr::new(169, 254, 0, 0), 16, DenyReason::LinkLocal),
    // RFC 1918.
    (Ipv4Addr::new(172, 16, 0, 0), 12, DenyReason::Private),
    // RFC 6890: IETF protocol assignments (DS-Lite 192.0.0.0/29, NAT64 discovery
    // 192.0.0.170/31, ...). The two anycast /32s in it (PCP, TURN) are not relay targets.
    (Ipv4Addr::new(192, 0, 0, 0), 24, DenyReason::Reserved),
    // RFC 5737: TEST-NET-1.
    (Ipv4Addr::new(192, 0, 2, 0), 24, DenyReason::Reserved),
    // RFC 7526: deprecated 6to4 relay anycast.
    (Ipv4Addr::new(192, 88, 99, 0), 24, DenyReason::Reserved),
    // RFC 1918.
    (Ipv4Addr::new(192, 168, 0, 0), 16, DenyReason::Private),
    // RFC 2544: benchmarking.
    (Ipv4Addr::new(198, 18, 0, 0), 15, DenyReason::Reserved),
    // RFC 5737: TEST-NET-2.
    (Ipv4Addr::new(198, 51, 100, 0), 24, DenyReason::Reserved),
    // RFC 5737: TEST-NET-3.
    (Ipv4Addr::new(203, 0, 113, 0), 24, DenyReason::Reserved),
    // RFC 5771.
    (Ipv4Addr::new(224, 0, 0, 0), 4, DenyReason::Multicast),
    // RFC 1112 §4: reserved for future use (255.255.255.255 is matched above).
    (Ipv4Addr::new(240, 0, 0, 0), 4, DenyReason::Reserved),
];

/// IPv6 ranges refused by default, first match wins. `::`, `::1` and the forms carrying IPv4 are
/// handled before this table; anything outside `2000::/3` is refused after it.
const V6_DENY: &[(Ipv6Addr, u8, DenyReason)] = &[
    // RFC 4291 §2.7.
    (
        Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
        DenyReason::Multicast,
    ),
    // RFC 4291 §2.5.6.
    (
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
        DenyReason::LinkLocal,
    ),
    // RFC 3879: deprecated site-local, private in all but name.
    (
        Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0),
        10,
        DenyReason::Private,
    ),
    // RFC 4193: unique local.
    (
        Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0),
        7,
        DenyReason::Private,
    ),
    // RFC 6666: discard-only.
    (
        Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0),
        64,
        DenyReason::Reserved,
    ),
    // RFC 4380: Teredo; the obfuscated client address cannot be judged (module docs).
    (
        Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0),
        32,
        DenyReason::Reserved,
    ),
    // RFC 5180: benchmarking.
    (
        Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0),
        48,
        DenyReason::Reserved,
    ),
    // RFC 4843 (deprecated ORCHID) and RFC 7343 (ORCHIDv2): identifiers, not locators.
    (
        Ipv6Addr::new(0x2001, 0x10, 0, 0, 0, 0, 0, 0),
        28,
        DenyReason::Reserved,
    ),
    (
        Ipv6Addr::new(0x2001, 0x20, 0, 0, 0, 0, 0, 0),
        28,
        DenyReason::Reserved,
    ),
    // RFC 3849 and RFC 9637: documentation.
    (
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0),
        32,
        DenyReason::Reserved,
    ),
    (
        Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0),
        20,
        DenyReason::Reserved,
    ),
];

fn in_v4(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

fn in_v6(ip: Ipv6Addr, net: Ipv6Addr, len: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    u128::from(ip) & mask == u128::from(net) & mask
}

/// The reason the default deny list refuses `ip`, or `None` if it is a globally reachable unicast
/// address. Operator rules and own addresses are not consulted; see [`TargetPolicy::check`].
///
/// IPv4: the table above this function (RFC 6890 special-purpose ranges that are not globally
/// reachable, plus multicast, broadcast and 240/4). IPv6: `::`, `::1`, the IPv4-carrying forms
/// judged by their IPv4 address (module docs), multicast, link-local, unique/site-local, discard,
/// Teredo, benchmarking, ORCHID and documentation prefixes, and everything outside `2000::/3`,
/// the only block IANA has allocated for global unicast (this covers the rest of `::/8`, e.g.
/// SIIT `::ffff:0:0:0/96`, and SRv6 `5f00::/16`).
pub fn default_deny(ip: IpAddr) -> Option<DenyReason> {
    match ip {
        IpAddr::V4(v4) => default_deny_v4(v4),
        IpAddr::V6(v6) => default_deny_v6(v6),
    }
}

fn default_deny_v4(ip: Ipv4Addr) -> Option<DenyReason> {
    V4_DENY
        .iter()
        .find(|(net, len, _)| in_v4(ip, *net, *len))
        .map(|(_, _, reason)| *reason)
}

fn default_deny_v6(ip: Ipv6Addr) -> Option<DenyReason> {
    if ip.is_unspecified() {
        return Some(DenyReason::Unspecified);
    }
    if ip.is_loopback() {
        return Some(DenyReason::Loopback);
    }
    if let Some((v4, how)) = embedded_v4(ip) {
        let inner = default_deny_v4(v4);
        return match how {
            Embedding::Mapped | Embedding::Nat64 | Embedding::SixToFour => inner,
            // Deprecated: nothing should route these, but old SIT tunnels still do.
            Embedding::Compatible => inner.or(Some(DenyReason::Reserved)),
            // RFC 8215: not globally reachable, the operator's own translator.
            Embedding::Nat64Local => inner.or(Some(DenyReason::Private)),
        };
    }
    if let Some((_, _, reason)) = V6_DENY.iter().find(|(net, len, _)| in_v6(ip, *net, *len)) {
        return Some(*reason);
    }
    if !in_v6(ip, Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0), 3) {
        return Some(DenyReason::Reserved);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn rule(s: &str) -> AddrRule {
        s.parse().unwrap()
    }

    fn deny_default(s: &str) -> Result<(), DenyReason> {
        TargetPolicy::default().check(sa(s))
    }

    #[test]
    fn parses_the_documented_forms() {
        let cases = [
            ("127.0.0.0/8", "127.0.0.0/8", 1, 65535),
            ("127.0.0.1/32:9000-9100", "127.0.0.1/32", 9000, 9100),
            ("::1/128:53", "::1/128", 53, 53),
            ("[::1]/128:53", "::1/128", 53, 53),
            ("[::1]:53", "::1/128", 53, 53),
            ("[2001:db8::]/32", "2001:db8::/32", 1, 65535),
            ("[::1]", "::1/128", 1, 65535),
            ("127.0.0.1", "127.0.0.1/32", 1, 65535),
            ("::1", "::1/128", 1, 65535),
            ("1.2.3.4:53", "1.2.3.4/32", 53, 53),
            ("1.2.3.4:1-65535", "1.2.3.4/32", 1, 65535),
            ("0.0.0.0/0", "0.0.0.0/0", 1, 65535),
            ("::/0:443", "::/0", 443, 443),
            // Host bits are cleared.
            ("10.1.2.3/8", "10.0.0.0/8", 1, 65535),
            ("[2001:db8::1]/32:7", "2001:db8::/32", 7, 7),
        ];
        for (input, net, start, end) in cases {
            let r = rule(input);
            assert_eq!(r.net, net.parse::<IpNet>().unwrap(), "{input}");
            assert_eq!(r.ports, start..=end, "{input}");
        }
    }

    #[test]
    fn rejects_bad_rules() {
        let cases = [
            ("127.0.0.0/33", RuleError::PrefixLen("33".into())),
            ("1.2.3.4:0", RuleError::PortZero),
            ("1.2.3.4:0-10", RuleError::PortZero),
            (
                "1.2.3.4:200-100",
                RuleError::ReversedRange {
                    start: 200,
                    end: 100,
                },
            ),
            ("::1/129", RuleError::PrefixLen("129".into())),
            ("garbage", RuleError::Address("garbage".into())),
            ("1.2.3.4:70000", RuleError::Port("70000".into())),
            ("", RuleError::Empty),
            ("1.2.3.4/", RuleError::PrefixLen("".into())),
            ("1.2.3.4/+8", RuleError::PrefixLen("+8".into())),
            ("1.2.3.4/8:", RuleError::Port("".into())),
            ("1.2.3.4:+53", RuleError::Port("+53".into())),
            ("1.2.3.4:5:6", RuleError::Port("5:6".into())),
            ("1.2.3.4:1-", RuleError::Port("".into())),
            ("[::1", RuleError::Syntax("[::1".into())),
            ("[::1]x", RuleError::Syntax("[::1]x".into())),
            ("[1.2.3.4]/32", RuleError::Address("1.2.3.4".into())),
            ("fe80::1%eth0", RuleError::Address("fe80::1%eth0".into())),
            ("host.example/32", RuleError::Address("host.example".into())),
            (" 1.2.3.4", RuleError::Address(" 1.2.3.4".into())),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<AddrRule>(), Err(want), "{input:?}");
        }
    }

    #[test]
    fn new_validates_ports_and_truncates() {
        let net: IpNet = "10.9.9.9/8".parse().unwrap();
        assert_eq!(AddrRule::new(net, 0..=5), Err(RuleError::PortZero));
        assert_eq!(
            AddrRule::new(net, RangeInclusive::new(9, 5)),
            Err(RuleError::ReversedRange { start: 9, end: 5 })
        );
        assert_eq!(AddrRule::new(net, 1..=65535), Ok(rule("10.0.0.0/8")));
    }

    #[test]
    fn display_round_trips() {
        for (input, shown) in [
            ("127.0.0.0/8", "127.0.0.0/8"),
            ("127.0.0.1/32:9000-9100", "127.0.0.1/32:9000-9100"),
            ("::1/128:53", "[::1]/128:53"),
            ("[2001:db8::]/32", "2001:db8::/32"),
            ("1.2.3.4:53", "1.2.3.4/32:53"),
            ("127.0.0.0/8:1-65535", "127.0.0.0/8"),
        ] {
            let r = rule(input);
            assert_eq!(r.to_string(), shown, "{input}");
            assert_eq!(rule(shown), r, "{input}");
        }
    }

    #[test]
    fn serde_uses_the_string_form() {
        #[derive(serde::Deserialize, serde::Serialize)]
        struct Cfg {
            allow_targets: Vec<AddrRule>,
        }
        let cfg: Cfg =
            toml::from_str(r#"allow_targets = ["127.0.0.0/8:1-65535", "[::1]:53"]"#).unwrap();
        assert_eq!(
            cfg.allow_targets,
            vec![rule("127.0.0.0/8"), rule("::1/128:53")]
        );
        let text = toml::to_string(&cfg).unwrap();
        assert!(text.contains(r#""127.0.0.0/8""#), "{text}");
        assert!(text.contains(r#""[::1]/128:53""#), "{text}");
        let err = toml::from_str::<Cfg>(r#"allow_targets = ["1.2.3.4:0"]"#)
            .err()
            .unwrap();
        assert!(err.to_string().contains("port 0"), "{err}");
        assert!(toml::from_str::<Cfg>("allow_targets = [5]").is_err());
    }

    #[test]
    fn rule_matching_and_mapped_forms() {
        let r = rule("127.0.0.0/8:9000-9100");
        assert!(r.matches(sa("127.0.0.1:9000")));
        assert!(r.matches(sa("127.255.0.1:9100")));
        assert!(!r.matches(sa("127.0.0.1:8999")));
        assert!(!r.matches(sa("128.0.0.1:9000")));
        assert!(r.matches(sa("[::ffff:127.0.0.1]:9050")));
        // NAT64 is not folded into allow matching.
        assert!(!r.matches(sa("[64:ff9b::127.0.0.1]:9050")));
        // A rule in mapped form matches the plain IPv4 address too.
        let mapped = rule("[::ffff:10.0.0.0]/104");
        assert!(mapped.matches(sa("10.1.2.3:5")));
        assert!(mapped.matches(sa("[::ffff:10.1.2.3]:5")));
        assert!(!mapped.matches(sa("11.1.2.3:5")));
    }

    #[test]
    fn deny_reason_labels() {
        let all = [
            (DenyReason::Loopback, "loopback"),
            (DenyReason::Private, "private"),
            (DenyReason::LinkLocal, "link_local"),
            (DenyReason::SharedAddressSpace, "shared_address_space"),
            (DenyReason::Multicast, "multicast"),
            (DenyReason::Broadcast, "broadcast"),
            (DenyReason::Unspecified, "unspecified"),
            (DenyReason::Reserved, "reserved"),
            (DenyReason::OwnAddress, "own_address"),
            (DenyReason::Operator, "operator"),
            (DenyReason::PortZero, "port_zero"),
        ];
        for (reason, label) in all {
            assert_eq!(reason.as_str(), label);
            assert!(!reason.to_string().is_empty());
        }
    }

    #[test]
    fn default_denies_each_v4_class() {
        use DenyReason::*;
        let cases = [
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("10.0.0.1", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("169.254.169.254", LinkLocal),
            ("100.64.0.1", SharedAddressSpace),
            ("100.127.255.255", SharedAddressSpace),
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("255.255.255.255", Broadcast),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Reserved),
            ("240.0.0.1", Reserved),
            ("255.255.255.254", Reserved),
            ("192.0.0.170", Reserved),
            ("192.0.2.6", Reserved),
            ("198.51.100.1", Reserved),
            ("203.0.113.9", Reserved),
            ("198.18.0.1", Reserved),
            ("198.19.255.255", Reserved),
            ("192.88.99.1", Reserved),
        ];
        for (ip, want) in cases {
            assert_eq!(deny_default(&format!("{ip}:443")), Err(want), "{ip}");
        }
    }

    #[test]
    fn default_denies_each_v6_class() {
        use DenyReason::*;
        let cases = [
            ("::1", Loopback),
            ("::", Unspecified),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("fc00::1", Private),
            ("fd12:3456::1", Private),
            ("fec0::1", Private),
            ("ff02::1", Multicast),
            ("ff0e::1", Multicast),
            ("100::1", Reserved),
            ("2001:db8::1", Reserved),
            ("3fff::1", Reserved),
            ("2001:2::1", Reserved),
            ("2001:20::1", Reserved),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", Reserved), // Teredo
            ("::ffff:0:808:808", Reserved),                     // SIIT, outside 2000::/3
            ("5f00::1", Reserved),
            ("4000::1", Reserved),
            ("::8.8.8.8", Reserved), // IPv4-compatible, deprecated
            ("64:ff9b:1::8.8.8.8", Private),
        ];
        for (ip, want) in cases {
            assert_eq!(deny_default(&format!("[{ip}]:443")), Err(want), "{ip}");
        }
    }

    #[test]
    fn embedded_ipv4_is_judged_as_ipv4() {
        use DenyReason::*;
        let v4_cases = [
            ("127.0.0.1", Loopback),
            ("10.1.2.3", Private),
            ("172.20.0.1", Private),
            ("192.168.0.1", Private),
            ("169.254.1.1", LinkLocal),
            ("100.64.1.1", SharedAddressSpace),
            ("224.0.0.251", Multicast),
            ("255.255.255.255", Broadcast),
            ("0.0.0.0", Unspecified),
            ("240.1.1.1", Reserved),
        ];
        for (v4, want) in v4_cases {
            let v4: Ipv4Addr = v4.parse().unwrap();
            let o = v4.octets();
            let forms = [
                format!("::ffff:{v4}"),
                format!("64:ff9b::{v4}"),
                format!("64:ff9b:1::{v4}"),
                format!("::{v4}"),
                format!("2002:{:02x}{:02x}:{:02x}{:02x}::1", o[0], o[1], o[2], o[3]),
            ];
            for form in forms {
                let ip: Ipv6Addr = form.parse().unwrap();
                // `::0.0.0.0` is `::` itself, which is Unspecified anyway.
                assert_eq!(
                    default_deny(IpAddr::V6(ip)),
                    Some(want),
                    "{form} carrying {v4}"
                );
            }
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        for t in [
            "8.8.8.8:53",
            "1.1.1.1:443",
            "[2606:4700::1111]:443",
            "[2001:4860:4860::8888]:53",
            "[::ffff:8.8.8.8]:53",
            "[64:ff9b::1.1.1.1]:443",
            "[2002:0808:0808::1]:443",
            "100.63.255.255:1",
            "100.128.0.0:1",
            "172.15.255.255:1",
            "172.32.0.0:1",
            "223.255.255.255:1",
            "[2001:1::1]:1", // PCP anycast in 2001::/23 but outside Teredo
        ] {
            assert_eq!(deny_default(t), Ok(()), "{t}");
        }
    }

    #[test]
    fn port_zero_first() {
        let p = TargetPolicy::new(vec![rule("0.0.0.0/0")], vec![], vec![]);
        assert_eq!(p.check(sa("8.8.8.8:0")), Err(DenyReason::PortZero));
        assert_eq!(p.check(sa("127.0.0.1:0")), Err(DenyReason::PortZero));
    }

    #[test]
    fn allow_overrides_default_for_its_ports_only() {
        let p = TargetPolicy::new(vec![rule("127.0.0.0/8:9000-9100")], vec![], vec![]);
        assert_eq!(p.check(sa("127.0.0.1:9000")), Ok(()));
        assert_eq!(p.check(sa("127.1.2.3:9100")), Ok(()));
        assert_eq!(p.check(sa("[::ffff:127.0.0.1]:9050")), Ok(()));
        assert_eq!(p.check(sa("127.0.0.1:9101")), Err(DenyReason::Loopback));
        assert_eq!(
            p.check(sa("[::ffff:127.0.0.1]:80")),
            Err(DenyReason::Loopback)
        );
        // Not carried over to translated forms.
        assert_eq!(
            p.check(sa("[64:ff9b::127.0.0.1]:9050")),
            Err(DenyReason::Loopback)
        );
        assert_eq!(p.check(sa("[::1]:9000")), Err(DenyReason::Loopback));
        assert_eq!(p.check(sa("10.0.0.1:9000")), Err(DenyReason::Private));

        let v6 = TargetPolicy::new(vec![rule("::1")], vec![], vec![]);
        assert_eq!(v6.check(sa("[::1]:53")), Ok(()));
        assert_eq!(v6.check(sa("127.0.0.1:53")), Err(DenyReason::Loopback));
    }

    #[test]
    fn deny_beats_allow_and_follows_embedded_forms() {
        let p = TargetPolicy::new(
            vec![rule("127.0.0.0/8"), rule("0.0.0.0/0"), rule("::/0")],
            vec![rule("127.0.0.2"), rule("8.8.8.0/24:53")],
            vec![],
        );
        assert_eq!(p.check(sa("127.0.0.1:5")), Ok(()));
        assert_eq!(p.check(sa("127.0.0.2:5")), Err(DenyReason::Operator));
        assert_eq!(
            p.check(sa("[::ffff:127.0.0.2]:5")),
            Err(DenyReason::Operator)
        );
        assert_eq!(p.check(sa("8.8.8.8:53")), Err(DenyReason::Operator));
        assert_eq!(p.check(sa("8.8.8.8:54")), Ok(()));
        assert_eq!(
            p.check(sa("[64:ff9b::8.8.8.8]:53")),
            Err(DenyReason::Operator)
        );
        assert_eq!(
            p.check(sa("[2002:808:808::1]:53")),
            Err(DenyReason::Operator)
        );
        assert_eq!(p.check(sa("[::8.8.8.8]:53")), Err(DenyReason::Operator));
        // Deny also beats own-address (it is checked first).
        let q = TargetPolicy::new(vec![], vec![rule("127.0.0.1")], vec![sa("127.0.0.1:4433")]);
        assert_eq!(q.check(sa("127.0.0.1:4433")), Err(DenyReason::Operator));
    }

    #[test]
    fn own_address_is_refused_even_when_allowed() {
        let allow_all = vec![rule("0.0.0.0/0"), rule("::/0")];
        let p = TargetPolicy::new(
            allow_all.clone(),
            vec![],
            vec![sa("127.0.0.1:4433"), sa("[2606:4700::1]:443")],
        );
        assert_eq!(p.check(sa("127.0.0.1:4433")), Err(DenyReason::OwnAddress));
        assert_eq!(
            p.check(sa("[::ffff:127.0.0.1]:4433")),
            Err(DenyReason::OwnAddress)
        );
        assert_eq!(p.check(sa("127.0.0.1:4434")), Ok(()));
        assert_eq!(p.check(sa("127.0.0.2:4433")), Ok(()));
        assert_eq!(
            p.check(sa("[2606:4700::1]:443")),
            Err(DenyReason::OwnAddress)
        );
        // Scope and flow label do not make it a different destination.
        let scoped = SocketAddr::V6(std::net::SocketAddrV6::new(
            "2606:4700::1".parse().unwrap(),
            443,
            7,
            3,
        ));
        assert_eq!(p.check(scoped), Err(DenyReason::OwnAddress));

        // Own address given in mapped form, own public address reached through NAT64.
        let q = TargetPolicy::new(
            allow_all.clone(),
            vec![],
            vec![sa("[::ffff:198.51.100.7]:443")],
        );
        assert_eq!(q.check(sa("198.51.100.7:443")), Err(DenyReason::OwnAddress));
        assert_eq!(
            q.check(sa("[64:ff9b::198.51.100.7]:443")),
            Err(DenyReason::OwnAddress)
        );

        // Unspecified own address: that port on loopback/unspecified of either family.
        let any = TargetPolicy::new(allow_all, vec![], vec![sa("0.0.0.0:443"), sa("[::]:8443")]);
        for t in [
            "127.0.0.1:443",
            "127.9.9.9:443",
            "0.0.0.0:443",
            "[::1]:443",
            "[::ffff:127.0.0.1]:443",
            "[::1]:8443",
            "127.0.0.1:8443",
            "[::]:8443",
        ] {
            assert_eq!(any.check(sa(t)), Err(DenyReason::OwnAddress), "{t}");
        }
        assert_eq!(any.check(sa("127.0.0.1:444")), Ok(()));
        assert_eq!(any.check(sa("8.8.8.8:443")), Ok(()));
    }

    fn arb_port_range() -> impl Strategy<Value = RangeInclusive<u16>> {
        (1u16..=65535, 1u16..=65535).prop_map(|(a, b)| a.min(b)..=a.max(b))
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u32>(), 0u8..=32)
                .prop_map(|(a, l)| IpNet::new(IpAddr::V4(a.into()), l).unwrap()),
            (any::<u128>(), 0u8..=128)
                .prop_map(|(a, l)| IpNet::new(IpAddr::V6(a.into()), l).unwrap()),
        ]
    }

    proptest! {
        #[test]
        fn loopback_and_private_denied_and_allowable(
            host in any::<u32>(),
            ten in any::<bool>(),
            port in 1u16..=65535,
            mapped in any::<bool>(),
        ) {
            let (v4, rule_text, reason) = if ten {
                (Ipv4Addr::from(0x0a00_0000 | (host & 0x00ff_ffff)), "10.0.0.0/8", DenyReason::Private)
            } else {
                (Ipv4Addr::from(0x7f00_0000 | (host & 0x00ff_ffff)), "127.0.0.0/8", DenyReason::Loopback)
            };
            let ip = if mapped { IpAddr::V6(v4.to_ipv6_mapped()) } else { IpAddr::V4(v4) };
            let target = SocketAddr::new(ip, port);
            prop_assert_eq!(TargetPolicy::default().check(target), Err(reason));
            let allowed = TargetPolicy::new(vec![rule(rule_text)], vec![], vec![]);
            prop_assert_eq!(allowed.check(target), Ok(()));
            let other_port = if port == 1 { 2 } else { 1 };
            let narrow = TargetPolicy::new(
                vec![AddrRule::new(rule_text.parse().unwrap(), port..=port).unwrap()],
                vec![],
                vec![],
            );
            prop_assert_eq!(narrow.check(target), Ok(()));
            prop_assert_eq!(narrow.check(SocketAddr::new(ip, other_port)), Err(reason));
        }

        #[test]
        fn embedded_forms_agree_with_ipv4(bits in any::<u32>()) {
            let v4 = Ipv4Addr::from(bits);
            let want = default_deny(IpAddr::V4(v4));
            let o = v4.octets();
            let mapped = v4.to_ipv6_mapped();
            let nat64 = Ipv6Addr::from((0x0064_ff9b_u128 << 96) | u128::from(bits));
            let six_to_four = Ipv6Addr::new(
                0x2002,
                u16::from_be_bytes([o[0], o[1]]),
                u16::from_be_bytes([o[2], o[3]]),
                0, 0, 0, 0, 1,
            );
            for ip in [mapped, nat64, six_to_four] {
                prop_assert_eq!(default_deny(IpAddr::V6(ip)), want, "{}", ip);
            }
        }

        #[test]
        fn display_from_str_round_trip(net in arb_net(), ports in arb_port_range()) {
            let r = AddrRule::new(net, ports).unwrap();
            let text = r.to_string();
            prop_assert_eq!(text.parse::<AddrRule>(), Ok(r), "{}", text);
        }

        #[test]
        fn parser_never_panics(s in "\\PC{0,40}") {
            let _ = s.parse::<AddrRule>();
        }

        #[test]
        fn parser_never_panics_on_rule_like_text(s in "[\\[\\]0-9a-f.:/-]{0,45}") {
            if let Ok(r) = s.parse::<AddrRule>() {
                prop_assert!(*r.ports.start() >= 1 && r.ports.start() <= r.ports.end());
                prop_assert_eq!(r.to_string().parse::<AddrRule>(), Ok(r));
            }
        }
    }
}
