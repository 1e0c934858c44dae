//! CONNECT-UDP over HTTP/2 (RFC 9298 §3.4 with RFC 8441 extended CONNECT), using the `h2` crate.
//!
//! One task per connection (the `h2` crate drives a connection as a future), and no task per
//! flow: the connection's task accepts request streams and hands each request to the worker's
//! pass ([`crate::worker`]), which admits it, answers it through the stream's response handle
//! and from then on writes target datagrams as DATAGRAM capsules straight into the stream.
//! The task reads every flow's request body (capsules) from one set of streams and passes the
//! chunks on, as they were decrypted (no copy).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

use bytes::Bytes;
use h2::RecvStream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::ctx::WorkerCtx;
use crate::proto::connect_udp::{HttpVersion, OwnedRequest};
use crate::relay::flow::CloseReason;
use crate::transport::coalesce::{coalesce, Coalesce, Flusher};
use crate::transport::link::{CoreMsg, Credit, TcpAnswer, TcpConnId, TcpCtl, CREDIT_BYTES};

const VERSION: HttpVersion = HttpVersion::Http2;

/// What a body yielded.
enum Item {
    Chunk(u32, Bytes),
    End(u32, CloseReason),
}

/// The request bodies of a connection's flows, polled only when `h2` woke them: each body has
/// its own waker (made once, when the body is added) that queues the body's slot and wakes
/// the connection task. A chunk costs no allocation (a `SelectAll` allocates a task node for
/// every item it yields), and a wake-up polls the bodies that have data, not all of them.
struct Bodies {
    slots: slab::Slab<BodySlot>,
    ready: Arc<Ready>,
}

struct BodySlot {
    stream: u32,
    body: RecvStream,
    state: Arc<BodyWaker>,
    waker: Waker,
}

/// Slots whose body was woken, and the connection task to wake.
#[derive(Default)]
struct Ready {
    inner: Mutex<ReadyInner>,
}

#[derive(Default)]
struct ReadyInner {
    queue: VecDeque<usize>,
    task: Option<Waker>,
}

/// One body's waker: queues its slot (once until it is polled again).
struct BodyWaker {
    slot: usize,
    queued: AtomicBool,
    ready: Arc<Ready>,
}

impl Wake for BodyWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let task = {
            let mut r = self.ready.inner.lock().unwrap_or_else(|e| e.into_inner());
            r.queue.push_back(self.slot);
            r.task.clone()
        };
        if let Some(t) = task {
            t.wake();
        }
    }
}

impl Bodies {
    fn new() -> Self {
        Bodies {
            slots: slab::Slab::new(),
            ready: Arc::default(),
        }
    }

    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn push(&mut self, stream: u32, body: RecvStream) {
        let entry = self.slots.vacant_entry();
        let w = Arc::new(BodyWaker {
            slot: entry.key(),
            queued: AtomicBool::new(false),
            ready: self.ready.clone(),
        });
        let waker = Waker::from(w.clone());
        entry.insert(BodySlot {
            stream,
            body,
            state: w,
            waker: waker.clone(),
        });
        // Polled once at the start, like any new future.
        waker.wake();
    }

    /// Stops reading a stream's body.
    fn remove(&mut self, stream: u32) {
        if let Some(k) = self
            .slots
            .iter()
            .find_map(|(k, b)| (b.stream == stream).then_some(k))
        {
            self.slots.remove(k);
        }
    }

    fn next(&mut self) -> impl std::future::Future<Output = Item> + '_ {
        std::future::poll_fn(move |cx| self.poll_next(cx))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Item> {
        loop {
            let slot = {
                let mut r = self.ready.inner.lock().unwrap_or_else(|e| e.into_inner());
                match r.queue.pop_front() {
                    Some(k) => k,
                    None => {
                        if !r.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                            r.task = Some(cx.waker().clone());
                        }
                        return Poll::Pending;
                    }
                }
            };
            // A slot reused since its old waker queued it is simply polled (nothing to read
            // is a Pending like any other).
            let Some(b) = self.slots.get_mut(slot) else {
                continue;
            };
            b.state.queued.store(false, Ordering::Release);
            let stream = b.stream;
            match b.body.poll_data(&mut Context::from_waker(&b.waker)) {
                Poll::Pending => continue,
                Poll::Ready(Some(Ok(data))) => {
                    // Capsules are consumed as they arrive (forwarded or dropped by the pass),
                    // so the window reopens at once: flow control never holds back the
                    // client.
                    let _ = b.body.flow_control().release_capacity(data.len());
                    // More may be buffered: the body goes to the back of the queue.
                    b.waker.wake_by_ref();
                    return Poll::Ready(Item::Chunk(stream, data));
                }
                Poll::Ready(Some(Err(_))) => {
                    self.slots.remove(slot);
                    return Poll::Ready(Item::End(stream, CloseReason::ClientAbort));
                }
                Poll::Ready(None) => {
                    self.slots.remove(slot);
                    return Poll::Ready(Item::End(stream, CloseReason::ClientEnd));
                }
            }
        }
    }
}

/// h2's framing-overhead budget for a connection window of `window` bytes: each buffered DATA
/// frame of n < 256 payload bytes takes 256 - n of it, so a full window of frames of
/// [`MIN_FULL_WINDOW_FRAME`] bytes fits.
fn data_frame_budget(window: u32) -> usize {
    let frames = window as usize / MIN_FULL_WINDOW_FRAME;
    frames * (256 - MIN_FULL_WINDOW_FRAME)
}

/// The smallest average DATA frame (a DATAGRAM capsule of a 45-byte payload) of which a client
/// may fill the whole connection window while the worker catches up.
const MIN_FULL_WINDOW_FRAME: usize = 48;

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
    let credit = Credit::new(CREDIT_BYTES);
    let _ = core.send(CoreMsg::TcpOpen {
        conn,
        version: VERSION,
        tls_identity,
        ctl: ctl_tx,
        credit: credit.clone(),
    });
    let result = run(&ctx, io, &core, conn, &mut ctl, &credit).await;
    let _ = core.send(CoreMsg::TcpClosed { conn });
    result
}

async fn run<T>(
    ctx: &WorkerCtx,
    io: T,
    core: &mpsc::UnboundedSender<CoreMsg>,
    conn: TcpConnId,
    ctl: &mut mpsc::UnboundedReceiver<TcpCtl>,
    credit: &Credit,
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
        .max_local_error_reset_streams(Some(256))
        // h2 closes a connection (ENHANCE_YOUR_CALM) whose buffered small DATA frames exceed a
        // budget, by default half the connection window: reached by a full window of DATA
        // frames below about 170 bytes each. A client sending small datagrams (a 64-byte
        // payload is a 67-byte frame) fills the window with exactly those whenever the worker
        // falls behind, so the budget covers a full window of frames of 48 bytes and more;
        // smaller ones are still refused.
        .data_frame_budget(data_frame_budget(h2cfg.initial_connection_window));
    // h2 flushes every DATA frame over 256 bytes on its own; its writes are gathered and go to
    // TLS together, once per wake-up of this task.
    let (io, flusher) = coalesce(io);
    let r = serve_connection(ctx, builder, io, &flusher, core, conn, ctl, credit).await;
    // What h2 wrote last (GOAWAY, a reset) still goes out, within a bound.
    let _ = tokio::time::timeout(FINAL_FLUSH, flusher.flush()).await;
    r
}

/// How long the last bytes of a closing connection may take to leave.
const FINAL_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

#[allow(clippy::too_many_arguments)]
async fn serve_connection<T>(
    ctx: &WorkerCtx,
    builder: h2::server::Builder,
    io: Coalesce<T>,
    flusher: &Flusher<T>,
    core: &mpsc::UnboundedSender<CoreMsg>,
    conn: TcpConnId,
    ctl: &mut mpsc::UnboundedReceiver<TcpCtl>,
    credit: &Credit,
) -> Result<(), h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let handshake = builder.handshake::<_, Bytes>(io);
    tokio::pin!(handshake);
    // The SETTINGS frame goes out while h2 waits for the client's preface.
    let mut h2c = loop {
        tokio::select! {
            r = &mut handshake => break r?,
            _ = flusher.flushed() => {}
        }
    };
    let mut phase = ctx.phase.clone();
    let mut draining = false;
    let mut bodies = Bodies::new();
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
                bodies.push(stream, body);
                let _ = core.send(CoreMsg::Request {
                    conn,
                    stream,
                    request,
                    started,
                    answer: TcpAnswer::H2(respond),
                });
            }
            // Bodies are read while the pass keeps up; else h2 buffers what arrives (up to the
            // windows, which then hold the client back) until it has taken half of it.
            item = bodies.next(), if !bodies.is_empty() && credit.has_room() => match item {
                Item::Chunk(stream, data) => {
                    credit.spend(data.len());
                    let _ = core.send(CoreMsg::Chunk { conn, stream, data });
                }
                Item::End(stream, reason) => {
                    let _ = core.send(CoreMsg::ClientEnd { conn, stream, reason });
                }
            },
            () = credit.room(), if !credit.has_room() => {}
            // h2's writes of this wake-up, together (no guard: see `Flusher::flushed`). A
            // failure ends the connection through h2's next read or write.
            _ = flusher.flushed() => {}
            Some(TcpCtl::Drop(stream)) = ctl.recv() => {
                // The relay ended this flow: its body is no longer read.
                bodies.remove(stream);
            }
        }
    }
    Ok(())
}
