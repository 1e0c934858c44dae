//! Test harness: a relay started in process on loopback with a certificate the client trusts,
//! an `h2` client (an independent HTTP/2 implementation), a UDP echo target, and a capsule
//! encoder/parser written independently of the relay's own codec.

#![allow(dead_code)]

pub mod h3_wire;
pub mod proc;
pub mod quic_peer;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use masque_relay::config::Config;
use masque_relay::Relay;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Waits (polling every 10 ms) until `cond` holds; fails with `why()` after [`TIMEOUT`].
pub async fn eventually(mut cond: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "{}", why());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The datagram backend the relays of this test binary run on. Every loopback test file runs
/// twice: as itself (io_uring when this machine offers it, `auto`) and through a `*_mmsg.rs`
/// twin that includes it as a module named `on_mmsg`, which runs it on the recvmmsg/sendmmsg
/// fallback. The twin's module path is how the harness tells them apart.
/// [`io_backend`] as the relay binary's `--io-backend` value.
pub fn io_backend_flag() -> &'static str {
    match io_backend() {
        masque_relay::io::dgram::Choice::Mmsg => "mmsg",
        _ => "auto",
    }
}

pub fn io_backend() -> masque_relay::io::dgram::Choice {
    if module_path!().contains("on_mmsg") {
        masque_relay::io::dgram::Choice::Mmsg
    } else {
        masque_relay::io::dgram::Choice::Auto
    }
}

/// A relay running in this process, with the PEM files of its certificate.
pub struct TestRelay {
    pub relay: Option<Relay>,
    pub addr: SocketAddr,
    client_tls: Arc<rustls::ClientConfig>,
    /// The relay's certificate (DER), for clients that build their own TLS configuration.
    cert_der: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl TestRelay {
    /// Starts a relay on 127.0.0.1:0 with two workers, loopback targets allowed, and the
    /// changes `f` makes to the configuration.
    pub fn start(f: impl FnOnce(&mut Config)) -> Self {
        Self::start_with_resolver(f, Arc::new(masque_relay::transport::target::SystemResolver))
    }

    /// [`TestRelay::start`] with a resolver of the test's choosing.
    pub fn start_with_resolver(
        f: impl FnOnce(&mut Config),
        resolver: Arc<dyn masque_relay::transport::target::Resolve>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, ck.cert.pem()).unwrap();
        std::fs::write(&key_path, ck.signing_key.serialize_pem()).unwrap();

        let mut cfg = Config {
            listen: "127.0.0.1:0".to_owned(),
            workers: 2,
            pin_workers: false,
            cert: Some(cert_path),
            key: Some(key_path),
            allow_targets: vec!["127.0.0.0/8".to_owned(), "::1/128".to_owned()],
            // Any free port: tests run in parallel, and the default 9464 may be taken.
            metrics: "127.0.0.1:0".to_owned(),
            ..Config::default()
        };
        cfg.io.backend = io_backend();
        f(&mut cfg);
        let relay = Relay::start_with_resolver(cfg.validate().unwrap(), resolver).unwrap();
        if io_backend() == masque_relay::io::dgram::Choice::Mmsg {
            assert_eq!(relay.io_backend().backend.as_str(), "mmsg");
        }
        let addr = relay.local_addr();

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TestRelay {
            relay: Some(relay),
            addr,
            client_tls: Arc::new(client_tls),
            cert_der: ck.cert.der().to_vec(),
            _dir: dir,
        }
    }

    /// The relay's certificate (DER).
    pub fn cert_der(&self) -> Vec<u8> {
        self.cert_der.clone()
    }

    /// Opens a TLS connection offering exactly `alpn`.
    pub async fn tls(&self, alpn: &[u8]) -> tokio_rustls::client::TlsStream<TcpStream> {
        let mut cfg = (*self.client_tls).clone();
        cfg.alpn_protocols = vec![alpn.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        connector.connect(name, tcp).await.unwrap()
    }

    /// An HTTP/2 connection whose SETTINGS (with ENABLE_CONNECT_PROTOCOL) have arrived.
    pub async fn h2(&self) -> SendRequest<Bytes> {
        let tls = self.tls(b"h2").await;
        h2_handshake(tls).await
    }

    /// Sum of a counter over the workers.
    pub fn sum(&self, f: impl Fn(&masque_relay::metrics::WorkerStats) -> u64) -> u64 {
        self.relay
            .as_ref()
            .unwrap()
            .stats()
            .iter()
            .map(|s| f(s))
            .sum()
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        if let Some(r) = self.relay.take() {
            r.shutdown();
        }
    }
}

pub async fn h2_handshake<T>(io: T) -> SendRequest<Bytes>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut client, conn) = h2::client::Builder::new()
        .initial_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .handshake(io)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    // The server's SETTINGS arrive asynchronously; extended CONNECT needs them.
    for _ in 0..200 {
        client = client.ready().await.unwrap();
        if client.is_extended_connect_protocol_enabled() {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("server never enabled extended CONNECT");
}

/// The path of the default URI template for a target.
pub fn udp_path(host: &str, port: u16) -> String {
    format!("/.well-known/masque/udp/{host}/{port}/")
}

/// Sends an extended CONNECT for connect-udp at `path`; returns the response status, its
/// headers, and the stream halves.
pub async fn connect_udp(
    client: &mut SendRequest<Bytes>,
    path: &str,
) -> (http::response::Parts, SendStream<Bytes>, RecvStream) {
    let req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("https://localhost{path}"))
        .header("capsule-protocol", "?1")
        .extension(h2::ext::Protocol::from("connect-udp"))
        .body(())
        .unwrap();
    let (resp, send) = client.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(TIMEOUT, resp)
        .await
        .expect("response in time")
        .unwrap();
    let (parts, body) = resp.into_parts();
    (parts, send, body)
}

// ---- capsules, written from RFC 9297 §3.2 / RFC 9000 §16 independently of src/proto ----

pub fn varint(v: u64, out: &mut Vec<u8>) {
    if v < 1 << 6 {
        out.push(v as u8);
    } else if v < 1 << 14 {
        out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes());
    } else if v < 1 << 30 {
        out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

pub fn capsule(ty: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(ty, &mut out);
    varint(value.len() as u64, &mut out);
    out.extend_from_slice(value);
    out
}

/// A DATAGRAM capsule with context ID 0 carrying `payload`.
pub fn datagram(payload: &[u8]) -> Vec<u8> {
    let mut value = vec![0u8];
    value.extend_from_slice(payload);
    capsule(0, &value)
}

pub fn read_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    if buf.len() < len {
        return None;
    }
    let mut v = u64::from(first & 0x3f);
    for b in &buf[1..len] {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, len))
}

/// Reassembles capsules from DATA frames and returns the payloads of context-0 DATAGRAMs.
#[derive(Default)]
pub struct CapsuleReader {
    buf: Vec<u8>,
}

impl CapsuleReader {
    pub fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some((ty, a)) = read_varint(&self.buf) {
            let Some((len, b)) = read_varint(&self.buf[a..]) else {
                break;
            };
            let start = a + b;
            let end = start + len as usize;
            if self.buf.len() < end {
                break;
            }
            if ty == 0 {
                let value = &self.buf[start..end];
                let (ctx, c) = read_varint(value).expect("context id");
                assert_eq!(ctx, 0, "relay sent a non-zero context");
                out.push(value[c..].to_vec());
            }
            self.buf.drain(..end);
        }
        out
    }
}

/// Reads DATA frames until `n` datagrams arrived (or the stream ended / timed out).
pub async fn recv_datagrams(
    body: &mut RecvStream,
    reader: &mut CapsuleReader,
    n: usize,
) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, body.data()).await {
            Ok(Some(Ok(mut data))) => {
                let len = data.len();
                got.extend(reader.push(&data.copy_to_bytes(len)));
                let _ = body.flow_control().release_capacity(len);
            }
            _ => break,
        }
    }
    got
}

/// A UDP target on loopback that echoes every datagram and counts them; stops when dropped.
pub struct EchoTarget {
    pub addr: SocketAddr,
    /// The target's socket, for datagrams it sends of its own accord.
    pub sock: UdpSocket,
    pub received: Arc<AtomicU64>,
    /// Source address of the last datagram (the relay's flow socket).
    pub last_peer: Arc<std::sync::Mutex<Option<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoTarget {
    pub fn start(bind: &str) -> Self {
        let sock = UdpSocket::bind(bind).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let own = sock.try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let last_peer = Arc::new(std::sync::Mutex::new(None));
        let (s, r, p) = (stop.clone(), received.clone(), last_peer.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    r.fetch_add(1, Ordering::Relaxed);
                    *p.lock().unwrap() = Some(from);
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        EchoTarget {
            addr,
            sock: own,
            received,
            last_peer,
            stop,
            thread: Some(thread),
        }
    }
}

impl EchoTarget {
    /// Sends `data` to `to` from the target's own address.
    pub fn send_from(&self, data: &[u8], to: SocketAddr) {
        self.sock.send_to(data, to).unwrap();
    }
}

impl Drop for EchoTarget {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for the relay to end the stream: `Ok(())` on a clean END_STREAM (empty DATA frames
/// carrying it are skipped), `Err` with the reset reason otherwise.
pub async fn stream_end(body: &mut RecvStream, within: Duration) -> Result<(), h2::Error> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, body.data()).await {
            Err(_) => panic!("the stream did not end within {within:?}"),
            Ok(None) => return Ok(()),
            Ok(Some(Ok(data))) => assert!(data.is_empty(), "unexpected data {data:?}"),
            Ok(Some(Err(e))) => return Err(e),
        }
    }
}

/// A UDP target on loopback: `flood N` makes it send N datagrams of 1200 bytes back at once;
/// anything else is echoed.
pub struct FloodTarget {
    pub addr: SocketAddr,
    /// Flood datagrams sent so far.
    pub sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FloodTarget {
    pub fn start() -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let sent = Arc::new(AtomicU64::new(0));
        let counted = sent.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                match msg
                    .strip_prefix("flood ")
                    .and_then(|c| c.parse::<usize>().ok())
                {
                    Some(count) => {
                        for i in 0..count {
                            let mut d = vec![0u8; 1200];
                            d[..8].copy_from_slice(&(i as u64).to_be_bytes());
                            let _ = sock.send_to(&d, from);
                            counted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    None => {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            }
        });
        FloodTarget {
            addr,
            sent,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FloodTarget {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A resolver with a fixed table; names not in it fail, and `slow.test` never answers.
#[derive(Debug, Default)]
pub struct TableResolver(pub Vec<(&'static str, Vec<SocketAddr>)>);

impl masque_relay::transport::target::Resolve for TableResolver {
    fn resolve(&self, host: &str, port: u16) -> masque_relay::transport::target::Resolution {
        let found = self
            .0
            .iter()
            .find(|(name, _)| *name == host)
            .map(|(_, addrs)| {
                addrs
                    .iter()
                    .map(|a| SocketAddr::new(a.ip(), port))
                    .collect::<Vec<_>>()
            });
        let slow = host == "slow.test";
        Box::pin(async move {
            if slow {
                std::future::pending::<()>().await;
            }
            found.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such name"))
        })
    }
}

// ---- HTTP/3: the async `quinn` crate with `h3` and `h3-datagram` as the independent client ----

impl TestRelay {
    /// A quinn client configuration trusting the relay's certificate, offering ALPN `h3`.
    pub fn quic_client_config(&self) -> quinn::ClientConfig {
        let mut tls = (*self.client_tls).clone();
        tls.alpn_protocols = vec![b"h3".to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.datagram_receive_buffer_size(Some(1 << 20));
        cfg.transport_config(Arc::new(transport));
        cfg
    }

    /// A QUIC connection to the relay from a new client endpoint bound to `bind`.
    pub async fn quic(&self, bind: &str) -> (quinn::Endpoint, quinn::Connection) {
        let mut ep = quinn::Endpoint::client(bind.parse().unwrap()).unwrap();
        ep.set_default_client_config(self.quic_client_config());
        let conn = tokio::time::timeout(TIMEOUT, ep.connect(self.addr, "localhost").unwrap())
            .await
            .expect("QUIC handshake in time")
            .unwrap();
        (ep, conn)
    }
}

/// An HTTP/3 client connection (h3 crate) with datagrams and extended CONNECT enabled. HTTP
/// Datagrams go straight over the quinn connection, framed by the test (quarter stream ID,
/// RFC 9297 §2.1): h3-datagram 0.0.2 writes a zero quarter stream ID for every stream.
pub struct H3Client {
    pub endpoint: quinn::Endpoint,
    pub quic: quinn::Connection,
    pub send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
}

pub type H3Stream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

impl H3Client {
    /// Sends an HTTP Datagram for the request on `stream` carrying `payload` (context ID and
    /// UDP payload).
    pub fn send_datagram(&self, stream: h3::quic::StreamId, payload: &[u8]) {
        let mut d = Vec::new();
        varint(stream.into_inner() / 4, &mut d);
        d.extend_from_slice(payload);
        self.quic.send_datagram(Bytes::from(d)).unwrap();
    }

    /// The next HTTP Datagram: (request stream ID, context ID and payload).
    pub async fn recv_datagram(&self) -> (u64, Vec<u8>) {
        let d = tokio::time::timeout(TIMEOUT, self.quic.read_datagram())
            .await
            .expect("datagram in time")
            .unwrap();
        let (q, n) = read_varint(&d).expect("quarter stream ID");
        (q * 4, d[n..].to_vec())
    }
}

impl TestRelay {
    pub async fn h3(&self) -> H3Client {
        self.h3_from("127.0.0.1:0").await
    }

    pub async fn h3_from(&self, bind: &str) -> H3Client {
        let (endpoint, quic) = self.quic(bind).await;
        let (mut driver, send) = h3::client::builder()
            .enable_datagram(true)
            .enable_extended_connect(true)
            .build::<_, _, Bytes>(h3_quinn::Connection::new(quic.clone()))
            .await
            .unwrap();
        tokio::spawn(async move {
            std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        H3Client {
            endpoint,
            quic,
            send,
        }
    }
}

/// Sends an extended CONNECT (`:protocol = connect-udp`) over HTTP/3; returns the response and
/// the request stream.
pub async fn h3_connect_udp(client: &mut H3Client, path: &str) -> (http::Response<()>, H3Stream) {
    let req = http::Request::builder()
        .method("CONNECT")
        .uri(format!("https://localhost{path}"))
        .header("capsule-protocol", "?1")
        .extension(h3::ext::Protocol::CONNECT_UDP)
        .body(())
        .unwrap();
    let mut stream = tokio::time::timeout(TIMEOUT, client.send.send_request(req))
        .await
        .expect("request sent in time")
        .unwrap();
    let resp = tokio::time::timeout(TIMEOUT, stream.recv_response())
        .await
        .expect("response in time")
        .unwrap();
    (resp, stream)
}
