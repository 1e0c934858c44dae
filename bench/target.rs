//! The UDP target: echoes bench payloads marked echo, counts and drops those marked sink,
//! answers counter queries, and echoes anything else unchanged (so it also serves as a plain
//! echo server). Batched: one recvmmsg, then one sendmmsg for the echoes of that batch.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::mmsg::{self, MmsgSocket, BATCH};
use crate::wire::{Header, Kind, TargetCounts};

/// Run tags remembered at most; the oldest runs are forgotten first.
const MAX_TAGS: usize = 1024;

/// Totals since the target started, for its own report.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub received: u64,
    pub received_bytes: u64,
    pub echoed: u64,
    pub echo_failed: u64,
    pub sunk: u64,
    pub foreign: u64,
}

/// The target's state, apart from its socket.
#[derive(Debug, Default)]
struct Counts {
    tags: HashMap<u32, TargetCounts>,
    order: Vec<u32>,
    totals: Totals,
}

impl Counts {
    fn tag(&mut self, tag: u32) -> &mut TargetCounts {
        if !self.tags.contains_key(&tag) {
            if self.order.len() >= MAX_TAGS {
                let old = self.order.remove(0);
                self.tags.remove(&old);
            }
            self.order.push(tag);
        }
        self.tags.entry(tag).or_default()
    }
}

/// A datagram to send back, where, and the run tag and measured bit it counts against.
type Echo = (Vec<u8>, SocketAddr, Option<(u32, bool)>);

/// What to do with one received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Send the datagram back; count a failure against this tag if the send fails.
    Echo(Option<(u32, bool)>),
    /// Answer a query.
    Reply(u32),
    Drop,
}

fn classify(counts: &mut Counts, d: &[u8]) -> Action {
    counts.totals.received += 1;
    counts.totals.received_bytes += d.len() as u64;
    let Some(h) = Header::read(d) else {
        counts.totals.foreign += 1;
        return Action::Echo(None);
    };
    match h.kind {
        Kind::Query => Action::Reply(h.tag),
        Kind::Reply => Action::Drop,
        Kind::Echo | Kind::Sink => {
            let c = counts.tag(h.tag);
            c.total += 1;
            if h.measured {
                c.measured += 1;
                c.measured_bytes += d.len() as u64;
            }
            if h.kind == Kind::Echo {
                Action::Echo(Some((h.tag, h.measured)))
            } else {
                counts.totals.sunk += 1;
                Action::Drop
            }
        }
    }
}

/// Serves on `sock` until `stop` is set (checked every 100 ms) or `until` passes. Prints a line
/// per second to standard error when `verbose`. Returns the totals.
pub async fn serve(
    sock: std::net::UdpSocket,
    stop: Arc<AtomicBool>,
    until: Option<Instant>,
    verbose: bool,
) -> std::io::Result<Totals> {
    let mut s = MmsgSocket::new(sock, 65_536)?;
    let mut counts = Counts::default();
    let mut out: Vec<Echo> = Vec::with_capacity(BATCH);
    let mut last_print = Instant::now();
    let mut printed = Totals::default();
    loop {
        if stop.load(Ordering::Relaxed) || until.is_some_and(|u| Instant::now() >= u) {
            return Ok(counts.totals);
        }
        tokio::select! {
            () = s.readable() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        // A bounded number of batches per wake-up, so `stop` is seen under any load.
        for _ in 0..64 {
            let n = match s.try_recv() {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    // ICMP errors for earlier echoes surface here; they concern nobody now.
                    tracing::debug!(error = %e, "target receive");
                    continue;
                }
            };
            out.clear();
            for i in 0..n {
                let (d, from) = s.datagram(i);
                let Some(from) = from else { continue };
                match classify(&mut counts, d) {
                    Action::Echo(tag) => out.push((d.to_vec(), from, tag)),
                    Action::Reply(tag) => {
                        let c = counts.tags.get(&tag).copied().unwrap_or_default();
                        out.push((c.encode_reply(tag).to_vec(), from, None));
                    }
                    Action::Drop => {}
                }
            }
            // Sent in batches; when the socket buffer is full, one short wait for room, then
            // what still does not fit is lost (and counted).
            let mut sent = vec![false; out.len()];
            let mut next = 0;
            for attempt in 0..2 {
                while next < out.len() {
                    let msgs: Vec<(&[u8], Option<SocketAddr>)> = out[next..]
                        .iter()
                        .take(BATCH)
                        .map(|(b, a, _)| (&b[..], Some(*a)))
                        .collect();
                    match s.try_send(&msgs) {
                        Ok(0) => break,
                        Ok(k) => {
                            sent[next..next + k].iter_mut().for_each(|x| *x = true);
                            next += k;
                        }
                        // A datagram the kernel refused outright: skip it.
                        Err(_) => next += 1,
                    }
                }
                if next == out.len() || attempt == 1 {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(1), s.writable()).await;
            }
            for ((_, _, tag), &ok) in out.iter().zip(&sent) {
                if let Some((tag, measured)) = tag {
                    if ok {
                        counts.totals.echoed += 1;
                    } else {
                        counts.totals.echo_failed += 1;
                    }
                    if *measured {
                        let c = counts.tag(*tag);
                        if ok {
                            c.echoed += 1;
                        } else {
                            c.echo_failed += 1;
                        }
                    }
                } else if ok {
                    counts.totals.echoed += 1;
                }
            }
        }
        if verbose && last_print.elapsed() >= Duration::from_secs(1) {
            let dt = last_print.elapsed().as_secs_f64();
            let t = counts.totals;
            eprintln!(
                "target: received {}/s ({:.3} Gbit/s), echoed {}/s, sunk {}/s, echo failures {}",
                crate::report::si((t.received - printed.received) as f64 / dt),
                (t.received_bytes - printed.received_bytes) as f64 * 8.0 / dt / 1e9,
                crate::report::si((t.echoed - printed.echoed) as f64 / dt),
                crate::report::si((t.sunk - printed.sunk) as f64 / dt),
                t.echo_failed,
            );
            printed = t;
            last_print = Instant::now();
        }
    }
}

/// A target running on a thread of its own (for `run`, `baseline` and `suite`).
#[derive(Debug)]
pub struct TargetThread {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<std::io::Result<Totals>>>,
}

impl TargetThread {
    /// Binds `listen` and serves on a new thread, pinned to `core` if given.
    pub fn start(listen: SocketAddr, core: Option<usize>) -> std::io::Result<Self> {
        let sock = mmsg::bind(listen)?;
        let addr = sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-target".into())
            .spawn(move || {
                crate::pin(core);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(serve(sock, s, None, false))
            })?;
        Ok(TargetThread {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and returns its totals.
    #[cfg(test)]
    pub fn stop(mut self) -> Option<Totals> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take()?.join().ok()?.ok()
    }
}

impl Drop for TargetThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{query_target, HEADER_LEN};

    fn payload(kind: Kind, measured: bool, tag: u32, seq: u32) -> Vec<u8> {
        let mut b = vec![0u8; 100];
        Header {
            kind,
            measured,
            tag,
            flow: 1,
            seq,
            sent_ns: 5,
        }
        .write(&mut b);
        b
    }

    #[test]
    fn counts_by_tag_and_kind() {
        let mut c = Counts::default();
        assert_eq!(
            classify(&mut c, &payload(Kind::Echo, true, 9, 1)),
            Action::Echo(Some((9, true)))
        );
        assert_eq!(
            classify(&mut c, &payload(Kind::Echo, false, 9, 2)),
            Action::Echo(Some((9, false)))
        );
        assert_eq!(
            classify(&mut c, &payload(Kind::Sink, true, 9, 3)),
            Action::Drop
        );
        assert_eq!(classify(&mut c, b"plain echo"), Action::Echo(None));
        assert_eq!(
            classify(&mut c, &payload(Kind::Query, false, 9, 0)[..HEADER_LEN]),
            Action::Reply(9)
        );
        let t = c.tags[&9];
        assert_eq!((t.total, t.measured, t.measured_bytes), (3, 2, 200));
        assert_eq!(c.totals.foreign, 1);
    }

    #[test]
    fn echoes_and_answers_queries_over_loopback() {
        let target = TargetThread::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 2048];
        for seq in 0..10 {
            let p = payload(Kind::Echo, seq % 2 == 0, 77, seq);
            client.send_to(&p, target.addr).unwrap();
            let (n, _) = client.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &p[..]);
        }
        client.send_to(b"hi", target.addr).unwrap();
        let (n, _) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hi");
        let c = query_target(target.addr, 77).unwrap();
        assert_eq!(
            (c.total, c.measured, c.echoed, c.echo_failed),
            (10, 5, 5, 0)
        );
        assert_eq!(query_target(target.addr, 78).unwrap().total, 0);
        let totals = target.stop().unwrap();
        assert_eq!(totals.foreign, 1);
    }
}
