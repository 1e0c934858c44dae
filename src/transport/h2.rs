//! CONNECT-UDP over HTTP/2 (RFC 9298 §3.4 with RFC 8441 extended CONNECT), using the `h2` crate.
//!
//! One task drives the connection (accepting streams, writing frames); each CONNECT-UDP request
//! runs in its own task on the same worker: the request is checked, the target resolved and its
//! socket opened before the response is sent, then the stream carries DATAGRAM capsules in DATA
//! frames both ways ([`super::tunnel`]).

use std::future::poll_fn;

use bytes::{BufMut, Bytes};
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::admit::{admit, ConnLimits};
use super::target;
use super::tunnel::{self, ClientGone, ClientRecv, ClientSend};
use crate::ctx::WorkerCtx;
use crate::proto::capsule;
use crate::proto::connect_udp::{check_request, HttpVersion, Rejection, RequestHead};

const VERSION: HttpVersion = HttpVersion::Http2;

/// Serves one HTTP/2 connection (after TLS and ALPN `h2`) until it closes.
pub(crate) async fn serve<T>(
    ctx: WorkerCtx,
    io: T,
    limits: std::rc::Rc<ConnLimits>,
) -> Result<(), h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let shared = ctx.shared();
    let h2cfg = &shared.config.http2;
    let mut builder = h2::server::Builder::new();
    builder
        .enable_connect_protocol()
        .max_concurrent_streams(h2cfg.max_concurrent_streams)
        .max_header_list_size(h2cfg.max_header_list_size)
        .initial_window_size(h2cfg.initial_stream_window)
        .initial_connection_window_size(h2cfg.initial_connection_window)
        .max_frame_size(h2cfg.max_frame_size)
        // Bounds what h2 buffers per stream for a client that does not read; beyond it, target
        // datagrams are dropped (see H2Send::try_send_datagram).
        .max_send_buffer_size(shared.config.client_send_buffer)
        // Rapid-reset style abuse: cap streams reset before the application saw them, and
        // streams the relay itself reset, per connection.
        .max_pending_accept_reset_streams(64)
        .max_local_error_reset_streams(Some(256));
    let mut conn = builder.handshake::<_, Bytes>(io).await?;
    let mut phase = ctx.phase.clone();
    let mut draining = false;
    loop {
        let next = tokio::select! {
            () = crate::ctx::reached(&mut phase, crate::ctx::Phase::Drain), if !draining => {
                // GOAWAY: h2 first announces the drain, then names the last stream it will
                // process after a round trip; established streams go on.
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
            next = conn.accept() => next,
        };
        let Some(next) = next else { break };
        let (req, respond) = next?;
        let ctx = ctx.clone();
        let limits = limits.clone();
        tokio::task::spawn_local(async move { handle_request(ctx, req, respond, limits).await });
    }
    Ok(())
}

async fn handle_request(
    ctx: WorkerCtx,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    limits: std::rc::Rc<ConnLimits>,
) {
    let started = std::time::Instant::now();
    let (parts, body) = req.into_parts();
    let protocol = parts.extensions.get::<h2::ext::Protocol>();
    let capsule_protocol = parts.headers.get("capsule-protocol").map(|v| v.as_bytes());
    let head = RequestHead {
        version: VERSION,
        method: parts.method.as_str(),
        protocol: protocol.map(|p| p.as_str()),
        scheme: parts.uri.scheme_str(),
        authority: parts.uri.authority().map(|a| a.as_str()),
        path: parts.uri.path_and_query().map(|p| p.as_str()),
        capsule_protocol,
    };
    let shared = ctx.shared();
    let proxy_authorization = parts
        .headers
        .get("proxy-authorization")
        .map(|v| v.as_bytes());
    let mut ticket = None;
    let target = if ctx.refusing() {
        // Draining: a request that raced the GOAWAY is refused.
        Err(crate::proto::connect_udp::Rejection::new(
            503,
            None,
            "relay is draining",
        ))
    } else {
        admit(&shared, &limits, proxy_authorization).and_then(|t| {
            ticket = Some(t);
            check_request(&head, &shared.config.uri_template)
        })
    };
    let opened = match target {
        Ok(t) => target::open(&ctx, &t, HttpVersion::Http2).await,
        Err(r) => Err(r),
    };
    let sock = match opened {
        Ok(sock) => sock,
        Err(rejection) => {
            debug!(status = rejection.status, details = %rejection.details, path = ?parts.uri.path_and_query(), "h2 request refused");
            ctx.stats.refused(VERSION, &rejection);
            let _ = respond.send_response(error_response(&rejection), true);
            ctx.stats.request_seconds.observe(started.elapsed());
            return;
        }
    };
    let response = Response::builder()
        .status(StatusCode::OK)
        .header("capsule-protocol", "?1")
        .body(())
        .expect("static response is valid");
    let send = match respond.send_response(response, false) {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "client went away before the response");
            return;
        }
    };
    ctx.stats.request_seconds.observe(started.elapsed());
    ctx.stats.request(VERSION, 200);
    ctx.stats.flows_opened.inc();
    debug!(target = %sock.target(), "h2 flow opened");
    let recv = H2Recv { body };
    let send = H2Send { stream: send };
    tunnel::run(&ctx, VERSION, sock, recv, send, None, ticket).await;
}

fn error_response(r: &Rejection) -> Response<()> {
    let mut b = Response::builder().status(r.status);
    for (name, value) in r.header_fields(VERSION, crate::relay::auth::CHALLENGE) {
        b = b.header(name, value);
    }
    b.body(()).unwrap_or_else(|_| {
        let mut resp = Response::new(());
        *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        resp
    })
}

struct H2Recv {
    body: RecvStream,
}

impl ClientRecv for H2Recv {
    async fn recv(&mut self) -> Result<Option<Bytes>, ClientGone> {
        match self.body.data().await {
            Some(Ok(b)) => Ok(Some(b)),
            Some(Err(e)) => Err(ClientGone::Reset(e.to_string())),
            None => Ok(None),
        }
    }

    fn release(&mut self, n: usize) {
        // Capsules are consumed as they arrive (forwarded or dropped), so the window reopens at
        // once: flow control never holds back the client, and nothing is retained here.
        let _ = self.body.flow_control().release_capacity(n);
    }
}

struct H2Send {
    stream: SendStream<Bytes>,
}

impl ClientSend for H2Send {
    fn try_send_datagram(&mut self, payload: &[u8]) -> bool {
        let len = capsule::datagram_header_len(0, payload.len()) + payload.len();
        // Ask for exactly this capsule's worth of flow-control credit and send only if it is
        // there now. h2 caps a stream's capacity at max_send_buffer_size minus what it still
        // holds unsent, so a client that stops reading sees its datagrams dropped, not queued.
        self.stream.reserve_capacity(len);
        if self.stream.capacity() < len {
            // Give back whatever was assigned so idle capacity is not hoarded by this stream.
            self.stream.reserve_capacity(0);
            return false;
        }
        // The one copy of a target datagram on its way to the client: into the worker's arena
        // (no allocation per capsule), from which h2 writes the DATA frame.
        let capsule = super::arena::take(super::arena::Use::Tx, len, |b| {
            capsule::encode_datagram_header(0, payload.len(), b);
            b.put_slice(payload);
        })
        .freeze();
        self.stream.send_data(capsule, false).is_ok()
    }

    async fn drive(&mut self) -> Result<(), ClientGone> {
        // h2's connection task writes the frames; here only a reset from the client matters.
        match poll_fn(|cx| self.stream.poll_reset(cx)).await {
            Ok(reason) => Err(ClientGone::Reset(format!("{reason:?}"))),
            Err(e) => Err(ClientGone::Reset(e.to_string())),
        }
    }

    async fn finish(mut self) {
        let _ = self.stream.send_data(Bytes::new(), true);
    }

    fn abort(mut self, protocol_error: bool) {
        // RFC 9297 §3.3: a malformed capsule stream is a malformed message, and the stream is
        // aborted: RST_STREAM(PROTOCOL_ERROR). A
        // failed target is reported like a failed CONNECT tunnel (RFC 9113 §8.5): CONNECT_ERROR.
        let reason = if protocol_error {
            h2::Reason::PROTOCOL_ERROR
        } else {
            h2::Reason::CONNECT_ERROR
        };
        self.stream.send_reset(reason);
    }
}
