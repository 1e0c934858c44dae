//! Micro-benchmarks of one worker pass over in-memory queues: the relay's sans-I/O work for 64
//! datagrams, without sockets, TLS or QUIC.
//!
//! - client to target, HTTP/3: for each QUIC DATAGRAM payload, read the quarter stream ID,
//!   find the request's flow by stream ID (std `HashMap`, as the relay keys request streams),
//!   read the context ID, `Flow::on_client_datagram`, and queue the payload (a reference, no
//!   copy) for the flow's target socket slot;
//! - client to target, HTTP/2 and HTTP/1.1: decode a chunk of 64 DATAGRAM capsules from one
//!   stream (`CapsuleDecoder`), `Flow::on_client_datagram` for each, queue a copy of the payload
//!   (the decoder lends it);
//! - target to client: for each target datagram (slot index and generation), find the slot in
//!   a `Slab`, its flow by stream ID, `Flow::on_target_datagram`, encode the HTTP/3 datagram
//!   (quarter stream ID, context 0, payload) or the DATAGRAM capsule into an output buffer (the
//!   one copy the relay makes), `Flow::on_sent_to_client`.
//!
//! 100 flows, the 64 datagrams spread over them; 64 and 1200-byte payloads.
//! `cargo bench --bench worker_pass` (add `-- --quick` for a short run).

use std::collections::{HashMap, VecDeque};
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use masque_relay::proto::capsule::{self, CapsuleDecoder};
use masque_relay::proto::varint;
use masque_relay::relay::flow::{ClientDatagram, Flow};
use slab::Slab;

/// Datagrams per pass.
const PASS: usize = 64;
/// Flows in the table.
const FLOWS: usize = 100;

/// What the relay keeps per request stream (the part the datagram path touches).
struct Request {
    flow: Flow,
    /// The flow's target socket in the engine's slab, and its generation.
    slot: u32,
    gen: u32,
}

/// The engine's per-socket slot: which request stream it belongs to.
struct Slot {
    gen: u32,
    stream: u64,
}

struct Worker {
    requests: HashMap<u64, Request>,
    slots: Slab<Slot>,
}

/// A worker with `FLOWS` open flows on streams 0, 4, 8, ...
fn worker(now: Instant) -> Worker {
    let mut requests = HashMap::new();
    let mut slots = Slab::new();
    for i in 0..FLOWS {
        let stream = 4 * i as u64;
        let gen = 1 + i as u32;
        let slot = slots.insert(Slot { gen, stream }) as u32;
        requests.insert(
            stream,
            Request {
                flow: Flow::new(now, Duration::from_secs(120), capsule::MAX_UDP_PAYLOAD),
                slot,
                gen,
            },
        );
    }
    Worker { requests, slots }
}

/// The flow of the `k`-th datagram of a pass: spread over the table.
fn flow_of(k: usize) -> usize {
    (k * 37) % FLOWS
}

/// 64 HTTP/3 datagrams (quarter stream ID, context 0, payload), as QUIC hands them over.
fn h3_datagrams(size: usize) -> VecDeque<Bytes> {
    (0..PASS)
        .map(|k| {
            let mut b = BytesMut::with_capacity(size + 16);
            varint::write(flow_of(k) as u64, &mut b); // quarter stream ID = stream ID / 4
            varint::write(0, &mut b);
            b.put_bytes(0xab, size);
            b.freeze()
        })
        .collect()
}

/// One chunk of 64 DATAGRAM capsules, as an HTTP/2 DATA frame (or HTTP/1.1 read) delivers it.
fn capsule_chunk(size: usize) -> Bytes {
    let payload = vec![0xabu8; size];
    let mut b = BytesMut::new();
    for _ in 0..PASS {
        capsule::encode_datagram(0, &payload, &mut b);
    }
    b.freeze()
}

/// 64 target datagrams: the slot they arrived on and the payload.
fn target_datagrams(w: &Worker, size: usize) -> VecDeque<(u32, u32, Bytes)> {
    (0..PASS)
        .map(|k| {
            let r = &w.requests[&(4 * flow_of(k) as u64)];
            (r.slot, r.gen, Bytes::from(vec![0xcdu8; size]))
        })
        .collect()
}

/// Client to target over HTTP/3; returns the datagrams queued for targets.
fn h3_to_target(
    w: &mut Worker,
    queue: &VecDeque<Bytes>,
    out: &mut Vec<(u32, Bytes)>,
    now: Instant,
) -> usize {
    out.clear();
    for d in queue {
        let Some((qsid, n)) = varint::read(d) else {
            continue;
        };
        let Some(req) = w.requests.get_mut(&(qsid * 4)) else {
            continue;
        };
        let Some((ctx, m)) = varint::read(&d[n..]) else {
            continue;
        };
        let payload = d.slice(n + m..);
        if req.flow.on_client_datagram(now, ctx, payload.len() as u64) == ClientDatagram::Forward {
            out.push((req.slot, payload));
        }
    }
    out.len()
}

/// Client to target over HTTP/2 (or HTTP/1.1): one stream's chunk of capsules.
fn capsules_to_target(
    w: &mut Worker,
    decoder: &mut CapsuleDecoder,
    chunk: &[u8],
    out: &mut Vec<(u32, Bytes)>,
    now: Instant,
) -> usize {
    out.clear();
    // The chunk arrived on a stream: one lookup for the whole chunk.
    let Some(req) = w.requests.get_mut(&4) else {
        return 0;
    };
    let slot = req.slot;
    let flow = &mut req.flow;
    let r = decoder.decode(chunk, |ev| {
        if let capsule::Event::Datagram {
            context_id,
            payload,
        } = ev
        {
            if flow.on_client_datagram(now, context_id, payload.len() as u64)
                == ClientDatagram::Forward
            {
                out.push((slot, Bytes::copy_from_slice(payload)));
            }
        }
    });
    debug_assert!(r.is_ok());
    out.len()
}

/// How target datagrams go to the client.
#[derive(Clone, Copy)]
enum Encoding {
    /// QUIC DATAGRAM payload: quarter stream ID, context ID 0, payload.
    H3Datagram,
    /// DATAGRAM capsule: type, length, context ID 0, payload.
    Capsule,
}

/// Target to client: returns the bytes encoded.
fn to_client(
    w: &mut Worker,
    queue: &VecDeque<(u32, u32, Bytes)>,
    enc: Encoding,
    out: &mut BytesMut,
    now: Instant,
) -> usize {
    out.clear();
    for (slot, gen, payload) in queue {
        let Some(s) = w.slots.get(*slot as usize).filter(|s| s.gen == *gen) else {
            continue;
        };
        let stream = s.stream;
        let Some(req) = w.requests.get_mut(&stream) else {
            continue;
        };
        let n = payload.len();
        if req.flow.on_target_datagram(now, n).is_err() {
            continue;
        }
        match enc {
            Encoding::H3Datagram => {
                varint::write(stream / 4, out);
                varint::write(0, out);
                out.put_slice(payload);
            }
            Encoding::Capsule => capsule::encode_datagram(0, payload, out),
        }
        req.flow.on_sent_to_client(n);
    }
    out.len()
}

fn passes(c: &mut Criterion) {
    let mut g = c.benchmark_group("worker pass: 64 datagrams");
    g.throughput(Throughput::Elements(PASS as u64));
    for size in [64usize, 1200] {
        let mut w = worker(Instant::now());
        let h3 = h3_datagrams(size);
        let chunk = capsule_chunk(size);
        let from_targets = target_datagrams(&w, size);
        let mut queued: Vec<(u32, Bytes)> = Vec::with_capacity(PASS);
        let mut encoded = BytesMut::with_capacity(PASS * (size + 16));
        let mut decoder = CapsuleDecoder::new(capsule::MAX_UDP_PAYLOAD);
        // Sanity: every datagram makes it through each pass.
        let now = Instant::now();
        assert_eq!(h3_to_target(&mut w, &h3, &mut queued, now), PASS);
        assert_eq!(
            capsules_to_target(&mut w, &mut decoder, &chunk, &mut queued, now),
            PASS
        );
        assert!(
            to_client(
                &mut w,
                &from_targets,
                Encoding::H3Datagram,
                &mut encoded,
                now
            ) > 0
        );

        g.bench_function(format!("h3 client->target, {size} B"), |b| {
            b.iter(|| {
                let now = Instant::now();
                h3_to_target(&mut w, black_box(&h3), &mut queued, now)
            })
        });
        g.bench_function(format!("h2 capsules client->target, {size} B"), |b| {
            b.iter(|| {
                let now = Instant::now();
                capsules_to_target(&mut w, &mut decoder, black_box(&chunk), &mut queued, now)
            })
        });
        g.bench_function(format!("h3 datagram target->client, {size} B"), |b| {
            b.iter(|| {
                let now = Instant::now();
                to_client(
                    &mut w,
                    black_box(&from_targets),
                    Encoding::H3Datagram,
                    &mut encoded,
                    now,
                )
            })
        });
        g.bench_function(format!("capsule target->client, {size} B"), |b| {
            b.iter(|| {
                let now = Instant::now();
                to_client(
                    &mut w,
                    black_box(&from_targets),
                    Encoding::Capsule,
                    &mut encoded,
                    now,
                )
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
    targets = passes
}
criterion_main!(benches);
