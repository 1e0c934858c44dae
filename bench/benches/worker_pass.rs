//! The worker's real pass (`worker::core`), in memory: the relay's `Core` on the in-memory
//! datagram engine, with an in-memory quinn-proto HTTP/3 client whose flows are open. Each
//! iteration hands one pass 64 datagrams and times that pass only (the client's encryption
//! and its reading of what the relay sent happen outside the timing):
//!
//! - client to target: 64 QUIC DATAGRAM frames (packed several to a packet where they fit):
//!   packet in, quinn-proto decrypts it, the HTTP/3 session finds each datagram's flow, the flow
//!   decides, the payload (a slice of the decrypted packet) is queued for the flow's egress
//!   socket and the pass ends with the engine's flush;
//! - target to client: 64 target datagrams on the flows' egress sockets: demultiplexed by
//!   (socket, source), the flow decides, each is framed (quarter stream ID, context 0) into the
//!   client's DATAGRAM queue, and quinn-proto seals the packets.
//!
//! What the kernel would do (the syscalls, the copies into and out of the socket buffers) is
//! not in these figures: the in-memory engine copies a received datagram into its pool buffer
//! and counts sends. 1 and 100 flows, 64- and 1200-byte payloads.
//! `cargo bench --bench worker_pass` (add `-- --quick` for a short run).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use masque_relay::worker::PassBench;

/// Datagrams per pass.
const PASS: usize = 64;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("worker pass: 64 datagrams");
    g.throughput(Throughput::Elements(PASS as u64));
    for flows in [1usize, 100] {
        for size in [64usize, 1200] {
            let mut b = PassBench::h3(flows);
            // Warm-up: queues, arenas and the client's windows reach their working size.
            for _ in 0..50 {
                b.client_to_target(PASS, size);
                b.target_to_client(PASS, size);
            }
            g.bench_function(
                format!("h3 client to target, {size} B, {flows} flows"),
                |bn| {
                    bn.iter_custom(|iters| {
                        let mut t = Duration::ZERO;
                        for _ in 0..iters {
                            t += b.client_to_target(PASS, size);
                        }
                        t
                    })
                },
            );
            g.bench_function(
                format!("h3 target to client, {size} B, {flows} flows"),
                |bn| {
                    bn.iter_custom(|iters| {
                        let mut t = Duration::ZERO;
                        for _ in 0..iters {
                            t += b.target_to_client(PASS, size);
                        }
                        t
                    })
                },
            );
        }
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
