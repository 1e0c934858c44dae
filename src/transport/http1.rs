//! CONNECT-UDP over HTTP/1.1 (RFC 9298 §3.2-§3.3): `GET` with `Upgrade: connect-udp`, answered
//! with `101 Switching Protocols`, after which the whole connection carries capsules both ways.
//!
//! The request head is parsed with `httparse`; [`parse_head`] is pure so it can be tested and
//! fuzzed on its own. One connection carries at most one flow; refusals close the connection.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tracing::debug;

use super::target;
use super::tunnel::{self, ClientGone, ClientRecv, ClientSend};
use crate::ctx::WorkerCtx;
use crate::proto::capsule;
use crate::proto::connect_udp::{check_request, has_token, HttpVersion, Rejection, RequestHead};
use crate::proto::sf::ProxyError;

const VERSION: HttpVersion = HttpVersion::Http11;
/// Largest request head accepted; a longer one gets 431.
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// A parsed HTTP/1.1 request head, owning its strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    /// True when `Connection` lists the `upgrade` option.
    pub connection_upgrade: bool,
    pub upgrade: Option<String>,
    pub capsule_protocol: Option<Vec<u8>>,
    pub proxy_authorization: Option<Vec<u8>>,
    /// Bytes of the buffer the head took; what follows is already capsule data.
    pub len: usize,
}

/// Result of trying to parse a head from what has arrived so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Complete(Head),
    /// Need more bytes.
    Partial,
    /// Unusable request: answer with this status and close.
    Error(u16, &'static str),
}

/// Parses a request head from the start of `buf`.
pub fn parse_head(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        // A head is refused past the limit whether or not it completed in the read that
        // crossed it.
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => {
            return Parsed::Error(431, "request head too large")
        }
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Parsed::Error(431, "request head too large")
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::Error(431, "too many headers"),
        Err(_) => return Parsed::Error(400, "malformed request head"),
    };
    if req.version != Some(1) {
        return Parsed::Error(505, "only HTTP/1.1 can upgrade");
    }
    let mut host = None;
    let mut connection_upgrade = false;
    let mut upgrade: Option<String> = None;
    let mut capsule_protocol = None;
    let mut proxy_authorization = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            // RFC 9112 §3.2: more than one Host is a 400.
            if host.is_some() {
                return Parsed::Error(400, "duplicate Host");
            }
            match std::str::from_utf8(h.value) {
                Ok(v) => host = Some(v.trim().to_owned()),
                Err(_) => return Parsed::Error(400, "Host is not text"),
            }
        } else if name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value);
            connection_upgrade |= has_token(&v, "upgrade");
        } else if name.eq_ignore_ascii_case("upgrade") {
            let v = String::from_utf8_lossy(h.value);
            upgrade = Some(match upgrade {
                Some(prev) => format!("{prev}, {v}"),
                None => v.into_owned(),
            });
        } else if name.eq_ignore_ascii_case("capsule-protocol") {
            if capsule_protocol.is_some() {
                return Parsed::Error(400, "duplicate Capsule-Protocol");
            }
            capsule_protocol = Some(h.value.to_vec());
        } else if name.eq_ignore_ascii_case("proxy-authorization") {
            if proxy_authorization.is_some() {
                return Parsed::Error(400, "duplicate Proxy-Authorization");
            }
            proxy_authorization = Some(h.value.to_vec());
        } else if name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
        {
            // RFC 9298 §3.2 / RFC 9297 §3.2: no content on an upgrade request carrying capsules.
            return Parsed::Error(400, "body framing on an upgrade request");
        }
    }
    let mut path = req.path.unwrap_or_default().to_owned();
    if let Some((authority, rest)) = split_absolute_form(req.path.unwrap_or_default()) {
        // RFC 9112 §3.2.2: with an absolute-form request-target the authority in it is the one
        // that counts, and Host is ignored. RFC 9298 §3.2's own example uses this form.
        if authority.is_empty() {
            return Parsed::Error(400, "absolute-form target without authority");
        }
        host = Some(authority.to_owned());
        path = rest;
    }
    Parsed::Complete(Head {
        method: req.method.unwrap_or_default().to_owned(),
        path,
        host,
        connection_upgrade,
        upgrade,
        capsule_protocol,
        proxy_authorization,
        len,
    })
}

/// Splits `https://authority/path?query` into the authority and `/path?query` (a missing path
/// becomes `/`); `None` for the usual origin-form `/path`.
fn split_absolute_form(target: &str) -> Option<(&str, String)> {
    let (scheme, rest) = target.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("https") && !scheme.eq_ignore_ascii_case("http") {
        return None;
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    Some((authority, path))
}

/// Serves one HTTP/1.1 connection (after TLS): one upgrade, then the tunnel.
pub(crate) async fn serve<T>(
    ctx: WorkerCtx,
    mut io: T,
    limits: std::rc::Rc<super::admit::ConnLimits>,
) -> std::io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let mut buf = BytesMut::with_capacity(4096);
    // The whole head must arrive within the handshake timeout (slowloris).
    let shared = ctx.shared();
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    let head = loop {
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) => {
                let r = Rejection::new(408, None, "request head not received in time");
                return refuse(&ctx, &mut io, &r).await;
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => return Ok(()), // closed before a complete request
            Ok(Ok(_)) => {}
        }
        match parse_head(&buf) {
            Parsed::Partial => {
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(4096);
                }
            }
            Parsed::Error(status, why) => {
                let r = Rejection::new(status, Some(ProxyError::HttpRequestError), why);
                return refuse(&ctx, &mut io, &r).await;
            }
            Parsed::Complete(head) => break head,
        }
    };
    let started = std::time::Instant::now();
    if !head.connection_upgrade && head.method == "GET" {
        let r = Rejection::new(
            400,
            Some(ProxyError::HttpRequestError),
            "Connection must list upgrade",
        );
        let sent = refuse(&ctx, &mut io, &r).await;
        ctx.stats.request_seconds.observe(started.elapsed());
        return sent;
    }
    let req = RequestHead {
        version: VERSION,
        method: &head.method,
        protocol: head.upgrade.as_deref(),
        scheme: None,
        authority: head.host.as_deref(),
        path: Some(&head.path),
        capsule_protocol: head.capsule_protocol.as_deref(),
    };
    if ctx.refusing() {
        // Draining: no new flows (RFC 9110 §15.6.4).
        let r = Rejection::new(503, None, "relay is draining");
        return refuse(&ctx, &mut io, &r).await;
    }
    let ticket = match super::admit::admit(&shared, &limits, head.proxy_authorization.as_deref()) {
        Ok(t) => t,
        Err(r) => return refuse(&ctx, &mut io, &r).await,
    };
    let opened = match check_request(&req, &shared.config.uri_template) {
        Ok(t) => target::open(&ctx, &t, HttpVersion::Http11).await,
        Err(r) => Err(r),
    };
    let sock = match opened {
        Ok(s) => s,
        Err(r) => {
            let sent = refuse(&ctx, &mut io, &r).await;
            ctx.stats.request_seconds.observe(started.elapsed());
            return sent;
        }
    };
    io.write_all(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: connect-udp\r\n\
          Capsule-Protocol: ?1\r\n\r\n",
    )
    .await?;
    io.flush().await?;
    ctx.stats.request_seconds.observe(started.elapsed());
    ctx.stats.request(VERSION, 101);
    ctx.stats.flows_opened.inc();
    debug!(target = %sock.target(), "http/1.1 flow opened");
    buf.advance(head.len);
    let first = (!buf.is_empty()).then(|| buf.split().freeze());
    let (r, w) = tokio::io::split(io);
    let recv = H1Recv { io: r, buf };
    let send = H1Send {
        io: w,
        pending: BytesMut::new(),
        limit: shared.config.client_send_buffer,
    };
    tunnel::run(&ctx, VERSION, sock, recv, send, first, Some(ticket)).await;
    Ok(())
}

async fn refuse<T: AsyncWrite + Unpin>(
    ctx: &WorkerCtx,
    io: &mut T,
    r: &Rejection,
) -> std::io::Result<()> {
    debug!(status = r.status, details = %r.details, "http/1.1 request refused");
    ctx.stats.refused(VERSION, r);
    let reason = http::StatusCode::from_u16(r.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut resp = format!("HTTP/1.1 {} {reason}\r\n", r.status);
    for (name, value) in r.header_fields(VERSION, crate::relay::auth::CHALLENGE) {
        // Field names are case-insensitive; HTTP/1.1 peers conventionally see them capitalised.
        let mut upper = true;
        for c in name.chars() {
            resp.push(if upper { c.to_ascii_uppercase() } else { c });
            upper = c == '-';
        }
        resp.push_str(&format!(": {value}\r\n"));
    }
    resp.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
    io.write_all(resp.as_bytes()).await?;
    io.shutdown().await
}

struct H1Recv<T> {
    io: ReadHalf<T>,
    buf: BytesMut,
}

impl<T: AsyncRead + AsyncWrite> ClientRecv for H1Recv<T> {
    async fn recv(&mut self) -> Result<Option<Bytes>, ClientGone> {
        if self.buf.capacity() < 2048 {
            self.buf.reserve(16 * 1024);
        }
        match self.io.read_buf(&mut self.buf).await? {
            0 => Ok(None),
            _ => Ok(Some(self.buf.split().freeze())),
        }
    }

    fn release(&mut self, _n: usize) {}
}

struct H1Send<T> {
    io: WriteHalf<T>,
    /// Encoded capsules not yet written to the connection, at most `limit` bytes.
    pending: BytesMut,
    limit: usize,
}

impl<T: AsyncRead + AsyncWrite> ClientSend for H1Send<T> {
    fn try_send_datagram(&mut self, payload: &[u8]) -> bool {
        let len = capsule::datagram_header_len(0, payload.len()) + payload.len();
        if self.pending.len() + len > self.limit {
            return false;
        }
        capsule::encode_datagram_header(0, payload.len(), &mut self.pending);
        self.pending.put_slice(payload);
        true
    }

    async fn drive(&mut self) -> Result<(), ClientGone> {
        if self.pending.is_empty() {
            return std::future::pending().await;
        }
        // write_buf advances `pending` by what was written; cancel-safe.
        self.io.write_buf(&mut self.pending).await?;
        if self.pending.is_empty() {
            self.io.flush().await?;
        }
        Ok(())
    }

    async fn finish(mut self) {
        let _ = self.io.write_all(&self.pending).await;
        let _ = self.io.shutdown().await;
    }

    fn abort(self, _protocol_error: bool) {
        // Dropping both halves closes the TCP connection without close_notify: on HTTP/1.1 an
        // aborted tunnel is an aborted connection.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &[u8] =
        b"GET /.well-known/masque/udp/192.0.2.6/443/ HTTP/1.1\r\nHost: relay.example\r\n\
        Connection: Upgrade\r\nUpgrade: connect-udp\r\nCapsule-Protocol: ?1\r\n\r\n";

    #[test]
    fn parses_the_rfc_example() {
        let mut bytes = GOOD.to_vec();
        bytes.extend_from_slice(&[0, 1, 0]);
        let Parsed::Complete(h) = parse_head(&bytes) else {
            panic!()
        };
        assert_eq!(h.method, "GET");
        assert_eq!(h.path, "/.well-known/masque/udp/192.0.2.6/443/");
        assert_eq!(h.host.as_deref(), Some("relay.example"));
        assert!(h.connection_upgrade);
        assert_eq!(h.upgrade.as_deref(), Some("connect-udp"));
        assert_eq!(h.capsule_protocol.as_deref(), Some(&b"?1"[..]));
        assert_eq!(h.len, GOOD.len());
    }

    #[test]
    fn every_prefix_is_partial() {
        for i in 0..GOOD.len() {
            assert_eq!(parse_head(&GOOD[..i]), Parsed::Partial, "prefix {i}");
        }
    }

    #[test]
    fn refusals() {
        let status = |b: &[u8]| match parse_head(b) {
            Parsed::Error(s, _) => s,
            other => panic!("{other:?}"),
        };
        assert_eq!(status(b"GET / HTTP/1.0\r\n\r\n"), 505);
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nContent-Length: 3\r\n\r\n"), 400);
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(status(b"\x00\x01garbage\r\n\r\n"), 400);
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD + 10, b'a');
        assert_eq!(status(&long), 431);
        // Complete, but longer than the limit.
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(status(&long), 431);
    }

    #[test]
    fn absolute_form_uses_its_authority() {
        let req =
            b"GET https://relay.example:8443/.well-known/masque/udp/192.0.2.6/443/ HTTP/1.1\r\n\
            Host: ignored.example\r\nConnection: Upgrade\r\nUpgrade: connect-udp\r\n\r\n";
        let Parsed::Complete(h) = parse_head(req) else {
            panic!()
        };
        assert_eq!(h.host.as_deref(), Some("relay.example:8443"));
        assert_eq!(h.path, "/.well-known/masque/udp/192.0.2.6/443/");
        let split = |t| split_absolute_form(t).map(|(a, p)| (a.to_owned(), p));
        assert_eq!(
            split("https://a.example"),
            Some(("a.example".into(), "/".into()))
        );
        assert_eq!(
            split("HTTPS://a.example?x=1"),
            Some(("a.example".into(), "/?x=1".into()))
        );
        assert_eq!(split("/plain/path"), None);
        assert_eq!(split("ftp://a/b"), None);
        let Parsed::Error(400, _) = parse_head(b"GET https:///x HTTP/1.1\r\n\r\n") else {
            panic!()
        };
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse_head(&bytes);
        }
    }
}
