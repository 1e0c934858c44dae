//! The HTTP/2 client (the `h2` crate over tokio-rustls): extended CONNECT per flow (RFC 8441,
//! RFC 9298), UDP payloads as DATAGRAM capsules in DATA frames, written and read with the
//! relay's capsule codec. One sender per connection paces all of its flows; one reader task
//! per flow.

use std::cell::RefCell;
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use masque_relay::proto::capsule::{self, CapsuleDecoder};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};

use crate::load::Load;
use crate::run::{split, Ctx};
use crate::udpc::sleep_until;
use crate::BenchError;

/// TLS handshakes in progress at once.
pub const HANDSHAKES_AT_ONCE: usize = 64;

/// Opens a TLS connection to the relay offering `alpn`.
pub async fn tls_connect(
    ctx: &Ctx,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, BenchError> {
    let tcp = TcpStream::connect(ctx.spec.relay).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(ctx.spec.server_name.clone())
        .map_err(|e| BenchError::Args(format!("server name: {e}")))?;
    Ok(tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await?)
}

struct Group {
    load: Load,
    sends: Vec<Option<SendStream<Bytes>>>,
}

pub async fn run(ctx: Rc<Ctx>) -> Result<(), BenchError> {
    let tls = Arc::new(crate::tls::client_config(
        ctx.spec.insecure,
        ctx.spec.ca.as_deref(),
        b"h2",
    )?);
    let sem = Rc::new(Semaphore::new(HANDSHAKES_AT_ONCE));
    let tasks: Vec<_> = split(ctx.spec.flows, ctx.spec.connections)
        .into_iter()
        .map(|g| tokio::task::spawn_local(connection(ctx.clone(), tls.clone(), g, sem.clone())))
        .collect();
    for t in tasks {
        match t.await {
            Ok(Err(e)) => ctx.error(e.to_string()),
            Err(e) => ctx.error(e.to_string()),
            Ok(Ok(())) => {}
        }
    }
    Ok(())
}

fn fail_all(ctx: &Ctx, n: usize) {
    let now = Instant::now();
    for _ in 0..n {
        ctx.flow_failed(now, 0);
    }
}

async fn handshake(
    ctx: &Ctx,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<SendRequest<Bytes>, BenchError> {
    let io = tls_connect(ctx, tls).await?;
    let h2err = |e: h2::Error| BenchError::Setup(format!("HTTP/2: {e}"));
    let (mut client, conn) = h2::client::Builder::new()
        .initial_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_send_buffer_size(1 << 20)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(h2err)?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    // Extended CONNECT needs the relay's SETTINGS, which arrive on their own time.
    for _ in 0..400 {
        client = client.ready().await.map_err(h2err)?;
        if client.is_extended_connect_protocol_enabled() {
            return Ok(client);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err(BenchError::Setup(
        "the relay did not enable extended CONNECT (SETTINGS_ENABLE_CONNECT_PROTOCOL)".into(),
    ))
}

async fn connection(
    ctx: Rc<Ctx>,
    tls: Arc<rustls::ClientConfig>,
    flows: Range<usize>,
    sem: Rc<Semaphore>,
) -> Result<(), BenchError> {
    let n = flows.len();
    let permit = sem.acquire().await;
    let mut client = match handshake(&ctx, &tls).await {
        Ok(c) => c,
        Err(e) => {
            fail_all(&ctx, n);
            return Err(e);
        }
    };
    drop(permit);
    ctx.connection_opened();
    let group = Rc::new(RefCell::new(Group {
        load: Load::new(ctx.spec.shape(n), n),
        sends: (0..n).map(|_| None).collect(),
    }));
    let replies = Rc::new(Notify::new());
    let authority = format!("{}:{}", ctx.spec.server_name, ctx.spec.relay.port());
    for i in 0..n {
        let uri = format!("https://{authority}{}", ctx.spec.path_for(flows.start + i));
        let req = http::Request::builder()
            .method("CONNECT")
            .uri(&uri)
            .header("capsule-protocol", "?1")
            .extension(h2::ext::Protocol::from("connect-udp"))
            .body(())
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        let sent = match client.clone().ready().await {
            Ok(c) => {
                client = c;
                client.send_request(req, false)
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok((resp, send)) => {
                tokio::task::spawn_local(flow(
                    ctx.clone(),
                    group.clone(),
                    replies.clone(),
                    flows.start,
                    i,
                    resp,
                    send,
                ));
            }
            Err(e) => {
                ctx.error(format!("HTTP/2 request: {e}"));
                fail_all(&ctx, n - i);
                break;
            }
        }
    }
    sender(&ctx, &group, &replies, flows.start).await;
    drop(client);
    Ok(())
}

/// One flow: waits for the response, then reads the capsules that come back.
async fn flow(
    ctx: Rc<Ctx>,
    group: Rc<RefCell<Group>>,
    replies: Rc<Notify>,
    base: usize,
    i: usize,
    resp: h2::client::ResponseFuture,
    mut send: SendStream<Bytes>,
) {
    let resp = tokio::time::timeout(ctx.spec.setup_timeout, resp).await;
    let now = Instant::now();
    let mut body: RecvStream = match resp {
        Ok(Ok(r)) if r.status() == 200 => r.into_body(),
        Ok(Ok(r)) => return ctx.flow_failed(now, r.status().as_u16()),
        Ok(Err(e)) => {
            ctx.error(format!("HTTP/2 response: {e}"));
            return ctx.flow_failed(now, 0);
        }
        Err(_) => return ctx.flow_failed(now, 0),
    };
    send.reserve_capacity(64 * 1024);
    {
        let mut g = group.borrow_mut();
        g.sends[i] = Some(send);
        g.load.open_flow(i, now);
    }
    ctx.flow_opened(now);
    let mut decoder = CapsuleDecoder::new(capsule::MAX_UDP_PAYLOAD);
    while let Some(Ok(mut data)) = body.data().await {
        let len = data.len();
        let now = Instant::now();
        let bytes = data.copy_to_bytes(len);
        let mut got = 0;
        {
            let mut rec = ctx.rec.borrow_mut();
            let mut g = group.borrow_mut();
            let r = decoder.decode(&bytes, |ev| {
                if let capsule::Event::Datagram {
                    context_id: 0,
                    payload,
                } = ev
                {
                    if let Some(f) = rec.on_receive(now, payload) {
                        if let Some(local) = (f as usize).checked_sub(base) {
                            g.load.on_reply(local, now);
                            got += 1;
                        }
                    }
                }
            });
            if r.is_err() {
                ctx.error("malformed capsule from the relay");
                return;
            }
        }
        let _ = body.flow_control().release_capacity(len);
        if got > 0 {
            replies.notify_one();
        }
    }
}

/// Sends what the load allows on the connection's flows until the run stops.
async fn sender(ctx: &Ctx, group: &RefCell<Group>, replies: &Notify, base: usize) {
    let size = ctx.spec.payload_size();
    let clen = capsule::datagram_header_len(0, size) + size;
    loop {
        if ctx.stop.get() {
            return;
        }
        let now = Instant::now();
        let sending = ctx.sending(now);
        let mut blocked = false;
        let next = {
            let mut g = group.borrow_mut();
            let Group { load, sends } = &mut *g;
            let mut dead = Vec::new();
            if sending {
                let mut rec = ctx.rec.borrow_mut();
                let sent = load.poll(now, 64, |i| {
                    let Some(s) = sends[i].as_mut() else {
                        dead.push(i);
                        return false;
                    };
                    if s.capacity() < clen {
                        // Wait for flow-control credit rather than queue without bound.
                        s.reserve_capacity(clen * 64);
                        blocked = true;
                        return false;
                    }
                    let mut b = BytesMut::with_capacity(clen);
                    capsule::encode_datagram_header(0, size, &mut b);
                    let start = b.len();
                    b.resize(start + size, 0);
                    rec.fill(now, (base + i) as u32, &mut b[start..]);
                    let frame = b.freeze();
                    match s.send_data(frame.clone(), false) {
                        Ok(()) => {
                            s.reserve_capacity(clen * 64);
                            true
                        }
                        Err(_) => {
                            rec.unsend(&frame[start..]);
                            sends[i] = None;
                            false
                        }
                    }
                });
                // Blocked only when no flow could send: otherwise go on at once.
                blocked &= sent == 0;
                rec.timed_out += load.take_timeouts();
            }
            for i in dead {
                load.close_flow(i);
            }
            load.next_send(now)
        };
        let wake = if !sending || blocked {
            Some(now + Duration::from_millis(1))
        } else {
            next
        };
        if sending && !blocked && group.borrow().load.has_ready() {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            () = replies.notified() => {}
            () = sleep_until(wake) => {}
            () = ctx.wake.notified() => {}
        }
    }
}
