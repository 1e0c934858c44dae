//! The UDP target: echoes bench payloads marked echo, counts and drops those marked sink,
//! answers a download request with a burst of datagrams sent as UDP GSO trains, answers counter
//! queries, and echoes anything else unchanged (so it also serves as a plain echo server).
//! Batched: one recvmmsg, then one sendmmsg for the echoes of that batch and one (GSO) sendmmsg
//! for its bursts.
//!
//! One thread serves one socket or many (`--ports N`: N consecutive ports, one task each on the
//! thread's reactor, one receive batch and one set of counters for all of them), so flows can
//! be spread over many target addresses at the cost of one thread.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::mmsg::{self, GsoTx, RxBatch, Train, TxBatch, BATCH};
use crate::wire::{burst_seq, DownloadRequest, Header, Kind, TargetCounts};

/// Run tags remembered at most; the oldest runs are forgotten first.
const MAX_TAGS: usize = 1024;
/// Bytes of each receive buffer: any UDP datagram fits.
const RX_BUF: usize = 65_536;

/// Totals since the target started, for its own report.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub received: u64,
    pub received_bytes: u64,
    /// Datagrams sent back: echoes and burst datagrams.
    pub echoed: u64,
    pub echo_failed: u64,
    pub sunk: u64,
    /// Download requests answered with a burst.
    pub bursts: u64,
    pub foreign: u64,
}

/// The target's counters, shared by its sockets.
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

    /// `n` datagrams of `tag` were to go back (measured or not); `sent` of them did.
    fn sent_back(&mut self, tag: Option<(u32, bool)>, n: usize, sent: usize) {
        let (n, sent) = (n as u64, sent as u64);
        self.totals.echoed += sent;
        if let Some((tag, measured)) = tag {
            self.totals.echo_failed += n - sent;
            if measured {
                let c = self.tag(tag);
                c.echoed += sent;
                c.echo_failed += n - sent;
            }
        }
    }
}

/// A datagram to send back, where, and the run tag and measured bit it counts against.
type Echo = (Vec<u8>, SocketAddr, Option<(u32, bool)>);

/// A burst answering a download request: its datagrams back to back in one buffer.
#[derive(Debug)]
struct Burst {
    buf: Vec<u8>,
    size: usize,
    to: SocketAddr,
    tag: (u32, bool),
}

impl Burst {
    fn datagrams(&self) -> usize {
        self.buf.len() / self.size.max(1)
    }
}

/// What to do with one received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Send the datagram back; count a failure against this tag if the send fails.
    Echo(Option<(u32, bool)>),
    /// Answer a query.
    Reply(u32),
    /// Answer a download request with a burst.
    Burst(Header, DownloadRequest),
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
        Kind::Reply | Kind::Burst => Action::Drop,
        Kind::Echo | Kind::Sink | Kind::Download => {
            let req = if h.kind == Kind::Download {
                match DownloadRequest::read(d) {
                    Some(r) => Some(r),
                    None => {
                        counts.totals.foreign += 1;
                        return Action::Drop;
                    }
                }
            } else {
                None
            };
            let c = counts.tag(h.tag);
            c.total += 1;
            if h.measured {
                c.measured += 1;
                c.measured_bytes += d.len() as u64;
            }
            match (h.kind, req) {
                (Kind::Echo, _) => Action::Echo(Some((h.tag, h.measured))),
                (_, Some(r)) => Action::Burst(h, r),
                _ => {
                    counts.totals.sunk += 1;
                    Action::Drop
                }
            }
        }
    }
}

/// Writes the burst answering request `h` into `buf`: `req.burst` payloads of `req.size` bytes,
/// back to back, each with the request's tag, flow, measured bit and send time, and sequence
/// numbers following on from `h.seq * burst` (see [`burst_seq`]).
fn write_burst(h: &Header, req: DownloadRequest, buf: &mut Vec<u8>) {
    let size = req.size as usize;
    buf.clear();
    buf.resize(size * usize::from(req.burst), 0);
    for (i, d) in buf.chunks_mut(size).enumerate() {
        Header {
            kind: Kind::Burst,
            measured: h.measured,
            tag: h.tag,
            flow: h.flow,
            seq: burst_seq(h.seq, req.burst, i as u16),
            sent_ns: h.sent_ns,
        }
        .write(d);
    }
}

/// What the sockets of one target thread share (one task at a time, never across an await).
struct Shared {
    rx: RefCell<RxBatch>,
    tx: RefCell<TxBatch>,
    gso: RefCell<Option<GsoTx>>,
    counts: RefCell<Counts>,
}

/// Sends `out` in sendmmsg batches; when the socket buffer is full, one short wait for room,
/// then what still does not fit is lost. Returns which were sent.
async fn send_echoes(shared: &Shared, io: &tokio::net::UdpSocket, out: &[Echo]) -> Vec<bool> {
    let mut sent = vec![false; out.len()];
    let mut next = 0;
    for attempt in 0..2 {
        while next < out.len() {
            let msgs: Vec<(&[u8], Option<SocketAddr>)> = out[next..]
                .iter()
                .take(BATCH)
                .map(|(b, a, _)| (&b[..], Some(*a)))
                .collect();
            match shared.tx.borrow_mut().send(io, &msgs) {
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
        let _ = tokio::time::timeout(Duration::from_millis(1), io.writable()).await;
    }
    sent
}

/// Sends the bursts as GSO trains of at most [`mmsg::gso_segments`] datagrams, as
/// [`send_echoes`] does. Returns how many datagrams of each burst were sent.
async fn send_bursts(shared: &Shared, io: &tokio::net::UdpSocket, bursts: &[Burst]) -> Vec<usize> {
    let mut sent = vec![0usize; bursts.len()];
    let mut trains: Vec<Train<'_>> = Vec::new();
    let mut owner: Vec<usize> = Vec::new();
    for (b, burst) in bursts.iter().enumerate() {
        let per = mmsg::gso_segments(burst.size);
        let datagrams: Vec<&[u8]> = burst.buf.chunks(burst.size).collect();
        for t in datagrams.chunks(per) {
            trains.push(Train {
                datagrams: t.to_vec(),
                to: Some(burst.to),
            });
            owner.push(b);
        }
    }
    let mut next = 0;
    for attempt in 0..2 {
        while next < trains.len() {
            let r = {
                let mut gso = shared.gso.borrow_mut();
                let gso = gso.get_or_insert_with(|| GsoTx::new(io));
                gso.send(io, &trains[next..])
            };
            match r {
                Ok(0) => break,
                Ok(mut k) => {
                    // Whole trains with GSO; sent one by one, a train may go in part.
                    while k > 0 && next < trains.len() {
                        let len = trains[next].datagrams.len();
                        let m = len.min(k);
                        sent[owner[next]] += m;
                        k -= m;
                        if m == len {
                            next += 1;
                        } else {
                            trains[next].datagrams.drain(..m);
                        }
                    }
                }
                // A train the kernel refused outright: skip it.
                Err(_) => next += 1,
            }
        }
        if next == trains.len() || attempt == 1 {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(1), io.writable()).await;
    }
    sent
}

/// Serves one socket until `stop` is set (checked every 100 ms) or `until` passes.
async fn serve_socket(
    shared: Rc<Shared>,
    io: tokio::net::UdpSocket,
    stop: Arc<AtomicBool>,
    until: Option<Instant>,
) {
    let mut out: Vec<Echo> = Vec::with_capacity(BATCH);
    let mut bursts: Vec<Burst> = Vec::new();
    let mut spare: Vec<Vec<u8>> = Vec::new();
    loop {
        if stop.load(Ordering::Relaxed) || until.is_some_and(|u| Instant::now() >= u) {
            return;
        }
        tokio::select! {
            r = io.readable() => { let _ = r; }
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        // A bounded number of batches per wake-up, so `stop` is seen under any load.
        for _ in 0..64 {
            out.clear();
            spare.extend(bursts.drain(..).map(|b| b.buf));
            {
                let mut rx = shared.rx.borrow_mut();
                let n = match rx.recv(&io) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        // ICMP errors for earlier echoes surface here; they concern nobody now.
                        tracing::debug!(error = %e, "target receive");
                        continue;
                    }
                };
                let mut counts = shared.counts.borrow_mut();
                for i in 0..n {
                    let (d, from) = rx.datagram(i);
                    let Some(from) = from else { continue };
                    match classify(&mut counts, d) {
                        Action::Echo(tag) => out.push((d.to_vec(), from, tag)),
                        Action::Reply(tag) => {
                            let c = counts.tags.get(&tag).copied().unwrap_or_default();
                            out.push((c.encode_reply(tag).to_vec(), from, None));
                        }
                        Action::Burst(h, req) => {
                            let mut buf = spare.pop().unwrap_or_default();
                            write_burst(&h, req, &mut buf);
                            bursts.push(Burst {
                                buf,
                                size: req.size as usize,
                                to: from,
                                tag: (h.tag, h.measured),
                            });
                        }
                        Action::Drop => {}
                    }
                }
            }
            if !out.is_empty() {
                let sent = send_echoes(&shared, &io, &out).await;
                let mut counts = shared.counts.borrow_mut();
                for ((_, _, tag), &ok) in out.iter().zip(&sent) {
                    counts.sent_back(*tag, 1, usize::from(ok));
                }
            }
            if !bursts.is_empty() {
                let sent = send_bursts(&shared, &io, &bursts).await;
                let mut counts = shared.counts.borrow_mut();
                for (b, &k) in bursts.iter().zip(&sent) {
                    counts.totals.bursts += 1;
                    counts.sent_back(Some(b.tag), b.datagrams(), k);
                }
            }
        }
    }
}

/// Serves on `socks` (one task each on this thread) until `stop` is set (checked every 100 ms)
/// or `until` passes. Prints a line per second to standard error when `verbose`. Returns the
/// totals over all sockets.
pub async fn serve(
    socks: Vec<std::net::UdpSocket>,
    stop: Arc<AtomicBool>,
    until: Option<Instant>,
    verbose: bool,
) -> std::io::Result<Totals> {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            let mut ios = Vec::with_capacity(socks.len());
            for s in socks {
                s.set_nonblocking(true)?;
                ios.push(tokio::net::UdpSocket::from_std(s)?);
            }
            let shared = Rc::new(Shared {
                rx: RefCell::new(RxBatch::new(RX_BUF)),
                tx: RefCell::new(TxBatch::default()),
                gso: RefCell::new(None),
                counts: RefCell::new(Counts::default()),
            });
            let tasks: Vec<_> = ios
                .into_iter()
                .map(|io| {
                    tokio::task::spawn_local(serve_socket(shared.clone(), io, stop.clone(), until))
                })
                .collect();
            let mut last_print = Instant::now();
            let mut printed = Totals::default();
            while !tasks.iter().all(|t| t.is_finished()) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if verbose && last_print.elapsed() >= Duration::from_secs(1) {
                    let dt = last_print.elapsed().as_secs_f64();
                    let t = shared.counts.borrow().totals;
                    eprintln!(
                        "target: received {}/s ({:.3} Gbit/s), echoed {}/s, sunk {}/s, \
                         bursts {}/s, send failures {}",
                        crate::report::si((t.received - printed.received) as f64 / dt),
                        (t.received_bytes - printed.received_bytes) as f64 * 8.0 / dt / 1e9,
                        crate::report::si((t.echoed - printed.echoed) as f64 / dt),
                        crate::report::si((t.sunk - printed.sunk) as f64 / dt),
                        crate::report::si((t.bursts - printed.bursts) as f64 / dt),
                        t.echo_failed,
                    );
                    printed = t;
                    last_print = Instant::now();
                }
            }
            for t in tasks {
                let _ = t.await;
            }
            let totals = shared.counts.borrow().totals;
            Ok(totals)
        })
        .await
}

/// Binds `ports` consecutive UDP ports from `listen`'s. With port 0 and more than one port,
/// picks a free range below the usual ephemeral ports (so the relay's own sockets do not take
/// them meanwhile); with one port, binds `listen` as it is.
pub fn bind_ports(listen: SocketAddr, ports: u16) -> std::io::Result<Vec<std::net::UdpSocket>> {
    let n = ports.max(1);
    let bind_range = |base: u16| -> std::io::Result<Vec<std::net::UdpSocket>> {
        (0..n)
            .map(|i| {
                let mut a = listen;
                a.set_port(base.checked_add(i).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "port range past 65535")
                })?);
                mmsg::bind(a)
            })
            .collect()
    };
    if n == 1 || listen.port() != 0 {
        return bind_range(listen.port());
    }
    let (lo, hi) = (10_000u16, 32_000u16.saturating_sub(n).max(10_001));
    let mut last = None;
    for _ in 0..64 {
        let base = rand::random_range(lo..hi);
        match bind_range(base) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free port range")))
}

/// A target running on a thread of its own (for `run`, `baseline` and `suite`).
#[derive(Debug)]
pub struct TargetThread {
    /// The first port's address; the others follow it.
    pub addr: SocketAddr,
    pub ports: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<std::io::Result<Totals>>>,
}

impl TargetThread {
    /// Binds `listen` and serves on a new thread, pinned to `core` if given.
    pub fn start(listen: SocketAddr, core: Option<usize>) -> std::io::Result<Self> {
        Self::start_ports(listen, 1, core)
    }

    /// Binds `ports` consecutive ports (see [`bind_ports`]) and serves them all on one new
    /// thread, pinned to `core` if given.
    pub fn start_ports(
        listen: SocketAddr,
        ports: u16,
        core: Option<usize>,
    ) -> std::io::Result<Self> {
        let socks = bind_ports(listen, ports)?;
        let addr = socks[0].local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-target".into())
            .spawn(move || {
                crate::pin(core);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(serve(socks, s, None, false))
            })?;
        Ok(TargetThread {
            addr,
            ports: ports.max(1),
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
    use crate::wire::{query_target, DOWNLOAD_REQUEST_LEN, HEADER_LEN};

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

    fn download(measured: bool, tag: u32, flow: u32, seq: u32, burst: u16, size: u32) -> Vec<u8> {
        let mut b = vec![0u8; DOWNLOAD_REQUEST_LEN];
        Header {
            kind: Kind::Download,
            measured,
            tag,
            flow,
            seq,
            sent_ns: 77,
        }
        .write(&mut b);
        DownloadRequest { burst, size }.write(&mut b);
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
        // A download request is counted like any payload of its run, and answered.
        let d = download(true, 9, 4, 5, 16, 1200);
        assert!(matches!(
            classify(&mut c, &d),
            Action::Burst(h, DownloadRequest { burst: 16, size: 1200 }) if h.flow == 4
        ));
        assert_eq!(c.tags[&9].measured, 3);
        // One without its fields is not.
        assert_eq!(classify(&mut c, &d[..HEADER_LEN]), Action::Drop);
        assert_eq!((c.tags[&9].total, c.totals.foreign), (4, 2));
    }

    #[test]
    fn a_burst_follows_on_from_its_request() {
        let h = Header::read(&download(true, 3, 8, 10, 5, 64)).unwrap();
        let mut buf = Vec::new();
        write_burst(&h, DownloadRequest { burst: 5, size: 64 }, &mut buf);
        assert_eq!(buf.len(), 5 * 64);
        for (i, d) in buf.chunks(64).enumerate() {
            let b = Header::read(d).unwrap();
            assert_eq!(
                (b.kind, b.measured, b.tag, b.flow, b.sent_ns),
                (Kind::Burst, true, 3, 8, 77)
            );
            assert_eq!(b.seq, 50 + i as u32);
        }
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

    /// A download request is answered with its burst (GSO trains of at most 54 x 1200 B, so
    /// 100 datagrams take two): every datagram arrives on a socket without GRO, with the run
    /// tag and consecutive sequence numbers, and the counts say what was sent.
    #[test]
    fn a_download_burst_arrives_in_full_and_is_counted() {
        let target = TargetThread::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = vec![0u8; 65_536];
        let mut want_seq = Vec::new();
        for (seq, burst, measured) in [(3u32, 16u16, true), (4, 100, true), (5, 16, false)] {
            client
                .send_to(&download(measured, 41, 2, seq, burst, 1200), target.addr)
                .unwrap();
            let mut got = Vec::new();
            for _ in 0..burst {
                let (n, from) = client.recv_from(&mut buf).unwrap();
                assert_eq!((n, from), (1200, target.addr));
                let h = Header::read(&buf[..n]).unwrap();
                assert_eq!(
                    (h.kind, h.tag, h.flow, h.measured, h.sent_ns),
                    (Kind::Burst, 41, 2, measured, 77)
                );
                got.push(h.seq);
            }
            want_seq = (0..burst).map(|i| burst_seq(seq, burst, i)).collect();
            assert_eq!(got, want_seq);
        }
        assert_eq!(want_seq[0], 80);
        let c = query_target(target.addr, 41).unwrap();
        assert_eq!(
            (c.total, c.measured, c.echoed, c.echo_failed),
            (3, 2, 116, 0)
        );
        assert_eq!(c.measured_bytes, 2 * DOWNLOAD_REQUEST_LEN as u64);
        let totals = target.stop().unwrap();
        // Sent back: the three bursts and the query's reply.
        assert_eq!((totals.bursts, totals.echoed), (3, 133));
    }

    /// One thread serves several consecutive ports; they share one set of counters, so a
    /// query to any port sees what all of them received.
    #[test]
    fn many_ports_share_one_count() {
        let target = TargetThread::start_ports("127.0.0.1:0".parse().unwrap(), 4, None).unwrap();
        assert_eq!(target.ports, 4);
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 2048];
        for i in 0..4u16 {
            let mut to = target.addr;
            to.set_port(target.addr.port() + i);
            let p = payload(Kind::Echo, true, 12, u32::from(i));
            client.send_to(&p, to).unwrap();
            let (n, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&p[..], to));
        }
        let mut last = target.addr;
        last.set_port(target.addr.port() + 3);
        let c = query_target(last, 12).unwrap();
        assert_eq!((c.measured, c.echoed), (4, 4));
        assert_eq!(target.stop().unwrap().received, 5);
    }
}
