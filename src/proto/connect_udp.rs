//! The CONNECT-UDP request rules (RFC 9298 §3), shared by every HTTP version.
//!
//! A transport pulls the few fields that matter out of its own request representation into a
//! [`RequestHead`] and calls [`check_request`]; the answer is either the target to resolve or a
//! [`Rejection`] with the status code and `Proxy-Status` to send. Keeping this in one place is
//! what keeps HTTP/1.1, HTTP/2 and HTTP/3 from drifting apart.

use super::sf::{self, ProxyError};
use super::target::{parse_target, Target, TargetError};
use super::uri_template::UriTemplate;

/// The HTTP version the request arrived on; the method and framing rules differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http11,
    Http2,
    Http3,
}

impl HttpVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpVersion::Http11 => "http1",
            HttpVersion::Http2 => "h2",
            HttpVersion::Http3 => "h3",
        }
    }
}

/// The parts of a request this module looks at, borrowed from the transport's representation.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub version: HttpVersion,
    pub method: &'a str,
    /// `:protocol` (HTTP/2, HTTP/3) or the `Upgrade` header value (HTTP/1.1).
    pub protocol: Option<&'a str>,
    /// `:scheme`; HTTP/1.1 has none.
    pub scheme: Option<&'a str>,
    /// `:authority` or `Host`.
    pub authority: Option<&'a str>,
    /// `:path` or the request-target: path and query.
    pub path: Option<&'a str>,
    /// The `Capsule-Protocol` header value, if present.
    pub capsule_protocol: Option<&'a [u8]>,
}

/// A request as any HTTP version hands it to the admission pipeline, owning its fields (it may
/// wait for a name to resolve).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRequest {
    pub version: HttpVersion,
    pub method: String,
    pub protocol: Option<String>,
    pub scheme: Option<String>,
    pub authority: Option<String>,
    pub path: Option<String>,
    pub capsule_protocol: Option<Vec<u8>>,
    pub proxy_authorization: Option<Vec<u8>>,
}

impl OwnedRequest {
    /// The view [`check_request`] takes.
    pub fn head(&self) -> RequestHead<'_> {
        RequestHead {
            version: self.version,
            method: &self.method,
            protocol: self.protocol.as_deref(),
            scheme: self.scheme.as_deref(),
            authority: self.authority.as_deref(),
            path: self.path.as_deref(),
            capsule_protocol: self.capsule_protocol.as_deref(),
        }
    }
}

/// A refused request: what to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    /// The `Proxy-Status` error, when the refusal is the proxy's (RFC 9209).
    pub proxy_error: Option<ProxyError>,
    /// A short human-readable reason, for the log and `Proxy-Status` details.
    pub details: String,
}

impl Rejection {
    pub fn new(status: u16, proxy_error: Option<ProxyError>, details: impl Into<String>) -> Self {
        Self {
            status,
            proxy_error,
            details: details.into(),
        }
    }

    /// The `Proxy-Status` header value, if this refusal carries one.
    pub fn proxy_status(&self) -> Option<String> {
        self.proxy_error
            .map(|e| sf::proxy_status(PROXY_NAME, e, Some(&self.details)))
    }

    /// The header fields this refusal carries besides its status, the same on every HTTP
    /// version (names in lower case):
    /// - `proxy-status` (RFC 9209) when the proxy refused;
    /// - `allow` on 405: RFC 9110 §15.5.6 says the origin server "MUST generate an Allow header
    ///   field in a 405 response containing a list of the target resource's currently supported
    ///   methods": GET (with Upgrade) on HTTP/1.1, CONNECT on HTTP/2 and HTTP/3;
    /// - `proxy-authenticate` with `challenge` on 407 (RFC 9110 §15.5.8).
    pub fn header_fields(
        &self,
        version: HttpVersion,
        challenge: &str,
    ) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(2);
        if let Some(ps) = self.proxy_status() {
            out.push(("proxy-status", ps));
        }
        match self.status {
            405 => out.push((
                "allow",
                match version {
                    HttpVersion::Http11 => "GET",
                    HttpVersion::Http2 | HttpVersion::Http3 => "CONNECT",
                }
                .to_owned(),
            )),
            407 => out.push(("proxy-authenticate", challenge.to_owned())),
            _ => {}
        }
        out
    }
}

/// The name this relay gives itself in `Proxy-Status`.
pub const PROXY_NAME: &str = sf::DEFAULT_PROXY_NAME;
/// The HTTP Upgrade Token of RFC 9298 §3.
pub const UPGRADE_TOKEN: &str = "connect-udp";

/// Checks a request against RFC 9298 §3 and the configured template; returns the target.
pub fn check_request(head: &RequestHead<'_>, template: &UriTemplate) -> Result<Target, Rejection> {
    let malformed = |why: &str| Rejection::new(400, Some(ProxyError::HttpRequestError), why);
    match head.version {
        HttpVersion::Http11 => {
            // RFC 9298 §3.2: the method is GET and the request upgrades to "connect-udp".
            if head.method != "GET" {
                return Err(Rejection::new(405, None, "method must be GET with Upgrade"));
            }
            match head.protocol {
                Some(p) if has_token(p, UPGRADE_TOKEN) => {}
                _ => return Err(malformed("Upgrade must be connect-udp")),
            }
        }
        HttpVersion::Http2 | HttpVersion::Http3 => {
            // RFC 9298 §3.4 (with RFC 8441 / RFC 9220): extended CONNECT with
            // :protocol = connect-udp, and :scheme, :path and :authority all present.
            if head.method != "CONNECT" {
                return Err(Rejection::new(405, None, "method must be CONNECT"));
            }
            match head.protocol {
                Some(UPGRADE_TOKEN) => {}
                Some(_) => return Err(Rejection::new(501, None, "unsupported :protocol")),
                None => return Err(Rejection::new(501, None, "CONNECT without :protocol")),
            }
            match head.scheme {
                Some("https" | "http") => {}
                Some(_) => return Err(malformed("unsupported :scheme")),
                None => return Err(malformed("missing :scheme")),
            }
        }
    }
    if head.authority.is_none_or(|a| a.is_empty()) {
        return Err(malformed("missing authority"));
    }
    // RFC 9297 §3.4: Capsule-Protocol is a Boolean; only ?1 means the capsule protocol is in
    // use. connect-udp always uses it, so an absent header is accepted, but a client that states
    // anything else is refused rather than silently relayed with the wrong framing.
    if let Some(v) = head.capsule_protocol {
        if !sf::capsule_protocol_is_true(v) {
            return Err(malformed("Capsule-Protocol is not ?1"));
        }
    }
    let path = head.path.ok_or_else(|| malformed("missing path"))?;
    let m = template
        .match_path(path)
        .ok_or_else(|| Rejection::new(404, None, "path does not match the URI template"))?;
    parse_target(m.target_host, m.target_port).map_err(|e| target_rejection(&e))
}

fn target_rejection(e: &TargetError) -> Rejection {
    Rejection::new(400, Some(ProxyError::HttpRequestError), e.to_string())
}

/// True if the comma-separated header value contains `token` (case-insensitive).
pub fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::target::TargetHost;

    fn template() -> UriTemplate {
        "/.well-known/masque/udp/{target_host}/{target_port}/"
            .parse()
            .unwrap()
    }

    fn h2<'a>(path: &'a str) -> RequestHead<'a> {
        RequestHead {
            version: HttpVersion::Http2,
            method: "CONNECT",
            protocol: Some("connect-udp"),
            scheme: Some("https"),
            authority: Some("relay.example:443"),
            path: Some(path),
            capsule_protocol: Some(b"?1"),
        }
    }

    #[test]
    fn accepts_the_rfc_example() {
        let t = check_request(&h2("/.well-known/masque/udp/192.0.2.6/443/"), &template()).unwrap();
        assert_eq!(t.host, TargetHost::Ip("192.0.2.6".parse().unwrap()));
        assert_eq!(t.port, 443);
    }

    #[test]
    fn http11_upgrade() {
        let mut head = h2("/.well-known/masque/udp/example.com/53/");
        head.version = HttpVersion::Http11;
        head.method = "GET";
        head.protocol = Some("foo, Connect-UDP");
        head.scheme = None;
        assert!(check_request(&head, &template()).is_ok());
        head.method = "CONNECT";
        assert_eq!(check_request(&head, &template()).unwrap_err().status, 405);
        head.method = "GET";
        head.protocol = Some("websocket");
        assert_eq!(check_request(&head, &template()).unwrap_err().status, 400);
    }

    #[test]
    fn status_for_each_refusal() {
        let t = template();
        let status = |h: RequestHead<'_>| check_request(&h, &t).unwrap_err().status;
        let p = "/.well-known/masque/udp/192.0.2.6/443/";
        assert_eq!(
            status(RequestHead {
                method: "GET",
                ..h2(p)
            }),
            405
        );
        assert_eq!(
            status(RequestHead {
                protocol: Some("websocket"),
                ..h2(p)
            }),
            501
        );
        assert_eq!(
            status(RequestHead {
                protocol: None,
                ..h2(p)
            }),
            501
        );
        assert_eq!(
            status(RequestHead {
                scheme: None,
                ..h2(p)
            }),
            400
        );
        assert_eq!(
            status(RequestHead {
                authority: None,
                ..h2(p)
            }),
            400
        );
        assert_eq!(
            status(RequestHead {
                path: None,
                ..h2(p)
            }),
            400
        );
        assert_eq!(
            status(RequestHead {
                capsule_protocol: Some(b"?0"),
                ..h2(p)
            }),
            400
        );
        assert_eq!(status(h2("/other/192.0.2.6/443/")), 404);
        for bad in [
            "/.well-known/masque/udp/192.0.2.6/0/",
            "/.well-known/masque/udp/192.0.2.6/65536/",
            "/.well-known/masque/udp/192.0.2.6/44x/",
            "/.well-known/masque/udp/192.0.2.6//",
            "/.well-known/masque/udp//443/",
            "/.well-known/masque/udp/fe80%3A%3A1%25eth0/443/",
        ] {
            assert_eq!(status(h2(bad)), 400, "{bad}");
        }
    }

    #[test]
    fn absent_capsule_protocol_is_accepted() {
        let head = RequestHead {
            capsule_protocol: None,
            ..h2("/.well-known/masque/udp/192.0.2.6/443/")
        };
        assert!(check_request(&head, &template()).is_ok());
    }

    #[test]
    fn rejection_carries_proxy_status() {
        let r =
            check_request(&h2("/.well-known/masque/udp/192.0.2.6/0/"), &template()).unwrap_err();
        let ps = r.proxy_status().unwrap();
        assert!(
            ps.starts_with("masque-relay; error=http_request_error"),
            "{ps}"
        );
    }
}
