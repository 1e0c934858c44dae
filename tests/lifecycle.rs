//! Graceful drain, live reload and restart: in process through the `Relay` API, and as the
//! binary with real signals.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::proc::*;
use common::*;
use rustls::pki_types::ServerName;

#[tokio::test]
async fn drain_keeps_flows_refuses_new_work_then_closes_with_h3_no_error() {
    let mut relay = TestRelay::start(|_| {});
    let target = EchoTarget::start("127.0.0.1:0");
    let path = udp_path("127.0.0.1", target.addr.port());

    let mut h2c = relay.h2().await;
    let (resp, mut h2_send, mut h2_body) = connect_udp(&mut h2c, &path).await;
    assert_eq!(resp.status, 200);
    let mut h3c = relay.h3().await;
    let (resp, h3_stream) = h3_connect_udp(&mut h3c, &path).await;
    assert_eq!(resp.status(), 200);

    // The drain is in force for new requests as soon as `drain` returns; the listeners and
    // the GOAWAYs follow as each worker sees it.
    relay.relay.as_ref().unwrap().drain();

    // Established flows keep relaying, on both protocols.
    let mut reader = CapsuleReader::default();
    h2_send
        .send_data(Bytes::from(datagram(b"h2 during drain")), false)
        .unwrap();
    assert_eq!(
        recv_datagrams(&mut h2_body, &mut reader, 1).await,
        vec![b"h2 during drain".to_vec()]
    );
    let mut p = vec![0u8];
    p.extend_from_slice(b"h3 during drain");
    h3c.send_datagram(h3_stream.id(), &p);
    let (_, got) = h3c.recv_datagram().await;
    assert_eq!(&got[1..], b"h3 during drain");

    // New requests on the existing connections are refused.
    let req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("https://localhost{path}"))
        .extension(h2::ext::Protocol::from("connect-udp"))
        .body(())
        .unwrap();
    let refused = match h2c.clone().ready().await {
        Err(_) => true, // GOAWAY seen: the client will not even send it
        Ok(mut c) => match c.send_request(req, false) {
            Err(_) => true,
            Ok((resp, _)) => match tokio::time::timeout(TIMEOUT, resp).await.unwrap() {
                Err(_) => true, // REFUSED_STREAM
                Ok(r) => r.status() == 503,
            },
        },
    };
    assert!(
        refused,
        "a new HTTP/2 request was accepted during the drain"
    );
    let h3_new = http::Request::builder()
        .method("CONNECT")
        .uri(format!("https://localhost{path}"))
        .extension(h3::ext::Protocol::CONNECT_UDP)
        .body(())
        .unwrap();
    let h3_refused = match h3c.send.send_request(h3_new).await {
        Err(_) => true,
        Ok(mut s) => match tokio::time::timeout(TIMEOUT, s.recv_response())
            .await
            .unwrap()
        {
            Err(_) => true, // H3_REQUEST_REJECTED
            Ok(r) => r.status() == 503,
        },
    };
    assert!(
        h3_refused,
        "a new HTTP/3 request was accepted during the drain"
    );

    // New TCP connections are not accepted once every worker has closed its listener.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while tokio::net::TcpStream::connect(relay.addr).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the listeners are still open during the drain"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Stop: the HTTP/3 connection is closed with H3_NO_ERROR.
    let quic = h3c.quic.clone();
    let relay_inner = relay.relay.take().unwrap();
    tokio::task::spawn_blocking(move || relay_inner.shutdown())
        .await
        .unwrap();
    let reason = tokio::time::timeout(TIMEOUT, quic.closed()).await.unwrap();
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(0x100), "H3_NO_ERROR")
        }
        other => panic!("expected an application close, got {other:?}"),
    }
}

#[tokio::test]
async fn reload_swaps_the_certificate_for_new_connections_only() {
    let relay = TestRelay::start(|_| {});
    let target = EchoTarget::start("127.0.0.1:0");
    let mut client = relay.h2().await;
    let (_, mut send, mut body) =
        connect_udp(&mut client, &udp_path("127.0.0.1", target.addr.port())).await;

    // A second certificate; the client trusts both.
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("b.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.path().join("b.key"), ck.signing_key.serialize_pem()).unwrap();
    let r = relay.relay.as_ref().unwrap();
    let mut cfg = r.config();
    cfg.tls = masque_relay::config::TlsSource::Files {
        cert: dir.path().join("b.pem"),
        key: dir.path().join("b.key"),
    };
    r.reload(cfg).unwrap();

    // The established flow is untouched.
    send.send_data(Bytes::from(datagram(b"after reload")), false)
        .unwrap();
    let mut reader = CapsuleReader::default();
    assert_eq!(
        recv_datagrams(&mut body, &mut reader, 1).await,
        vec![b"after reload".to_vec()]
    );

    // A new connection sees the new certificate.
    let seen = peer_cert(relay.addr, ck.cert.der().to_vec()).await;
    assert_eq!(seen, ck.cert.der().to_vec());

    // A bad certificate path is refused and the running one stays.
    let mut bad = r.config();
    bad.tls = masque_relay::config::TlsSource::Files {
        cert: dir.path().join("missing.pem"),
        key: dir.path().join("b.key"),
    };
    assert!(r.reload(bad).is_err());
    assert_eq!(
        peer_cert(relay.addr, ck.cert.der().to_vec()).await,
        ck.cert.der().to_vec()
    );
}

/// Connects with TLS trusting `trusted` and returns the certificate the relay presented.
async fn peer_cert(addr: std::net::SocketAddr, trusted: Vec<u8>) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.into()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake with the new certificate");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

async fn h2_to(addr: std::net::SocketAddr, trusted: &[u8]) -> h2::client::SendRequest<Bytes> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.to_vec().into()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    h2_handshake(tls).await
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_then_exits_by_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = write_cert(dir.path(), "a");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = relay_args(&listen, 1, &cert, &key, &["--drain-timeout", "2"]);
    let mut p = Proc::start(&as_strs(&args));
    let target = EchoTarget::start("127.0.0.1:0");
    let addr = listen.parse().unwrap();
    let mut client = h2_to(addr, &der).await;
    let (_, mut send, mut body) =
        connect_udp(&mut client, &udp_path("127.0.0.1", target.addr.port())).await;

    let start = Instant::now();
    p.signal("TERM");
    p.wait_log("draining");
    // The flow keeps relaying during the drain.
    let mut reader = CapsuleReader::default();
    send.send_data(Bytes::from(datagram(b"still relaying")), false)
        .unwrap();
    assert_eq!(
        recv_datagrams(&mut body, &mut reader, 1).await,
        vec![b"still relaying".to_vec()]
    );
    // A new connection is refused.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    // The relay exits 0 once the drain deadline passes, ending the flow's stream.
    let st = p.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{st:?}");
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "exited before the drain deadline"
    );
    assert!(p.log.lock().unwrap().contains("drain timeout reached"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_and_an_invalid_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_a, key_a, der_a) = write_cert(dir.path(), "a");
    let (cert_b, key_b, der_b) = write_cert(dir.path(), "b");
    let port = free_port();
    let config = dir.path().join("relay.toml");
    let write_config = |cert: &std::path::Path, key: &std::path::Path, extra: &str| {
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nworkers = 1\nmetrics = \"off\"\n\
                 allow_targets = [\"127.0.0.0/8\"]\ncert = {:?}\nkey = {:?}\n{extra}",
                cert.to_str().unwrap(),
                key.to_str().unwrap()
            ),
        )
        .unwrap();
    };
    write_config(&cert_a, &key_a, "");
    let p = Proc::start(&["--config", config.to_str().unwrap()]);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let target = EchoTarget::start("127.0.0.1:0");
    let mut client = h2_to(addr, &der_a).await;
    let (_, mut send, mut body) =
        connect_udp(&mut client, &udp_path("127.0.0.1", target.addr.port())).await;

    write_config(&cert_b, &key_b, "");
    p.signal("HUP");
    p.wait_log("configuration reloaded");
    // The established flow survives; a new connection sees the new certificate.
    let mut reader = CapsuleReader::default();
    send.send_data(Bytes::from(datagram(b"survives")), false)
        .unwrap();
    assert_eq!(
        recv_datagrams(&mut body, &mut reader, 1).await,
        vec![b"survives".to_vec()]
    );
    assert_eq!(peer_cert(addr, der_b.clone()).await, der_b);

    // An invalid configuration is refused, naming the problem; the running one stays.
    write_config(&cert_a, &key_a, "flow_idle_timeout_secs = 0\n");
    p.signal("HUP");
    p.wait_log("reload refused");
    assert!(p.log.lock().unwrap().contains("flow_idle_timeout_secs"));
    assert_eq!(peer_cert(addr, der_b.clone()).await, der_b);
    send.send_data(Bytes::from(datagram(b"still")), false)
        .unwrap();
    assert_eq!(
        recv_datagrams(&mut body, &mut reader, 1).await,
        vec![b"still".to_vec()]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_takes_over_the_port_while_the_first_drains() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = write_cert(dir.path(), "a");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = relay_args(&listen, 1, &cert, &key, &["--drain-timeout", "5"]);
    let args = as_strs(&args);
    let mut old = Proc::start(&args);
    let target = EchoTarget::start("127.0.0.1:0");
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let mut client = h2_to(addr, &der).await;
    let (_, mut send, mut body) =
        connect_udp(&mut client, &udp_path("127.0.0.1", target.addr.port())).await;

    // The new process binds the same port (SO_REUSEPORT), then the old one drains.
    let _new = Proc::start(&args);
    old.signal("TERM");
    old.wait_log("draining");
    // Once the old listener is closed (a connection queued on it just before is reset, as the
    // README says), new connections reach the new process...
    old.wait_log("worker stopped accepting");
    for _ in 0..5 {
        let mut c = h2_to(addr, &der).await;
        let (resp, _, _) = connect_udp(&mut c, &udp_path("127.0.0.1", target.addr.port())).await;
        assert_eq!(resp.status, 200);
    }
    // ...while the old one still relays its established flow.
    let mut reader = CapsuleReader::default();
    send.send_data(Bytes::from(datagram(b"old flow")), false)
        .unwrap();
    assert_eq!(
        recv_datagrams(&mut body, &mut reader, 1).await,
        vec![b"old flow".to_vec()]
    );
    drop(send);
    drop(body);
    drop(client);
    assert!(old.wait_exit(Duration::from_secs(10)).success());
}

/// An HTTP/3 client (quinn + h3) trusting `der`, bound to `bind`.
async fn h3_to(
    addr: std::net::SocketAddr,
    der: &[u8],
) -> (quinn::Endpoint, quinn::Connection, H3Send) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.to_vec().into()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = tokio::time::timeout(TIMEOUT, ep.connect(addr, "localhost").unwrap())
        .await
        .expect("handshake in time")
        .unwrap();
    let (mut driver, send) = h3::client::builder()
        .enable_datagram(true)
        .enable_extended_connect(true)
        .build::<_, _, Bytes>(h3_quinn::Connection::new(conn.clone()))
        .await
        .unwrap();
    tokio::spawn(async move {
        std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    (ep, conn, send)
}

type H3Send = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

#[tokio::test(flavor = "multi_thread")]
async fn after_a_restart_http3_is_steered_to_the_new_workers() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = write_cert(dir.path(), "a");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = relay_args(&listen, 2, &cert, &key, &["--no-pin"]);
    let args = as_strs(&args);
    let mut old = Proc::start(&args);
    let _new = Proc::start(&args);
    old.signal("TERM");
    assert!(old.wait_exit(Duration::from_secs(10)).success());

    // Only the new process is left: its two sockets must be in worker order for the CID
    // steering, which a client changing ports exercises.
    let target = EchoTarget::start("127.0.0.1:0");
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let (ep, conn, mut send) = h3_to(addr, &der).await;
    let req = http::Request::builder()
        .method("CONNECT")
        .uri(format!(
            "https://localhost{}",
            udp_path("127.0.0.1", target.addr.port())
        ))
        .extension(h3::ext::Protocol::CONNECT_UDP)
        .body(())
        .unwrap();
    let mut stream = send.send_request(req).await.unwrap();
    assert_eq!(
        tokio::time::timeout(TIMEOUT, stream.recv_response())
            .await
            .unwrap()
            .unwrap()
            .status(),
        200
    );
    let qsid = (stream.id().into_inner() / 4) as u8;
    for i in 0..10 {
        if i > 0 {
            ep.rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
                .unwrap();
        }
        let msg = format!("port {i}");
        let mut ok = false;
        for _ in 0..20 {
            let mut d = vec![qsid, 0];
            d.extend_from_slice(msg.as_bytes());
            conn.send_datagram(Bytes::from(d)).unwrap();
            if let Ok(Ok(got)) =
                tokio::time::timeout(Duration::from_millis(250), conn.read_datagram()).await
            {
                if &got[2..] == msg.as_bytes() {
                    ok = true;
                    break;
                }
            }
        }
        assert!(ok, "no echo from port change {i}");
    }
}

// ---- where io_uring is forbidden ----

/// A container that forbids io_uring (a seccomp filter, as Docker's default profile has): the
/// relay says why it falls back, runs on recvmmsg/sendmmsg and relays; asked for io_uring
/// explicitly, it refuses to start and names the field.
#[tokio::test(flavor = "multi_thread")]
async fn where_io_uring_is_forbidden_the_relay_falls_back_and_relays() {
    use masque_relay::io::sandbox::forbid_io_uring;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = write_cert(dir.path(), "a");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = relay_args(&listen, 1, &cert, &key, &[]);
    let args = as_strs(&args);
    let mut forced = Command::new(env!("CARGO_BIN_EXE_masque-relay"));
    forbid_io_uring(&mut forced)
        .args(&args)
        .args(["--io-backend", "uring"]);
    let out = match forced.output() {
        Ok(out) => out,
        // A kernel built without seccomp filters cannot play the container here.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("seccomp filters unavailable ({e}); skipped");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("io.backend") && err.contains("io_uring_setup"),
        "{err}"
    );

    let p = Proc::start_with(
        |c| {
            forbid_io_uring(c);
        },
        &args,
    );
    let log = p.log.lock().unwrap().clone();
    let line = log
        .lines()
        .find(|l| l.contains("datagram I/O backend"))
        .unwrap_or_else(|| panic!("no backend line in:\n{log}"));
    assert!(
        line.contains("mmsg") && line.contains("io_uring_setup"),
        "{line}"
    );
    let target = EchoTarget::start("127.0.0.1:0");
    let mut client = h2_to(listen.parse().unwrap(), &der).await;
    let (resp, mut send, mut body) =
        connect_udp(&mut client, &udp_path("127.0.0.1", target.addr.port())).await;
    assert_eq!(resp.status.as_u16(), 200);
    let mut reader = CapsuleReader::default();
    for i in 0..20u8 {
        send.send_data(Bytes::from(datagram(&[i; 100])), false)
            .unwrap();
        assert_eq!(
            recv_datagrams(&mut body, &mut reader, 1).await,
            vec![vec![i; 100]]
        );
    }
}

/// `--io-backend mmsg` forces the fallback where io_uring works too.
#[test]
fn the_flag_forces_the_fallback() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let p = Proc::start_with(
        |_| {},
        &[
            "--listen",
            &listen,
            "--workers",
            "1",
            "--metrics",
            "off",
            "--io-backend",
            "mmsg",
        ],
    );
    let log = p.log.lock().unwrap().clone();
    assert!(
        log.lines()
            .any(|l| l.contains("datagram I/O backend") && l.contains("mmsg")),
        "{log}"
    );
}
