//! The few Structured Field (RFC 8941, updated by RFC 9651) pieces the relay needs: reading the
//! `Capsule-Protocol` Boolean (RFC 9297 §3.4) and writing `Proxy-Status` (RFC 9209) values.
//!
//! Parsing is strict where the answer matters (only a well-formed `?1` item means true, since
//! anything malformed must be treated as an absent field) and writing always produces valid,
//! printable-ASCII field values, whatever text callers hand in.

use std::fmt;

/// Proxy name (an sf-token) callers put in `Proxy-Status` unless configured otherwise.
pub const DEFAULT_PROXY_NAME: &str = "masque-relay";

/// RFC 8941 §3.3.6 Boolean as a whole field value for `Capsule-Protocol` (RFC 9297 §3.4): returns
/// true only for `?1` (parameters allowed and ignored, e.g. `?1;foo=bar`; surrounding OWS
/// trimmed); `?0`, `1`, `true`, `?`, `?2`, empty, garbage → false. Takes the raw bytes (header
/// values may not be UTF-8).
///
/// If the field appears on several lines, pass them joined with `", "` (RFC 8941 §4.2): the
/// value is then a List, which is not a Boolean, so the answer is false.
pub fn capsule_protocol_is_true(value: &[u8]) -> bool {
    //= https://www.rfc-editor.org/rfc/rfc9297#section-3.4
    //# The "Capsule-Protocol" header field is an Item Structured Field; see
    //# Section 3.3 of [STRUCTURED-FIELDS].  Its value MUST be a Boolean; any
    //# other value type MUST be handled as if the field were not present by
    //# recipients (for example, if this field is included multiple times,
    //# its type will become a List and the field will be ignored).  This
    //# document does not define any parameters for the Capsule-Protocol
    //# header field value, but future documents might define parameters.
    //# Receivers MUST ignore unknown parameters.
    //
    // An item that fails to parse is not a Boolean either, so parameters are parsed (and must be
    // well formed) even though their values are ignored.
    let value = trim_ows(value);

    //= https://www.rfc-editor.org/rfc/rfc8941#section-3.3.6
    //# sf-boolean = "?" boolean
    //# boolean    = "0" / "1"
    let Some(rest) = value.strip_prefix(b"?1") else {
        return false;
    };
    matches!(parse_parameters(rest), Some(b""))
}

/// Strips leading and trailing OWS (SP / HTAB). RFC 8941 §4.2 discards SP around the item; the
/// HTTP layer already strips HTAB from field values, but callers may hand in raw values.
fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Parses `*( ";" *SP parameter )` and returns what follows, or `None` if malformed.
fn parse_parameters(mut s: &[u8]) -> Option<&[u8]> {
    //= https://www.rfc-editor.org/rfc/rfc8941#section-3.1.2
    //# parameters    = *( ";" *SP parameter )
    //# parameter     = param-key [ "=" param-value ]
    //# param-key     = key
    //# key           = ( lcalpha / "*" )
    //#                 *( lcalpha / DIGIT / "_" / "-" / "." / "*" )
    //# lcalpha       = %x61-7A ; a-z
    //# param-value   = bare-item
    while let [b';', rest @ ..] = s {
        s = parse_key(skip_sp(rest))?;
        if let [b'=', rest @ ..] = s {
            s = parse_bare_item(rest)?;
        }
    }
    Some(s)
}

fn skip_sp(mut s: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = s {
        s = rest;
    }
    s
}

fn parse_key(s: &[u8]) -> Option<&[u8]> {
    match s.first() {
        Some(b'a'..=b'z' | b'*') => {}
        _ => return None,
    }
    let len = s
        .iter()
        .position(|c| !matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'*'))
        .unwrap_or(s.len());
    Some(&s[len..])
}

/// Parses one bare item (RFC 8941 §4.2.3.1, plus RFC 9651's Date and Display String) and
/// returns what follows it, or `None` if malformed.
fn parse_bare_item(s: &[u8]) -> Option<&[u8]> {
    match *s.first()? {
        b'-' | b'0'..=b'9' => parse_number(s).map(|(rest, _)| rest),
        b'"' => parse_string(s).map(|(rest, _)| rest),
        c if c.is_ascii_alphabetic() || c == b'*' => Some(&s[token_len(s)..]),
        b':' => parse_byte_sequence(s),
        b'?' => match s.get(1)? {
            b'0' | b'1' => Some(&s[2..]),
            _ => None,
        },
        b'@' => match parse_number(&s[1..])? {
            (rest, true) => Some(rest),
            (_, false) => None,
        },
        b'%' => parse_display_string(s),
        _ => None,
    }
}

/// RFC 8941 §4.2.4. Returns the rest and whether the number was an Integer (not a Decimal).
fn parse_number(s: &[u8]) -> Option<(&[u8], bool)> {
    let digits_at = usize::from(s.first() == Some(&b'-'));
    if !s.get(digits_at)?.is_ascii_digit() {
        return None;
    }
    let mut len = 0; // characters of input_number: digits and at most one "."
    let mut dot_at = None;
    for &c in &s[digits_at..] {
        if c == b'.' && dot_at.is_none() {
            if len > 12 {
                return None;
            }
            dot_at = Some(len);
        } else if !c.is_ascii_digit() {
            break;
        }
        len += 1;
        let limit = if dot_at.is_some() { 16 } else { 15 };
        if len > limit {
            return None;
        }
    }
    if let Some(dot) = dot_at {
        let fraction = len - dot - 1;
        if fraction == 0 || fraction > 3 {
            return None;
        }
    }
    Some((&s[digits_at + len..], dot_at.is_none()))
}

/// RFC 8941 §4.2.5. Returns the rest and the unescaped string.
fn parse_string(s: &[u8]) -> Option<(&[u8], Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 1;
    loop {
        match *s.get(i)? {
            b'\\' => match *s.get(i + 1)? {
                c @ (b'"' | b'\\') => {
                    out.push(c);
                    i += 2;
                }
                _ => return None,
            },
            b'"' => return Some((&s[i + 1..], out)),
            c @ 0x20..=0x7e => {
                out.push(c);
                i += 1;
            }
            _ => return None,
        }
    }
}

/// RFC 8941 §4.2.6: a token runs to the first character that is not tchar, ":" or "/".
fn token_len(s: &[u8]) -> usize {
    s.iter()
        .position(|&c| !(is_tchar(c) || c == b':' || c == b'/'))
        .unwrap_or(s.len())
}

/// tchar (RFC 9110 §5.6.2).
fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// RFC 8941 §4.2.7: base64 characters between colons.
fn parse_byte_sequence(s: &[u8]) -> Option<&[u8]> {
    let body = &s[1..];
    let end = body
        .iter()
        .position(|&c| !(c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=')))?;
    (body[end] == b':').then(|| &body[end + 1..])
}

/// RFC 9651 §4.2.10: `%"`, printable ASCII and lowercase `%xx` escapes, `"`; must be UTF-8.
fn parse_display_string(s: &[u8]) -> Option<&[u8]> {
    if s.get(1) != Some(&b'"') {
        return None;
    }
    let mut bytes = Vec::new();
    let mut i = 2;
    loop {
        match *s.get(i)? {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                if !hex.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
                    return None;
                }
                let hex = std::str::from_utf8(hex).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'"' => {
                std::str::from_utf8(&bytes).ok()?;
                return Some(&s[i + 1..]);
            }
            c @ 0x20..=0x7e => {
                bytes.push(c);
                i += 1;
            }
            _ => return None,
        }
    }
}

/// A Proxy Error Type (RFC 9209 §2.3), the value of `Proxy-Status`'s `error` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyError {
    DnsTimeout,
    DnsError,
    DestinationNotFound,
    DestinationUnavailable,
    DestinationIpProhibited,
    DestinationIpUnroutable,
    ConnectionRefused,
    ConnectionTerminated,
    ConnectionTimeout,
    ConnectionReadTimeout,
    ConnectionWriteTimeout,
    ConnectionLimitReached,
    TlsProtocolError,
    TlsCertificateError,
    TlsAlertReceived,
    HttpRequestError,
    HttpRequestDenied,
    HttpResponseIncomplete,
    HttpResponseHeaderSectionSize,
    HttpResponseHeaderSize,
    HttpResponseBodySize,
    HttpResponseTrailerSectionSize,
    HttpResponseTrailerSize,
    HttpResponseTransferCoding,
    HttpResponseContentCoding,
    HttpResponseTimeout,
    HttpUpgradeFailed,
    HttpProtocolError,
    ProxyInternalResponse,
    ProxyInternalError,
    ProxyConfigurationError,
    ProxyLoopDetected,
}

impl ProxyError {
    /// Every type RFC 9209 §2.3 defines, in the RFC's order.
    pub const ALL: [ProxyError; 32] = [
        Self::DnsTimeout,
        Self::DnsError,
        Self::DestinationNotFound,
        Self::DestinationUnavailable,
        Self::DestinationIpProhibited,
        Self::DestinationIpUnroutable,
        Self::ConnectionRefused,
        Self::ConnectionTerminated,
        Self::ConnectionTimeout,
        Self::ConnectionReadTimeout,
        Self::ConnectionWriteTimeout,
        Self::ConnectionLimitReached,
        Self::TlsProtocolError,
        Self::TlsCertificateError,
        Self::TlsAlertReceived,
        Self::HttpRequestError,
        Self::HttpRequestDenied,
        Self::HttpResponseIncomplete,
        Self::HttpResponseHeaderSectionSize,
        Self::HttpResponseHeaderSize,
        Self::HttpResponseBodySize,
        Self::HttpResponseTrailerSectionSize,
        Self::HttpResponseTrailerSize,
        Self::HttpResponseTransferCoding,
        Self::HttpResponseContentCoding,
        Self::HttpResponseTimeout,
        Self::HttpUpgradeFailed,
        Self::HttpProtocolError,
        Self::ProxyInternalResponse,
        Self::ProxyInternalError,
        Self::ProxyConfigurationError,
        Self::ProxyLoopDetected,
    ];

    /// The registered name, e.g. `"destination_ip_prohibited"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::DnsTimeout => "dns_timeout",
            Self::DnsError => "dns_error",
            Self::DestinationNotFound => "destination_not_found",
            Self::DestinationUnavailable => "destination_unavailable",
            Self::DestinationIpProhibited => "destination_ip_prohibited",
            Self::DestinationIpUnroutable => "destination_ip_unroutable",
            Self::ConnectionRefused => "connection_refused",
            Self::ConnectionTerminated => "connection_terminated",
            Self::ConnectionTimeout => "connection_timeout",
            Self::ConnectionReadTimeout => "connection_read_timeout",
            Self::ConnectionWriteTimeout => "connection_write_timeout",
            Self::ConnectionLimitReached => "connection_limit_reached",
            Self::TlsProtocolError => "tls_protocol_error",
            Self::TlsCertificateError => "tls_certificate_error",
            Self::TlsAlertReceived => "tls_alert_received",
            Self::HttpRequestError => "http_request_error",
            Self::HttpRequestDenied => "http_request_denied",
            Self::HttpResponseIncomplete => "http_response_incomplete",
            Self::HttpResponseHeaderSectionSize => "http_response_header_section_size",
            Self::HttpResponseHeaderSize => "http_response_header_size",
            Self::HttpResponseBodySize => "http_response_body_size",
            Self::HttpResponseTrailerSectionSize => "http_response_trailer_section_size",
            Self::HttpResponseTrailerSize => "http_response_trailer_size",
            Self::HttpResponseTransferCoding => "http_response_transfer_coding",
            Self::HttpResponseContentCoding => "http_response_content_coding",
            Self::HttpResponseTimeout => "http_response_timeout",
            Self::HttpUpgradeFailed => "http_upgrade_failed",
            Self::HttpProtocolError => "http_protocol_error",
            Self::ProxyInternalResponse => "proxy_internal_response",
            Self::ProxyInternalError => "proxy_internal_error",
            Self::ProxyConfigurationError => "proxy_configuration_error",
            Self::ProxyLoopDetected => "proxy_loop_detected",
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Proxy-Status (RFC 9209): formats `<proxy-name>; error=<error_type>` plus optional
/// `details="..."` (sf-string: `"` and `\` escaped, non-printable-ASCII characters dropped).
///
/// For more parameters (`rcode`, `info-code`, `next-hop`) use [`ProxyStatus`].
pub fn proxy_status(proxy_name: &str, error: ProxyError, details: Option<&str>) -> String {
    let status = ProxyStatus::new(proxy_name, error);
    match details {
        Some(details) => status.details(details),
        None => status,
    }
    .into_string()
}

/// Builds one `Proxy-Status` list member: the proxy name, then `error`, then parameters in the
/// order they are added. Any text argument is made safe: the result is always a valid
/// structured field of printable ASCII.
///
/// A parameter added twice appears twice; recipients keep the last (RFC 8941 §4.2.3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyStatus {
    value: String,
}

impl ProxyStatus {
    /// `<proxy-name>; error=<error_type>`. The name is written as a Token when it is one (as
    /// [`DEFAULT_PROXY_NAME`] is), otherwise as a String.
    pub fn new(proxy_name: &str, error: ProxyError) -> Self {
        // RFC 9209 §2: each member's value identifies the intermediary and is a String or Token.
        let mut value = String::with_capacity(64);
        push_token_or_string(&mut value, proxy_name);

        //= https://www.rfc-editor.org/rfc/rfc9209#section-2.1.1
        //# The error parameter's value is a Token that is a proxy error type.
        value.push_str("; error=");
        value.push_str(error.as_str());
        Self { value }
    }

    //= https://www.rfc-editor.org/rfc/rfc9209#section-2.1.5
    //# The details parameter's value is a String containing additional
    //# information not captured anywhere else.
    /// Adds `details="..."`.
    pub fn details(mut self, details: &str) -> Self {
        self.value.push_str("; details=");
        push_sf_string(&mut self.value, details);
        self
    }

    //= https://www.rfc-editor.org/rfc/rfc9209#section-2.3.2
    //# rcode:  A String conveying the DNS RCODE that indicates the error
    //#    type.  See [RFC8499], Section 3.
    /// Adds `rcode="..."` (meant for [`ProxyError::DnsError`], e.g. `"NXDOMAIN"`).
    pub fn rcode(mut self, rcode: &str) -> Self {
        self.value.push_str("; rcode=");
        push_sf_string(&mut self.value, rcode);
        self
    }

    //= https://www.rfc-editor.org/rfc/rfc9209#section-2.3.2
    //# info-code:  An Integer conveying the Extended DNS Error Code
    //#    [RFC8914] that indicates the error type.
    /// Adds `info-code=<n>` (meant for [`ProxyError::DnsError`]).
    pub fn info_code(mut self, info_code: u16) -> Self {
        self.value.push_str("; info-code=");
        self.value.push_str(&info_code.to_string());
        self
    }

    /// Adds `next-hop=...`, as a Token when the text is one, otherwise as a String.
    pub fn next_hop(mut self, next_hop: &str) -> Self {
        self.value.push_str("; next-hop=");
        push_token_or_string(&mut self.value, next_hop);
        self
    }

    /// The field value built so far.
    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// The field value.
    pub fn into_string(self) -> String {
        self.value
    }
}

impl fmt::Display for ProxyStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.value)
    }
}

fn is_sf_token(s: &str) -> bool {
    //= https://www.rfc-editor.org/rfc/rfc8941#section-3.3.4
    //# sf-token = ( ALPHA / "*" ) *( tchar / ":" / "/" )
    let b = s.as_bytes();
    matches!(b.first(), Some(c) if c.is_ascii_alphabetic() || *c == b'*') && token_len(b) == b.len()
}

fn push_token_or_string(out: &mut String, s: &str) {
    if is_sf_token(s) {
        out.push_str(s);
    } else {
        push_sf_string(out, s);
    }
}

/// Writes `s` as an sf-string, dropping what a String cannot hold instead of failing: a
/// diagnostic missing a character beats a response that cannot be sent.
fn push_sf_string(out: &mut String, s: &str) {
    //= https://www.rfc-editor.org/rfc/rfc8941#section-3.3.3
    //# Strings are zero or more printable ASCII [RFC0020] characters (i.e.,
    //# the range %x20 to %x7E).  Note that this excludes tabs, newlines,
    //# carriage returns, etc.
    out.push('"');
    for c in s.chars().filter(|c| matches!(c, ' '..='~')) {
        //= https://www.rfc-editor.org/rfc/rfc8941#section-4.1.6
        //# If char is "\" or DQUOTE:
        //#
        //#     1.  Append "\" to output.
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn capsule_protocol_true_values() {
        for v in [
            &b"?1"[..],
            b" ?1",
            b"?1 ",
            b"\t?1\t ",
            b"?1;foo=bar",
            b"?1; foo=bar",
            b"?1;foo",
            b"?1;a=1;b=?0;c=\"x\\\"y\";d=:aGk=:;e=-1.5;f=*tok/x:y",
            b"?1;a=@1659578233;b=%\"caf%c3%a9\"",
            b"?1;*k=1",
            b"?1;a=123456789012345;b=123456789012.123",
        ] {
            assert!(
                capsule_protocol_is_true(v),
                "{}",
                String::from_utf8_lossy(v)
            );
        }
    }

    #[test]
    fn capsule_protocol_false_values() {
        for v in [
            &b""[..],
            b" ",
            b"?0",
            b"?0;foo=bar",
            b"1",
            b"true",
            b"?",
            b"?2",
            b"?10",
            b"?1?1",
            b"??1",
            b"\"?1\"",
            b"?1, ?1",                // the field twice: a List
            b"?1,",                   // ...
            b"?1 ;a",                 // no space before ";"
            b"?1;",                   // ";" must be followed by a key
            b"?1;A=1",                // keys are lowercase
            b"?1;1a=1",               // and start with a letter or "*"
            b"?1;a=",                 // "=" needs a value
            b"?1;a=\"x",              // unterminated String
            b"?1;a=\"\\x\"",          // bad escape
            b"?1;a=\"\x7f\"",         // not printable
            b"?1;a=1234567890123456", // Integer too long
            b"?1;a=1.2345",           // too many fraction digits
            b"?1;a=1.",               // empty fraction
            b"?1;a=-",
            b"?1;a=:abc", // unterminated Byte Sequence
            b"?1;a=?3",
            b"?1;a=@1.5",        // Date must be an Integer
            b"?1;a=%\"%C3%A9\"", // Display String escapes are lowercase
            b"?1;a=%\"%ff\"",    // and must decode to UTF-8
            b"?1;a=(1 2)",       // Inner Lists are not bare items
            b"?1\x00",
            b"\xff?1",
            b"?1\xff",
        ] {
            assert!(
                !capsule_protocol_is_true(v),
                "{}",
                String::from_utf8_lossy(v)
            );
        }
    }

    #[test]
    fn proxy_error_names_match_rfc9209() {
        let names: Vec<&str> = ProxyError::ALL.iter().map(ProxyError::as_str).collect();
        assert_eq!(
            names,
            [
                "dns_timeout",
                "dns_error",
                "destination_not_found",
                "destination_unavailable",
                "destination_ip_prohibited",
                "destination_ip_unroutable",
                "connection_refused",
                "connection_terminated",
                "connection_timeout",
                "connection_read_timeout",
                "connection_write_timeout",
                "connection_limit_reached",
                "tls_protocol_error",
                "tls_certificate_error",
                "tls_alert_received",
                "http_request_error",
                "http_request_denied",
                "http_response_incomplete",
                "http_response_header_section_size",
                "http_response_header_size",
                "http_response_body_size",
                "http_response_trailer_section_size",
                "http_response_trailer_size",
                "http_response_transfer_coding",
                "http_response_content_coding",
                "http_response_timeout",
                "http_upgrade_failed",
                "http_protocol_error",
                "proxy_internal_response",
                "proxy_internal_error",
                "proxy_configuration_error",
                "proxy_loop_detected",
            ]
        );
        for e in ProxyError::ALL {
            assert!(is_sf_token(e.as_str()));
            assert_eq!(e.to_string(), e.as_str());
        }
    }

    #[test]
    fn proxy_status_formats() {
        assert_eq!(
            proxy_status(
                DEFAULT_PROXY_NAME,
                ProxyError::DestinationIpProhibited,
                None
            ),
            "masque-relay; error=destination_ip_prohibited"
        );
        assert_eq!(
            proxy_status(
                "masque-relay",
                ProxyError::DnsError,
                Some("no \"A\" record\\x")
            ),
            r#"masque-relay; error=dns_error; details="no \"A\" record\\x""#
        );
        assert_eq!(
            proxy_status(
                "masque-relay",
                ProxyError::DnsTimeout,
                Some("tab\there\nnewline é")
            ),
            r#"masque-relay; error=dns_timeout; details="tabherenewline ""#
        );
        // A name that is not a Token is written as a String.
        assert_eq!(
            proxy_status("relay 1", ProxyError::ConnectionRefused, None),
            r#""relay 1"; error=connection_refused"#
        );
        assert_eq!(
            proxy_status("", ProxyError::ConnectionRefused, Some("")),
            r#"""; error=connection_refused; details="""#
        );
        assert_eq!(
            ProxyStatus::new("masque-relay", ProxyError::DnsError)
                .rcode("NXDOMAIN")
                .info_code(22)
                .details("lookup failed")
                .next_hop("192.0.2.6")
                .to_string(),
            r#"masque-relay; error=dns_error; rcode="NXDOMAIN"; info-code=22; details="lookup failed"; next-hop="192.0.2.6""#
        );
        assert_eq!(
            ProxyStatus::new("masque-relay", ProxyError::ConnectionTimeout)
                .next_hop("target.example:443")
                .as_str(),
            "masque-relay; error=connection_timeout; next-hop=target.example:443"
        );
    }

    #[test]
    fn own_output_parses_as_an_item() {
        let value = ProxyStatus::new("r", ProxyError::DnsError)
            .rcode("SERVFAIL")
            .info_code(65535)
            .details("x")
            .next_hop("h")
            .into_string();
        let rest = parse_bare_item(value.as_bytes()).unwrap();
        assert_eq!(parse_parameters(rest), Some(&b""[..]));
    }

    /// The unescaper the spec describes (RFC 8941 §4.2.5), written independently of the parser
    /// above so a shared bug cannot hide.
    fn unescape_sf_string(s: &str) -> Option<(String, &str)> {
        let mut chars = s.strip_prefix('"')?.char_indices();
        let mut out = String::new();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next()?.1 {
                    e @ ('"' | '\\') => out.push(e),
                    _ => return None,
                },
                '"' => return Some((out, &s[i + 2..])),
                ' '..='~' => out.push(c),
                _ => return None,
            }
        }
        None
    }

    fn printable(s: &str) -> String {
        s.chars().filter(|c| matches!(c, ' '..='~')).collect()
    }

    fn any_error() -> impl Strategy<Value = ProxyError> {
        prop::sample::select(ProxyError::ALL.to_vec())
    }

    /// Valid parameters: `;` *SP key [ "=" bare-item ].
    fn any_parameters() -> impl Strategy<Value = String> {
        let value = prop_oneof![
            Just(String::new()),
            (-999_999_999_999_999i64..=999_999_999_999_999).prop_map(|n| format!("={n}")),
            (-999_999_999_999i64..=999_999_999_999, 0u16..1000)
                .prop_map(|(a, b)| format!("={a}.{b}")),
            "[ -~]{0,12}".prop_map(|s| {
                let mut out = String::from("=");
                push_sf_string(&mut out, &s);
                out
            }),
            "[A-Za-z*][A-Za-z0-9!#$%&'*+.^_`|~:/-]{0,8}".prop_map(|t| format!("={t}")),
            "[A-Za-z0-9+/]{0,8}={0,2}".prop_map(|b| format!("=:{b}:")),
            prop::bool::ANY.prop_map(|b| format!("=?{}", u8::from(b))),
        ];
        prop::collection::vec((" {0,2}", "[a-z*][a-z0-9_.*-]{0,6}", value), 0..4).prop_map(
            |params| {
                params
                    .into_iter()
                    .map(|(sp, key, value)| format!(";{sp}{key}{value}"))
                    .collect()
            },
        )
    }

    proptest! {
        #[test]
        fn true_with_any_valid_parameters(params in any_parameters(), lead in "[ \t]{0,2}", trail in "[ \t]{0,2}") {
            let value = format!("{lead}?1{params}{trail}");
            prop_assert!(capsule_protocol_is_true(value.as_bytes()), "{:?}", value);
            let value = format!("{lead}?0{params}{trail}");
            prop_assert!(!capsule_protocol_is_true(value.as_bytes()), "{:?}", value);
            // Joined with another line, the field is a List: not a Boolean.
            let value = format!("?1{params}, ?1");
            prop_assert!(!capsule_protocol_is_true(value.as_bytes()), "{:?}", value);
        }

        #[test]
        fn true_only_when_value_starts_with_question_one(bytes in prop::collection::vec(any::<u8>(), 0..24)) {
            if capsule_protocol_is_true(&bytes) {
                prop_assert!(trim_ows(&bytes).starts_with(b"?1"));
            }
        }

        #[test]
        fn proxy_status_is_printable_and_round_trips(
            name in prop_oneof!["[a-z][a-z0-9-]{0,10}", any::<String>()],
            error in any_error(),
            details in prop::option::of(any::<String>()),
        ) {
            let value = proxy_status(&name, error, details.as_deref());
            prop_assert!(value.bytes().all(|b| (0x20..=0x7e).contains(&b)), "{:?}", value);

            // The proxy name: a Token as is, otherwise a String holding its printable part.
            let rest = if is_sf_token(&name) {
                prop_assert!(value.starts_with(&name));
                &value[name.len()..]
            } else {
                let (got, rest) = unescape_sf_string(&value).unwrap();
                prop_assert_eq!(got, printable(&name));
                rest
            };
            let expected_error = format!("; error={error}");
            prop_assert!(rest.starts_with(&expected_error), "{:?}", value);
            let rest = &rest[expected_error.len()..];
            match &details {
                None => prop_assert_eq!(rest, ""),
                Some(details) => {
                    let quoted = rest.strip_prefix("; details=").unwrap();
                    let (got, tail) = unescape_sf_string(quoted).unwrap();
                    prop_assert_eq!(got, printable(details));
                    prop_assert_eq!(tail, "");
                }
            }

            // And the whole value is a well-formed item with parameters.
            let after_item = parse_bare_item(value.as_bytes()).unwrap();
            prop_assert_eq!(parse_parameters(after_item), Some(&b""[..]));
        }

        #[test]
        fn sf_string_writer_and_parser_agree(s in any::<String>()) {
            let mut out = String::new();
            push_sf_string(&mut out, &s);
            let (rest, parsed) = parse_string(out.as_bytes()).unwrap();
            prop_assert!(rest.is_empty());
            prop_assert_eq!(String::from_utf8(parsed).unwrap(), printable(&s));
        }
    }
}
