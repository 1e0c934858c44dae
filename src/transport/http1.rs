//! CONNECT-UDP over HTTP/1.1 (RFC 9298 §3.2-§3.3): `GET` with `Upgrade: connect-udp`, answered
//! with `101 Switching Protocols`, after which the whole connection carries capsules both ways.
//!
//! The request head is parsed with `httparse`; [`parse_head`] is pure so it can be tested and
//! fuzzed on its own. One connection carries at most one flow; refusals close the connection.

use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::ctx::WorkerCtx;
use crate::proto::connect_udp::{has_token, HttpVersion, OwnedRequest, Rejection};
use crate::proto::sf::ProxyError;
use crate::relay::flow::CloseReason;
use crate::transport::link::{CoreMsg, Credit, TcpAnswer, TcpConnId, CREDIT_BYTES};

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

/// Serves one HTTP/1.1 connection (after TLS): one upgrade, then the tunnel. The request is
/// admitted and its flow opened by the worker's pass; this task reads the client's capsule
/// bytes and hands them on as they arrive, and writes the capsules the pass sends back.
pub(crate) async fn serve<T>(
    ctx: WorkerCtx,
    io: T,
    core: mpsc::UnboundedSender<CoreMsg>,
    conn: TcpConnId,
    tls_identity: Option<String>,
) -> std::io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (ctl_tx, _ctl) = mpsc::unbounded_channel();
    let credit = Credit::new(CREDIT_BYTES);
    let _ = core.send(CoreMsg::TcpOpen {
        conn,
        version: VERSION,
        tls_identity,
        ctl: ctl_tx,
        credit: credit.clone(),
    });
    let result = run(&ctx, io, &core, conn, &credit).await;
    let _ = core.send(CoreMsg::TcpClosed { conn });
    result
}

async fn run<T>(
    ctx: &WorkerCtx,
    mut io: T,
    core: &mpsc::UnboundedSender<CoreMsg>,
    conn: TcpConnId,
    credit: &Credit,
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
                return refuse(ctx, &mut io, &r, None).await;
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
                return refuse(ctx, &mut io, &r, None).await;
            }
            Parsed::Complete(head) => break head,
        }
    };
    let started = Instant::now();
    if !head.connection_upgrade && head.method == "GET" {
        let r = Rejection::new(
            400,
            Some(ProxyError::HttpRequestError),
            "Connection must list upgrade",
        );
        return refuse(ctx, &mut io, &r, Some(started)).await;
    }
    let request = OwnedRequest {
        version: VERSION,
        method: head.method.clone(),
        protocol: head.upgrade.clone(),
        scheme: None,
        authority: head.host.clone(),
        path: Some(head.path.clone()),
        capsule_protocol: head.capsule_protocol.clone(),
        proxy_authorization: head.proxy_authorization.clone(),
    };
    // What may wait for the client: a capsule is at least a few bytes, most are datagrams of
    // a packet's size.
    let depth = (shared.config.client_send_buffer / 1500).max(16);
    let (out_tx, mut out) = mpsc::channel::<Bytes>(depth);
    let (reply_tx, reply) = oneshot::channel();
    let _ = core.send(CoreMsg::Request {
        conn,
        stream: 0,
        request,
        started,
        answer: TcpAnswer::H1 {
            reply: reply_tx,
            out: out_tx,
        },
    });
    match reply.await {
        Ok(Ok(())) => {}
        Ok(Err(r)) => return write_refusal(&mut io, &r).await,
        Err(_) => return Ok(()), // the worker stopped
    }
    io.write_all(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: connect-udp\r\n\
          Capsule-Protocol: ?1\r\n\r\n",
    )
    .await?;
    io.flush().await?;
    buf.advance(head.len);
    if !buf.is_empty() {
        let data = buf.split().freeze();
        credit.spend(data.len());
        let _ = core.send(CoreMsg::Chunk {
            conn,
            stream: 0,
            data,
        });
    }
    let (mut r, w) = tokio::io::split(io);
    // The capsules ready at one wake-up go to TLS as one write (one record, one syscall),
    // not one each.
    let mut w = tokio::io::BufWriter::with_capacity(64 * 1024, w);
    let mut reading = true;
    loop {
        if buf.capacity() < 2048 {
            buf.reserve(16 * 1024);
        }
        tokio::select! {
            // Read while the pass keeps up; else TCP holds the client back until the pass has
            // taken half of what it was handed.
            n = r.read_buf(&mut buf), if reading && credit.has_room() => match n {
                Ok(0) | Err(_) => {
                    let reason = if n.is_ok() { CloseReason::ClientEnd } else { CloseReason::ClientAbort };
                    reading = false;
                    let _ = core.send(CoreMsg::ClientEnd { conn, stream: 0, reason });
                }
                Ok(_) => {
                    let data = buf.split().freeze();
                    credit.spend(data.len());
                    let _ = core.send(CoreMsg::Chunk { conn, stream: 0, data });
                }
            },
            () = credit.room(), if reading && !credit.has_room() => {}
            capsule = out.recv() => match capsule {
                Some(c) => {
                    w.write_all(&c).await?;
                    // Whatever else is ready goes out in the same flush.
                    while let Ok(c) = out.try_recv() {
                        w.write_all(&c).await?;
                    }
                    w.flush().await?;
                }
                // The flow ended: on HTTP/1.1 the connection ends with it.
                None => {
                    let _ = w.shutdown().await;
                    return Ok(());
                }
            },
        }
    }
}

/// Refuses a request this task could not even hand on (a malformed head), recorded like every
/// other answer.
async fn refuse<T: AsyncWrite + Unpin>(
    ctx: &WorkerCtx,
    io: &mut T,
    r: &Rejection,
    started: Option<Instant>,
) -> std::io::Result<()> {
    debug!(status = r.status, details = %r.details, "http/1.1 request refused");
    let took = started.map_or(std::time::Duration::ZERO, |t| t.elapsed());
    ctx.stats.answered(VERSION, r.status, Some(r), took);
    write_refusal(io, r).await
}

async fn write_refusal<T: AsyncWrite + Unpin>(io: &mut T, r: &Rejection) -> std::io::Result<()> {
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
