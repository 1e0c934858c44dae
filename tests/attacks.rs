//! SECURITY.md's attacks against the relay binary over loopback, each bounded in count and time.
//!
//! Every test starts the built `masque-relay` (one worker, so attacker and victim share it), reads
//! its memory (`VmRSS`) and file descriptors from `/proc` before, during and after the attack, and
//! runs a well-behaved client on its own thread doing echo round trips through the relay
//! before, during and after. Each prints one `ATTACK item=..` line with the figures; the
//! assertions are generous (a shared two-core VM, debug builds) but a relay that buffers without
//! bound, stalls or crashes fails them clearly. Tests run one at a time (a lock), so the figures
//! of one attack are not spoiled by another.
//!
//! Items not here: 17 (target unreachable closes only that flow) is
//! `h2_relay::unreachable_target_closes_the_stream` and `h3_relay::unreachable_target_resets_the_stream`;
//! 21 (buffer pool exhaustion) has no pool to exhaust until the io_uring backend lands.
//!
//! Longer runs: `cargo test --release --test attacks stress_ -- --ignored --nocapture` (the
//! `stress_` variants: about ten times the count or duration). The other ignored tests are bugs
//! found here, each named in its `ignore` reason; run one with
//! `cargo test --test attacks NAME -- --ignored --nocapture`.

mod attack_util;
mod common;

use std::net::UdpSocket;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use attack_util::*;
use bytes::{Buf, Bytes};
use common::{connect_udp, datagram, h3_connect_udp, stream_end, udp_path, varint, CapsuleReader};
use common::{eventually, EchoTarget, FloodTarget, H3Client, H3Stream};

const MIB: u64 = 1024;
/// The bar for floods: RSS growth in KiB.
const FLOOD_GROWTH: u64 = 64 * MIB;
/// File descriptors allowed above the baseline once an attack is over.
const FD_SLACK: usize = 4;

/// One UDP payload with context ID 0, as an HTTP/3 client sends it (after the quarter stream ID).
fn ctx0(payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(payload);
    v
}

/// An echo round trip on an HTTP/3 flow; true if it came back within a second.
async fn h3_echo(client: &H3Client, stream: &H3Stream, msg: &[u8]) -> bool {
    client.send_datagram(stream.id(), &ctx0(msg));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Ok(d)) = tokio::time::timeout_at(deadline, client.quic.read_datagram()).await {
        if d.ends_with(msg) {
            return true;
        }
    }
    false
}

/// An extended CONNECT for connect-udp that reports failures instead of panicking.
async fn try_connect_udp(
    client: &mut h2::client::SendRequest<Bytes>,
    path: &str,
) -> Result<(u16, h2::SendStream<Bytes>, h2::RecvStream), String> {
    let req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("https://localhost{path}"))
        .header("capsule-protocol", "?1")
        .extension(h2::ext::Protocol::from("connect-udp"))
        .body(())
        .unwrap();
    let mut ready = client.clone().ready().await.map_err(|e| e.to_string())?;
    let (resp, send) = ready.send_request(req, false).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .map_err(|_| "no response in 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    Ok((status, send, resp.into_body()))
}

/// An echo round trip on an HTTP/2 flow.
async fn h2_echo(send: &mut h2::SendStream<Bytes>, body: &mut h2::RecvStream, msg: &[u8]) -> bool {
    if send.send_data(Bytes::from(datagram(msg)), false).is_err() {
        return false;
    }
    let mut reader = CapsuleReader::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Some(Ok(mut data))) = tokio::time::timeout_at(deadline, body.data()).await {
        let len = data.len();
        let _ = body.flow_control().release_capacity(len);
        if reader
            .push(&data.copy_to_bytes(len))
            .iter()
            .any(|d| d == msg)
        {
            return true;
        }
    }
    false
}

// ---------------------------------------------------------------------------------------------
// 6. HTTP/2 Rapid Reset

/// HEADERS (a real CONNECT-UDP) + RST_STREAM(CANCEL) pairs in a tight loop, at most
/// `per_conn` on one connection, reconnecting when the relay sends GOAWAY or closes, until
/// `max_streams` pairs are written or `for_how_long` passed.
async fn rapid_reset(
    relay: &RelayProc,
    port: u16,
    max_streams: u64,
    for_how_long: Duration,
) -> String {
    let per_conn = 2000u32;
    let started = Instant::now();
    let deadline = started + for_how_long;
    let block = hpack_connect_udp(port);
    let (mut streams, mut conns, mut goaways, mut closed) = (0u64, 0u32, Vec::new(), 0u32);
    let (mut responses, mut resets, mut processed) = (0u64, 0u64, 0u64);
    while streams < max_streams && Instant::now() < deadline {
        let mut c = RawH2::connect(relay, true).await;
        conns += 1;
        let mut id = 1u32;
        while id < 2 * per_conn && streams < max_streams && Instant::now() < deadline {
            let mut batch = Vec::with_capacity(100 * 200);
            for _ in 0..100 {
                h2_frame_into(h2f::HEADERS, h2f::END_HEADERS, id, &block, &mut batch);
                h2_frame_into(
                    h2f::RST_STREAM,
                    0,
                    id,
                    &h2f::CANCEL.to_be_bytes(),
                    &mut batch,
                );
                id += 2;
            }
            if c.send(&batch, Duration::from_secs(2)).await.is_err()
                || c.seen.goaway_code().is_some()
                || c.seen.is_closed()
            {
                break;
            }
            streams += 100;
        }
        c.settle(Duration::from_secs(10)).await;
        responses += c.seen.count(h2f::HEADERS);
        resets += c.seen.count(h2f::RST_STREAM);
        match c.seen.goaway_code() {
            Some(code) => {
                goaways.push(code);
                processed += c
                    .seen
                    .goaway_last_stream
                    .load(Ordering::Relaxed)
                    .div_ceil(2);
            }
            None => closed += 1,
        }
    }
    goaways.sort_unstable();
    goaways.dedup();
    format!(
        "{streams} HEADERS+RST_STREAM pairs written on {conns} connections in {:.1} s; relay \
         answered {responses} HEADERS, {resets} RST_STREAM; GOAWAY codes seen {goaways:?} \
         (their Last-Stream-IDs cover {processed} streams); {closed} connections ended without \
         GOAWAY",
        started.elapsed().as_secs_f64()
    )
}

#[test]
fn h2_rapid_reset_is_bounded_and_the_good_client_is_served() {
    serial(|| async {
        let relay = RelayProc::start(RelayOpts::default());
        let target = EchoTarget::start("127.0.0.1:0");
        let prober = Prober::start(&relay, Proto::H2, target.addr);
        let (notes, f) = measure(
            &relay,
            &prober,
            rapid_reset(
                &relay,
                target.addr.port(),
                100_000,
                Duration::from_millis(2500),
            ),
        )
        .await;
        f.report("6", "h2_rapid_reset", &notes);
        f.assert_bounded(FLOOD_GROWTH, FD_SLACK);
    });
}

#[test]
#[ignore = "stress: cargo test --release --test attacks stress_ -- --ignored --nocapture"]
fn stress_h2_rapid_reset() {
    serial(|| async {
        let relay = RelayProc::start(RelayOpts::default());
        let target = EchoTarget::start("127.0.0.1:0");
        let prober = Prober::start(&relay, Proto::H2, target.addr);
        let (notes, f) = measure(
            &relay,
            &prober,
            rapid_reset(
                &relay,
                target.addr.port(),
                1_000_000,
                Duration::from_secs(10),
            ),
        )
        .await;
        f.report("6", "stress_h2_rapid_reset", &notes);
        f.assert_bounded(FLOOD_GROWTH, FD_SLACK);
    });
}

// ---------------------------------------------------------------------------------------------
// 7. CONTINUATION flood, HPACK bomb, PING / SETTINGS / empty DATA floods

/// HEADERS without END_HEADERS, then CONTINUATION frames (16 KiB of literal fields each, or
/// empty) until the relay closes the connection, 64 MiB or 3 s.
async fn continuation_flood(relay: &RelayProc, port: u16, empty: bool) -> (bool, String) {
    let mut c = RawH2::connect(relay, true).await;
    let mut head = Vec::new();
    h2_frame_into(h2f::HEADERS, 0, 1, &hpack_connect_udp(port), &mut head);
    let mut payload = Vec::new();
    if !empty {
        while payload.len() < 16_000 {
            hpack_literal(b"x-flood", &[b'f'; 100], &mut payload);
        }
    }
    let mut batch = Vec::new();
    for _ in 0..64 {
        h2_frame_into(h2f::CONTINUATION, 0, 1, &payload, &mut batch);
    }
    let started = Instant::now();
    let mut sent = 0u64;
    let mut frames = 0u64;
    let mut outcome = c.send(&head, Duration::from_secs(2)).await;
    while outcome.is_ok()
        && !c.seen.is_closed()
        && c.seen.goaway_code().is_none()
        && sent < 64 << 20
        && started.elapsed() < Duration::from_secs(3)
    {
        outcome = c.send(&batch, Duration::from_secs(1)).await;
        if outcome.is_ok() {
            sent += batch.len() as u64;
            frames += 64;
        }
    }
    let closed = c.wait_closed(Duration::from_secs(2)).await;
    let kind = if empty { "empty" } else { "16 KiB" };
    (
        closed,
        format!(
            "{kind} CONTINUATION: {frames} frames / {sent} bytes written in {:.0} ms; \
             write outcome {outcome:?}; GOAWAY {:?}; closed {}",
            ms(started.elapsed()),
            c.seen.goaway_code(),
            c.seen.is_closed()
        ),
    )
}

/// Repeats an attack on fresh connections for at least `min` (each one ends quickly when the
/// relay closes it), so the well-behaved client is measured during a sustained attack.
/// Returns (attempts, attempts the relay closed, notes of the first).
async fn repeat_for<F, Fut>(min: Duration, mut one: F) -> (u32, u32, String)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (bool, String)>,
{
    let started = Instant::now();
    let (mut n, mut closed, mut first) = (0u32, 0u32, None);
    while n == 0 || started.elapsed() < min {
        let (c, notes) = one().await;
        n += 1;
        closed += u32::from(c);
        first.get_or_insert(notes);
    }
    (n, closed, first.unwrap_or_default())
}

#[test]
fn h2_continuation_flood_closes_the_connection() {
    serial(|| async {
        let relay = RelayProc::start(RelayOpts::default());
        let target = EchoTarget::start("127.0.0.1:0");
        let prober = Prober::start(&relay, Proto::H2, target.addr);
        let port = target.addr.port();
        let each = Duration::from_millis(750);
        let (outcomes, f) = measure(&relay, &prober, async {
            let full = repeat_for(each, || continuation_flood(&relay, port, false)).await;
            let empty = repeat_for(each, || continuation_flood(&relay, port, true)).await;
            (full, empty)
        })
        .await;
        let ((full_n, full_closed, full), (empty_n, empty_closed, empty)) = outcomes;
        f.report(
            "7",
            "h2_continuation_flood",
            &format!(
                "{full_n} connections flooded with 16 KiB CONTINUATION frames, {full_closed} \
                 closed by the relay, the first: {full}; {empty_n} with empty ones, \
                 {empty_closed} closed, the first: {empty}"
            ),
        );
        assert_eq!(full_closed, full_n, "CONTINUATION flood not closed: {full}");
        assert_eq!(
            empty_closed, empty_n,
            "empty CONTINUATION flood not closed: {empty}"
        );
        f.assert_bounded(FLOOD_GROWTH, FD_SLACK);
    });
}

/// An HPACK bomb: one 4000-byte field enters the dynamic table, then every HEADERS block
/// references it 16 000 times (one byte each): 64 MB of decoded header list per 16 KB frame.
async fn hpack_bomb(relay: &RelayProc, port: u16, streams: u32) -> (u64, bool, String) {
    let mut c = RawH2::connect(relay, true).await;
    let started = Instant::now();
    let mut sent = 0u32;
    for i in 0..streams {
        let mut block = hpack_connect_udp(port);
        if i == 0 {
            hpack_literal_indexed(b"x-bomb", &[b'b'; 4000], &mut block);
            block.extend(std::iter::repeat_n(0x80 | 62, 12_000));
        } else {
            block.extend(std::iter::repeat_n(0x80 | 62, 16_000));
        }
        let frame = h2_frame(h2f::HEADERS, h2f::END_HEADERS, 1 + 2 * i, &block);
        if c.send(&frame, Duration::from_secs(2)).await.is_err()
            || c.seen.is_closed()
            || c.seen.goaway_code().is_some()
        {
            break;
        }
        sent += 1;
    }
    let closed = c.wait_closed(Duration::from_secs(1)).await;
    let ok = c.seen.ok_responses.load(Ordering::Relaxed);
    let notes = format!(
        "HPACK bomb: {sent} blocks of 16 KB (64 MB decoded each) in {:.0} ms; relay answered \
         {} HEADERS ({ok} of them 200), {} RST_STREAM; GOAWAY {:?}; closed {}",
        ms(started.elapsed()),
        c.seen.count(h2f::HEADERS),
        c.seen.count(h2f::RST_STREAM),
        c.seen.goaway_code(),
        c.seen.is_closed()
    );
    (ok, closed, notes)
}

/// One HEADERS frame of 63 KB holding 560 distinct 100-byte fields: 80 KB decoded, over
/// max_header_list_size (64 KiB).
async fn many_headers(relay: &RelayProc, port: u16) -> (u64, bool, String) {
    let mut c = RawH2::connect(relay, true).await;
    let mut block = hpack_connect_udp(port);
    for i in 0..560 {
        hpack_literal(
            format!("x-many-{i:04}").as_bytes(),
            &[b'm'; 100],
            &mut block,
        );
    }
    let frame = h2_frame(h2f::HEADERS, h2f::END_HEADERS, 1, &block);
    let _ = c.send(&frame, Duration::from_secs(2)).await;
    // Either the stream is refused (431 / RST_STREAM) or the connection goes.
    let deadline = Instant::now() + Duration::from_secs(2);
    while c.seen.count(h2f::HEADERS) + c.seen.count(h2f::RST_STREAM) == 0
        && !c.seen.is_closed()
        && c.seen.goaway_code().is_none()
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let answered = c.seen.count(h2f::HEADERS) + c.seen.count(h2f::RST_STREAM) > 0
        || c.seen.is_closed()
        || c.seen.goaway_code().is_some();
    let ok = c.seen.ok_responses.load(Ordering::Relaxed);
    let notes = format!(
        "{} KB header block, 80 KB decoded: {} HEADERS ({ok} of them 200), {} RST_STREAM, \
         GOAWAY {:?}, closed {}",
        block.len() / 1000,
        c.seen.count(h2f::HEADERS),
        c.seen.count(h2f::RST_STREAM),
        c.seen.goaway_code(),
        c.seen.is_closed()
    );
    (ok, answered, notes)
}

#[test]
fn h2_hpack_bomb_and_oversized_header_lists_are_refused() {
    serial(|| async {
        let relay = RelayProc::start(RelayOpts::default());
        let target = EchoTarget::start("127.0.0.1:0");
        let prober = Prober::start(&relay, Proto::H2, target.addr);
        let port = target.addr.port();
        let (outcomes, f) = measure(&relay, &prober, async {
            let accepted = std::cell::Cell::new(0);
            let bomb = repeat_for(Duration::from_millis(1000), || {
                let (relay, accepted) = (&relay, &accepted);
                async move {
                    let (ok, closed, notes) = hpack_bomb(relay, port, 200).await;
                    accepted.set(accepted.get() + ok);
                    (closed, notes)
                }
            })
            .await;
            (bomb, accepted.get(), many_headers(&relay, port).await)
        })
        .await;
        let ((bomb_n, bomb_closed, bomb), bomb_ok, (many_ok, many_answered, many)) = outcomes;
        f.report(
            "7",
            "h2_hpack_bomb",
            &format!(
                "{bomb_n} connections tried, {bomb_closed} closed by the relay, the first: \
                 {bomb}; {many}"
            ),
        );
        assert_eq!(
            bomb_ok, 0,
            "a request with a 64 MB header list was accepted"
        );
        assert_eq!(
            bomb_closed, bomb_n,
            "an HPACK bomb's connection was not closed: {bomb}"
        );
        assert_eq!(many_ok, 0, "an 80 KB header list was accepted: {many}");
        assert!(
            many_answered,
            "no answer to an oversized header list: {many}"
        );
        f.assert_bounded(FLOOD_GROWTH, FD_SLACK);
    });
}

/// Writes `frames` in batches as fast as the relay takes them for `for_how_long`, without ever
/// reading (the relay's answers pile up). Returns (outcome, bytes written).
async fn write_flood(
    c: &mut RawH2,
    batch: &[u8],
    for_how_long: Duration,
) -> (Result<(), SendFail>, u64) {
    let started = Instant::now();
    let mut written = 0u64;
    let mut outcome = Ok(());
    while started.elapsed() < for_how_long {
        outcome = c.send(batch, Duration::from_millis(500)).await;
        if outcome.is_err() {
            break;
        }
        written += batch.len() as u64;
    }
    (outcome, written)
}

/// The relay's write-stall timeout in the flood test: short, so the test sees the close.
const STALL_SECS: u64 = 2;

/// How a flood that never reads ended.
struct NoReadFlood {
    /// Bytes the client managed to write (whole batches), flood and wait together.
    written: u64,
    /// From the start of the flood to its first write that did not complete in 500 ms (the
    /// relay stopped reading), if one did not.
    blocked_after: Option<Duration>,
    /// From the start of the flood to the client's write failing (the relay closed the
    /// connection); `None` if it was still open after `within`.
    closed_after: Option<Duration>,
    /// Bytes per frame of the flood.
    frame_len: u64,
}

impl NoReadFlood {
    fn describe(&self) -> String {
        let blocked = match self.blocked_after {
            Some(b) => format!("its writes blocked after {:.2} s", b.as_secs_f64()),
            None => "its writes never blocked".to_owned(),
        };
        let closed = match self.closed_after {
            Some(c) => format!(
                "closed by the relay {:.2} s after it began",
                c.as_secs_f64()
            ),
            None => "NOT closed".to_owned(),
        };
        format!(
            "{} frames written, {blocked}, {closed}",
            self.written / self.frame_len
        )
    }
}

/// Floods `batch` (frames of `frame_len` bytes) for `flood_for` without ever reading, then keeps one write pending until it
/// fails (the relay closed the connection) or `within` (from the start) passed. A relay that
/// only throttles leaves that write blocked for good.
async fn flood_until_closed(
    c: &mut RawH2,
    batch: &[u8],
    frame_len: u64,
    flood_for: Duration,
    within: Duration,
) -> NoReadFlood {
    let started = Instant::now();
    let (outcome, mut written) = write_flood(c, batch, flood_for).await;
    let blocked_after = (outcome == Err(SendFail::Blocked)).then(|| started.elapsed());
    let closed_after = match outcome {
        Err(SendFail::Closed) => Some(started.elapsed()),
        _ => loop {
            let left = within.saturating_sub(started.elapsed());
            if left.is_zero() {
                break None;
            }
            // The relay has stopped reading, so this write waits; the relay's close (a reset:
            // it leaves our bytes unread) fails it.
            match c.send(batch, left).await {
                Ok(()) => written += batch.len() as u64,
                Err(SendFail::Closed) => break Some(started.elapsed()),
                Err(SendFail::Blocked) => break None,
            }
        },
    };
    NoReadFlood {
        written,
        blocked_after,
        closed_after,
        frame_len,
    }
}

fn flood_verdict(outcome: Result<(), SendFail>, closed: bool) -> &'static str {
    match (outcome, closed) {
        (_, true) | (Err(SendFail::Closed), _) => "connection closed",
        (Err(SendFail::Blocked), _) => "throttled (the relay stopped reading)",
        (Ok(()), false) => "neither closed nor throttled",
    }
}

#[test]
fn h2_ping_settings_and_empty_data_floods_are_bounded() {
    serial(|| async {
        let relay = RelayProc::start(RelayOpts {
            config: Some(format!(
                "[http2]\nwrite_stall_timeout_secs = {STALL_SECS}\n"
            )),
            metrics: true,
            ..Default::default()
        });
        let target = EchoTarget::start("127.0.0.1:0");
        let prober = Prober::start(&relay, Proto::H2, target.addr);
        let port = target.addr.port();
        let each = Duration::from_millis(1500);
        // The relay must close a flood that never reads within its stall timeout of the flood
        // blocking; 10 s from the start leaves room for a loaded machine.
        let within = Duration::from_secs(10);
        let (verdicts, f) = measure(&relay, &prober, async {
            // PING flood, never reading the PONGs (CVE-2019-9512).
            let mut c = RawH2::connect(&relay, false).await;
            let mut batch = Vec::new();
            for i in 0..1000u64 {
                h2_frame_into(h2f::PING, 0, 0, &i.to_be_bytes(), &mut batch);
            }
            let ping = flood_until_closed(&mut c, &batch, 17, each, within).await;
            drop(c);
            // SETTINGS flood, never reading the ACKs (CVE-2019-9515).
            let mut c = RawH2::connect(&relay, false).await;
            let mut batch = Vec::new();
            for _ in 0..1000 {
                // SETTINGS_ENABLE_PUSH = 0: valid from a client, changes nothing.
                h2_frame_into(h2f::SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 0], &mut batch);
            }
            let settings = flood_until_closed(&mut c, &batch, 15, each, within).await;
            drop(c);
            // Empty DATA frames on an open CONNECT-UDP stream (CVE-2019-9518), reading what
            // the relay sends.
            let mut c = RawH2::connect(&relay, true).await;
            let mut head = Vec::new();
            h2_frame_into(
                h2f::HEADERS,
                h2f::END_HEADERS,
                1,
                &hpack_connect_udp(port),
                &mut head,
            );
            c.send(&head, Duration::from_secs(2)).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.seen.ok_responses.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut batch = Vec::new();
            for _ in 0..1000 {
                h2_frame_into(h2f::DATA, 0, 1, &[], &mut batch);
            }
            let (empty, empty_bytes) = write_flood(&mut c, &batch, each).await;
            let empty_closed = c.wait_closed(Duration::from_millis(100)).await;
            let empty_notes = format!(
                "stream answered 200: {}, GOAWAY {:?}, RST_STREAM {}",
                c.seen.ok_responses.load(Ordering::Relaxed) == 1,
                c.seen.goaway_code(),
                c.seen.count(h2f::RST_STREAM)
            );
            (
                ping,
                settings,
                (empty, empty_bytes, empty_closed, empty_notes),
            )
        })
        .await;
        let (ping, settings, (empty, empty_bytes, ec, en)) = verdicts;
        let stalled = relay.metric(
            "masque_relay_connections_closed_total",
            &[r#"protocol="h2""#, r#"reason="write_stall""#],
        );
        let notes = format!(
            "write stall timeout {STALL_SECS} s; PING flood: {}; SETTINGS flood: {}; \
             empty DATA flood: {} frames written ({en}), {}; \
             connections closed for write_stall: {stalled}",
            ping.describe(),
            settings.describe(),
            empty_bytes / 9,
            flood_verdict(empty, ec)
        );
        f.report("7", "h2_control_frame_floods", &notes);
        // The relay must not queue an answer per frame without bound (a flood that never reads
        // gets throttled: the relay stops reading), and must not keep such a connection open:
        // once it has had nothing taken for its stall timeout, it closes it.
        for (name, flood) in [("PING", &ping), ("SETTINGS", &settings)] {
            assert!(
                flood.blocked_after.is_some() || flood.closed_after.is_some(),
                "{name} flood neither throttled nor closed: {}",
                flood.describe()
            );
            assert!(
                flood.closed_after.is_some(),
                "{name} flood's connection not closed within {within:?}: {}",
                flood.describe()
            );
        }
        // Closed by the stall guard, not by chance: exactly the two floods that never read (the
        // empty-DATA client and the well-behaved one read).
        assert_eq!(
            stalled, 2.0,
            "connections closed for write_stall: {stalled}, expected the PING and SETTINGS floods"
        );
        f.assert_bounded(FLOOD_GROWTH, FD_SLACK);
    });
}

// ---------------------------------------------------------------------------------------------
// 8. Slow reader

#[test]
fn slow_reader_memory_stays_within_the_send_buffers() {
    serial(|| async {
        let relay = RelayProc::start(RelayOpts {
            metrics: true,
            ..Default::default()
        });
        let echo = EchoTarget::start("127.0.0.1:0");
        let prober = Prober::start(&relay, Proto::H2, echo.addr);
        let flood = FloodTarget::start();
        const FLOWS: usize = 16;
        const EACH: usize = 5000;
        let ((dropped, delivered, echoed), f) = measure(&relay, &prober, async {
            // A client with 64 KiB windows that does not read.
            let tls = relay.tls(b"h2").await;
            let (client, conn) = h2::client::Builder::new()
                .initial_window_size(65_535)
                .initial_connection_window_size(65_535)
                .handshake::<_, Bytes>(tls)
                .await
                .unwrap();
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut client = client;
            for _ in 0..200 {
                client = client.ready().await.unwrap();
                if client.is_extended_connect_protocol_enabled() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut kept = Vec::new();
            for _ in 0..FLOWS {
                let (resp, mut send, body) =
                    connect_udp(&mut client, &udp_path("127.0.0.1", flood.addr.port())).await;
                assert_eq!(resp.status, 200);
                send.send_data(
                    Bytes::from(datagram(format!("flood {EACH}").as_bytes())),
                    false,
                )
                .unwrap();
                kept.push((send, body));
            }
            // The floods have landed once the target has sent them all and the relay has
            // dropped some for the client that does not read.
            let total = (FLOWS * EACH) as u64;
            let not_reading = || {
                relay.metric(
                    "masque_relay_datagrams_dropped_total",
                    &[r#"reason="client_not_reading""#],
                )
            };
            eventually(
                || flood.sent.load(Ordering::Relaxed) >= total && not_reading() > 0.0,
                || {
                    format!(
                        "flood sent {} of {total}, {} dropped for the slow reader",
                        flood.sent.load(Ordering::Relaxed),
                        not_reading()
                    )
                },
            )
            .await;
            let dropped = not_reading();
            // A flow works again once its client reads what waited for it.
            let (send, body) = &mut kept[0];
            let mut delivered = 0;
            while let Ok(Some(Ok(data))) =
                tokio::time::timeout(Duration::from_millis(300), body.data()).await
            {
                delivered += data.len();
                let _ = body.flow_control().release_capacity(data.len());
            }
            let echoed = h2_echo(send, body, b"reading again").await;
            (dropped, delivered, echoed)
        })
        .await;
        f.report(
            "8",
            "slow_reader_binary",
            &format!(
                "{FLOWS} flows x {EACH} datagrams of 1200 bytes at a client that does not read; \
                 {dropped} dropped (client_not_reading); {delivered} bytes waited for flow 0 \
                 (its window: 65535)"
            ),
        );
        assert!(dropped > 0.0, "no datagram dropped for the slow reader");
        assert!(echoed, "the flow did not recover once the client read");
        // The worker's target receive pool (io.target_buffers of 64 KiB, allocated at start)
        // becomes resident as GRO trains of the flood fill its buffers: bounded by the
        // configuration, on top of the 32 MiB allowed for everything else.
        let pool = u64::from(masque_relay::io::dgram::Sizes::default().target_buffers) * 64;
        f.assert_bounded(32 * MIB + pool, FD_SLACK);
    });
}

/// Writes DATAGRAM capsules of `payload` bytes, one DATA frame each, on every stream in turn as
/// fast as HTTP/2 flow control lets it, for `for_how_long`. Returns the capsules written, or
/// the error that ended the writing (the relay closed the connection).
async fn small_capsule_flood(
    flows: &mut [(h2::SendStream<Bytes>, h2::RecvStream)],
    payload: usize,
    for_how_long: Duration,
) -> (u64, Option<String>) {
    let capsule = Bytes::from(datagram(&vec![7u8; payload]));
    let started = Instant::now();
    let mut written = 0u64;
    while started.elapsed() < for_how_long {
        for (send, _) in flows.iter_mut() {
            send.reserve_capacity(64 * capsule.len());
            let cap = tokio::time::timeout(
                Duration::from_millis(500),
                std::future::poll_fn(|cx| send.poll_capacity(cx)),
            )
            .await;
            let n = match cap {
                // The relay is behind: flow control holds this stream back for now.
                Err(_) => continue,
                Ok(Some(Ok(n))) => n / capsule.len(),
                Ok(Some(Err(e))) => return (written, Some(e.to_string())),
                Ok(None) => return (written, Some("stream closed".into())),
            };
            for _ in 0..n {
                if let Err(e) = send.send_data(capsule.clone(), false) {
                    return (written, Some(e.to_string()));
                }
                written += 1;
            }
        }
    }
    (written, None)
}

/// A client that writes small datagrams faster than the worker relays them (a fast sender, not
/// an attacker) is held back by HTTP/2 flow control: what its connection task has read and the
/// pass has not taken is bounded (the task stops reading; h2 buffers up to the windows), and
/// the connection is not mistaken for a small-frame flood (h2's ENHANCE_YOUR_CALM), so it
/// stays open and its flows keep working.
#[test]
fn a_client_sending_small_datagrams_faster_than_they_are_relayed_is_held_back() {
    serial(|| async {
        let relay = RelayProc::start(RelayOpts {
            metrics: true,
            ..Default::default()
        });
        let echo = EchoTarget::start("127.0.0.1:0");
        let prober = Prober::start(&relay, Proto::H2, echo.addr);
        let sink = SinkTarget::start();
        const FLOWS: usize = 8;
        let ((written, ended, echoed), f) = measure(&relay, &prober, async {
            let mut client = relay.h2().await;
            let mut flows = Vec::new();
            for _ in 0..FLOWS {
                let (resp, send, body) =
                    connect_udp(&mut client, &udp_path("127.0.0.1", sink.addr.port())).await;
                assert_eq!(resp.status, 200);
                flows.push((send, body));
            }
            let (written, ended) =
                small_capsule_flood(&mut flows, 64, Duration::from_secs(4)).await;
            // The same connection still opens flows and relays.
            let (resp, mut send, mut body) =
                connect_udp(&mut client, &udp_path("127.0.0.1", echo.addr.port())).await;
            let echoed = resp.status == 200 && h2_echo(&mut send, &mut body, b"still here").await;
            (written, ended, echoed)
        })
        .await;
        let closed = relay.metric(
            "masque_relay_connections_closed_total",
            &[r#"protocol="h2""#, r#"reason="protocol_error""#],
        );
        f.report(
            "8",
            "fast_small_datagram_sender",
            &format!(
                "{FLOWS} flows, {written} capsules of 64-byte datagrams written in 4 s, one DATA \
                 frame each; the sink received {}; writing ended: {ended:?}",
                sink.received.load(Ordering::Relaxed)
            ),
        );
        assert_eq!(ended, None, "the relay ended the fast client's connection");
        assert_eq!(closed, 0.0, "a connection was closed as a protocol error");
        assert!(echoed, "the fast client's connection no longer relays");
        assert!(written > 10_000, "the flood hardly ran: {written} capsules");
        // Without the bound, what was read and not yet relayed grows by tens of MiB a second.
        f.assert_bounded(32 * MIB, FD_SLACK);
    });
}

// ---------------------------------------------------------------------------------------------
// 9. Capsule abuse

/// (truncated capsule, context ID overrunning the capsule, DATAGRAM of 2^62-1 bytes)
fn truncated_capsule() -> Vec<u8> {
    // DATAGRAM declaring 16 bytes, 4 present, then END_STREAM.
    vec![0x00, 0x10, 0x00, 1, 2, 3]
}

fn context_id_overrun() -> Vec<u8> {
    // DATAGRAM of length 1 whose context ID is a 2-byte varint: it runs past the capsule.
    let mut v = vec![0x00, 0x01, 0x40];
    v.extend_from_slice(&datagram(b"after the overrun"));
    v
}

fn huge_datagram_header() -> Vec<u8> {
    // DATAGRAM, Length 2^62-1 (8-byte varint), context ID 0.
    vec![0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]
}

async fn capsule_abuse_h2(relay: &RelayProc, port: u16) -> String {
    let path = udp_path("127.0.0.1", port);
    let mut client = relay.h2().await;
    let (resp, mut a_send, mut a_body) = connect_udp(&mut client, &path).await;
    assert_eq!(resp.status, 200);
    assert!(h2_echo(&mut a_send, &mut a_body, b"sibling before").await);
    let mut notes = Vec::new();

    let (_, mut s, mut b) = connect_udp(&mut client, &path).await;
    s.send_data(Bytes::from(truncated_capsule()), true).unwrap();
    let r = stream_end(&mut b, Duration::from_secs(5)).await;
    notes.push(format!(
        "truncated: {:?}",
        r.as_ref().map_err(|e| e.reason())
    ));
    assert_eq!(
        r.err().and_then(|e| e.reason()),
        Some(h2::Reason::PROTOCOL_ERROR),
        "truncated capsule"
    );
    assert!(h2_echo(&mut a_send, &mut a_body, b"sibling 1").await);

    let (_, mut s, mut b) = connect_udp(&mut client, &path).await;
    s.send_data(Bytes::from(context_id_overrun()), false)
        .unwrap();
    let r = stream_end(&mut b, Duration::from_secs(5)).await;
    notes.push(format!(
        "context ID overrun: {:?}",
        r.as_ref().map_err(|e| e.reason())
    ));
    assert_eq!(
        r.err().and_then(|e| e.reason()),
        Some(h2::Reason::PROTOCOL_ERROR),
        "context ID overrunning the capsule"
    );
    assert!(h2_echo(&mut a_send, &mut a_body, b"sibling 2").await);

    let (_, mut s, mut b) = connect_udp(&mut client, &path).await;
    s.send_data(Bytes::from(huge_datagram_header()), false)
        .unwrap();
    let chunk = Bytes::from(vec![0u8; 64 * 1024]);
    let mut written = 0usize;
    for _ in 0..64 {
        s.reserve_capacity(chunk.len());
        let cap = tokio::time::timeout(
            Duration::from_millis(500),
            std::future::poll_fn(|cx| s.poll_capacity(cx)),
        )
        .await;
        match cap {
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
        if s.send_data(chunk.clone(), false).is_err() {
            break;
        }
        written += chunk.len();
    }
    let r = stream_end(&mut b, Duration::from_secs(5)).await;
    notes.push(format!(
        "2^62-1 DATAGRAM: {:?} after {} KiB written",
        r.as_ref().map_err(|e| e.reason()),
        written / 1024
    ));
    assert_eq!(
        r.err().and_then(|e| e.reason()),
        Some(h2::Reason::PROTOCOL_ERROR),
        "2^62-1 byte DATAGRAM"
    );
    assert!(h2_echo(&mut a_send, &mut a_body, b"sibling 3").await);
    format!("h2 [{}]", notes.join(", "))
}

/// Waits for the relay to abort an HTTP/3 request stream; returns what the client saw.
async fn h3_stream_aborted(stream: &mut H3Stream) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, stream.recv_data()).await {
            Err(_) => return Err("the stream was not aborted within 5 s".into()),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => return Err("the stream ended cleanly".into()),
            Ok(Err(e)) => return Ok(format!("{e}")),
        }
    }
}

async fn capsule_abuse_h3(relay: &RelayProc, port: u16) -> String {
    let path = udp_path("127.0.0.1", port);
    let mut client = relay.h3().await;
    let (resp, sibling) = h3_connect_udp(&mut client, &path).await;
    assert_eq!(resp.status(), 200);
    assert!(h3_echo(&client, &sibling, b"h3 sibling before").await);
    let mut notes = Vec::new();

    let (_, mut s) = h3_connect_udp(&mut client, &path).await;
    s.send_data(Bytes::from(truncated_capsule())).await.unwrap();
    let _ = s.finish().await;
    let r = h3_stream_aborted(&mut s).await;
    notes.push(format!("truncated: {r:?}"));
    assert!(r.is_ok(), "truncated capsule: {r:?}");
    assert!(h3_echo(&client, &sibling, b"h3 sibling 1").await);

    let (_, mut s) = h3_connect_udp(&mut client, &path).await;
    s.send_data(Bytes::from(context_id_overrun()))
        .await
        .unwrap();
    let r = h3_stream_aborted(&mut s).await;
    notes.push(format!("context ID overrun: {r:?}"));
    assert!(r.is_ok(), "context ID overrun: {r:?}");
    assert!(h3_echo(&client, &sibling, b"h3 sibling 2").await);

    let (_, mut s) = h3_connect_udp(&mut client, &path).await;
    s.send_data(Bytes::from(huge_datagram_header()))
        .await
        .unwrap();
    let chunk = Bytes::from(vec![0u8; 64 * 1024]);
    let mut written = 0usize;
    for _ in 0..64 {
        match tokio::time::timeout(Duration::from_millis(500), s.send_data(chunk.clone())).await {
            Ok(Ok(())) => written += chunk.len(),
            _ => break,
        }
    }
    let r = h3_stream_aborted(&mut s).await;
    notes.push(format!(
        "2^62-1 DATAGRAM: {r:?} after {} KiB written",
        written / 1024
    ));
    assert!(r.is_ok(), "2^62-1 byte DATAGRAM: {r:?}");
    assert!(h3_echo(&client, &sibling, b"h3 sibling 3").await);
    format!("h3 [{}]", notes.join(", "))
}

#[test]
fn capsule_abuse_aborts_only_the_stream_without_buffering() {
    serial(|| async {
        let relay = RelayProc::start(RelayOpts::default());
        let target = EchoTarget::start("127.0.0.1:0");
        let prober = Prober::start(&relay, Proto::H2, target.addr);
        let port = target.addr.port();
        let (notes, f) = measure(&relay, &prober, async {
            let h2 = capsule_abuse_h2(&relay, port).await;
            let h3 = capsule_abuse_h3(&relay, port).await;
            format!("{h2}; {h3}")
        })
        .await;
        f.report("9", "capsule_abuse", &notes);
        f.assert_bounded(8 * MIB, FD_SLACK);
    });
}

// ---------------------------------------------------------------------------------------------
// 10. QUIC amplification

/// What the relay sent towards an address that never proved it can receive.
struct Amplification {
    cert_len: usize,
    /// Bytes of the client's first flight the relay received from that address.
    received: usize,
    /// Bytes the relay sent to it within 3 s.
    sent: usize,
    datagrams: usize,
    /// Answers to junk Initials (sizes).
    junk_back: Vec<usize>,
}

async fn amplification() -> Amplification {
    // A certificate of ~12 KB: the relay's first flight is far more than 3x a client Initial,
    // so the anti-amplification limit has to hold it back.
    let relay = RelayProc::start(RelayOpts {
        extra_names: 300,
        ..Default::default()
    });
    // A proxy the client talks to: it forwards the client's first flight (what it sends in the
    // first 100 ms) to the relay, never forwards anything back, and counts the bytes the relay
    // sends to its address, which is thus never validated.
    let proxy = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
    proxy
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let relay_addr = relay.addr;
    let p = proxy.clone();
    let counter = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        let (mut to_relay, mut from_relay, mut relay_pkts) = (0, 0, 0);
        let mut first: Option<Instant> = None;
        let end = Instant::now() + Duration::from_millis(3000);
        while Instant::now() < end {
            let Ok((n, from)) = p.recv_from(&mut buf) else {
                continue;
            };
            if from == relay_addr {
                from_relay += n;
                relay_pkts += 1;
            } else if first.get_or_insert_with(Instant::now).elapsed() < Duration::from_millis(100)
            {
                p.send_to(&buf[..n], relay_addr).unwrap();
                to_relay += n;
            }
        }
        (to_relay, from_relay, relay_pkts)
    });
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(relay.quic_config());
    let connecting = ep.connect(proxy_addr, "localhost").unwrap();
    let handshake = tokio::time::timeout(Duration::from_millis(2500), connecting).await;
    assert!(
        !matches!(handshake, Ok(Ok(_))),
        "the handshake completed through a proxy that forwards nothing back"
    );
    let (received, sent, datagrams) = counter.join().unwrap();
    drop(ep);

    // Junk that looks like an Initial, from an address that never answers: version 1 (does not
    // decrypt), and an unknown version at 100 and 1200 bytes (Version Negotiation only for the
    // last). The relay handles one source's datagrams in order, so once the Version
    // Negotiation is back, any answer to the two before it is back too.
    let junk = UdpCounter::start();
    for (len, v) in [(1200usize, 1u32), (100, 0x1a2a_3a4a), (1200, 0x1a2a_3a4a)] {
        junk.sock
            .send_to(&junk_initial(len, v), relay.addr)
            .unwrap();
    }
    eventually(
        || !junk.sizes().is_empty(),
        || "no Version Negotiation for a 1200-byte Initial of an unknown version".to_owned(),
    )
    .await;
    Amplification {
        cert_len: relay.der.len(),
        received,
        sent,
        datagrams,
        junk_back: junk.sizes(),
    }
}

impl Amplification {
    fn report(&self, test: &str) {
        eprintln!(
            "ATTACK item=10 test={test}: certificate {} bytes; the relay received {} bytes of \
             client Initial from an address that never answers and sent {} bytes in {} \
             datagrams back within 3 s: {:.3}x (3x = {} bytes); junk Initials (1200 B v1, 100 B \
             unknown version, 1200 B unknown version) drew {:?}",
            self.cert_len,
            self.received,
            self.sent,
            self.datagrams,
            self.sent as f64 / self.received as f64,
            3 * self.received,
            self.junk_back
        );
        assert!(self.received >= 1200, "no client Initial was forwarded");
        assert!(
            self.cert_len > 3 * self.received,
            "the certificate is too small for the limit to matter"
        );
        assert!(self.sent > 0, "the relay did not answer a valid Initial");
        assert!(
            self.junk_back.iter().all(|n| *n < 1200),
            "an answer to junk is larger than the junk: {:?}",
            self.junk_back
        );
        assert!(
            self.junk_back.len() <= 1,
            "junk Initials drew {:?}",
            self.junk_back
        );
    }
}

/// The relay's first flight is held back before address validation: at most 3x what it
/// received plus one datagram (quinn-proto lets a datagram of the full MTU go while any budget
/// is left). The strict 3x of RFC 9000 §8.1 is `quic_amplification_is_at_most_3x`.
#[test]
fn quic_amplification_is_held_back_before_address_validation() {
    serial(|| async {
        let a = amplification().await;
        a.report("quic_amplification");
        // http3.initial_mtu (1350) is the largest first-flight datagram.
        assert!(
            a.sent < 3 * a.received + 1350,
            "amplification: {} bytes sent for {} received",
            a.sent,
            a.received
        );
    });
}

#[test]
fn quic_amplification_is_at_most_3x() {
    serial(|| async {
        let a = amplification().await;
        a.report("quic_amplification_strict");
        assert!(
            a.sent <= 3 * a.received,
            "amplification: {} bytes sent for {} received",
            a.sent,
            a.received
        );
    });
}

// ---------------------------------------------------------------------------------------------
// 11. Junk short-header packets

/// Sends `packets` junk short-header packets from three sources (100, 30 and 20 bytes) and
/// checks the stateless resets that come back.
async fn junk_short_headers(test: &str, packets: usize) {
    let relay = RelayProc::start(RelayOpts::default());
    let target = EchoTarget::start("127.0.0.1:0");
    let prober = Prober::start(&relay, Proto::H3, target.addr);
    // A reset must be smaller than what triggered it, so the 20-byte source (too small to hide
    // a 16-byte token in a smaller packet) must get none.
    let sources = [
        (100usize, UdpCounter::start()),
        (30, UdpCounter::start()),
        (20, UdpCounter::start()),
    ];
    let relay_addr = relay.addr;
    let kernel_drops_before = udp_drops(relay.addr.port());
    let (elapsed, f) = measure(&relay, &prober, async {
        let socks: Vec<(usize, Arc<UdpSocket>)> =
            sources.iter().map(|(n, c)| (*n, c.sock.clone())).collect();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            for i in 0..packets {
                let (len, s) = &socks[i % socks.len()];
                let _ = s.send_to(&junk_short_header(*len), relay_addr);
                if i % 500 == 499 {
                    // Give the relay a moment so most of the junk is read, not dropped by the
                    // kernel for a full socket buffer.
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            started.elapsed()
        })
        .await
        .unwrap()
    })
    .await;
    // A barrier per source: an Initial of an unknown version draws a Version Negotiation, and
    // the relay handles a source's datagrams in order, so once it is back, every reset for that
    // source's junk is back too. Sent again every 200 ms until answered: the kernel may drop it
    // as it drops some of the junk.
    let deadline = Instant::now() + common::TIMEOUT;
    for round in 0.. {
        if sources.iter().all(|(_, c)| c.vn_count() >= 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a source got no Version Negotiation for its last packet"
        );
        if round % 20 == 0 {
            for (_, c) in sources.iter().filter(|(_, c)| c.vn_count() == 0) {
                let _ = c.sock.send_to(&junk_initial(1200, 0x1a2a_3a4a), relay_addr);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let kernel_drops = udp_drops(relay.addr.port()).saturating_sub(kernel_drops_before);
    let got: Vec<(usize, Vec<usize>)> = sources
        .iter()
        .map(|(n, c)| (*n, c.sizes_but_vn()))
        .collect();
    let total: usize = got.iter().map(|(_, v)| v.len()).sum();
    let notes = format!(
        "{packets} junk short-header packets in {:.0} ms ({kernel_drops} dropped by the kernel \
         before the relay read them); stateless resets per source size: {}",
        ms(elapsed),
        got.iter()
            .map(|(n, v)| format!("{n} B -> {} resets (largest {:?})", v.len(), v.iter().max()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    f.report("11", test, &notes);
    for (len, sizes) in &got {
        assert!(
            sizes.iter().all(|s| s < len),
            "a stateless reset not smaller than its {len}-byte trigger: {sizes:?}"
        );
    }
    assert!(got[2].1.is_empty(), "20-byte packets drew resets");
    // quinn-proto allows one reset per 20 ms; twice that rate plus a few is the bound.
    let allowed = (elapsed.as_millis() as usize + 400) / 10 + 10;
    assert!(
        total <= allowed,
        "{total} stateless resets for {packets} junk packets (allowed {allowed})"
    );
    f.assert_bounded(FLOOD_GROWTH, FD_SLACK);
}

#[test]
fn junk_short_header_packets_get_few_small_stateless_resets() {
    serial(|| junk_short_headers("junk_short_header", 10_000));
}

#[test]
#[ignore = "stress: cargo test --release --test attacks stress_ -- --ignored --nocapture"]
fn stress_junk_short_header_packets() {
    serial(|| junk_short_headers("stress_junk_short_header", 200_000));
}

// ---------------------------------------------------------------------------------------------
// 12. Half-open flood

async fn half_open_flood(relay: &RelayProc, n: usize) -> String {
    let started = Instant::now();
    let addr = relay.addr;
    let der = relay.der.clone();
    let (socks, flights) = tokio::task::spawn_blocking(move || {
        let flights = client_initials(addr, &der, n);
        let socks: Vec<UdpSocket> = flights
            .iter()
            .map(|flight| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.set_nonblocking(true).unwrap();
                for d in flight {
                    let _ = s.send_to(d, addr);
                }
                s
            })
            .collect();
        (socks, flights)
    })
    .await
    .unwrap();
    let sent_at = started.elapsed();
    // A good client connects during the flood (it may have to answer a Retry).
    let t = Instant::now();
    let mut good = relay.h3().await;
    let target = EchoTarget::start("127.0.0.1:0");
    let (resp, stream) =
        h3_connect_udp(&mut good, &udp_path("127.0.0.1", target.addr.port())).await;
    assert_eq!(resp.status(), 200);
    assert!(h3_echo(&good, &stream, b"during the half-open flood").await);
    let good_connect = t.elapsed();
    // No wait: the relay handles its QUIC socket's datagrams in order, so the flood's Initials
    // were all handled, and their answers sent, before the good client's handshake went on.
    let got = drain_sockets(&socks);
    let mut handshaking = std::collections::HashSet::new();
    let mut retried = std::collections::HashSet::new();
    for (i, _, ty) in &got {
        match ty {
            Some(3) => {
                retried.insert(*i);
            }
            Some(_) => {
                handshaking.insert(*i);
            }
            None => {}
        }
    }
    let bytes_in: usize = flights.iter().flatten().map(|d| d.len()).sum();
    let bytes_out: usize = got.iter().map(|(_, n, _)| n).sum();
    assert!(
        handshaking.len() <= 64 + 8,
        "{} half-open handshakes got state past the Retry threshold (64)",
        handshaking.len()
    );
    assert!(
        bytes_out <= 3 * bytes_in,
        "half-open flood amplified: {bytes_out} bytes out for {bytes_in} in"
    );
    format!(
        "{n} client Initials from {n} ports ({bytes_in} bytes) in {:.0} ms: {} handshakes \
         started, {} answered with Retry, {bytes_out} bytes back; a new good client connected \
         and echoed in {:.0} ms",
        ms(sent_at),
        handshaking.len(),
        retried.len(),
        ms(good_connect)
    )
}

#[test]
fn half_open_flood_is_capped_and_a_new_client_still_connects() {
    serial(|| async {
        let relay = RelayProc::start(RelayOpts::default());
        let target = EchoTarget::start("127.0.0.1:0");
        let prober = Prober::start(&relay, Proto::H3, target.addr);
        let (notes, f) = measure(&relay, &prober, half_open_flood(&relay, 2000)).await;
        f.report("12", "half_open_flood", &notes);
        f.assert_bounded(FLOOD_GROWTH, FD_SLACK);
    });
}

#[test]
#[ignore = "stress: cargo test --release --test attacks stress_ -- --ignored --nocapture"]
fn stress_half_open_flood() {
    serial(|| async {
        let relay = RelayProc::start(RelayOpts::default());
        let target = EchoTarget::start("127.0.0.1:0");
        let prober = Prober::start(&relay, Proto::H3, target.addr);
        let (notes, f) = measure(&relay, &prober, half_open_flood(&relay, 15_000)).await;
        f.report("12", "stress_half_open_flood", &notes);
        f.assert_bounded(FLOOD_GROWTH, FD_SLACK);
    });
}

// ---------------------------------------------------------------------------------------------
// 13. DATAGRAM flood into one flow

/// Drop reasons the relay counts (README, metrics).
const DROP_REASONS: [&str; 9] = [
    "unknown_context",
    "too_large",
    "client_not_reading",
    "target_busy",
    "no_flow",
    "malformed",
    "rate_limit",
    "buffer_pool_empty",
    "truncated_receive",
];

fn drops_by_reason(relay: &RelayProc) -> Vec<f64> {
    DROP_REASONS
        .iter()
        .map(|r| {
            relay.metric(
                "masque_relay_datagrams_dropped_total",
                &[&format!("reason=\"{r}\"")],
            )
        })
        .collect()
}

/// QUIC DATAGRAMs of 1200 bytes as fast as the attacker can into one flow whose target never
/// answers. Returns (handed to quinn, received by the target, relay drops, rate_limit drops,
/// non-zero drops by reason).
async fn datagram_flood(relay: &RelayProc, for_how_long: Duration) -> (u64, u64, f64, f64, String) {
    let sink = SinkTarget::start();
    let mut client = relay.h3().await;
    let (resp, stream) =
        h3_connect_udp(&mut client, &udp_path("127.0.0.1", sink.addr.port())).await;
    assert_eq!(resp.status(), 200);
    let before = drops_by_reason(relay);
    let mut d = Vec::new();
    varint(stream.id().into_inner() / 4, &mut d);
    d.push(0);
    d.resize(1200, 0xdd);
    let d = Bytes::from(d);
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < for_how_long {
        for _ in 0..64 {
            if client.quic.send_datagram(d.clone()).is_ok() {
                sent += 1;
            }
        }
        tokio::task::yield_now().await;
    }
    // A barrier: an echo on a second flow of the same connection comes back only after the
    // relay has handled (relayed or dropped and counted) every flood datagram sent before it.
    let echo = EchoTarget::start("127.0.0.1:0");
    let (resp, probe) = h3_connect_udp(&mut client, &udp_path("127.0.0.1", echo.addr.port())).await;
    assert_eq!(resp.status(), 200);
    assert!(h3_echo(&client, &probe, b"after the flood").await);
    let after = drops_by_reason(relay);
    let delta: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let dropped = delta.iter().sum();
    let limited = delta[6];
    let reasons = DROP_REASONS
        .iter()
        .zip(&delta)
        .filter(|(_, d)| **d > 0.0)
        .map(|(r, d)| format!("{r} {d}"))
        .collect::<Vec<_>>()
        .join(", ");
    let received = sink.received.load(Ordering::Relaxed);
    drop(stream);
    (sent, received, dropped, limited, reasons)
}

/// The flow's rate limit in this test: far below what the flood offers, so the relay has to
/// drop (and count) most of it.
const FLOOD_FLOW_RATE: u32 = 5000;

#[test]
fn datagram_flood_into_one_flow_is_bounded() {
    serial(|| async {
        let relay = RelayProc::start(RelayOpts {
            metrics: true,
            config: Some(format!(
                "[limits]\ndatagrams_per_second = {FLOOD_FLOW_RATE}\n"
            )),
            ..Default::default()
        });
        let target = EchoTarget::start("127.0.0.1:0");
        let prober = Prober::start(&relay, Proto::H3, target.addr);
        let flood_for = Duration::from_secs(2);
        let ((sent, received, dropped, limited, reasons), f) =
            measure(&relay, &prober, datagram_flood(&relay, flood_for)).await;
        f.report(
            "13",
            "datagram_flood",
            &format!(
                "{sent} DATAGRAMs of 1200 bytes handed to the attacker's QUIC stack in 2 s (it \
                 drops what it cannot send); flow limited to {FLOOD_FLOW_RATE}/s; the sink \
                 received {received}; the relay's drop counter rose by {dropped} ({reasons})"
            ),
        );
        assert!(received > 0, "nothing reached the sink");
        assert!(
            limited > 0.0,
            "the relay's rate_limit drop counter did not rise"
        );
        // The limit's burst is a tenth of a second's worth (at least 64).
        let allowed = u64::from(FLOOD_FLOW_RATE) * 3 + 1000;
        assert!(
            received <= allowed,
            "{received} datagrams reached the sink through a {FLOOD_FLOW_RATE}/s limit"
        );
        f.assert_bounded(FLOOD_GROWTH, FD_SLACK);
    });
}

#[test]
#[ignore = "stress: cargo test --release --test attacks stress_ -- --ignored --nocapture"]
fn stress_datagram_flood_into_one_flow() {
    serial(|| async {
        let relay = RelayProc::start(RelayOpts {
            metrics: true,
            ..Default::default()
        });
        let target = EchoTarget::start("127.0.0.1:0");
        let prober = Prober::start(&relay, Proto::H3, target.addr);
        let ((sent, received, dropped, _, reasons), f) = measure(
            &relay,
            &prober,
            datagram_flood(&relay, Duration::from_secs(20)),
        )
        .await;
        f.report(
            "13",
            "stress_datagram_flood",
            &format!(
                "default limits; {sent} DATAGRAMs of 1200 bytes handed to the attacker's QUIC \
                 stack in 20 s; the sink received {received}; the relay's drop counter rose by \
                 {dropped} ({reasons})"
            ),
        );
        f.assert_bounded(FLOOD_GROWTH, FD_SLACK);
    });
}

// ---------------------------------------------------------------------------------------------
// 14. QPACK / field section size on the decoded size

/// Sends a raw request with `section` on a new bidi stream of `conn`; returns the response
/// status or how the stream ended.
async fn raw_h3_request(
    conn: &quinn::Connection,
    section: &[u8],
    fin: bool,
) -> Result<u16, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(&h3_frame(0x01, section))
        .await
        .map_err(|e| format!("write: {e}"))?;
    if fin {
        let _ = send.finish();
    }
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, recv.read_chunk(65_536, true)).await {
            Err(_) => return Err(format!("no answer within 5 s ({} bytes)", got.len())),
            Ok(Ok(Some(c))) => {
                got.extend_from_slice(&c.bytes);
                if let Some(s) = h3_response_status(&got) {
                    return Ok(s);
                }
            }
            Ok(Ok(None)) => return Err(format!("stream ended after {} bytes", got.len())),
            Ok(Err(e)) => return Err(format!("stream error: {e}")),
        }
    }
}

#[test]
fn h3_header_limits_apply_to_the_decoded_size_and_the_connection_survives() {
    serial(|| async {
        let relay = RelayProc::start(RelayOpts::default());
        let target = EchoTarget::start("127.0.0.1:0");
        let port = target.addr.port();
        let mut client = relay.h3().await;
        let (resp, sibling) = h3_connect_udp(&mut client, &udp_path("127.0.0.1", port)).await;
        assert_eq!(resp.status(), 200);

        // The control: a plain request by hand gets 200.
        let plain = raw_h3_request(&client.quic, &qpack_connect_udp(port, &[]), false).await;
        // 24 000 decoded bytes in 15 000 encoded ones: under the 16 KiB limit on the wire,
        // over it once decoded.
        let mut big = Vec::new();
        qpack_literal_huffman(b"x-big", &huffman_a(24_000), &mut big);
        let huffman_section = qpack_connect_udp(port, &big);
        let huffman = raw_h3_request(&client.quic, &huffman_section, true).await;
        let alive_1 = h3_echo(&client, &sibling, b"after the Huffman bomb").await;
        // Over the limit on the wire too: 40 KB of literal.
        let mut big = Vec::new();
        qpack_literal(b"x-big", &[b'z'; 40_000], &mut big);
        let literal = raw_h3_request(&client.quic, &qpack_connect_udp(port, &big), true).await;
        let alive_2 = h3_echo(&client, &sibling, b"after the 40 KB literal").await;
        // Many small fields adding up to 20 KB decoded.
        let mut many = Vec::new();
        for i in 0..400 {
            qpack_literal(format!("x-{i:03}").as_bytes(), &[b'q'; 16], &mut many);
        }
        let many_fields = raw_h3_request(&client.quic, &qpack_connect_udp(port, &many), true).await;
        let alive_3 = h3_echo(&client, &sibling, b"after many fields").await;
        let (resp, _) = h3_connect_udp(&mut client, &udp_path("127.0.0.1", port)).await;
        eprintln!(
            "ATTACK item=14 test=h3_header_limits: plain request {plain:?}; Huffman section of \
             {} bytes encoding 24 000: {huffman:?}; 40 KB literal: {literal:?}; 400 fields (~20 KB \
             decoded): {many_fields:?}; sibling flow alive after each: {alive_1} {alive_2} \
             {alive_3}; a new request on the same connection: {}",
            huffman_section.len(),
            resp.status()
        );
        assert_eq!(plain, Ok(200), "a plain hand-made request was not served");
        assert!(huffman_section.len() < 16_384);
        for (what, r) in [
            ("Huffman", &huffman),
            ("literal", &literal),
            ("many fields", &many_fields),
        ] {
            assert!(
                matches!(r, Ok(431))
                    || matches!(r, Err(e) if e.contains("reset") || e.contains("stream error")),
                "{what}: over-limit headers got {r:?}"
            );
        }
        assert!(alive_1 && alive_2 && alive_3, "the sibling flow died");
        assert_eq!(
            resp.status(),
            200,
            "the connection no longer serves requests"
        );
        assert!(client.quic.close_reason().is_none());
    });
}

/// A CONNECT-UDP request whose stream the client finishes right after the HEADERS (before the
/// response) still gets its answer, and its stream completes.
#[test]
fn h3_request_finished_right_after_its_headers_is_answered() {
    serial(|| async {
        let relay = RelayProc::start(RelayOpts::default());
        let target = EchoTarget::start("127.0.0.1:0");
        let (_ep, conn) = relay.quic().await;
        let r = raw_h3_request(&conn, &qpack_connect_udp(target.addr.port(), &[]), true).await;
        eprintln!("HEADERS + FIN: {r:?}");
        assert!(r.is_ok(), "no response: {r:?}");
    });
}

// ---------------------------------------------------------------------------------------------
// 15. HTTP/3 request-stream rapid reset

async fn h3_rapid_reset(relay: &RelayProc, port: u16, max: u64, for_how_long: Duration) -> String {
    let (_ep, conn) = relay.quic().await;
    let frame = h3_frame(0x01, &qpack_connect_udp(port, &[]));
    let started = Instant::now();
    let mut streams = 0u64;
    let mut stalled = false;
    let cancelled = quinn::VarInt::from_u32(0x10c); // H3_REQUEST_CANCELLED
    'outer: while streams < max && started.elapsed() < for_how_long {
        let mut batch = Vec::with_capacity(64);
        for _ in 0..64 {
            match tokio::time::timeout(Duration::from_secs(2), conn.open_bi()).await {
                Ok(Ok((mut send, recv))) => {
                    let _ = send.write_all(&frame).await;
                    batch.push((send, recv));
                }
                Ok(Err(e)) => panic!("the attacker's connection died: {e}"),
                Err(_) => {
                    stalled = true;
                    break 'outer;
                }
            }
        }
        // Let the HEADERS leave before the resets, so the relay does start each request.
        tokio::time::sleep(Duration::from_millis(2)).await;
        for (mut send, mut recv) in batch {
            let _ = send.reset(cancelled);
            let _ = recv.stop(cancelled);
            streams += 1;
        }
    }
    let elapsed = started.elapsed();
    assert!(
        !stalled,
        "the relay stopped granting streams after {streams} reset requests"
    );
    format!(
        "{streams} request streams opened and reset in {:.0} ms ({:.0}/s); relay kept granting \
         streams",
        ms(elapsed),
        streams as f64 / elapsed.as_secs_f64()
    )
}

#[test]
fn h3_request_stream_rapid_reset_is_bounded() {
    serial(|| async {
        let relay = RelayProc::start(RelayOpts::default());
        let target = EchoTarget::start("127.0.0.1:0");
        let prober = Prober::start(&relay, Proto::H3, target.addr);
        let (notes, f) = measure(
            &relay,
            &prober,
            h3_rapid_reset(
                &relay,
                target.addr.port(),
                100_000,
                Duration::from_millis(2500),
            ),
        )
        .await;
        f.report("15", "h3_rapid_reset", &notes);
        f.assert_bounded(FLOOD_GROWTH, FD_SLACK);
    });
}

#[test]
#[ignore = "stress: cargo test --release --test attacks stress_ -- --ignored --nocapture"]
fn stress_h3_request_stream_rapid_reset() {
    serial(|| async {
        let relay = RelayProc::start(RelayOpts::default());
        let target = EchoTarget::start("127.0.0.1:0");
        let prober = Prober::start(&relay, Proto::H3, target.addr);
        let (notes, f) = measure(
            &relay,
            &prober,
            h3_rapid_reset(
                &relay,
                target.addr.port(),
                1_000_000,
                Duration::from_secs(10),
            ),
        )
        .await;
        f.report("15", "stress_h3_rapid_reset", &notes);
        f.assert_bounded(FLOOD_GROWTH, FD_SLACK);
    });
}

// ---------------------------------------------------------------------------------------------
// 16. 0-RTT

/// A session store that records the early-data allowance of every ticket the relay issues.
#[derive(Debug)]
struct TicketLog {
    inner: rustls::client::ClientSessionMemoryCache,
    max_early_data: std::sync::Mutex<Vec<u32>>,
}

impl rustls::client::ClientSessionStore for TicketLog {
    fn set_kx_hint(
        &self,
        server_name: rustls::pki_types::ServerName<'static>,
        group: rustls::NamedGroup,
    ) {
        self.inner.set_kx_hint(server_name, group)
    }

    fn kx_hint(
        &self,
        server_name: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(server_name)
    }

    fn set_tls12_session(
        &self,
        server_name: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.inner.set_tls12_session(server_name, value)
    }

    fn tls12_session(
        &self,
        server_name: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &rustls::pki_types::ServerName<'static>) {
        self.inner.remove_tls12_session(server_name)
    }

    fn insert_tls13_ticket(
        &self,
        server_name: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.max_early_data
            .lock()
            .unwrap()
            .push(value.max_early_data_size());
        self.inner.insert_tls13_ticket(server_name, value)
    }

    fn take_tls13_ticket(
        &self,
        server_name: &rustls::pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(server_name)
    }
}

#[test]
fn zero_rtt_is_off_so_no_connect_udp_is_replayed() {
    serial(|| async {
        let relay = RelayProc::start(RelayOpts::default());
        let target = EchoTarget::start("127.0.0.1:0");
        let port = target.addr.port();
        let log = Arc::new(TicketLog {
            inner: rustls::client::ClientSessionMemoryCache::new(16),
            max_early_data: std::sync::Mutex::new(Vec::new()),
        });
        let mut tls = client_tls(&relay.der, b"h3");
        tls.enable_early_data = true;
        tls.resumption = rustls::client::Resumption::store(log.clone());
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(quic_client_config(&tls));

        // A first session, used for a flow, which leaves tickets behind.
        let conn = ep.connect(relay.addr, "localhost").unwrap().await.unwrap();
        let mut client = h3_over(ep.clone(), conn.clone()).await;
        let (resp, stream) = h3_connect_udp(&mut client, &udp_path("127.0.0.1", port)).await;
        assert_eq!(resp.status(), 200);
        assert!(h3_echo(&client, &stream, b"first session").await);
        // The relay sends its session tickets after the handshake; the next connection needs one.
        eventually(
            || !log.max_early_data.lock().unwrap().is_empty(),
            || "the relay sent no session ticket".to_owned(),
        )
        .await;
        drop(stream);
        conn.close(quinn::VarInt::from_u32(0x100), b"");
        drop(client);
        let tickets = log.max_early_data.lock().unwrap().clone();
        let before = target.received.load(Ordering::Relaxed);

        // The second connection tries 0-RTT.
        let connecting = ep.connect(relay.addr, "localhost").unwrap();
        let outcome = match connecting.into_0rtt() {
            Err(connecting) => {
                let conn = connecting.await.unwrap();
                conn.close(quinn::VarInt::from_u32(0x100), b"");
                "into_0rtt refused: the client has no early-data allowance".to_owned()
            }
            Ok((conn, accepted)) => {
                // Early data would be allowed by the client: send a CONNECT-UDP and a datagram
                // for it in 0-RTT; the relay must reject them.
                let early = async {
                    let (mut send, _recv) = conn.open_bi().await.unwrap();
                    let _ = send
                        .write_all(&h3_frame(0x01, &qpack_connect_udp(port, &[])))
                        .await;
                    let mut d = vec![0u8, 0u8];
                    d.extend_from_slice(b"early");
                    let _ = conn.send_datagram(Bytes::from(d));
                };
                early.await;
                let accepted = accepted.await;
                assert!(!accepted, "the relay accepted 0-RTT");
                format!("0-RTT attempted and rejected (accepted = {accepted})")
            }
        };
        let after = target.received.load(Ordering::Relaxed);
        eprintln!(
            "ATTACK item=16 test=zero_rtt: tickets issued with max_early_data_size {tickets:?}; \
             {outcome}; datagrams at the target from the second connection: {}",
            after - before
        );
        assert!(
            tickets.iter().all(|m| *m == 0),
            "the relay's tickets allow early data: {tickets:?}"
        );
        assert_eq!(after, before, "something reached the target from 0-RTT");
    });
}

// ---------------------------------------------------------------------------------------------
// 20. Memory pressure under a cgroup cap

/// What opening flows under a memory cap came to.
struct CapOutcome {
    statuses: std::collections::BTreeMap<u16, u64>,
    refused: bool,
    alive: bool,
    oom_kills: u64,
    notes: String,
}

/// Runs the relay (with `config`) in a memory cgroup of `cap` bytes and opens flows over
/// HTTP/2 (up to 256 per connection, the per-connection cap) until the relay refuses one for
/// the whole relay (503), dies, or `within` passes. `None` when no cgroup can be made here.
async fn open_flows_under_cap(
    cap: u64,
    config: Option<String>,
    within: Duration,
) -> Option<CapOutcome> {
    let cg = match MemCgroup::create(cap) {
        Ok(cg) => cg,
        Err(why) => {
            eprintln!(
                "ATTACK item=20 test=memory_pressure: SKIPPED, cannot make a memory cgroup here \
                 ({why}); run as root on a host with cgroup v2 (memory controller) or the v1 \
                 memory hierarchy"
            );
            return None;
        }
    };
    let mut relay = RelayProc::start(RelayOpts {
        cgroup: Some(cg.dir.clone()),
        config,
        ..Default::default()
    });
    let rss_start = relay.rss_kib();
    let usage_start = cg.usage();
    let target = SinkTarget::start();
    let path = udp_path("127.0.0.1", target.addr.port());
    let started = Instant::now();
    let mut conns = Vec::new();
    let mut flows = Vec::new();
    let mut statuses = std::collections::BTreeMap::<u16, u64>::new();
    let (mut refused, mut peak_usage, mut peak_rss) = (false, 0, 0);
    let mut failure = None;
    'outer: while started.elapsed() < within {
        if !relay.alive() {
            break;
        }
        let addr = relay.addr;
        let der = relay.der.clone();
        let connected = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::spawn(async move {
                let tls = tls_connect(addr, &der, b"h2").await;
                common::h2_handshake(tls).await
            }),
        )
        .await;
        let mut client = match connected {
            Ok(Ok(c)) => c,
            other => {
                failure = Some(format!("connect: {:?}", other.map(|r| r.map(|_| ()))));
                break;
            }
        };
        for _ in 0..256 {
            match try_connect_udp(&mut client, &path).await {
                Ok((status, send, body)) => {
                    *statuses.entry(status).or_default() += 1;
                    match status {
                        200 => flows.push((send, body)),
                        503 => {
                            refused = true;
                            break 'outer;
                        }
                        _ => break,
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break 'outer;
                }
            }
        }
        peak_usage = peak_usage.max(cg.usage());
        peak_rss = peak_rss.max(relay.rss_kib());
        conns.push(client);
    }
    peak_usage = peak_usage.max(cg.usage());
    peak_rss = peak_rss.max(relay.rss_kib());
    // The cgroup counts an OOM kill when it happens; the exit shows once the process is gone.
    let oom_kills = cg.oom_kills();
    if oom_kills > 0 {
        let deadline = Instant::now() + common::TIMEOUT;
        while relay.alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let alive = relay.alive();
    let per_flow =
        peak_usage.saturating_sub(usage_start) as f64 / 1024.0 / flows.len().max(1) as f64;
    let notes = format!(
        "cap {} MiB ({}); {} flows open on {} connections after {:.1} s; statuses {statuses:?}; \
         relay RSS {rss_start} KiB at start, {peak_rss} KiB at most; cgroup usage {} KiB at start, \
         {} KiB at most (~{per_flow:.1} KiB per flow); relay alive {alive}; oom_kill {oom_kills}; exit {:?}; \
         client error {failure:?}",
        cap >> 20,
        if cg.v2 { "cgroup v2" } else { "cgroup v1" },
        flows.len(),
        conns.len(),
        started.elapsed().as_secs_f64(),
        usage_start / 1024,
        peak_usage / 1024,
        relay.exit_status()
    );
    drop(flows);
    drop(conns);
    drop(relay);
    Some(CapOutcome {
        statuses,
        refused,
        alive,
        oom_kills,
        notes,
    })
}

/// With `max_flows` sized to the memory the relay has (2000 flows, ~10 KiB each, in 64 MiB),
/// the cap holds under the memory limit: flow 2001 gets 503 and nothing is OOM-killed.
#[test]
fn under_a_memory_cap_max_flows_sized_to_it_refuses_with_503() {
    serial(|| async {
        let Some(o) = open_flows_under_cap(
            64 << 20,
            Some("[limits]\nmax_flows = 2000\n".into()),
            Duration::from_secs(20),
        )
        .await
        else {
            return;
        };
        eprintln!(
            "ATTACK item=20 test=memory_pressure_sized_max_flows: {}",
            o.notes
        );
        assert_eq!(o.oom_kills, 0, "the relay was OOM-killed: {}", o.notes);
        assert!(o.alive, "the relay died: {}", o.notes);
        assert!(o.refused, "no 503: {}", o.notes);
        assert_eq!(o.statuses.get(&200), Some(&2000), "{}", o.notes);
    });
}

/// SECURITY.md item 20 as written: with the default limits, flooding flows under a 64 MiB cap
/// must end in refusals (429/503), never an OOM kill.
#[test]
fn under_a_memory_cap_new_flows_are_refused_before_any_oom_kill() {
    serial(|| async {
        let Some(o) = open_flows_under_cap(64 << 20, None, Duration::from_secs(30)).await else {
            return;
        };
        eprintln!(
            "ATTACK item=20 test=memory_pressure_default_limits: {}",
            o.notes
        );
        assert_eq!(o.oom_kills, 0, "the relay was OOM-killed: {}", o.notes);
        assert!(o.alive, "the relay died: {}", o.notes);
        assert!(o.refused, "no refusal within the time: {}", o.notes);
    });
}
