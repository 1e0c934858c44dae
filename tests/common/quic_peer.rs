//! A hand-driven HTTP/3 client on quinn-proto (sans-I/O QUIC, not the relay's code) that behaves
//! the way quiche-based clients such as masque-e2e do, which the async quinn/h3 clients of the
//! other tests never do:
//!
//! - a blocking loop: send what is due, then wait on the socket until a packet arrives or the
//!   connection's own timer fires (with nothing in flight, that is the idle timeout);
//! - it checks for the relay's SETTINGS *before* reading its streams and then waits for the
//!   next packet, so SETTINGS that come after the handshake with nothing behind them leave it
//!   waiting;
//! - several HTTP Datagrams queued together leave in one packet (quinn-proto packs DATAGRAM
//!   frames like quiche);
//! - one UDP socket per connection, and [`QuicPeer::vanish`] drops it without a
//!   CONNECTION_CLOSE, at any point.
//!
//! Every wait is bounded by the caller's deadline, so a relay that never answers fails the
//! test instead of hanging it.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn_proto::{ClientConfig, ConnectionHandle, Dir, Endpoint, EndpointConfig, StreamId};

use super::h3_wire::{
    client_control_stream, control_stream_settings, h3_frame, h3_response_status, qpack_connect_udp,
};
use super::{read_varint, varint};

/// A quinn-proto client configuration trusting `der` (the relay's certificate), ALPN `h3`.
pub fn client_config(der: &[u8]) -> ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(der.to_vec()))
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    ClientConfig::new(Arc::new(crypto))
}

/// One client connection on its own socket.
pub struct QuicPeer {
    socket: UdpSocket,
    server: SocketAddr,
    endpoint: Endpoint,
    ch: ConnectionHandle,
    conn: quinn_proto::Connection,
    /// Bytes read so far from each stream the relay opened or answered on.
    streams: HashMap<StreamId, Vec<u8>>,
    /// The relay's control stream, once its type byte has been seen.
    settings: Option<Vec<(u64, u64)>>,
    datagrams: VecDeque<Bytes>,
    lost: bool,
}

impl QuicPeer {
    /// Starts a connection from a fresh socket and sends the first flight; the handshake goes
    /// on in [`QuicPeer::handshake`].
    pub fn start(server: SocketAddr, cfg: &ClientConfig) -> QuicPeer {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(server).unwrap();
        let mut endpoint = Endpoint::new(Arc::new(EndpointConfig::default()), None, true, None);
        let (ch, conn) = endpoint
            .connect(Instant::now(), cfg.clone(), server, "localhost")
            .unwrap();
        let mut p = QuicPeer {
            socket,
            server,
            endpoint,
            ch,
            conn,
            streams: HashMap::new(),
            settings: None,
            datagrams: VecDeque::new(),
            lost: false,
        };
        p.flush();
        p
    }

    /// Completes the handshake (as quiche's clients do: send, check, then wait).
    pub fn handshake(&mut self, deadline: Instant) -> Result<(), String> {
        loop {
            self.flush();
            self.poll();
            if !self.conn.is_handshaking() {
                return Ok(());
            }
            self.check(deadline, "handshake")?;
            self.recv_once(deadline);
        }
    }

    /// Opens the control stream with SETTINGS, then waits for the relay's SETTINGS the way
    /// masque-e2e does: check, read the streams, then block until the next packet.
    pub fn wait_settings(&mut self, deadline: Instant) -> Result<Vec<(u64, u64)>, String> {
        let control = self.conn.streams().open(Dir::Uni).expect("a uni stream");
        let mut bytes = client_control_stream();
        self.write(control, &mut bytes, false);
        loop {
            if let Some(s) = &self.settings {
                return Ok(s.clone());
            }
            self.poll();
            self.check(deadline, "the relay's SETTINGS")?;
            self.drive(deadline);
        }
    }

    /// Sends a CONNECT-UDP request to the echo port on loopback; returns its stream.
    pub fn request(&mut self, port: u16) -> StreamId {
        let id = self.conn.streams().open(Dir::Bi).expect("a bidi stream");
        self.streams.insert(id, Vec::new());
        let mut head = h3_frame(0x01, &qpack_connect_udp(port, &[]));
        self.write(id, &mut head, false);
        self.flush();
        id
    }

    /// Waits for the response to the request on `id`; returns its status.
    pub fn response(&mut self, id: StreamId, deadline: Instant) -> Result<u16, String> {
        loop {
            self.poll();
            if let Some(status) = self.streams.get(&id).and_then(|b| h3_response_status(b)) {
                return Ok(status);
            }
            self.check(deadline, "the response")?;
            self.drive(deadline);
        }
    }

    /// Queues one HTTP Datagram (context 0) per payload for the request on `id`, then sends
    /// them together: small ones share packets.
    pub fn send_datagrams(&mut self, id: StreamId, payloads: &[&[u8]]) {
        for p in payloads {
            let mut d = Vec::with_capacity(p.len() + 9);
            varint(quarter(id), &mut d);
            varint(0, &mut d);
            d.extend_from_slice(p);
            let _ = self.conn.datagrams().send(Bytes::from(d), false);
        }
        self.flush();
    }

    /// The next UDP payload for the request on `id`, or `None` by the deadline.
    pub fn recv_datagram(&mut self, id: StreamId, deadline: Instant) -> Option<Vec<u8>> {
        loop {
            self.poll();
            while let Some(d) = self.datagrams.pop_front() {
                let (q, a) = read_varint(&d)?;
                let (ctx, b) = read_varint(&d[a..])?;
                if q == quarter(id) && ctx == 0 {
                    return Some(d[a + b..].to_vec());
                }
            }
            if Instant::now() >= deadline || self.lost {
                return None;
            }
            self.drive(deadline);
        }
    }

    /// Datagrams and UDP packets this client has sent: (DATAGRAM frames, UDP datagrams).
    pub fn sent(&self) -> (u64, u64) {
        let s = self.conn.stats();
        (s.frame_tx.datagram, s.udp_tx.datagrams)
    }

    /// Receives whatever has arrived without waiting (what a client that keeps sending sees).
    pub fn poll_socket(&mut self) {
        self.socket.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = self.socket.recv(&mut buf) {
            self.handle(&buf[..n]);
        }
        self.socket.set_nonblocking(false).unwrap();
        self.flush();
        self.poll();
    }

    /// Gone without a word: the socket closes, no CONNECTION_CLOSE is sent.
    pub fn vanish(self) {
        drop(self);
    }

    /// The local address of this connection's socket.
    pub fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }

    fn check(&self, deadline: Instant, what: &str) -> Result<(), String> {
        if self.lost {
            return Err(format!("connection lost while waiting for {what}"));
        }
        if Instant::now() >= deadline {
            return Err(format!("no {what} by the deadline"));
        }
        Ok(())
    }

    fn write(&mut self, id: StreamId, bytes: &mut Vec<u8>, fin: bool) {
        let mut s = self.conn.send_stream(id);
        let n = s.write(bytes).expect("stream write");
        assert_eq!(n, bytes.len(), "small writes fit the window");
        if fin {
            s.finish().unwrap();
        }
        bytes.clear();
        self.flush();
    }

    /// Sends everything the connection has to send now.
    fn flush(&mut self) {
        let mut buf = Vec::with_capacity(1500);
        loop {
            buf.clear();
            match self.conn.poll_transmit(Instant::now(), 1, &mut buf) {
                Some(t) => {
                    let _ = self.socket.send(&buf[..t.size]);
                }
                None => break,
            }
        }
        while let Some(ev) = self.conn.poll_endpoint_events() {
            if let Some(ev) = self.endpoint.handle_event(self.ch, ev) {
                self.conn.handle_event(ev);
            }
        }
    }

    /// One round as quiche's clients run it: send, wait for the relay's next packet, send.
    /// The connection's own timers (delayed ACKs, loss detection) are served while waiting,
    /// but only a packet from the relay ends the wait: what the client has read so far is all
    /// it will look at until then.
    fn drive(&mut self, deadline: Instant) {
        self.flush();
        while !self.recv_once(deadline) && Instant::now() < deadline && !self.lost {
            self.flush();
            self.poll_lost();
        }
        self.flush();
    }

    /// Waits for one packet until the connection's timer (50 ms when it has none), never past
    /// `deadline`; true when a packet arrived.
    fn recv_once(&mut self, deadline: Instant) -> bool {
        let now = Instant::now();
        let timer = self.conn.poll_timeout();
        let wait = timer
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(50))
            .min(deadline.saturating_duration_since(now))
            .max(Duration::from_millis(1));
        self.socket.set_read_timeout(Some(wait)).unwrap();
        let mut buf = vec![0u8; 65_536];
        match self.socket.recv(&mut buf) {
            Ok(n) => {
                self.handle(&buf[..n]);
                true
            }
            Err(_) => {
                if timer.is_some_and(|t| t <= Instant::now()) {
                    self.conn.handle_timeout(Instant::now());
                }
                false
            }
        }
    }

    /// Notes a lost connection without reading any stream (the wait above reads nothing).
    fn poll_lost(&mut self) {
        if self.conn.is_drained() || self.conn.is_closed() {
            self.lost = true;
        }
    }

    fn handle(&mut self, packet: &[u8]) {
        let mut resp = Vec::new();
        if let Some(quinn_proto::DatagramEvent::ConnectionEvent(_, ev)) = self.endpoint.handle(
            Instant::now(),
            self.server,
            None,
            None,
            packet.into(),
            &mut resp,
        ) {
            self.conn.handle_event(ev);
        }
    }

    /// Takes the connection's events: stream data into `streams`, the relay's SETTINGS,
    /// datagrams.
    fn poll(&mut self) {
        while let Some(ev) = self.conn.poll() {
            if let quinn_proto::Event::ConnectionLost { .. } = ev {
                self.lost = true;
            }
        }
        while let Some(id) = self.conn.streams().accept(Dir::Uni) {
            self.streams.entry(id).or_default();
        }
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for id in ids {
            let mut got = Vec::new();
            let mut stream = self.conn.recv_stream(id);
            let Ok(mut rs) = stream.read(true) else {
                continue;
            };
            while let Ok(Some(c)) = rs.next(usize::MAX) {
                got.extend_from_slice(&c.bytes);
            }
            let _ = rs.finalize();
            let buf = self.streams.get_mut(&id).unwrap();
            buf.extend_from_slice(&got);
            if id.dir() == Dir::Uni && self.settings.is_none() {
                self.settings = control_stream_settings(buf);
            }
        }
        while let Some(d) = self.conn.datagrams().recv() {
            self.datagrams.push_back(d);
        }
    }
}

fn quarter(id: StreamId) -> u64 {
    u64::from(quinn_proto::VarInt::from(id)) / 4
}
