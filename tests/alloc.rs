//! No heap allocation per datagram in steady state: the relay runs in this process under a
//! counting allocator, the load comes from `masque-bench` in another process (its own
//! allocations are not counted), and the allocations made while datagrams flow are divided by
//! the datagrams relayed in the same window.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use masque_relay::io::alloc::{allocations, Counting};
use masque_relay::metrics::Direction;
use masque_relay::proto::connect_udp::HttpVersion;

#[global_allocator]
static ALLOC: Counting<std::alloc::System> = Counting(std::alloc::System);

fn relayed(relay: &TestRelay, v: HttpVersion) -> u64 {
    relay.sum(|s| s.datagrams_for(v, Direction::ToTarget) + s.datagrams_for(v, Direction::ToClient))
}

/// The counter is process-wide: one measurement at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Allocations per relayed datagram over a steady window of echo load on `protocol`.
fn allocations_per_datagram(protocol: &str, v: HttpVersion) -> (f64, u64) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let relay = TestRelay::start(|c| {
        c.workers = 1;
        c.metrics = "off".to_owned();
    });
    let mut load = Command::new(env!("CARGO_BIN_EXE_masque-bench"))
        .args([
            "run",
            "--relay",
            &relay.addr.to_string(),
            "--protocol",
            protocol,
            "--insecure",
            "--flows",
            "8",
            "--size",
            "1200",
            "--rate",
            "4000",
            "--warmup",
            "1",
            "--duration",
            "4",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Warm-up: connections, flows, pools and queues reach their working size. Every wait is
    // on the relay's datagram count, never on the clock.
    let wait_for = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while relayed(&relay, v) < n {
            assert!(
                Instant::now() < deadline,
                "the load stalled below {n} datagrams"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for(4000);
    // A further 2000 for queues and pools to settle, then the measured window.
    wait_for(relayed(&relay, v) + 2000);
    let (a0, d0) = (allocations(), relayed(&relay, v));
    wait_for(d0 + 12_000);
    let (a1, d1) = (allocations(), relayed(&relay, v));
    let _ = load.kill();
    let _ = load.wait();
    let datagrams = d1 - d0;
    ((a1 - a0) as f64 / datagrams as f64, datagrams)
}

#[test]
fn steady_http3_relaying_does_not_allocate_per_datagram() {
    let (per, n) = allocations_per_datagram("h3", HttpVersion::Http3);
    println!("HTTP/3: {per:.4} allocations per relayed datagram over {n} datagrams");
    assert!(per < 0.05, "{per:.4} allocations per datagram over {n}");
}

/// HTTP/2 rides on TLS records: rustls's buffered API allocates for each record it seals (the
/// record and the list of slices of a vectored write) and opens (the plaintext), about three
/// per record, and at this rate most records carry one capsule. The relay's own part (capsule
/// decoding, the target send, the capsule encoding into the worker's arena) allocates nothing
/// per datagram; the bound catches any allocation per datagram added on top of TLS's.
#[test]
fn steady_http2_relaying_allocates_only_for_tls_records() {
    let (per, n) = allocations_per_datagram("h2", HttpVersion::Http2);
    println!("HTTP/2: {per:.4} allocations per relayed datagram over {n} datagrams");
    assert!(per < 2.0, "{per:.4} allocations per datagram over {n}");
}
