//! Micro-benchmarks of the worker's flow table (`relay::flow_table::FlowTable`):
//!
//! - demultiplexing a target datagram: the flow on (egress socket, source address), a SipHash
//!   lookup (the relay hashes addresses a peer chooses with a randomly keyed hasher), for 64
//!   datagrams (one pass) from a pseudo-random sequence of existing flows, so large tables are
//!   not all in cache;
//! - the slab access by flow ID that follows it (and that client datagrams take directly);
//! - opening and closing a flow (socket assignment, the demux entry, the idle timer, the
//!   quarantine of the freed pair).
//!
//! At 100, 10 000 and 100 000 flows spread over 64 target ports on one address (real traffic
//! spreads over many targets; flows to one target need a socket each).
//! `cargo bench --bench flow_table` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use masque_relay::proto::connect_udp::HttpVersion;
use masque_relay::relay::flow::Flow;
use masque_relay::relay::flow_table::{Assign, ClientRef, FlowId, FlowTable, TargetRef};
use masque_relay::relay::limits::FlowLimiter;

/// Lookups per iteration: one pass of datagrams.
const PASS: usize = 64;
/// Length of the pseudo-random sequence of flows the passes walk through.
const SEQUENCE: usize = 1 << 16;
/// Target ports the flows spread over.
const PORTS: u16 = 64;

/// xorshift64*: a fixed pseudo-random sequence without a dependency.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn target(i: usize) -> SocketAddr {
    SocketAddr::new(
        "192.0.2.1".parse().unwrap(),
        1000 + (i % PORTS as usize) as u16,
    )
}

/// A table with `n` flows; returns it with each flow's (egress, target, id).
fn table(n: usize, now: Instant) -> (FlowTable, Vec<(u32, SocketAddr, FlowId)>) {
    let limiter = FlowLimiter::new(0, 0);
    let mut t = FlowTable::new();
    let mut sockets = 0u32;
    let mut flows = Vec::with_capacity(n);
    for i in 0..n {
        let to = target(i);
        let egress = loop {
            match t.assign(to, now) {
                Assign::Socket(e) => break e,
                Assign::NeedSocket => {
                    t.add_egress(false, sockets, now);
                    sockets += 1;
                }
            }
        };
        let id = t.open(
            Flow::new(now, Duration::from_secs(120), 65_527),
            ClientRef::H3 {
                conn: (i / 256) as u32,
                stream: 4 * (i % 256) as u64,
            },
            HttpVersion::Http3,
            TargetRef { egress, addr: to },
            None,
            limiter.acquire(None).unwrap(),
            now,
        );
        flows.push((egress, to, id));
    }
    (t, flows)
}

fn bench(c: &mut Criterion) {
    let now = Instant::now();
    let mut g = c.benchmark_group("flow table");
    for n in [100usize, 10_000, 100_000] {
        let (mut t, flows) = table(n, now);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let seq: Vec<usize> = (0..SEQUENCE)
            .map(|_| (xorshift(&mut state) % n as u64) as usize)
            .collect();
        let mut at = 0;
        g.throughput(Throughput::Elements(PASS as u64));
        g.bench_with_input(
            BenchmarkId::new("demux + entry, 64 datagrams", n),
            &n,
            |b, _| {
                b.iter(|| {
                    let mut sum = 0u64;
                    for _ in 0..PASS {
                        let (egress, from, _) = flows[seq[at]];
                        at = (at + 1) % SEQUENCE;
                        let id = t.demux(egress, from).expect("a flow");
                        sum += t.get(id).map_or(0, |e| e.flow.counters().dropped);
                    }
                    black_box(sum)
                })
            },
        );
        g.throughput(Throughput::Elements(1));
        let mut later = now;
        let mut i = 0;
        g.bench_with_input(BenchmarkId::new("open + close a flow", n), &n, |b, _| {
            let limiter = FlowLimiter::new(0, 0);
            b.iter(|| {
                // A new flow to one of the targets, closed at once; time moves on so the
                // quarantine and idle sockets are served as in a running worker.
                later += Duration::from_micros(20);
                i += 1;
                let to = target(i);
                let egress = match t.assign(to, later) {
                    Assign::Socket(e) => e,
                    Assign::NeedSocket => {
                        let e = 1_000_000 + i as u32;
                        t.add_egress(false, e, later);
                        e
                    }
                };
                let id = t.open(
                    Flow::new(later, Duration::from_secs(120), 65_527),
                    ClientRef::Tcp {
                        conn: 1,
                        stream: i as u32,
                    },
                    HttpVersion::Http2,
                    TargetRef { egress, addr: to },
                    None,
                    limiter.acquire(None).unwrap(),
                    later,
                );
                black_box(t.close(id, later))
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
