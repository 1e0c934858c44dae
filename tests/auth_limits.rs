//! Authentication (Bearer, Basic, mTLS) and abuse limits, against the relay over loopback.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use masque_relay::relay::auth;
use masque_relay::relay::flow::DropReason;
use rustls::pki_types::{PrivateKeyDer, ServerName};

fn credentials_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("credentials");
    std::fs::write(
        &path,
        format!(
            "{}\n{}\n",
            auth::token_line("ci", "token-0123456789abcdef"),
            auth::basic_line("alice", "wonderland", b"salty")
        ),
    )
    .unwrap();
    path
}

async fn h2_with_auth(
    client: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    authz: Option<&str>,
) -> (http::response::Parts, h2::SendStream<Bytes>, h2::RecvStream) {
    let mut b = http::Request::builder()
        .method("CONNECT")
        .uri(format!("https://localhost{path}"))
        .extension(h2::ext::Protocol::from("connect-udp"));
    if let Some(a) = authz {
        b = b.header("proxy-authorization", a);
    }
    let (resp, send) = client.send_request(b.body(()).unwrap(), false).unwrap();
    let (parts, body) = tokio::time::timeout(TIMEOUT, resp)
        .await
        .unwrap()
        .unwrap()
        .into_parts();
    (parts, send, body)
}

#[tokio::test]
async fn proxy_authorization_is_required_over_h2_h3_and_http11() {
    let dir = tempfile::tempdir().unwrap();
    let creds = credentials_file(dir.path());
    let relay = TestRelay::start(|c| c.auth.credentials_file = Some(creds.clone()));
    let target = EchoTarget::start("127.0.0.1:0");
    let path = udp_path("127.0.0.1", target.addr.port());
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:wonderland")
    );
    let wrong = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("alice:looking-glass")
    );

    // HTTP/2: missing and wrong credentials get 407 with a challenge; no socket is opened.
    let mut client = relay.h2().await;
    for authz in [
        None,
        Some("Bearer nope"),
        Some(wrong.as_str()),
        Some("Negotiate x"),
    ] {
        let (resp, _, _) = h2_with_auth(&mut client, &path, authz).await;
        assert_eq!(resp.status, 407, "{authz:?}");
        let challenge = resp
            .headers
            .get("proxy-authenticate")
            .unwrap()
            .to_str()
            .unwrap();
        assert!(
            challenge.contains("Basic") && challenge.contains("Bearer"),
            "{challenge}"
        );
    }
    assert_eq!(relay.sum(|s| s.flows_opened.get()), 0);
    assert_eq!(target.received.load(Ordering::Relaxed), 0);
    // Right credentials, both schemes.
    for authz in ["Bearer token-0123456789abcdef", basic.as_str()] {
        let (resp, mut send, mut body) = h2_with_auth(&mut client, &path, Some(authz)).await;
        assert_eq!(resp.status, 200);
        send.send_data(Bytes::from(datagram(b"authorized")), false)
            .unwrap();
        let mut reader = CapsuleReader::default();
        assert_eq!(
            recv_datagrams(&mut body, &mut reader, 1).await,
            vec![b"authorized".to_vec()]
        );
    }

    // HTTP/3.
    let mut h3c = relay.h3().await;
    let (resp, _) = h3_connect_udp(&mut h3c, &path).await;
    assert_eq!(resp.status(), 407);
    assert!(resp.headers().get("proxy-authenticate").is_some());
    let req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("https://localhost{path}"))
        .header("proxy-authorization", "Bearer token-0123456789abcdef")
        .extension(h3::ext::Protocol::CONNECT_UDP)
        .body(())
        .unwrap();
    let mut s = h3c.send.send_request(req).await.unwrap();
    assert_eq!(
        tokio::time::timeout(TIMEOUT, s.recv_response())
            .await
            .unwrap()
            .unwrap()
            .status(),
        200
    );

    // HTTP/1.1.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for (authz, want) in [
        ("", "407"),
        (
            "Proxy-Authorization: Bearer token-0123456789abcdef\r\n",
            "101",
        ),
    ] {
        let mut io = relay.tls(b"http/1.1").await;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: connect-udp\r\n{authz}\r\n"
        );
        io.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(TIMEOUT, io.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with(&format!("HTTP/1.1 {want} ")), "{head}");
    }
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    // A CA and a client certificate it issued.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client_cert = rcgen::CertificateParams::new(vec!["client".to_owned()])
        .unwrap()
        .signed_by(&client_key, &ca)
        .unwrap();
    let ca_path = dir.path().join("ca.pem");
    let relay = TestRelay::start(|c| c.auth.client_ca = Some(ca_path.clone()));
    let target = EchoTarget::start("127.0.0.1:0");

    let roots = relay_roots(&relay).await;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let connect = |cfg: rustls::ClientConfig| async move {
        let tcp = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        // TLS 1.3: a refused client certificate shows on the first read after the handshake.
        Ok::<_, std::io::Error>(tls)
    };
    // Without a client certificate: the handshake (or the first exchange) fails.
    let mut no_cert = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    no_cert.alpn_protocols = vec![b"h2".to_vec()];
    let failed = match connect(no_cert).await {
        Err(_) => true,
        Ok(tls) => {
            let r = tokio::time::timeout(TIMEOUT, h2::client::handshake(tls))
                .await
                .unwrap();
            match r {
                Err(_) => true,
                Ok((c, conn)) => {
                    let conn_res = tokio::time::timeout(TIMEOUT, conn).await.unwrap();
                    drop(c);
                    conn_res.is_err()
                }
            }
        }
    };
    assert!(failed, "a client without a certificate got through");

    // With the certificate: served.
    let mut with_cert = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![client_cert.der().clone()],
            PrivateKeyDer::Pkcs8(client_key.serialize_der().into()),
        )
        .unwrap();
    with_cert.alpn_protocols = vec![b"h2".to_vec()];
    let tls = connect(with_cert).await.unwrap();
    let mut client = h2_handshake(tls).await;
    let (resp, mut send, mut body) =
        connect_udp(&mut client, &udp_path("127.0.0.1", target.addr.port())).await;
    assert_eq!(resp.status, 200);
    send.send_data(Bytes::from(datagram(b"mtls")), false)
        .unwrap();
    let mut reader = CapsuleReader::default();
    assert_eq!(
        recv_datagrams(&mut body, &mut reader, 1).await,
        vec![b"mtls".to_vec()]
    );
}

/// The relay's certificate as a root store (taken from a TLS handshake with it).
async fn relay_roots(relay: &TestRelay) -> rustls::RootCertStore {
    let tls = relay.tls(b"h2").await;
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    roots
}

#[tokio::test]
async fn flow_caps_per_connection_and_in_total() {
    let relay = TestRelay::start(|c| {
        c.limits.max_flows_per_connection = 2;
        c.limits.max_flows = 3;
    });
    let target = EchoTarget::start("127.0.0.1:0");
    let path = udp_path("127.0.0.1", target.addr.port());
    let mut a = relay.h2().await;
    let mut kept = Vec::new();
    for _ in 0..2 {
        let (resp, s, b) = connect_udp(&mut a, &path).await;
        assert_eq!(resp.status, 200);
        kept.push((s, b));
    }
    // A third on the same connection: 429.
    let (resp, _, _) = connect_udp(&mut a, &path).await;
    assert_eq!(resp.status, 429);
    // Another connection may open one more (3 in total), then the relay is full: 503.
    let mut b = relay.h2().await;
    let (resp, s, body) = connect_udp(&mut b, &path).await;
    assert_eq!(resp.status, 200);
    let (resp, _, _) = connect_udp(&mut b, &path).await;
    assert_eq!(resp.status, 503);
    let ps = resp.headers.get("proxy-status").unwrap().to_str().unwrap();
    assert!(ps.contains("connection_limit_reached"), "{ps}");
    // Ending a flow frees its slot.
    drop((s, body));
    let (mut s0, _) = kept.pop().unwrap();
    s0.send_data(Bytes::new(), true).unwrap();
    let mut freed = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (resp, _, _) = connect_udp(&mut b, &path).await;
        if resp.status == 200 {
            freed = true;
            break;
        }
    }
    assert!(freed, "closing flows did not free their slots");
}

#[tokio::test]
async fn new_flow_rate_per_connection() {
    let relay = TestRelay::start(|c| c.limits.new_flows_per_second = 1);
    let target = EchoTarget::start("127.0.0.1:0");
    let path = udp_path("127.0.0.1", target.addr.port());
    let mut client = relay.h2().await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let (resp, _, _) = connect_udp(&mut client, &path).await;
        statuses.push(resp.status.as_u16());
    }
    // A burst of two, then refusals until the bucket refills.
    assert_eq!(&statuses[..2], &[200, 200]);
    assert!(statuses[2..].contains(&429), "{statuses:?}");
}

#[tokio::test]
async fn datagram_rate_per_flow_drops_and_counts() {
    let relay = TestRelay::start(|c| c.limits.datagrams_per_second = 100);
    let target = EchoTarget::start("127.0.0.1:0");
    let mut client = relay.h2().await;
    let (_, mut send, _body) =
        connect_udp(&mut client, &udp_path("127.0.0.1", target.addr.port())).await;
    let mut burst = Vec::new();
    for i in 0..500u32 {
        burst.extend(datagram(&i.to_be_bytes()));
    }
    send.send_data(Bytes::from(burst), false).unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while relay.sum(|s| s.drops_for(DropReason::RateLimit)) < 400
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dropped = relay.sum(|s| s.drops_for(DropReason::RateLimit));
    let got = target.received.load(Ordering::Relaxed);
    // A burst of 64 gets through (plus what refills while the burst is read), the rest is
    // dropped and counted; nothing is lost uncounted.
    assert!((64..=80).contains(&got), "target got {got}");
    assert_eq!(got + dropped, 500, "got {got}, dropped {dropped}");
}
