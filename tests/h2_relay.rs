//! CONNECT-UDP over HTTP/2 against the relay over loopback, with the `h2` crate as the client.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use masque_relay::relay::flow::{CloseReason, DropReason};

fn status(p: &http::response::Parts) -> u16 {
    p.status.as_u16()
}

#[tokio::test]
async fn echo_is_byte_exact_for_every_size() {
    let relay = TestRelay::start(|_| {});
    let target = EchoTarget::start("127.0.0.1:0");
    let mut client = relay.h2().await;
    let (resp, mut send, mut body) =
        connect_udp(&mut client, &udp_path("127.0.0.1", target.addr.port())).await;
    assert_eq!(status(&resp), 200);
    assert_eq!(resp.headers.get("capsule-protocol").unwrap(), "?1");
    assert!(resp.headers.get("content-length").is_none());

    let mut reader = CapsuleReader::default();
    for size in [0usize, 1, 1200, 1472] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
        send.send_data(Bytes::from(datagram(&payload)), false)
            .unwrap();
        let got = recv_datagrams(&mut body, &mut reader, 1).await;
        assert_eq!(got, vec![payload], "size {size}");
    }
}

#[tokio::test]
async fn capsules_split_across_frames_and_coalesced() {
    let relay = TestRelay::start(|_| {});
    let target = EchoTarget::start("127.0.0.1:0");
    let mut client = relay.h2().await;
    let (resp, mut send, mut body) =
        connect_udp(&mut client, &udp_path("127.0.0.1", target.addr.port())).await;
    assert_eq!(status(&resp), 200);
    let mut reader = CapsuleReader::default();

    // One capsule split into one-byte DATA frames.
    let one = datagram(b"split into single bytes");
    for b in &one {
        send.send_data(Bytes::copy_from_slice(&[*b]), false)
            .unwrap();
    }
    assert_eq!(
        recv_datagrams(&mut body, &mut reader, 1).await,
        vec![b"split into single bytes".to_vec()]
    );

    // Three capsules in one DATA frame, and a fourth split across two frames with the third.
    let mut many = Vec::new();
    for p in [&b"a"[..], b"bb", b"ccc"] {
        many.extend(datagram(p));
    }
    let fourth = datagram(b"dddd");
    many.extend_from_slice(&fourth[..3]);
    send.send_data(Bytes::from(many), false).unwrap();
    send.send_data(Bytes::copy_from_slice(&fourth[3..]), false)
        .unwrap();
    let mut got = recv_datagrams(&mut body, &mut reader, 4).await;
    got.sort();
    assert_eq!(
        got,
        vec![
            b"a".to_vec(),
            b"bb".to_vec(),
            b"ccc".to_vec(),
            b"dddd".to_vec()
        ]
    );
}

#[tokio::test]
async fn unknown_capsule_types_are_skipped() {
    let relay = TestRelay::start(|_| {});
    let target = EchoTarget::start("127.0.0.1:0");
    let mut client = relay.h2().await;
    let (_, mut send, mut body) =
        connect_udp(&mut client, &udp_path("127.0.0.1", target.addr.port())).await;
    let mut bytes = Vec::new();
    // Reserved (greasing) types 0x29*N+0x17 and some arbitrary unknown ones, with values.
    for ty in [
        0x17u64,
        0x29 + 0x17,
        0x29 * 1000 + 0x17,
        0x1234,
        0x3fff_ffff,
    ] {
        bytes.extend(capsule(ty, b"ignore me"));
    }
    bytes.extend(datagram(b"after the unknown ones"));
    // A non-zero context ID is unknown to the relay: dropped, not an error.
    bytes.extend(capsule(0, &[2, b'x']));
    bytes.extend(datagram(b"still alive"));
    send.send_data(Bytes::from(bytes), false).unwrap();
    let mut reader = CapsuleReader::default();
    let got = recv_datagrams(&mut body, &mut reader, 2).await;
    assert_eq!(
        got,
        vec![b"after the unknown ones".to_vec(), b"still alive".to_vec()]
    );
    assert_eq!(
        target.received.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    assert_eq!(relay.sum(|s| s.capsules_unknown.get()), 5);
    assert_eq!(relay.sum(|s| s.drops_for(DropReason::UnknownContext)), 1);
}

#[tokio::test]
async fn malformed_capsule_resets_only_its_stream() {
    let relay = TestRelay::start(|_| {});
    let target = EchoTarget::start("127.0.0.1:0");
    let path = udp_path("127.0.0.1", target.addr.port());
    let mut client = relay.h2().await;
    let (_, mut good_send, mut good_body) = connect_udp(&mut client, &path).await;
    let (resp, mut bad_send, mut bad_body) = connect_udp(&mut client, &path).await;
    assert_eq!(status(&resp), 200);

    // DATAGRAM with Length 1 but a two-byte context ID: the context ID overruns the capsule.
    bad_send
        .send_data(Bytes::from_static(&[0x00, 0x01, 0x40, 0x00]), false)
        .unwrap();
    let err = tokio::time::timeout(TIMEOUT, bad_body.data())
        .await
        .unwrap()
        .expect("stream ends with an error")
        .unwrap_err();
    assert_eq!(err.reason(), Some(h2::Reason::PROTOCOL_ERROR), "{err:?}");

    // The sibling stream keeps relaying.
    let mut reader = CapsuleReader::default();
    good_send
        .send_data(Bytes::from(datagram(b"sibling")), false)
        .unwrap();
    assert_eq!(
        recv_datagrams(&mut good_body, &mut reader, 1).await,
        vec![b"sibling".to_vec()]
    );
    // And a new stream on the same connection works.
    let (resp, mut new_send, mut new_body) = connect_udp(&mut client, &path).await;
    assert_eq!(status(&resp), 200);
    let mut reader = CapsuleReader::default();
    new_send
        .send_data(Bytes::from(datagram(b"new")), false)
        .unwrap();
    assert_eq!(
        recv_datagrams(&mut new_body, &mut reader, 1).await,
        vec![b"new".to_vec()]
    );
    assert_eq!(
        relay.sum(|s| s.flows_closed_for(CloseReason::ClientProtocolError)),
        1
    );
}

#[tokio::test]
async fn truncated_capsule_at_end_of_stream_resets() {
    let relay = TestRelay::start(|_| {});
    let target = EchoTarget::start("127.0.0.1:0");
    let mut client = relay.h2().await;
    let (_, mut send, mut body) =
        connect_udp(&mut client, &udp_path("127.0.0.1", target.addr.port())).await;
    let capsule = datagram(b"cut short");
    send.send_data(Bytes::copy_from_slice(&capsule[..5]), true)
        .unwrap();
    let r = tokio::time::timeout(TIMEOUT, body.data()).await.unwrap();
    let err = r.expect("an error, not a clean end").unwrap_err();
    assert_eq!(err.reason(), Some(h2::Reason::PROTOCOL_ERROR));
}

#[tokio::test]
async fn huge_declared_datagram_aborts_without_buffering() {
    let relay = TestRelay::start(|_| {});
    let target = EchoTarget::start("127.0.0.1:0");
    let mut client = relay.h2().await;
    let (_, mut send, mut body) =
        connect_udp(&mut client, &udp_path("127.0.0.1", target.addr.port())).await;
    // DATAGRAM capsule declaring 2^62-1 bytes, context 0, then a little of the value.
    let mut bytes = vec![0x00];
    varint((1 << 62) - 1, &mut bytes);
    bytes.push(0);
    bytes.extend_from_slice(&[0xaa; 1000]);
    send.send_data(Bytes::from(bytes), false).unwrap();
    let err = tokio::time::timeout(TIMEOUT, body.data())
        .await
        .unwrap()
        .expect("reset")
        .unwrap_err();
    assert_eq!(err.reason(), Some(h2::Reason::PROTOCOL_ERROR));
}

#[tokio::test]
async fn malformed_paths_are_refused() {
    let relay = TestRelay::start(|_| {});
    let mut client = relay.h2().await;
    let cases: &[(&str, u16)] = &[
        ("/.well-known/masque/udp/127.0.0.1/0/", 400),
        ("/.well-known/masque/udp/127.0.0.1/65536/", 400),
        ("/.well-known/masque/udp/127.0.0.1/99999/", 400),
        ("/.well-known/masque/udp/127.0.0.1/12a/", 400),
        ("/.well-known/masque/udp/127.0.0.1//", 400),
        ("/.well-known/masque/udp//443/", 400),
        ("/.well-known/masque/udp/fe80%3A%3A1%25eth0/443/", 400),
        ("/.well-known/masque/udp/%5B%3A%3A1%5D/443/", 400),
        ("/.well-known/masque/udp/127.0.0.1%2553/443/", 400),
        ("/.well-known/masque/udp/127.0.0.1/443", 404),
        ("/elsewhere/127.0.0.1/443/", 404),
    ];
    for (path, want) in cases {
        let (resp, _, _) = connect_udp(&mut client, path).await;
        assert_eq!(status(&resp), *want, "{path}");
        assert!(resp.headers.get("capsule-protocol").is_none(), "{path}");
        if *want == 400 {
            let ps = resp.headers.get("proxy-status").unwrap().to_str().unwrap();
            assert!(
                ps.starts_with("masque-relay; error=http_request_error"),
                "{ps}"
            );
        }
    }
    assert_eq!(relay.sum(|s| s.flows_opened.get()), 0);
}

#[tokio::test]
async fn non_connect_udp_requests_are_refused() {
    let relay = TestRelay::start(|_| {});
    let mut client = relay.h2().await;
    let get = http::Request::builder()
        .method("GET")
        .uri(format!("https://localhost{}", udp_path("127.0.0.1", 9)))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(get, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 405);
    // RFC 9110 §15.5.6: a 405 names the methods the resource supports.
    assert_eq!(resp.headers().get("allow").unwrap(), "CONNECT");
    let ws = http::Request::builder()
        .method("CONNECT")
        .uri(format!("https://localhost{}", udp_path("127.0.0.1", 9)))
        .extension(h2::ext::Protocol::from("websocket"))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(ws, false).unwrap();
    assert_eq!(resp.await.unwrap().status(), 501);
}

#[tokio::test]
async fn denied_targets_get_403_and_no_socket() {
    // No allow rules: the default deny list applies.
    let relay = TestRelay::start(|c| c.allow_targets.clear());
    let mut client = relay.h2().await;
    for path in [
        udp_path("127.0.0.1", 9),
        udp_path("10.1.2.3", 53),
        udp_path("169.254.169.254", 80),
        udp_path("%3A%3Affff%3A127.0.0.1", 9),
        udp_path("%3A%3A1", 9),
        // A name that resolves (from /etc/hosts) to loopback is checked by its address.
        udp_path("localhost", 9),
    ] {
        let (resp, _, _) = connect_udp(&mut client, &path).await;
        assert_eq!(status(&resp), 403, "{path}");
        let ps = resp.headers.get("proxy-status").unwrap().to_str().unwrap();
        assert!(
            ps.starts_with("masque-relay; error=destination_ip_prohibited"),
            "{ps}"
        );
    }
    assert_eq!(relay.sum(|s| s.flows_opened.get()), 0);
}

#[tokio::test]
async fn port_outside_the_allowed_range_is_denied() {
    let target = EchoTarget::start("127.0.0.1:0");
    let port = target.addr.port();
    let relay = TestRelay::start(|c| c.allow_targets = vec![format!("127.0.0.1/32:{port}")]);
    let mut client = relay.h2().await;
    let (resp, _, _) = connect_udp(&mut client, &udp_path("127.0.0.1", port)).await;
    assert_eq!(status(&resp), 200);
    let other = if port == 65535 { port - 1 } else { port + 1 };
    let (resp, _, _) = connect_udp(&mut client, &udp_path("127.0.0.1", other)).await;
    assert_eq!(status(&resp), 403);
}

#[tokio::test]
async fn ipv6_target() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    }
    let relay = TestRelay::start(|_| {});
    let target = EchoTarget::start("[::1]:0");
    let mut client = relay.h2().await;
    let (resp, mut send, mut body) =
        connect_udp(&mut client, &udp_path("%3A%3A1", target.addr.port())).await;
    assert_eq!(status(&resp), 200);
    send.send_data(Bytes::from(datagram(b"over v6")), false)
        .unwrap();
    let mut reader = CapsuleReader::default();
    assert_eq!(
        recv_datagrams(&mut body, &mut reader, 1).await,
        vec![b"over v6".to_vec()]
    );
    let peer = target.last_peer.lock().unwrap().unwrap();
    assert!(peer.is_ipv6(), "{peer}");
}

#[tokio::test]
async fn hundred_flows_on_one_connection_stay_separate() {
    let relay = TestRelay::start(|_| {});
    let target = EchoTarget::start("127.0.0.1:0");
    let path = udp_path("127.0.0.1", target.addr.port());
    let mut client = relay.h2().await;
    let mut flows = Vec::new();
    for _ in 0..100 {
        let (resp, send, body) = connect_udp(&mut client, &path).await;
        assert_eq!(status(&resp), 200);
        flows.push((send, body));
    }
    // Every flow sends three datagrams naming itself; every flow gets back exactly its own.
    // All 100 flows stay open throughout; the datagrams go out twenty flows at a time so that
    // the echo target's socket buffer (a kernel default) does not overflow on a busy machine.
    for chunk in (0..100).collect::<Vec<usize>>().chunks(20) {
        for &i in chunk {
            for k in 0..3 {
                let msg = format!("flow {i} datagram {k}");
                flows[i]
                    .0
                    .send_data(Bytes::from(datagram(msg.as_bytes())), false)
                    .unwrap();
            }
        }
        for &i in chunk {
            let mut reader = CapsuleReader::default();
            let mut got = recv_datagrams(&mut flows[i].1, &mut reader, 3).await;
            got.sort();
            let want: Vec<Vec<u8>> = (0..3)
                .map(|k| format!("flow {i} datagram {k}").into_bytes())
                .collect();
            assert_eq!(got, want, "flow {i}");
        }
    }
    assert_eq!(relay.sum(|s| s.flows_open()), 100);
}

#[tokio::test]
async fn idle_timeout_closes_the_flow() {
    let relay = TestRelay::start(|c| c.flow_idle_timeout_secs = 1);
    let target = EchoTarget::start("127.0.0.1:0");
    let mut client = relay.h2().await;
    let (_, mut send, mut body) =
        connect_udp(&mut client, &udp_path("127.0.0.1", target.addr.port())).await;
    send.send_data(Bytes::from(datagram(b"ping")), false)
        .unwrap();
    let mut reader = CapsuleReader::default();
    assert_eq!(recv_datagrams(&mut body, &mut reader, 1).await.len(), 1);
    // Then silence: the relay ends the stream after about a second.
    let start = std::time::Instant::now();
    stream_end(&mut body, Duration::from_secs(5))
        .await
        .expect("clean END_STREAM");
    assert!(start.elapsed() >= Duration::from_millis(500));
    assert_eq!(relay.sum(|s| s.flows_closed_for(CloseReason::Idle)), 1);
}

#[tokio::test]
async fn end_stream_closes_the_target_socket() {
    let relay = TestRelay::start(|_| {});
    let target = EchoTarget::start("127.0.0.1:0");
    let mut client = relay.h2().await;
    let (_, mut send, mut body) =
        connect_udp(&mut client, &udp_path("127.0.0.1", target.addr.port())).await;
    send.send_data(Bytes::from(datagram(b"hello")), false)
        .unwrap();
    let mut reader = CapsuleReader::default();
    assert_eq!(recv_datagrams(&mut body, &mut reader, 1).await.len(), 1);
    let flow_addr = target.last_peer.lock().unwrap().unwrap();

    send.send_data(Bytes::new(), true).unwrap();
    // The relay finishes its side promptly.
    stream_end(&mut body, TIMEOUT)
        .await
        .expect("clean END_STREAM");

    // And the flow is gone: the target's next datagram to the flow's (shared) egress socket
    // reaches no one and is counted.
    assert_eq!(relay.sum(|s| s.flows_open()), 0);
    let before = relay.sum(|s| s.drops_for(DropReason::UnknownSource));
    target.send_from(b"late", flow_addr);
    eventually(
        || relay.sum(|s| s.drops_for(DropReason::UnknownSource)) > before,
        || "late reply not counted".into(),
    )
    .await;
    assert_eq!(relay.sum(|s| s.flows_closed_for(CloseReason::ClientEnd)), 1);
}

#[tokio::test]
async fn unreachable_target_closes_the_stream() {
    let relay = TestRelay::start(|_| {});
    // A port with nothing behind it: the first datagram draws ICMP port unreachable.
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut client = relay.h2().await;
    let (resp, mut send, mut body) = connect_udp(&mut client, &udp_path("127.0.0.1", port)).await;
    assert_eq!(status(&resp), 200);
    send.send_data(Bytes::from(datagram(b"knock")), false)
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(2), body.data())
        .await
        .expect("closed within a second or two")
        .expect("reset");
    assert_eq!(r.unwrap_err().reason(), Some(h2::Reason::CONNECT_ERROR));
    assert_eq!(
        relay.sum(|s| s.flows_closed_for(CloseReason::TargetError)),
        1
    );
}

#[tokio::test]
async fn names_are_resolved_and_checked_by_address() {
    let target = EchoTarget::start("127.0.0.1:0");
    let resolver = TableResolver(vec![
        // A name whose first address is denied (private) and second allowed (loopback):
        // the relay skips the denied one.
        (
            "mixed.test",
            vec![
                "10.9.9.9:0".parse().unwrap(),
                "127.0.0.1:0".parse().unwrap(),
            ],
        ),
        ("private.test", vec!["192.168.1.1:0".parse().unwrap()]),
    ]);
    let relay = TestRelay::start_with_resolver(
        |c| c.resolve_timeout_ms = 300,
        std::sync::Arc::new(resolver),
    );
    let mut client = relay.h2().await;
    let port = target.addr.port();

    let (resp, mut send, mut body) = connect_udp(&mut client, &udp_path("mixed.test", port)).await;
    assert_eq!(status(&resp), 200);
    send.send_data(Bytes::from(datagram(b"by name")), false)
        .unwrap();
    let mut reader = CapsuleReader::default();
    assert_eq!(
        recv_datagrams(&mut body, &mut reader, 1).await,
        vec![b"by name".to_vec()]
    );

    let refusals = [
        ("private.test", 403, "destination_ip_prohibited"),
        ("nxdomain.test", 502, "dns_error"),
        ("slow.test", 504, "dns_timeout"),
    ];
    for (name, want, error) in refusals {
        let (resp, _, _) = connect_udp(&mut client, &udp_path(name, port)).await;
        assert_eq!(status(&resp), want, "{name}");
        let ps = resp.headers.get("proxy-status").unwrap().to_str().unwrap();
        assert!(
            ps.starts_with(&format!("masque-relay; error={error}")),
            "{name}: {ps}"
        );
    }
    assert_eq!(relay.sum(|s| s.resolve_failures.get()), 2);
    assert_eq!(relay.sum(|s| s.flows_opened.get()), 1);
}

#[tokio::test]
async fn slow_reader_gets_drops_not_unbounded_buffering() {
    let relay = TestRelay::start(|_| {});
    let target = FloodTarget::start();
    // A client with the default 64 KiB stream window that stops reading.
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
    let (resp, mut send, mut body) =
        connect_udp(&mut client, &udp_path("127.0.0.1", target.addr.port())).await;
    assert_eq!(status(&resp), 200);
    const FLOOD: u64 = 2000;
    send.send_data(
        Bytes::from(datagram(format!("flood {FLOOD}").as_bytes())),
        false,
    )
    .unwrap();

    // Wait until the relay has dealt with the flood (read and relayed or dropped it). The
    // reads below must find it over, and no count says exactly when: the kernel's drops on a
    // full socket are only reported with a later datagram. So: until the count stands still.
    let deadline = std::time::Instant::now() + TIMEOUT;
    let handled = || {
        relay.sum(|s| s.drops_for(DropReason::ClientNotReading))
            + relay.sum(|s| {
                s.datagrams_for(
                    masque_relay::proto::connect_udp::HttpVersion::Http2,
                    masque_relay::metrics::Direction::ToClient,
                )
            })
    };
    let mut last = 0;
    while std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = handled();
        if now > 0 && now == last {
            break;
        }
        last = now;
    }
    let dropped = relay.sum(|s| s.drops_for(DropReason::ClientNotReading));
    assert!(dropped > 0, "no datagram was dropped for the slow reader");

    // What the relay let through is bounded by the client's window: read it all now.
    let mut reader = CapsuleReader::default();
    let mut delivered = 0u64;
    while let Ok(Some(Ok(data))) =
        tokio::time::timeout(Duration::from_millis(500), body.data()).await
    {
        delivered += reader.push(&data).len() as u64;
        let _ = body.flow_control().release_capacity(data.len());
    }
    assert!(
        delivered * 1200 <= 65_535,
        "{delivered} datagrams got through a 64 KiB window"
    );
    assert!(delivered + dropped <= FLOOD);
    // The flow still works once the client reads again.
    send.send_data(Bytes::from(datagram(b"still here")), false)
        .unwrap();
    let mut more = recv_datagrams(&mut body, &mut reader, 1).await;
    assert_eq!(more.pop().as_deref(), Some(&b"still here"[..]));
}

/// SECURITY.md 21: with a small receive pool, flooding targets use up their shares; the
/// datagrams beyond are dropped and counted, the worker never stalls, a new flow is served,
/// and every buffer comes back.
#[tokio::test]
async fn buffer_pool_exhaustion_drops_and_counts_and_the_worker_goes_on() {
    let relay = TestRelay::start(|c| {
        c.workers = 1;
        c.io.target_buffers = 64;
        c.io.target_buffer_size = 2048;
    });
    let target = FloodTarget::start();
    let mut client = relay.h2().await;
    let mut flows = Vec::new();
    for _ in 0..4 {
        let (resp, mut send, body) =
            connect_udp(&mut client, &udp_path("127.0.0.1", target.addr.port())).await;
        assert_eq!(status(&resp), 200);
        send.send_data(Bytes::from(datagram(b"flood 2000")), false)
            .unwrap();
        flows.push((send, body));
    }
    let no_buffer = || relay.sum(|s| s.drops_for(DropReason::NoBuffer));
    eventually(
        || no_buffer() > 0,
        || "8000 datagrams in a burst never filled a socket's share of 64 buffers".into(),
    )
    .await;
    // The worker goes on: a new flow's echo comes back while the floods drain.
    let echo = EchoTarget::start("127.0.0.1:0");
    let (resp, mut send, mut body) =
        connect_udp(&mut client, &udp_path("127.0.0.1", echo.addr.port())).await;
    assert_eq!(status(&resp), 200);
    let mut reader = CapsuleReader::default();
    send.send_data(Bytes::from(datagram(b"still served")), false)
        .unwrap();
    assert_eq!(
        recv_datagrams(&mut body, &mut reader, 1).await,
        vec![b"still served".to_vec()]
    );
    // Once the floods are over, every buffer is back in the pool (the gauge is read at each
    // pass; the echo flow's traffic makes passes happen).
    drop(flows);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while relay.sum(|s| s.io.pool_free[0].get()) != 64 {
        send.send_data(Bytes::from(datagram(b"tick")), false)
            .unwrap();
        assert!(
            std::time::Instant::now() < deadline,
            "buffers missing: {} of 64 free",
            relay.sum(|s| s.io.pool_free[0].get())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SECURITY.md 24: egress sockets are shared, so the relay filters sources itself. A third
/// host spraying a flow's egress port is dropped and counted, never relayed to the client.
#[tokio::test]
async fn datagrams_from_anyone_but_the_target_are_dropped_and_counted() {
    let relay = TestRelay::start(|c| c.workers = 1);
    let target = EchoTarget::start("127.0.0.1:0");
    let mut client = relay.h2().await;
    let (resp, mut send, mut body) =
        connect_udp(&mut client, &udp_path("127.0.0.1", target.addr.port())).await;
    assert_eq!(status(&resp), 200);
    let mut reader = CapsuleReader::default();
    send.send_data(Bytes::from(datagram(b"first")), false)
        .unwrap();
    assert_eq!(
        recv_datagrams(&mut body, &mut reader, 1).await,
        vec![b"first".to_vec()]
    );
    let egress = target.last_peer.lock().unwrap().unwrap();
    // Another host, and the target's own address from another port.
    let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let neighbour = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..50 {
        stranger.send_to(b"spoofed", egress).unwrap();
        neighbour.send_to(b"spoofed", egress).unwrap();
    }
    let spoofed = || relay.sum(|s| s.drops_for(DropReason::UnknownSource));
    eventually(
        || spoofed() >= 100,
        || format!("{} of 100 counted", spoofed()),
    )
    .await;
    // The flow goes on, and what reaches the client is only the target's echo.
    send.send_data(Bytes::from(datagram(b"second")), false)
        .unwrap();
    assert_eq!(
        recv_datagrams(&mut body, &mut reader, 1).await,
        vec![b"second".to_vec()]
    );
}

/// SECURITY.md 24: a closed flow's (socket, target) pair is not handed to the next flow to the
/// same target while replies for the old one may still arrive.
#[tokio::test]
async fn a_new_flow_never_receives_the_previous_flows_late_replies() {
    let relay = TestRelay::start(|c| c.workers = 1);
    let target = EchoTarget::start("127.0.0.1:0");
    let mut client = relay.h2().await;
    let path = udp_path("127.0.0.1", target.addr.port());
    let (_, mut send, mut body) = connect_udp(&mut client, &path).await;
    let mut reader = CapsuleReader::default();
    send.send_data(Bytes::from(datagram(b"a")), false).unwrap();
    assert_eq!(recv_datagrams(&mut body, &mut reader, 1).await.len(), 1);
    let old = target.last_peer.lock().unwrap().unwrap();
    send.send_data(Bytes::new(), true).unwrap();
    stream_end(&mut body, TIMEOUT)
        .await
        .expect("clean END_STREAM");
    // The next flow to the same target, at once.
    let (_, mut send, mut body) = connect_udp(&mut client, &path).await;
    let mut reader = CapsuleReader::default();
    send.send_data(Bytes::from(datagram(b"b")), false).unwrap();
    assert_eq!(
        recv_datagrams(&mut body, &mut reader, 1).await,
        vec![b"b".to_vec()]
    );
    let new = target.last_peer.lock().unwrap().unwrap();
    assert_ne!(old, new, "the pair is quarantined");
    // A late reply to the old flow goes nowhere.
    let before = relay.sum(|s| s.drops_for(DropReason::UnknownSource));
    target.send_from(b"late for a", old);
    eventually(
        || relay.sum(|s| s.drops_for(DropReason::UnknownSource)) > before,
        || "late reply not counted".into(),
    )
    .await;
    send.send_data(Bytes::from(datagram(b"c")), false).unwrap();
    assert_eq!(
        recv_datagrams(&mut body, &mut reader, 1).await,
        vec![b"c".to_vec()]
    );
}
