//! CONNECT-UDP over HTTP/2 (RFC 9298 §3.4 with RFC 8441 extended CONNECT), using the `h2` crate.
//!
//! One task per connection (the `h2` crate drives a connection as a future), and no task per
//! flow: the connection's task accepts request streams and hands each request to the worker's
//! pass ([`crate::worker`]), which admits it, answers it through the stream's response handle
//! and from then on writes target datagrams as DATAGRAM capsules straight into the stream.
//! The task reads every flow's request body (capsules) from one set of streams and passes the
//! chunks on, as they were decrypted (no copy).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream::{SelectAll, Stream, StreamExt};
use h2::RecvStream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::ctx::WorkerCtx;
use crate::proto::connect_udp::{HttpVersion, OwnedRequest};
use crate::relay::flow::CloseReason;
use crate::worker::core::{CoreMsg, TcpAnswer, TcpConnId, TcpCtl};

const VERSION: HttpVersion = HttpVersion::Http2;

/// One request body, as a stream of chunks tagged with its stream ID; it ends when the client
/// ends the stream or the pass drops the flow.
struct Body {
    stream: u32,
    body: Option<RecvStream>,
}

/// What a body yielded.
enum Item {
    Chunk(u32, Bytes),
    End(u32, CloseReason),
}

impl Stream for Body {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let stream = self.stream;
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(None);
        };
        match body.poll_data(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(b))) => {
                // Capsules are consumed as they arrive (forwarded or dropped by the pass), so
                // the window reopens at once: flow control never holds back the client.
                let _ = body.flow_control().release_capacity(b.len());
                Poll::Ready(Some(Item::Chunk(stream, b)))
            }
            Poll::Ready(Some(Err(_))) => {
                self.body = None;
                Poll::Ready(Some(Item::End(stream, CloseReason::ClientAbort)))
            }
            Poll::Ready(None) => {
                self.body = None;
                Poll::Ready(Some(Item::End(stream, CloseReason::ClientEnd)))
            }
        }
    }
}

/// Serves one HTTP/2 connection (after TLS and ALPN `h2`) until it closes.
pub(crate) async fn serve<T>(
    ctx: WorkerCtx,
    io: T,
    core: mpsc::UnboundedSender<CoreMsg>,
    conn: TcpConnId,
    tls_identity: Option<String>,
) -> Result<(), h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (ctl_tx, mut ctl) = mpsc::unbounded_channel();
    let _ = core.send(CoreMsg::TcpOpen {
        conn,
        version: VERSION,
        tls_identity,
        ctl: ctl_tx,
    });
    let result = run(&ctx, io, &core, conn, &mut ctl).await;
    let _ = core.send(CoreMsg::TcpClosed { conn });
    result
}

async fn run<T>(
    ctx: &WorkerCtx,
    io: T,
    core: &mpsc::UnboundedSender<CoreMsg>,
    conn: TcpConnId,
    ctl: &mut mpsc::UnboundedReceiver<TcpCtl>,
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
        // datagrams are dropped (the pass asks for capacity before each capsule).
        .max_send_buffer_size(shared.config.client_send_buffer)
        // Rapid-reset style abuse: cap streams reset before the application saw them, and
        // streams the relay itself reset, per connection.
        .max_pending_accept_reset_streams(64)
        .max_local_error_reset_streams(Some(256));
    let mut h2c = builder.handshake::<_, Bytes>(io).await?;
    let mut phase = ctx.phase.clone();
    let mut draining = false;
    let mut bodies: SelectAll<Body> = SelectAll::new();
    loop {
        tokio::select! {
            () = crate::ctx::reached(&mut phase, crate::ctx::Phase::Drain), if !draining => {
                // GOAWAY: h2 first announces the drain, then names the last stream it will
                // process after a round trip; established streams go on.
                draining = true;
                h2c.graceful_shutdown();
            }
            next = h2c.accept() => {
                let Some(next) = next else { break };
                let (req, respond) = next?;
                let started = Instant::now();
                let stream = respond.stream_id().as_u32();
                let (parts, body) = req.into_parts();
                let header = |name: &str| parts.headers.get(name).map(|v| v.as_bytes().to_vec());
                let request = OwnedRequest {
                    version: VERSION,
                    method: parts.method.as_str().to_owned(),
                    protocol: parts
                        .extensions
                        .get::<h2::ext::Protocol>()
                        .map(|p| p.as_str().to_owned()),
                    scheme: parts.uri.scheme_str().map(str::to_owned),
                    authority: parts.uri.authority().map(|a| a.as_str().to_owned()),
                    path: parts.uri.path_and_query().map(|p| p.as_str().to_owned()),
                    capsule_protocol: header("capsule-protocol"),
                    proxy_authorization: header("proxy-authorization"),
                };
                bodies.push(Body { stream, body: Some(body) });
                let _ = core.send(CoreMsg::Request {
                    conn,
                    stream,
                    request,
                    started,
                    answer: TcpAnswer::H2(respond),
                });
            }
            Some(item) = bodies.next(), if !bodies.is_empty() => match item {
                Item::Chunk(stream, data) => {
                    let _ = core.send(CoreMsg::Chunk { conn, stream, data });
                }
                Item::End(stream, reason) => {
                    let _ = core.send(CoreMsg::ClientEnd { conn, stream, reason });
                }
            },
            Some(TcpCtl::Drop(stream)) = ctl.recv() => {
                // The relay ended this flow: its body is no longer read.
                for b in bodies.iter_mut() {
                    if b.stream == stream {
                        b.body = None;
                    }
                }
            }
        }
    }
    Ok(())
}
