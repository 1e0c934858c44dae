//! Micro-benchmarks of the flow table: finding a flow's record for each datagram.
//!
//! - by the stream ID the peer chose (HTTP/3 request streams: the relay keys them in a std
//!   `HashMap`, SipHash, because a client picks the keys and could aim at a weak hash);
//! - the same keys in a `rustc_hash::FxHashMap` (what the relay uses for keys it issues itself,
//!   its connection handles), to show what SipHash costs;
//! - by index in a `slab::Slab` (how the datagram engine finds a target socket's slot).
//!
//! At 100, 10 000 and 100 000 flows. Keys are client-initiated bidirectional stream IDs (0, 4,
//! 8, ...; a `quinn_proto::StreamId` hashes as its `u64`), values a 64-byte record. Each
//! iteration looks up 64 flows (one pass of datagrams) taken from a pseudo-random sequence of
//! 65 536 existing keys, so large tables are not all in cache. `cargo bench --bench flow_table`
//! (add `-- --quick` for a short run).

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rustc_hash::FxHashMap;
use slab::Slab;

/// Lookups per iteration: one engine pass of datagrams.
const PASS: usize = 64;
/// Length of the pseudo-random key sequence the passes walk through.
const SEQUENCE: usize = 1 << 16;

/// A flow's record, about the size of the hot part of the relay's.
#[derive(Debug, Clone, Copy, Default)]
struct Record {
    counters: [u64; 7],
    slot: u64,
}

/// xorshift64*: a fixed pseudo-random sequence without a dependency.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// `SEQUENCE` flow indices in 0..flows, pseudo-random, the same every run.
fn sequence(flows: usize) -> Vec<usize> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64 ^ flows as u64;
    (0..SEQUENCE)
        .map(|_| (xorshift(&mut s) % flows as u64) as usize)
        .collect()
}

/// The stream ID of flow `i`: the client's `i`-th bidirectional stream.
fn stream_id(i: usize) -> u64 {
    4 * i as u64
}

fn lookups(c: &mut Criterion) {
    let mut g = c.benchmark_group("flow table: 64 lookups");
    g.throughput(Throughput::Elements(PASS as u64));
    for flows in [100usize, 10_000, 100_000] {
        let seq = sequence(flows);
        let ids: Vec<u64> = seq.iter().map(|&i| stream_id(i)).collect();

        let mut sip: HashMap<u64, Record> = HashMap::with_capacity(flows);
        let mut fx: FxHashMap<u64, Record> =
            FxHashMap::with_capacity_and_hasher(flows, Default::default());
        let mut slab: Slab<Record> = Slab::with_capacity(flows);
        let mut slots = Vec::with_capacity(flows);
        for i in 0..flows {
            let r = Record {
                slot: i as u64,
                ..Record::default()
            };
            sip.insert(stream_id(i), r);
            fx.insert(stream_id(i), r);
            slots.push(slab.insert(r));
        }
        let slot_seq: Vec<usize> = seq.iter().map(|&i| slots[i]).collect();

        g.bench_with_input(
            BenchmarkId::new("stream ID, std HashMap (SipHash)", flows),
            &ids,
            |b, ids| {
                let mut at = 0;
                b.iter(|| {
                    let mut sum = 0u64;
                    for id in &ids[at..at + PASS] {
                        if let Some(r) = sip.get_mut(black_box(id)) {
                            r.counters[0] += 1;
                            sum = sum.wrapping_add(r.slot);
                        }
                    }
                    at = (at + PASS) % SEQUENCE;
                    sum
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("stream ID, FxHashMap", flows),
            &ids,
            |b, ids| {
                let mut at = 0;
                b.iter(|| {
                    let mut sum = 0u64;
                    for id in &ids[at..at + PASS] {
                        if let Some(r) = fx.get_mut(black_box(id)) {
                            r.counters[0] += 1;
                            sum = sum.wrapping_add(r.slot);
                        }
                    }
                    at = (at + PASS) % SEQUENCE;
                    sum
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("slot index, Slab", flows),
            &slot_seq,
            |b, slot_seq| {
                let mut at = 0;
                b.iter(|| {
                    let mut sum = 0u64;
                    for &k in &slot_seq[at..at + PASS] {
                        if let Some(r) = slab.get_mut(black_box(k)) {
                            r.counters[0] += 1;
                            sum = sum.wrapping_add(r.slot);
                        }
                    }
                    at = (at + PASS) % SEQUENCE;
                    sum
                })
            },
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = lookups
}
criterion_main!(benches);
