//! CONNECT-UDP over HTTP/1.1 Upgrade (RFC 9298 §3.2-§3.3) against the relay over loopback.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends a request head and reads the response head; returns (status line + headers, leftover).
async fn request<T>(io: &mut T, head: &str) -> (String, Vec<u8>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    io.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(TIMEOUT, io.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end + 4].to_vec()).unwrap();
            return (head, buf[end + 4..].to_vec());
        }
    }
}

fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: connect-udp\r\n\
         Capsule-Protocol: ?1\r\n\r\n"
    )
}

#[tokio::test]
async fn upgrade_and_echo() {
    let relay = TestRelay::start(|_| {});
    let target = EchoTarget::start("127.0.0.1:0");
    let mut io = relay.tls(b"http/1.1").await;
    let (head, leftover) = request(
        &mut io,
        &upgrade_request(&udp_path("127.0.0.1", target.addr.port())),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("\r\nupgrade: connect-udp\r\n"), "{head}");
    assert!(lower.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert!(lower.contains("\r\ncapsule-protocol: ?1\r\n"), "{head}");
    assert!(leftover.is_empty());

    let mut reader = CapsuleReader::default();
    for size in [0usize, 1, 1200, 1472] {
        let payload: Vec<u8> = (0..size).map(|i| (i ^ size) as u8).collect();
        io.write_all(&datagram(&payload)).await.unwrap();
        let mut got = Vec::new();
        while got.is_empty() {
            let mut chunk = vec![0u8; 4096];
            let n = tokio::time::timeout(TIMEOUT, io.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0);
            got = reader.push(&chunk[..n]);
        }
        assert_eq!(got, vec![payload], "size {size}");
    }

    // Closing our side ends the flow and the relay closes the connection.
    io.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(TIMEOUT, io.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(n.is_ok() || rest.is_empty());
}

#[tokio::test]
async fn capsules_sent_with_the_request_are_relayed() {
    let relay = TestRelay::start(|_| {});
    let target = EchoTarget::start("127.0.0.1:0");
    let mut io = relay.tls(b"http/1.1").await;
    // Optimistic: the first capsule travels in the same write as the request head.
    let mut first = upgrade_request(&udp_path("127.0.0.1", target.addr.port())).into_bytes();
    first.extend(datagram(b"early"));
    io.write_all(&first).await.unwrap();
    let (head, leftover) = request(&mut io, "").await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let mut reader = CapsuleReader::default();
    let mut got = reader.push(&leftover);
    while got.is_empty() {
        let mut chunk = vec![0u8; 4096];
        let n = tokio::time::timeout(TIMEOUT, io.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got = reader.push(&chunk[..n]);
    }
    assert_eq!(got, vec![b"early".to_vec()]);
}

#[tokio::test]
async fn refusals_on_http11() {
    let relay = TestRelay::start(|c| c.allow_targets.clear());
    let cases = [
        (upgrade_request(&udp_path("127.0.0.1", 0)), "400"),
        (upgrade_request(&udp_path("127.0.0.1", 53)), "403"),
        (upgrade_request("/not/the/template"), "404"),
        (
            "GET /.well-known/masque/udp/192.0.2.1/53/ HTTP/1.1\r\nHost: localhost\r\n\
             Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                .to_owned(),
            "400",
        ),
        (
            "POST /.well-known/masque/udp/192.0.2.1/53/ HTTP/1.1\r\nHost: localhost\r\n\
             Connection: Upgrade\r\nUpgrade: connect-udp\r\n\r\n"
                .to_owned(),
            "405",
        ),
        ("GET / HTTP/1.0\r\n\r\n".to_owned(), "505"),
    ];
    for (req, want) in cases {
        let mut io = relay.tls(b"http/1.1").await;
        let (head, _) = request(&mut io, &req).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {want} ")),
            "{req:?} -> {head}"
        );
        assert!(
            !head.to_ascii_lowercase().contains("capsule-protocol"),
            "{head}"
        );
        if want == "403" {
            assert!(
                head.contains("Proxy-Status: masque-relay; error=destination_ip_prohibited"),
                "{head}"
            );
        }
        if want == "405" {
            assert!(head.contains("\r\nAllow: GET\r\n"), "{head}");
        }
    }
}
