//! The `/metrics` endpoint over real HTTP: a known number of datagrams goes through the relay on
//! every protocol it speaks (HTTP/2, HTTP/1.1, HTTP/3), and the scraped exposition (parsed by `prometheus-parse`, an
//! independent parser) must count them exactly.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use masque_relay::config::Config;
use masque_relay::metrics::ConnectionClose;
use masque_relay::proto::connect_udp::HttpVersion;
use masque_relay::relay::flow::CloseReason;
use prometheus_parse::{LineInfo, Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` to the metrics address and returns (status line + headers, body).
async fn http(addr: SocketAddr, request: &[u8]) -> (String, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(TIMEOUT, tcp.read_to_end(&mut raw))
        .await
        .expect("metrics response in time")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    (head.to_owned(), body.to_owned())
}

/// Scrapes `/metrics` and parses it, failing on any line a Prometheus parser would not take.
async fn scrape(relay: &TestRelay) -> Scrape {
    let addr = relay.relay.as_ref().unwrap().metrics_addr().unwrap();
    let (head, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    for line in body.lines() {
        assert!(
            !matches!(LineInfo::parse(line), LineInfo::Ignored),
            "not valid exposition: {line:?}"
        );
    }
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// Sum over workers of the samples of `name` whose labels include `labels`.
fn total(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<f64> = s
        .samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{name} is not a plain value: {other:?}"),
        })
        .collect();
    assert!(!matching.is_empty(), "no sample {name}{labels:?}");
    matching.iter().sum()
}

/// Waits (bounded) until the relay's own counters say the traffic is over.
async fn settle(relay: &TestRelay, what: &str, done: impl Fn(&TestRelay) -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done(relay) {
        assert!(Instant::now() < deadline, "never settled: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: connect-udp\r\n\
         Capsule-Protocol: ?1\r\n\r\n"
    )
}

/// Reads until a complete response head; returns it and what followed.
async fn read_head<T: tokio::io::AsyncRead + Unpin>(io: &mut T) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(TIMEOUT, io.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end + 4].to_vec()).unwrap();
            return (head, buf[end + 4..].to_vec());
        }
    }
}

const H2_SIZES: [usize; 5] = [0, 1, 100, 1200, 1472];
const H1_SIZES: [usize; 3] = [3, 30, 300];
const H3_SIZES: [usize; 3] = [1, 64, 1200];

#[tokio::test]
async fn scraped_counters_match_the_traffic_exactly() {
    let relay = TestRelay::start(|c| c.deny_targets = vec!["127.0.0.2/32".to_owned()]);
    let target = EchoTarget::start("127.0.0.1:0");
    let port = target.addr.port();

    // HTTP/2: one flow with five datagrams each way, one refusal by policy, one 404.
    let mut client = relay.h2().await;
    let (resp, mut send, mut body) = connect_udp(&mut client, &udp_path("127.0.0.1", port)).await;
    assert_eq!(resp.status, 200);
    let mut reader = CapsuleReader::default();
    for size in H2_SIZES {
        send.send_data(Bytes::from(datagram(&vec![7u8; size])), false)
            .unwrap();
        assert_eq!(
            recv_datagrams(&mut body, &mut reader, 1).await,
            vec![vec![7u8; size]]
        );
    }
    send.send_data(Bytes::new(), true).unwrap();
    stream_end(&mut body, TIMEOUT).await.unwrap();
    let (resp, _, _) = connect_udp(&mut client, &udp_path("127.0.0.2", port)).await;
    assert_eq!(resp.status, 403);
    let (resp, _, _) = connect_udp(&mut client, "/not/the/template").await;
    assert_eq!(resp.status, 404);

    // HTTP/1.1: one flow with three datagrams each way, then one refusal on its own connection.
    let mut io = relay.tls(b"http/1.1").await;
    io.write_all(upgrade_request(&udp_path("127.0.0.1", port)).as_bytes())
        .await
        .unwrap();
    let (head, leftover) = read_head(&mut io).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(leftover.is_empty());
    let mut reader = CapsuleReader::default();
    for size in H1_SIZES {
        io.write_all(&datagram(&vec![9u8; size])).await.unwrap();
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
        assert_eq!(got, vec![vec![9u8; size]]);
    }
    io.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, io.read_to_end(&mut rest)).await;
    let mut io = relay.tls(b"http/1.1").await;
    io.write_all(upgrade_request(&udp_path("127.0.0.2", port)).as_bytes())
        .await
        .unwrap();
    let (head, _) = read_head(&mut io).await;
    assert!(head.starts_with("HTTP/1.1 403 "), "{head}");
    drop(io);

    // HTTP/3: one flow with three QUIC DATAGRAM frames each way, one refusal by policy.
    let mut h3 = relay.h3().await;
    let (resp, mut stream) = h3_connect_udp(&mut h3, &udp_path("127.0.0.1", port)).await;
    assert_eq!(resp.status(), 200);
    for size in H3_SIZES {
        let mut d = vec![0u8]; // context ID 0
        d.extend(vec![5u8; size]);
        h3.send_datagram(stream.id(), &d);
        let want = (stream.id().into_inner(), d);
        assert_eq!(h3.recv_datagram().await, want, "size {size}");
    }
    stream.finish().await.unwrap();
    let (resp, _refused) = h3_connect_udp(&mut h3, &udp_path("127.0.0.2", port)).await;
    assert_eq!(resp.status(), 403);

    settle(
        &relay,
        "three flows and two HTTP/1.1 connections closed",
        |r| {
            let http1_closed =
                r.sum(|s| s.connections_closed_for(HttpVersion::Http11, ConnectionClose::Normal));
            r.sum(|s| s.flows_closed_for(CloseReason::ClientEnd)) == 3 && http1_closed == 2
        },
    )
    .await;
    let s = scrape(&relay).await;
    let t = |name: &str, labels: &[(&str, &str)]| total(&s, name, labels);

    // Requests by protocol and status, refusals by Proxy-Status error.
    let req = "masque_relay_requests_total";
    for (proto, status, n) in [
        ("h2", "200", 1.0),
        ("h2", "403", 1.0),
        ("h2", "404", 1.0),
        ("http1", "101", 1.0),
        ("http1", "403", 1.0),
        ("h3", "200", 1.0),
        ("h3", "403", 1.0),
    ] {
        let l = [("protocol", proto), ("status", status)];
        assert_eq!(t(req, &l), n, "{proto} {status}");
    }
    assert_eq!(t(req, &[]), 7.0);
    let refusals = "masque_relay_refusals_total";
    assert_eq!(t(refusals, &[("error", "destination_ip_prohibited")]), 3.0);
    assert_eq!(t(refusals, &[]), 3.0);

    // Datagrams and bytes, each way, per protocol.
    for (proto, sizes) in [
        ("h2", &H2_SIZES[..]),
        ("http1", &H1_SIZES),
        ("h3", &H3_SIZES),
    ] {
        let bytes: usize = sizes.iter().sum();
        for dir in ["to_target", "to_client"] {
            let l = [("protocol", proto), ("direction", dir)];
            let datagrams = t("masque_relay_datagrams_total", &l);
            assert_eq!(datagrams, sizes.len() as f64, "{proto} {dir}");
            assert_eq!(
                t("masque_relay_bytes_total", &l),
                bytes as f64,
                "{proto} {dir}"
            );
        }
    }

    // Flows.
    assert_eq!(t("masque_relay_flows_opened_total", &[]), 3.0);
    assert_eq!(t("masque_relay_flows_open", &[]), 0.0);
    let closed = "masque_relay_flows_closed_total";
    assert_eq!(t(closed, &[("reason", "client_end")]), 3.0);
    assert_eq!(t(closed, &[]), 3.0);
    assert_eq!(t("masque_relay_datagrams_dropped_total", &[]), 0.0);
    assert_eq!(t("masque_relay_target_errors_total", &[]), 0.0);

    // Connections: HTTP/2 and HTTP/3 still open, two HTTP/1.1 closed normally.
    let acc = "masque_relay_connections_accepted_total";
    let open = "masque_relay_connections_open";
    for (proto, accepted, still_open) in [("h2", 1.0, 1.0), ("http1", 2.0, 0.0), ("h3", 1.0, 1.0)] {
        assert_eq!(t(acc, &[("protocol", proto)]), accepted, "{proto}");
        assert_eq!(t(open, &[("protocol", proto)]), still_open, "{proto}");
    }
    let l = [("protocol", "http1"), ("reason", "normal")];
    assert_eq!(t("masque_relay_connections_closed_total", &l), 2.0);
    assert_eq!(t("masque_relay_handshake_failures_total", &[]), 0.0);

    // Histograms: one observation per handshake, per request answered after its target was
    // looked at (HTTP/3 does not time the ones refused before that), per closed flow.
    for (name, n) in [
        ("masque_relay_handshake_duration_seconds", 4.0),
        ("masque_relay_request_to_response_seconds", 7.0),
        ("masque_relay_flow_lifetime_seconds", 3.0),
    ] {
        let count = t(&format!("{name}_count"), &[]);
        assert_eq!(count, n, "{name}");
        let inf: f64 = s
            .samples
            .iter()
            .filter(|x| x.metric == name)
            .map(|x| match &x.value {
                Value::Histogram(b) => {
                    assert!(b.windows(2).all(|w| w[0].count <= w[1].count));
                    b.iter()
                        .find(|c| c.less_than.is_infinite())
                        .expect("+Inf bucket")
                        .count
                }
                other => panic!("{name} is not a histogram: {other:?}"),
            })
            .sum();
        assert_eq!(inf, n, "{name} +Inf");
        assert!(t(&format!("{name}_sum"), &[]) > 0.0, "{name}");
    }

    // Info metrics: one build, one backend line per worker.
    assert_eq!(
        t(
            "masque_relay_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    let backend = relay.relay.as_ref().unwrap().io_backend().backend.as_str();
    assert_eq!(
        t("masque_relay_io_backend_info", &[("backend", backend)]),
        2.0
    );
    // The engine's loop: passes ran, completions were drained, sends went out, and the
    // pools are reported (buffers are back once the traffic is over).
    assert!(t("masque_relay_io_loop_passes_total", &[]) > 0.0);
    assert!(t("masque_relay_io_completions_total", &[]) > 0.0);
    assert!(t("masque_relay_io_send_messages_total", &[]) > 0.0);
    let sizes = masque_relay::io::dgram::Sizes::default();
    assert_eq!(
        t("masque_relay_buffer_pool_free", &[("pool", "target")]),
        2.0 * f64::from(sizes.target_buffers)
    );

    // The scrape agrees with the in-process counters.
    assert_eq!(
        t("masque_relay_flows_opened_total", &[]),
        relay.sum(|s| s.flows_opened.get()) as f64
    );
}

#[tokio::test]
async fn handshake_failures_by_reason() {
    let relay = TestRelay::start(|c| c.handshake_timeout_secs = 1);
    // Not TLS at all: a TLS error.
    let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, tcp.read_to_end(&mut sink)).await;
    // Silent: a timeout.
    let mut silent = TcpStream::connect(relay.addr).await.unwrap();
    let _ = tokio::time::timeout(TIMEOUT, silent.read_to_end(&mut sink)).await;
    settle(&relay, "two handshake failures", |r| {
        r.sum(|s| {
            masque_relay::metrics::HandshakeFailure::ALL
                .iter()
                .map(|&f| s.handshake_failures_for(f))
                .sum()
        }) == 2
    })
    .await;
    let s = scrape(&relay).await;
    let hf = "masque_relay_handshake_failures_total";
    assert_eq!(total(&s, hf, &[("reason", "tls_error")]), 1.0);
    assert_eq!(total(&s, hf, &[("reason", "timeout")]), 1.0);
    assert_eq!(total(&s, hf, &[("reason", "other")]), 0.0);
    assert_eq!(
        total(&s, "masque_relay_connections_accepted_total", &[]),
        0.0
    );
}

#[tokio::test]
async fn endpoint_answers_only_get_metrics_and_bounds_requests() {
    let relay = TestRelay::start(|_| {});
    let addr = relay.relay.as_ref().unwrap().metrics_addr().unwrap();
    let cases: [(&[u8], &str); 4] = [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "404"),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", "404"),
        (
            b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "405",
        ),
        (b"\x16\x03\x01\x00\x05hello\r\n\r\n", "400"),
    ];
    for (req, want) in cases {
        let (head, body) = http(addr, req).await;
        assert!(head.starts_with(&format!("HTTP/1.1 {want} ")), "{head}");
        assert!(body.is_empty());
    }
    // A head that never ends is cut off at the size bound, and so is one with too many lines.
    let mut long = b"GET /metrics HTTP/1.1\r\nX-Long: ".to_vec();
    long.resize(16 * 1024, b'a');
    let mut many = b"GET /metrics HTTP/1.1\r\n".to_vec();
    for i in 0..100 {
        many.extend_from_slice(format!("X-{i}: a\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    for req in [long, many] {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let _ = tcp.write_all(&req).await; // the server may close before reading it all
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(TIMEOUT, tcp.read_to_end(&mut raw)).await;
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
    }

    // A client that connects and says nothing does not hold the endpoint: others are served
    // meanwhile, and the silent one is disconnected (after the I/O timeout).
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let _ = scrape(&relay).await;
    let mut raw = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(30), silent.read_to_end(&mut raw))
        .await
        .expect("a silent client is disconnected");
    assert!(n.is_ok() && raw.is_empty());
}

#[test]
fn metrics_field_and_flag() {
    let c = Config::default().validate().unwrap();
    assert_eq!(c.metrics, Some("127.0.0.1:9464".parse().unwrap()));
    let c = Config::from_toml("metrics = \"off\"")
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(c.metrics, None);
    let c = Config::from_toml("metrics = \"[::1]:0\"")
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(c.metrics, Some("[::1]:0".parse().unwrap()));
    let e = Config::from_toml("metrics = \"9464\"")
        .unwrap()
        .validate()
        .unwrap_err();
    assert_eq!(e.field, "metrics");

    let bin = env!("CARGO_BIN_EXE_masque-relay");
    let help = Command::new(bin).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--metrics"));
    let out = Command::new(bin)
        .args(["--metrics", "nowhere"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("metrics"));
}

#[tokio::test]
async fn off_means_no_endpoint() {
    let relay = TestRelay::start(|c| c.metrics = "off".to_owned());
    assert_eq!(relay.relay.as_ref().unwrap().metrics_addr(), None);
}

/// What one scrape costs: not a test of speed (nothing is asserted about time), a measurement to
/// run by hand:
/// `cargo test --release --test metrics scrape_cost -- --ignored --nocapture`
#[tokio::test]
#[ignore = "a measurement, run by hand"]
async fn scrape_cost() {
    let relay = TestRelay::start(|c| c.workers = 4);
    let addr = relay.relay.as_ref().unwrap().metrics_addr().unwrap();
    let stats = relay.relay.as_ref().unwrap().stats().to_vec();
    let registry = masque_relay::metrics::RelayCollector::registry(&stats);
    let rounds = 2000;
    let _ = masque_relay::metrics::collector::encode(&registry);
    let start = Instant::now();
    let mut len = 0;
    for _ in 0..rounds {
        len = masque_relay::metrics::collector::encode(&registry).len();
    }
    let in_process = start.elapsed() / rounds;
    let start = Instant::now();
    for _ in 0..200 {
        let _ = http(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
    }
    let over_http = start.elapsed() / 200;
    let lines = masque_relay::metrics::collector::encode(&registry)
        .lines()
        .count();
    println!(
        "4 workers: exposition {len} bytes, {lines} lines; gather+encode {in_process:?} per \
         scrape; GET /metrics over loopback {over_http:?} per scrape"
    );
}
