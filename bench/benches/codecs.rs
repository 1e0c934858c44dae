//! Micro-benchmarks of the per-datagram and per-request codecs: QUIC varints, DATAGRAM
//! capsules (encode, and decode of a stream of them), QPACK field sections of a CONNECT-UDP
//! request, the HTTP/3 request stream reader, the request check against the URI template, and
//! the per-flow bookkeeping of one datagram. `cargo bench --bench codecs`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use masque_relay::proto::capsule::{self, CapsuleDecoder};
use masque_relay::proto::connect_udp::{check_request, HttpVersion, RequestHead};
use masque_relay::proto::h3::stream::{RequestEvent, RequestStreamReader};
use masque_relay::proto::h3::{frame, qpack};
use masque_relay::proto::uri_template::UriTemplate;
use masque_relay::proto::varint;
use masque_relay::relay::flow::Flow;

const PATH: &[u8] = b"/.well-known/masque/udp/192.0.2.6/443/";

fn request_fields() -> Vec<(&'static [u8], &'static [u8])> {
    vec![
        (b":method", b"CONNECT"),
        (b":protocol", b"connect-udp"),
        (b":scheme", b"https"),
        (b":authority", b"relay.example:443"),
        (b":path", PATH),
        (b"capsule-protocol", b"?1"),
    ]
}

fn varints(c: &mut Criterion) {
    let values = [0u64, 63, 64, 16_383, 16_384, 1 << 29, 1 << 40];
    let mut buf = Vec::with_capacity(64);
    for v in values {
        varint::write(v, &mut buf);
    }
    let mut g = c.benchmark_group("varint");
    g.throughput(Throughput::Elements(values.len() as u64));
    g.bench_function("write 7", |b| {
        let mut out = Vec::with_capacity(64);
        b.iter(|| {
            out.clear();
            for v in values {
                varint::write(black_box(v), &mut out);
            }
            black_box(out.len())
        })
    });
    g.bench_function("read 7", |b| {
        b.iter(|| {
            let mut rest = black_box(&buf[..]);
            let mut sum = 0u64;
            while let Some((v, n)) = varint::read(rest) {
                sum = sum.wrapping_add(v);
                rest = &rest[n..];
            }
            sum
        })
    });
    g.finish();
}

fn capsules(c: &mut Criterion) {
    let mut g = c.benchmark_group("capsule");
    for size in [64usize, 1200] {
        let payload = vec![0xabu8; size];
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("encode datagram {size} B"), |b| {
            let mut out = Vec::with_capacity(size + 16);
            b.iter(|| {
                out.clear();
                capsule::encode_datagram(0, black_box(&payload), &mut out);
                out.len()
            })
        });
        // 64 capsules in one read, as a busy HTTP/2 DATA frame delivers them.
        let mut stream = Vec::new();
        for _ in 0..64 {
            capsule::encode_datagram(0, &payload, &mut stream);
        }
        g.throughput(Throughput::Elements(64));
        g.bench_function(format!("decode 64 datagrams of {size} B, one chunk"), |b| {
            let mut d = CapsuleDecoder::new(capsule::MAX_UDP_PAYLOAD);
            b.iter(|| {
                let mut n = 0usize;
                d.decode(black_box(&stream), |_| n += 1).unwrap();
                n
            })
        });
        // The same bytes cut at 1000-byte boundaries (capsules split across reads).
        g.bench_function(
            format!("decode 64 datagrams of {size} B, 1000-byte chunks"),
            |b| {
                let mut d = CapsuleDecoder::new(capsule::MAX_UDP_PAYLOAD);
                b.iter(|| {
                    let mut n = 0usize;
                    for chunk in stream.chunks(1000) {
                        d.decode(black_box(chunk), |_| n += 1).unwrap();
                    }
                    n
                })
            },
        );
    }
    g.finish();
}

fn qpack_and_requests(c: &mut Criterion) {
    let fields = request_fields();
    let mut block = Vec::new();
    qpack::encode_field_section(&fields, &mut block);
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Elements(1));
    g.bench_function("qpack encode CONNECT-UDP request", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            qpack::encode_field_section(black_box(&fields), &mut out);
            out.len()
        })
    });
    g.bench_function("qpack decode CONNECT-UDP request", |b| {
        b.iter(|| qpack::decode_field_section(black_box(&block), 16 * 1024).unwrap())
    });
    let mut headers = Vec::new();
    frame::encode_headers_frame(&block, &mut headers);
    g.bench_function("h3 request stream: HEADERS frame + decode", |b| {
        b.iter(|| {
            let mut r = RequestStreamReader::new(16 * 1024);
            let mut n = 0;
            r.push(black_box(&headers), |ev| {
                if let RequestEvent::Headers(h) = ev {
                    n = qpack::decode_field_section(h, 16 * 1024).unwrap().len();
                }
            })
            .unwrap();
            n
        })
    });
    let template =
        UriTemplate::parse_level3("/.well-known/masque/udp/{target_host}/{target_port}/").unwrap();
    let path = std::str::from_utf8(PATH).unwrap();
    g.bench_function("check CONNECT-UDP request against the template", |b| {
        b.iter(|| {
            let head = RequestHead {
                version: HttpVersion::Http3,
                method: "CONNECT",
                protocol: Some("connect-udp"),
                scheme: Some("https"),
                authority: Some("relay.example:443"),
                path: Some(black_box(path)),
                capsule_protocol: Some(b"?1"),
            };
            check_request(&head, &template).is_ok()
        })
    });
    g.finish();
}

fn flow_bookkeeping(c: &mut Criterion) {
    let mut g = c.benchmark_group("flow");
    g.throughput(Throughput::Elements(2));
    let now = Instant::now();
    let mut flow = Flow::new(now, Duration::from_secs(120), capsule::MAX_UDP_PAYLOAD);
    g.bench_function("one datagram each way", |b| {
        b.iter(|| {
            let a = flow.on_client_datagram(now, 0, black_box(1200));
            let t = flow.on_target_datagram(now, black_box(1200));
            flow.on_sent_to_client(1200);
            (a, t)
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    varints,
    capsules,
    qpack_and_requests,
    flow_bookkeeping
);
criterion_main!(benches);
