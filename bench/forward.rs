//! The raw forwarder: the floor of BENCH.md. A plain UDP relay with the relay's shape and none
//! of its protocol: one front socket for clients, one connected socket to the target per flow,
//! recvmmsg in and sendmmsg out, no HTTP, no crypto, no GSO/GRO. A GSO train (an upload client's,
//! or a target's download burst) arrives on these GRO-less sockets as its separate datagrams and
//! is forwarded datagram by datagram; the receive buffers hold any UDP datagram (64 KiB), so
//! nothing is cut short (a datagram that was would be dropped and counted, never forwarded).
//!
//! ```text
//!  client --UDP--> front socket --recvmmsg--> flow table ((client, flow id) -> socket)
//!                                                  --sendmmsg--> flow socket --> target
//!  target --> flow socket --recvmmsg (per flow task)--> reply queue
//!                                   --sendmmsg (one flush per loop pass)--> front --> client
//! ```
//!
//! A flow is a client address and the flow ID in the bench header (or 0 for other payloads),
//! as the relay's flow is a connection and a request stream. It runs as its own process
//! (`masque-bench forward`), so its CPU time is read from `/proc` exactly like the relay's.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::mmsg::{self, RxBatch, TxBatch, BATCH};
use crate::wire::Header;

/// Largest datagram forwarded.
const MAX_DATAGRAM: usize = 65_536;

/// Counts of the forwarder.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub to_target: u64,
    pub to_client: u64,
    pub dropped: u64,
    pub flows: u64,
}

struct Shared {
    front: tokio::net::UdpSocket,
    /// Replies waiting for the next flush to the front socket.
    out: RefCell<Vec<(Vec<u8>, SocketAddr)>>,
    /// Spare reply buffers.
    spare: RefCell<Vec<Vec<u8>>>,
    /// Receive scratch for the flow sockets (used by one task at a time, never across an await).
    scratch: RefCell<RxBatch>,
    tx: RefCell<TxBatch>,
    flush: Notify,
    totals: RefCell<Totals>,
}

impl Shared {
    /// Sends what waits in `out`; what the socket does not take after a short wait is dropped.
    async fn flush_out(&self) {
        for attempt in 0..2 {
            let pending = {
                let mut out = self.out.borrow_mut();
                let mut tx = self.tx.borrow_mut();
                let mut sent = 0;
                while sent < out.len() {
                    let msgs: Vec<(&[u8], Option<SocketAddr>)> = out[sent..]
                        .iter()
                        .take(BATCH)
                        .map(|(b, a)| (&b[..], Some(*a)))
                        .collect();
                    match tx.send(&self.front, &msgs) {
                        Ok(0) => break,
                        Ok(k) => sent += k,
                        Err(_) => {
                            sent += 1;
                            self.totals.borrow_mut().dropped += 1;
                        }
                    }
                }
                self.totals.borrow_mut().to_client += sent as u64;
                let mut spare = self.spare.borrow_mut();
                spare.extend(out.drain(..sent).map(|(b, _)| b));
                if attempt == 1 {
                    self.totals.borrow_mut().dropped += out.len() as u64;
                    spare.extend(out.drain(..).map(|(b, _)| b));
                }
                !out.is_empty()
            };
            if !pending {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(1), self.front.writable()).await;
        }
    }
}

/// Reads one flow's socket and queues the replies for `client`.
async fn flow_task(shared: Rc<Shared>, sock: Rc<tokio::net::UdpSocket>, client: SocketAddr) {
    loop {
        let _ = sock.readable().await;
        let full = {
            let mut scratch = shared.scratch.borrow_mut();
            let n = match scratch.recv(&sock) {
                Ok(n) => n,
                // An ICMP error from the target: the flow goes on, as the relay's would not; the
                // forwarder is a floor, not a policy.
                Err(_) => continue,
            };
            if n == 0 {
                continue;
            }
            let mut out = shared.out.borrow_mut();
            let mut spare = shared.spare.borrow_mut();
            for i in 0..n {
                if scratch.truncated(i) {
                    shared.totals.borrow_mut().dropped += 1;
                    continue;
                }
                let (d, _) = scratch.datagram(i);
                let mut b = spare.pop().unwrap_or_default();
                b.clear();
                b.extend_from_slice(d);
                out.push((b, client));
            }
            out.len() >= BATCH
        };
        if full {
            shared.flush_out().await;
        } else {
            // Other flows' replies of this loop pass join the same sendmmsg.
            shared.flush.notify_one();
        }
    }
}

/// Forwards between clients on `front` and `target` until `until`; returns the totals.
pub async fn serve(
    front: std::net::UdpSocket,
    target: SocketAddr,
    until: Instant,
) -> std::io::Result<Totals> {
    let shared = Rc::new(Shared {
        front: tokio::net::UdpSocket::from_std(front)?,
        out: RefCell::new(Vec::with_capacity(BATCH)),
        spare: RefCell::new(Vec::new()),
        scratch: RefCell::new(RxBatch::new(MAX_DATAGRAM)),
        tx: RefCell::new(TxBatch::default()),
        flush: Notify::new(),
        totals: RefCell::new(Totals::default()),
    });
    let flusher = {
        let s = shared.clone();
        tokio::task::spawn_local(async move {
            loop {
                s.flush.notified().await;
                s.flush_out().await;
            }
        })
    };
    let mut rx = RxBatch::new(MAX_DATAGRAM);
    let mut tx = TxBatch::default();
    let mut flows: HashMap<(SocketAddr, u32), Rc<tokio::net::UdpSocket>> = HashMap::new();
    let mut tasks = Vec::new();
    loop {
        if Instant::now() >= until {
            break;
        }
        tokio::select! {
            r = shared.front.readable() => { let _ = r; }
            () = tokio::time::sleep_until(until.into()) => break,
        }
        for _ in 0..64 {
            let n = match rx.recv(&shared.front) {
                Ok(0) => break,
                Ok(n) => n,
                Err(_) => continue,
            };
            // Consecutive datagrams of one flow go out in one sendmmsg.
            let mut i = 0;
            while i < n {
                let (d, from) = rx.datagram(i);
                let Some(from) = from.filter(|_| !rx.truncated(i)) else {
                    shared.totals.borrow_mut().dropped += 1;
                    i += 1;
                    continue;
                };
                let key = (from, Header::read(d).map(|h| h.flow).unwrap_or(0));
                let mut j = i + 1;
                while j < n {
                    let (d2, f2) = rx.datagram(j);
                    if f2 != Some(from)
                        || rx.truncated(j)
                        || Header::read(d2).map(|h| h.flow).unwrap_or(0) != key.1
                    {
                        break;
                    }
                    j += 1;
                }
                let sock = match flows.get(&key) {
                    Some(s) => s.clone(),
                    None => {
                        let s = match mmsg::connected(target)
                            .and_then(tokio::net::UdpSocket::from_std)
                        {
                            Ok(s) => Rc::new(s),
                            Err(e) => {
                                tracing::warn!(error = %e, "forwarder cannot open a flow socket");
                                shared.totals.borrow_mut().dropped += (j - i) as u64;
                                i = j;
                                continue;
                            }
                        };
                        shared.totals.borrow_mut().flows += 1;
                        tasks.push(tokio::task::spawn_local(flow_task(
                            shared.clone(),
                            s.clone(),
                            from,
                        )));
                        flows.insert(key, s.clone());
                        s
                    }
                };
                let msgs: Vec<(&[u8], Option<SocketAddr>)> =
                    (i..j).map(|k| (rx.datagram(k).0, None)).collect();
                let sent = tx.send(&sock, &msgs).unwrap_or(0);
                let mut t = shared.totals.borrow_mut();
                t.to_target += sent as u64;
                t.dropped += (msgs.len() - sent) as u64;
                i = j;
            }
        }
    }
    flusher.abort();
    for t in tasks {
        t.abort();
    }
    let totals = *shared.totals.borrow();
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::TargetThread;

    /// A forwarder to `target` on a thread of its own for 3 s: its front address and the
    /// thread, which returns its totals.
    fn forwarder(
        target: SocketAddr,
    ) -> (SocketAddr, std::thread::JoinHandle<std::io::Result<Totals>>) {
        let front = mmsg::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = front.local_addr().unwrap();
        let fwd = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let local = tokio::task::LocalSet::new();
            local.block_on(
                &rt,
                serve(front, target, Instant::now() + Duration::from_secs(3)),
            )
        });
        (addr, fwd)
    }

    #[test]
    fn forwards_both_ways_per_flow() {
        let target = TargetThread::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let (addr, fwd) = forwarder(target.addr);
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 2048];
        for flow in 0..3u32 {
            let mut p = vec![0u8; 64];
            Header {
                kind: crate::wire::Kind::Echo,
                measured: true,
                tag: 5,
                flow,
                seq: 0,
                sent_ns: 0,
            }
            .write(&mut p);
            client.send_to(&p, addr).unwrap();
            let (n, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!(from, addr);
            assert_eq!(&buf[..n], &p[..]);
        }
        let t = fwd.join().unwrap().unwrap();
        assert_eq!((t.to_target, t.to_client, t.flows), (3, 3, 3));
    }

    /// An upload client's GSO train (16 x 1200 B in one message) reaches the target whole,
    /// datagram by datagram; a target's download burst (GSO trains) comes back whole too.
    #[test]
    fn forwards_gso_trains_whole() {
        use crate::mmsg::{GsoTx, Train};
        use crate::wire::{query_target, DownloadRequest, Kind, DOWNLOAD_REQUEST_LEN};
        let target = TargetThread::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let (addr, fwd) = forwarder(target.addr);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = tokio::net::UdpSocket::from_std(mmsg::connected(addr).unwrap()).unwrap();
            let payloads: Vec<Vec<u8>> = (0..16u32)
                .map(|seq| {
                    let mut p = vec![0u8; 1200];
                    Header {
                        kind: Kind::Sink,
                        measured: true,
                        tag: 6,
                        flow: 2,
                        seq,
                        sent_ns: 0,
                    }
                    .write(&mut p);
                    p
                })
                .collect();
            let train = Train {
                datagrams: payloads.iter().map(|p| &p[..]).collect(),
                to: None,
            };
            let mut gso = GsoTx::new(&client);
            assert_eq!(gso.send(&client, &[train]).unwrap(), 16);
            // A download request through the forwarder: its burst comes back in full.
            let mut req = vec![0u8; DOWNLOAD_REQUEST_LEN];
            Header {
                kind: Kind::Download,
                measured: true,
                tag: 6,
                flow: 3,
                seq: 1,
                sent_ns: 0,
            }
            .write(&mut req);
            DownloadRequest {
                burst: 20,
                size: 1200,
            }
            .write(&mut req);
            client.send(&req).await.unwrap();
            let mut buf = vec![0u8; 65_536];
            for i in 0..20 {
                let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
                    .await
                    .expect("the burst arrives")
                    .unwrap();
                assert_eq!(n, 1200);
                let h = Header::read(&buf[..n]).unwrap();
                assert_eq!((h.kind, h.flow, h.seq), (Kind::Burst, 3, 20 + i));
            }
        });
        let c = query_target(target.addr, 6).unwrap();
        assert_eq!((c.measured, c.echoed), (17, 20));
        assert_eq!(c.measured_bytes, 16 * 1200 + DOWNLOAD_REQUEST_LEN as u64);
        let t = fwd.join().unwrap().unwrap();
        assert_eq!((t.to_target, t.to_client, t.dropped), (17, 20, 0));
    }
}
