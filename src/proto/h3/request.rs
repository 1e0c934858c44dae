//! HTTP/3 message rules (RFC 9114 §4.1.2–§4.4, RFC 9220): turning a decoded header section into a
//! [`RequestHead`], refusing malformed ones, and encoding response header sections.
//!
//! Everything refused here is "malformed" in the RFC's sense: a stream error of type
//! H3_MESSAGE_ERROR. Whether the request is a *valid CONNECT-UDP request* is a separate question
//! answered by [`crate::proto::connect_udp::check_request`], shared with HTTP/2 and HTTP/1.1 via
//! [`RequestHead::as_connect_udp`].

use bytes::BufMut;

use super::qpack::{encode_field_section, Field};
use super::{H3Error, H3_MESSAGE_ERROR};
use crate::proto::connect_udp::{self, HttpVersion};

//= https://www.rfc-editor.org/rfc/rfc9114#section-4.1.2
//# Malformed requests or responses that are
//# detected MUST be treated as a stream error of type H3_MESSAGE_ERROR.
const fn malformed(reason: &'static str) -> H3Error {
    H3Error::stream(H3_MESSAGE_ERROR, reason)
}

/// The control data and the few header fields the relay needs from a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub scheme: Option<String>,
    /// `:authority`, or the `Host` header when `:authority` is absent.
    pub authority: Option<String>,
    pub path: Option<String>,
    /// `:protocol` (extended CONNECT, RFC 9220).
    pub protocol: Option<String>,
    /// The raw `capsule-protocol` value; several field lines are joined with ", " as HTTP
    /// combines them (so a repeated one no longer parses as a single Boolean).
    pub capsule_protocol: Option<Vec<u8>>,
}

impl RequestHead {
    /// The view [`connect_udp::check_request`] takes.
    pub fn as_connect_udp(&self) -> connect_udp::RequestHead<'_> {
        connect_udp::RequestHead {
            version: HttpVersion::Http3,
            method: &self.method,
            protocol: self.protocol.as_deref(),
            scheme: self.scheme.as_deref(),
            authority: self.authority.as_deref(),
            path: self.path.as_deref(),
            capsule_protocol: self.capsule_protocol.as_deref(),
        }
    }
}

/// A `tchar` of RFC 9110 §5.6.2, the characters of a field name or method.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

//= https://www.rfc-editor.org/rfc/rfc9114#section-10.3
//# Any request or response that contains a
//# character not permitted in a field value MUST be treated as
//# malformed.  Valid characters are defined by the "field-content" ABNF
//# rule in Section 5.5 of [HTTP].
//
// field-content is visible ASCII, obs-text (0x80-0xff), SP and HTAB, with no whitespace at
// either end; an empty value is allowed.
fn is_valid_value(v: &[u8]) -> bool {
    let ok_byte = |b: u8| b == b' ' || b == b'\t' || b >= 0x21 && b != 0x7f;
    let ws = |b: &u8| *b == b' ' || *b == b'\t';
    v.iter().all(|&b| ok_byte(b)) && !v.first().is_some_and(ws) && !v.last().is_some_and(ws)
}

/// A pseudo-header value: visible ASCII only, no spaces, not empty. Stricter than field-content
/// because each is a method, scheme, authority, path or protocol token, none of which has
/// spaces or non-ASCII bytes.
fn pseudo_value(v: &[u8]) -> Result<String, H3Error> {
    if v.is_empty() || !v.iter().all(|&b| (0x21..=0x7e).contains(&b)) {
        return Err(malformed("invalid pseudo-header value"));
    }
    // Visible ASCII is valid UTF-8.
    Ok(String::from_utf8_lossy(v).into_owned())
}

/// Parses the decoded header section of a request.
pub fn parse_request(fields: &[Field]) -> Result<RequestHead, H3Error> {
    let mut method = None;
    let mut scheme = None;
    let mut authority = None;
    let mut path = None;
    let mut protocol = None;
    let mut host: Option<&[u8]> = None;
    let mut capsule_protocol: Option<Vec<u8>> = None;
    let mut regular_seen = false;

    for field in fields {
        let name = &field.name[..];
        let value = &field.value[..];
        if let Some(pseudo) = name.strip_prefix(b":") {
            //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3
            //# All pseudo-header fields MUST appear in the header section before
            //# regular header fields.  Any request or response that contains a
            //# pseudo-header field that appears in a header section after a regular
            //# header field MUST be treated as malformed.
            if regular_seen {
                return Err(malformed("pseudo-header after a regular field"));
            }
            //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3
            //# Endpoints MUST treat a request or response that contains
            //# undefined or invalid pseudo-header fields as malformed.
            //
            // :status is a response pseudo-header: undefined in a request.
            let slot = match pseudo {
                b"method" => &mut method,
                b"scheme" => &mut scheme,
                b"authority" => &mut authority,
                b"path" => &mut path,
                b"protocol" => &mut protocol,
                _ => return Err(malformed("unknown pseudo-header")),
            };
            //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
            //# All HTTP/3 requests MUST include exactly one value for the :method,
            //# :scheme, and :path pseudo-header fields, unless the request is a
            //# CONNECT request; see Section 4.4.
            //
            // "Exactly one" holds for every pseudo-header: a repeated one is never valid.
            if slot.is_some() {
                return Err(malformed("duplicate pseudo-header"));
            }
            *slot = Some(pseudo_value(value)?);
            continue;
        }
        regular_seen = true;
        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.2
        //# Characters in field names MUST be
        //# converted to lowercase prior to their encoding.  A request or
        //# response containing uppercase characters in field names MUST be
        //# treated as malformed.
        if name.iter().any(u8::is_ascii_uppercase) {
            return Err(malformed("uppercase field name"));
        }
        //= https://www.rfc-editor.org/rfc/rfc9114#section-10.3
        //# Requests or responses containing invalid field names MUST be treated
        //# as malformed.
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(malformed("invalid field name"));
        }
        if !is_valid_value(value) {
            return Err(malformed("invalid field value"));
        }
        match name {
            //= https://www.rfc-editor.org/rfc/rfc9114#section-4.2
            //# An endpoint MUST NOT generate
            //# an HTTP/3 field section containing connection-specific fields; any
            //# message containing connection-specific fields MUST be treated as
            //# malformed.
            //
            // The connection-specific fields named by RFC 9110 §7.6.1 and RFC 9113 §8.2.2.
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => return Err(malformed("connection-specific field")),
            //= https://www.rfc-editor.org/rfc/rfc9114#section-4.2
            //# The only exception to this is the TE header field, which MAY be
            //# present in an HTTP/3 request header; when it is, it MUST NOT contain
            //# any value other than "trailers".
            b"te" if value != b"trailers" => {
                return Err(malformed("TE other than \"trailers\""));
            }
            b"host" => {
                if host.is_some() {
                    return Err(malformed("duplicate Host"));
                }
                host = Some(value);
            }
            b"capsule-protocol" => match &mut capsule_protocol {
                Some(v) => {
                    v.extend_from_slice(b", ");
                    v.extend_from_slice(value);
                }
                None => capsule_protocol = Some(value.to_vec()),
            },
            _ => {}
        }
    }

    let method = method.ok_or(malformed("missing :method"))?;
    if !method.bytes().all(is_tchar) {
        return Err(malformed("invalid :method"));
    }

    //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
    //# If these fields are present, they MUST NOT be
    //# empty.  If both fields are present, they MUST contain the same value.
    //
    // (":authority" and "Host"; an empty :authority was refused by pseudo_value.)
    let host = match host {
        Some([]) => return Err(malformed("empty Host")),
        Some(h) => Some(pseudo_value(h).map_err(|_| malformed("invalid Host"))?),
        None => None,
    };
    if let (Some(a), Some(h)) = (&authority, &host) {
        if a != h {
            return Err(malformed(":authority and Host differ"));
        }
    }

    if method == "CONNECT" && protocol.is_none() {
        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.4
        //# A CONNECT request MUST be constructed as follows:
        //#
        //# *  The :method pseudo-header field is set to "CONNECT"
        //#
        //# *  The :scheme and :path pseudo-header fields are omitted
        //#
        //# *  The :authority pseudo-header field contains the host and port to
        //#    connect to (equivalent to the authority-form of the request-target
        //#    of CONNECT requests; see Section 7.1 of [HTTP]).
        //#
        //# The request stream remains open at the end of the request to carry
        //# the data to be transferred.  A CONNECT request that does not conform
        //# to these restrictions is malformed.
        if scheme.is_some() || path.is_some() {
            return Err(malformed("CONNECT with :scheme or :path"));
        }
        if authority.is_none() {
            return Err(malformed("CONNECT without :authority"));
        }
    } else {
        if protocol.is_some() && method != "CONNECT" {
            // RFC 8441 §4 / RFC 9220 §3: :protocol only accompanies the CONNECT method.
            return Err(malformed(":protocol on a method other than CONNECT"));
        }
        // A regular request or an extended CONNECT (RFC 8441 §4: ":scheme and :path MUST also
        // be included"): §4.3.1's rules apply to both.
        let scheme = scheme.as_deref().ok_or(malformed("missing :scheme"))?;
        if path.is_none() {
            return Err(malformed("missing :path"));
        }
        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
        //# If the :scheme pseudo-header field identifies a scheme that has a
        //# mandatory authority component (including "http" and "https"), the
        //# request MUST contain either an :authority pseudo-header field or a
        //# Host header field.
        if matches!(scheme, "http" | "https") {
            if authority.is_none() && host.is_none() {
                return Err(malformed("missing :authority and Host"));
            }
            //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3.1
            //# The authority MUST NOT include the
            //# deprecated userinfo subcomponent for URIs of scheme "http" or
            //# "https".
            if authority
                .as_deref()
                .or(host.as_deref())
                .is_some_and(|a| a.contains('@'))
            {
                return Err(malformed("userinfo in the authority"));
            }
        }
        if authority.is_none() {
            authority = host;
        }
    }

    Ok(RequestHead {
        method,
        scheme,
        authority,
        path,
        protocol,
        capsule_protocol,
    })
}

/// Checks a trailer section: no pseudo-header fields, and the same name and value rules as a
/// header section.
pub fn check_trailers(fields: &[Field]) -> Result<(), H3Error> {
    for field in fields {
        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.3
        //# Pseudo-header fields MUST NOT appear in trailer
        //# sections.
        if field.name.first() == Some(&b':') {
            return Err(malformed("pseudo-header in trailers"));
        }
        if field.name.iter().any(u8::is_ascii_uppercase) {
            return Err(malformed("uppercase field name"));
        }
        if field.name.is_empty() || !field.name.iter().all(|&b| is_tchar(b)) {
            return Err(malformed("invalid field name"));
        }
        if !is_valid_value(&field.value) {
            return Err(malformed("invalid field value"));
        }
    }
    Ok(())
}

/// Encodes the QPACK field section (not the HEADERS frame; see
/// [`super::frame::encode_headers_frame`]) of a response: `:status`, then `extra` in order.
///
/// # Panics
/// If `status` is not a three-digit code (100..=999).
pub fn encode_response(status: u16, extra: &[(&str, &str)], out: &mut impl BufMut) {
    assert!(
        (100..=999).contains(&status),
        "status {status} is not 3 digits"
    );
    let digits = [
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ];
    let mut fields: Vec<(&[u8], &[u8])> = Vec::with_capacity(extra.len() + 1);
    fields.push((b":status", &digits));
    for &(name, value) in extra {
        debug_assert!(
            !name.bytes().any(|b| b.is_ascii_uppercase()),
            "field names must be lowercase: {name}"
        );
        fields.push((name.as_bytes(), value.as_bytes()));
    }
    encode_field_section(&fields, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::h3::qpack::decode_field_section;
    use crate::proto::h3::ErrorScope;
    use proptest::prelude::*;

    fn fields(list: &[(&str, &str)]) -> Vec<Field> {
        list.iter().map(|&(n, v)| Field::new(n, v)).collect()
    }

    fn connect_udp() -> Vec<(&'static str, &'static str)> {
        vec![
            (":method", "CONNECT"),
            (":protocol", "connect-udp"),
            (":scheme", "https"),
            (":authority", "relay.example:443"),
            (":path", "/.well-known/masque/udp/192.0.2.6/443/"),
            ("capsule-protocol", "?1"),
        ]
    }

    fn reject(list: &[(&str, &str)]) -> &'static str {
        let err = parse_request(&fields(list)).unwrap_err();
        assert_eq!(err.code, H3_MESSAGE_ERROR);
        assert_eq!(err.scope, ErrorScope::Stream);
        err.reason
    }

    #[test]
    fn extended_connect() {
        let head = parse_request(&fields(&connect_udp())).unwrap();
        assert_eq!(
            head,
            RequestHead {
                method: "CONNECT".into(),
                scheme: Some("https".into()),
                authority: Some("relay.example:443".into()),
                path: Some("/.well-known/masque/udp/192.0.2.6/443/".into()),
                protocol: Some("connect-udp".into()),
                capsule_protocol: Some(b"?1".to_vec()),
            }
        );
        let view = head.as_connect_udp();
        assert_eq!(view.version, HttpVersion::Http3);
        assert_eq!(view.protocol, Some("connect-udp"));
        assert_eq!(view.capsule_protocol, Some(&b"?1"[..]));
    }

    #[test]
    fn plain_connect_and_get() {
        let head = parse_request(&fields(&[
            (":method", "CONNECT"),
            (":authority", "example.com:443"),
        ]))
        .unwrap();
        assert_eq!(head.authority.as_deref(), Some("example.com:443"));
        assert_eq!(head.path, None);
        // GET with Host standing in for :authority.
        let head = parse_request(&fields(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/"),
            ("host", "example.com"),
            ("te", "trailers"),
        ]))
        .unwrap();
        assert_eq!(head.authority.as_deref(), Some("example.com"));
        // Both present and equal.
        parse_request(&fields(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", "a"),
            (":path", "/"),
            ("host", "a"),
        ]))
        .unwrap();
        // A scheme without mandatory authority.
        parse_request(&fields(&[
            (":method", "GET"),
            (":scheme", "urn"),
            (":path", "x"),
        ]))
        .unwrap();
    }

    #[test]
    fn repeated_capsule_protocol_is_joined() {
        let mut list = connect_udp();
        list.push(("capsule-protocol", "?1"));
        let head = parse_request(&fields(&list)).unwrap();
        assert_eq!(head.capsule_protocol.as_deref(), Some(&b"?1, ?1"[..]));
    }

    #[test]
    fn malformed_requests() {
        let base = connect_udp();
        let with = |extra: (&'static str, &'static str)| {
            let mut l = base.clone();
            l.push(extra);
            l
        };
        let without = |name: &str| -> Vec<(&'static str, &'static str)> {
            base.iter().copied().filter(|(n, _)| *n != name).collect()
        };
        let mut pseudo_late = base.clone();
        pseudo_late.swap(4, 5);
        let cases: Vec<Vec<(&str, &str)>> = vec![
            pseudo_late,
            with((":status", "200")),
            with((":foo", "x")),
            with((":path", "/again")),
            with(("Capsule-Protocol", "?1")),
            with(("connection", "close")),
            with(("keep-alive", "5")),
            with(("proxy-connection", "x")),
            with(("transfer-encoding", "chunked")),
            with(("upgrade", "connect-udp")),
            with(("te", "gzip")),
            with(("bad name", "x")),
            with(("", "x")),
            with(("x", "a\r\nb")),
            with(("x", "a\0")),
            with(("x", " padded")),
            with(("x", "padded\t")),
            with(("host", "other.example")),
            with(("host", "")),
            without(":method"),
            without(":scheme"),
            without(":path"),
            vec![
                (":method", "CONNECT"),
                (":protocol", "connect-udp"),
                (":scheme", "https"),
                (":path", "/"),
            ],
            vec![
                (":method", "CONNECT"),
                (":authority", "a:1"),
                (":path", "/"),
            ],
            vec![
                (":method", "CONNECT"),
                (":authority", "a:1"),
                (":scheme", "https"),
            ],
            vec![(":method", "CONNECT")],
            vec![
                (":method", "GET"),
                (":protocol", "x"),
                (":scheme", "https"),
                (":path", "/"),
                (":authority", "a"),
            ],
            vec![(":method", "GET"), (":scheme", "https"), (":path", "/")],
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/"),
                (":authority", "u@a"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":path", ""),
                (":authority", "a"),
            ],
            vec![
                (":method", "G T"),
                (":scheme", "https"),
                (":path", "/"),
                (":authority", "a"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/"),
                (":authority", ""),
            ],
        ];
        for case in cases {
            let reason = reject(&case);
            assert!(!reason.is_empty(), "{case:?}");
        }
        // Reasons name the problem.
        assert_eq!(reject(&without(":method")), "missing :method");
        assert_eq!(
            reject(&with(("Capsule-Protocol", "?1"))),
            "uppercase field name"
        );
        assert_eq!(reject(&[]), "missing :method");
    }

    #[test]
    fn trailers() {
        check_trailers(&fields(&[("x-checksum", "abc")])).unwrap();
        check_trailers(&[]).unwrap();
        for bad in [(":status", "200"), ("X", "1"), ("x", "\n")] {
            assert_eq!(
                check_trailers(&fields(&[bad])).unwrap_err().code,
                H3_MESSAGE_ERROR
            );
        }
    }

    #[test]
    fn responses() {
        let mut out = Vec::new();
        encode_response(200, &[("capsule-protocol", "?1")], &mut out);
        // :status 200 is static index 25; capsule-protocol is a literal name.
        assert_eq!(&out[..3], [0x00, 0x00, 0xc0 | 25]);
        assert_eq!(
            decode_field_section(&out, 1000).unwrap(),
            fields(&[(":status", "200"), ("capsule-protocol", "?1")])
        );
        let mut out = Vec::new();
        let ps = "masque-relay; error=destination_ip_prohibited";
        encode_response(403, &[("proxy-status", ps)], &mut out);
        assert_eq!(
            decode_field_section(&out, 1000).unwrap(),
            fields(&[(":status", "403"), ("proxy-status", ps)])
        );
        let mut out = Vec::new();
        encode_response(101, &[], &mut out);
        assert_eq!(
            decode_field_section(&out, 1000).unwrap(),
            fields(&[(":status", "101")])
        );
    }

    #[test]
    #[should_panic(expected = "not 3 digits")]
    fn response_status_must_be_three_digits() {
        encode_response(1000, &[], &mut Vec::new());
    }

    proptest! {
        #[test]
        fn random_fields_never_panic(
            list in proptest::collection::vec(
                (
                    prop_oneof![
                        Just(b":method".to_vec()), Just(b":path".to_vec()),
                        Just(b":authority".to_vec()), Just(b":scheme".to_vec()),
                        Just(b":protocol".to_vec()), Just(b"host".to_vec()),
                        proptest::collection::vec(any::<u8>(), 0..8),
                    ],
                    proptest::collection::vec(any::<u8>(), 0..16),
                ),
                0..10,
            )
        ) {
            let fields: Vec<Field> = list.into_iter().map(|(n, v)| Field::new(n, v)).collect();
            if let Ok(head) = parse_request(&fields) {
                // Whatever passes has a method and, unless plain CONNECT, a scheme and path.
                prop_assert!(!head.method.is_empty());
                if head.method != "CONNECT" || head.protocol.is_some() {
                    prop_assert!(head.scheme.is_some() && head.path.is_some());
                }
            }
        }

        #[test]
        fn response_roundtrip(
            status in 100u16..=999,
            extra in proptest::collection::vec(("[a-z][a-z0-9-]{0,20}", "[ -~]{0,40}"), 0..5),
        ) {
            let refs: Vec<(&str, &str)> =
                extra.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let mut out = Vec::new();
            encode_response(status, &refs, &mut out);
            let decoded = decode_field_section(&out, u64::MAX).unwrap();
            prop_assert_eq!(decoded[0].clone(), Field::new(":status", status.to_string()));
            prop_assert_eq!(decoded.len(), extra.len() + 1);
            for (f, (n, v)) in decoded[1..].iter().zip(&extra) {
                prop_assert_eq!(&f.name, n.as_bytes());
                prop_assert_eq!(&f.value, v.as_bytes());
            }
        }
    }
}
