//! The plain UDP client of the baselines: one connected socket per "connection", its flows
//! told apart by the flow ID in the bench header; recvmmsg and sendmmsg. Pointed at the target
//! it is the **direct** baseline, at the raw forwarder the **raw-forward** one. In upload runs a
//! flow's burst leaves as UDP GSO trains (one sendmmsg message with `UDP_SEGMENT` per burst, at
//! most [`crate::mmsg::gso_segments`] datagrams each).

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use crate::load::Load;
use crate::mmsg::{self, GsoTx, MmsgSocket, Train, BATCH};
use crate::run::{split, Ctx, Mode};
use crate::BenchError;

pub async fn run(ctx: Rc<Ctx>) -> Result<(), BenchError> {
    let groups = split(ctx.spec.flows, ctx.spec.connections);
    let mut tasks = Vec::new();
    for g in groups {
        let sock = MmsgSocket::new(mmsg::connected(ctx.spec.relay)?, 65_536)?;
        ctx.connection_opened();
        tasks.push(tokio::task::spawn_local(group(ctx.clone(), sock, g)));
    }
    for t in tasks {
        if let Ok(Err(e)) = t.await {
            return Err(e);
        }
    }
    Ok(())
}

async fn group(
    ctx: Rc<Ctx>,
    mut sock: MmsgSocket,
    flows: std::ops::Range<usize>,
) -> Result<(), BenchError> {
    let base = flows.start;
    let mut load = Load::new(ctx.spec.shape(flows.len()), flows.len());
    let now = Instant::now();
    for i in 0..flows.len() {
        load.open_flow(i, now);
        ctx.flow_opened(now);
    }
    let size = ctx.spec.payload_size();
    let mut out: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; size]).collect();
    let mut flow_of = vec![0usize; BATCH];
    // Upload: a flow's consecutive datagrams go as one GSO train, at most a burst each.
    let mut gso = (ctx.spec.mode == Mode::Upload).then(|| GsoTx::new(&sock.io));
    let per_train = mmsg::gso_segments(size).min(usize::from(ctx.spec.burst.max(1)));
    loop {
        if ctx.stop.get() {
            return Ok(());
        }
        let now = Instant::now();
        // Receive everything waiting (bounded).
        for _ in 0..16 {
            let n = match sock.try_recv() {
                Ok(0) => break,
                Ok(n) => n,
                // ICMP port unreachable for an earlier datagram: count nothing, go on.
                Err(_) => continue,
            };
            let mut rec = ctx.rec.borrow_mut();
            for i in 0..n {
                if let Some(f) = rec.on_receive(now, sock.datagram(i).0) {
                    if let Some(local) = (f as usize).checked_sub(base) {
                        load.on_reply(local, now);
                    }
                }
            }
        }
        // Send what the load allows, one sendmmsg per batch.
        let mut sent_any = false;
        let mut blocked = false;
        let sending = ctx.sending(now);
        if sending {
            let n = {
                let mut rec = ctx.rec.borrow_mut();
                let mut k = 0;
                load.poll(now, BATCH, |i| {
                    rec.fill(now, (base + i) as u32, &mut out[k]);
                    flow_of[k] = i;
                    k += 1;
                    true
                });
                rec.timed_out += load.take_timeouts();
                k
            };
            if n > 0 {
                let took = match gso.as_mut() {
                    Some(gso) => {
                        let mut trains = Vec::new();
                        let mut k = 0;
                        while k < n {
                            let mut j = k + 1;
                            while j < n && flow_of[j] == flow_of[k] && j - k < per_train {
                                j += 1;
                            }
                            trains.push(Train {
                                datagrams: out[k..j].iter().map(|b| &b[..]).collect(),
                                to: None,
                            });
                            k = j;
                        }
                        gso.send(&sock.io, &trains).unwrap_or(0)
                    }
                    None => {
                        let msgs: Vec<(&[u8], Option<SocketAddr>)> =
                            out[..n].iter().map(|b| (&b[..], None)).collect();
                        sock.try_send(&msgs).unwrap_or(0)
                    }
                };
                let mut rec = ctx.rec.borrow_mut();
                // Last first: each cancel takes back its flow's most recent send.
                for k in (took..n).rev() {
                    rec.unsend(&out[k]);
                    // Hand the credit back: the datagram never left.
                    load.cancel(flow_of[k]);
                }
                sent_any = took > 0;
                blocked = took < n;
            }
        }
        if sent_any && load.has_ready() {
            tokio::task::yield_now().await;
            continue;
        }
        let wake = if sending && !blocked {
            load.next_send(now)
        } else {
            Some(now + std::time::Duration::from_millis(10))
        };
        tokio::select! {
            () = sock.readable() => {}
            () = sock.writable(), if blocked => {}
            () = sleep_until(wake) => {}
            () = ctx.wake.notified() => {}
        }
    }
}

/// Sleeps until `t`, or for ever without one.
pub async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
