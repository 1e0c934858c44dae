//! The HTTP/1.1 client: one TLS connection per flow, `Upgrade: connect-udp` (RFC 9298 §3.2),
//! then DATAGRAM capsules on the connection both ways. One sender paces all flows through a
//! small queue per flow; a writer and a reader task per connection.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use masque_relay::proto::capsule::{self, CapsuleDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify, Semaphore};

use crate::h2c::{tls_connect, HANDSHAKES_AT_ONCE};
use crate::load::Load;
use crate::run::Ctx;
use crate::udpc::sleep_until;
use crate::BenchError;

/// Capsules queued per flow before the sender counts the transport as full.
const QUEUE: usize = 64;

struct Group {
    load: Load,
    queues: Vec<Option<mpsc::Sender<Bytes>>>,
}

pub async fn run(ctx: Rc<Ctx>) -> Result<(), BenchError> {
    let tls = Arc::new(crate::tls::client_config(
        ctx.spec.insecure,
        ctx.spec.ca.as_deref(),
        b"http/1.1",
    )?);
    let n = ctx.spec.flows;
    let group = Rc::new(RefCell::new(Group {
        load: Load::new(ctx.spec.shape(n), n),
        queues: (0..n).map(|_| None).collect(),
    }));
    let replies = Rc::new(Notify::new());
    let sem = Rc::new(Semaphore::new(HANDSHAKES_AT_ONCE));
    for i in 0..n {
        tokio::task::spawn_local(flow(
            ctx.clone(),
            tls.clone(),
            group.clone(),
            replies.clone(),
            i,
            sem.clone(),
        ));
    }
    sender(&ctx, &group, &replies).await;
    Ok(())
}

/// Sends the upgrade request and reads the response head; returns the status and any bytes
/// that followed the head.
async fn upgrade<T>(io: &mut T, ctx: &Ctx, i: usize) -> Result<(u16, Vec<u8>), BenchError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let head = format!(
        "GET {} HTTP/1.1\r\nHost: {}:{}\r\nConnection: Upgrade\r\nUpgrade: connect-udp\r\n\
         Capsule-Protocol: ?1\r\n\r\n",
        ctx.spec.path_for(i),
        ctx.spec.server_name,
        ctx.spec.relay.port()
    );
    io.write_all(head.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(BenchError::Setup(
                "connection closed before the response".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let status = std::str::from_utf8(&buf[..end])
                .ok()
                .and_then(|h| h.split(' ').nth(1))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            return Ok((status, buf[end + 4..].to_vec()));
        }
        if buf.len() > 64 * 1024 {
            return Err(BenchError::Setup("response head too long".into()));
        }
    }
}

async fn flow(
    ctx: Rc<Ctx>,
    tls: Arc<rustls::ClientConfig>,
    group: Rc<RefCell<Group>>,
    replies: Rc<Notify>,
    i: usize,
    sem: Rc<Semaphore>,
) {
    let permit = sem.acquire().await;
    let opened = async {
        let mut io = tls_connect(&ctx, &tls).await?;
        let (status, rest) = upgrade(&mut io, &ctx, i).await?;
        Ok::<_, BenchError>((io, status, rest))
    };
    let r = tokio::time::timeout(ctx.spec.setup_timeout, opened).await;
    drop(permit);
    let now = Instant::now();
    let (io, rest) = match r {
        Ok(Ok((io, 101, rest))) => (io, rest),
        Ok(Ok((_, status, _))) => return ctx.flow_failed(now, status),
        Ok(Err(e)) => {
            ctx.error(format!("HTTP/1.1 flow: {e}"));
            return ctx.flow_failed(now, 0);
        }
        Err(_) => return ctx.flow_failed(now, 0),
    };
    ctx.connection_opened();
    let (mut rd, mut wr) = tokio::io::split(io);
    let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
    {
        let mut g = group.borrow_mut();
        g.queues[i] = Some(tx);
        g.load.open_flow(i, now);
    }
    ctx.flow_opened(now);
    tokio::task::spawn_local(async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                return;
            }
            // Whatever else is queued goes out before the next wait.
            while let Ok(b) = rx.try_recv() {
                if wr.write_all(&b).await.is_err() {
                    return;
                }
            }
            if wr.flush().await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut decoder = CapsuleDecoder::new(capsule::MAX_UDP_PAYLOAD);
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending = rest;
    loop {
        let now = Instant::now();
        let mut got = 0;
        {
            let mut rec = ctx.rec.borrow_mut();
            let mut g = group.borrow_mut();
            let r = decoder.decode(&pending, |ev| {
                if let capsule::Event::Datagram {
                    context_id: 0,
                    payload,
                } = ev
                {
                    if rec.on_receive(now, payload).is_some() {
                        g.load.on_reply(i, now);
                        got += 1;
                    }
                }
            });
            if r.is_err() {
                ctx.error("malformed capsule from the relay");
                return;
            }
        }
        if got > 0 {
            replies.notify_one();
        }
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => pending = buf[..n].to_vec(),
        }
    }
}

async fn sender(ctx: &Ctx, group: &RefCell<Group>, replies: &Notify) {
    let size = ctx.spec.payload_size();
    let clen = capsule::datagram_header_len(0, size) + size;
    loop {
        if ctx.stop.get() {
            // Closing the queues ends the writers, which close their connections.
            group.borrow_mut().queues.iter_mut().for_each(|q| *q = None);
            return;
        }
        let now = Instant::now();
        let sending = ctx.sending(now);
        let mut blocked = false;
        let next = {
            let mut g = group.borrow_mut();
            let Group { load, queues } = &mut *g;
            let mut dead = Vec::new();
            if sending {
                let mut rec = ctx.rec.borrow_mut();
                load.poll(now, 64, |i| {
                    let permit = match queues[i].as_ref().map(|q| q.try_reserve()) {
                        None => return false,
                        Some(Ok(p)) => p,
                        Some(Err(mpsc::error::TrySendError::Full(()))) => {
                            blocked = true;
                            return false;
                        }
                        Some(Err(_)) => {
                            dead.push(i);
                            return false;
                        }
                    };
                    let mut b = BytesMut::with_capacity(clen);
                    capsule::encode_datagram_header(0, size, &mut b);
                    let start = b.len();
                    b.resize(start + size, 0);
                    rec.fill(now, i as u32, &mut b[start..]);
                    permit.send(b.freeze());
                    true
                });
                rec.timed_out += load.take_timeouts();
            }
            for i in dead {
                queues[i] = None;
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
