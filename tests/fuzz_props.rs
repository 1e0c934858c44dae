//! The property-test form of every fuzz target (tests/fuzz/, README "Fuzzing"): the same checks
//! the cargo-fuzz binaries run, from `tests/fuzz/checks.rs`, driven here by proptest so they
//! run in `cargo test` on stable Rust:
//!
//! - every target on arbitrary bytes, and on its seeds with random edits (proptest's stand-in
//!   for a fuzzer's mutations);
//! - every committed corpus file and every seed, replayed;
//! - structured inputs through the relay's encoders and back (varints, capsules, frames,
//!   SETTINGS, QPACK with and without Huffman, targets through URI templates, whole request
//!   streams, HTTP/1.1 upgrade heads).
//!
//! Allocations are counted (the counting allocator below is this binary's global allocator), so
//! the memory bounds in the checks are enforced here too.

#[path = "fuzz/checks.rs"]
mod checks;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use masque_relay::proto::h3::frame::Settings;
use masque_relay::proto::h3::qpack::Field;
use masque_relay::proto::target::{Target, TargetHost};
use masque_relay::proto::varint;
use proptest::collection::vec;
use proptest::prelude::*;

use checks::{Capsule, Frame, H1Request, TargetSpelling};

#[global_allocator]
static ALLOC: checks::CountingAlloc = checks::CountingAlloc;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target)
}

fn target_fn(name: &str) -> fn(&[u8]) {
    checks::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, f)| f)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
}

#[test]
fn counting_allocator_is_installed() {
    let (v, peak) = checks::measure(|| vec![0u8; 1000]);
    assert_eq!(v.len(), 1000);
    assert!(peak.is_some_and(|p| p >= 1000), "{peak:?}");
}

#[test]
fn chunks_cover_the_input() {
    let data: Vec<u8> = (0..=255).collect();
    for mode in 0..=255 {
        let pieces = checks::chunks(&data, mode);
        assert_eq!(pieces.concat(), data, "mode {mode}");
    }
}

#[test]
fn seeds_pass() {
    for (target, seed) in checks::seeds() {
        target_fn(target)(&seed);
    }
}

/// Every committed corpus file (and crash regression input) runs clean.
#[test]
fn corpus_replays() {
    let mut total = 0;
    for &(name, f) in checks::TARGETS {
        let dir = corpus_dir(name);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            f(&std::fs::read(&path).unwrap());
            total += 1;
        }
    }
    assert!(
        total >= checks::TARGETS.len(),
        "corpus nearly empty: {total} files"
    );
}

/// Writes the seeds into the corpus folders (`cargo test --test fuzz_props -- --ignored
/// write_seeds`); only needed to regrow a corpus from scratch.
#[test]
#[ignore = "writes files under tests/fuzz/corpus"]
fn write_seeds() {
    for (i, (target, seed)) in checks::seeds().into_iter().enumerate() {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{i:02}")), seed).unwrap();
    }
}

/// A seed of some target, edited: bytes overwritten, inserted, removed, and the end cut.
fn mutated_seed() -> impl Strategy<Value = (&'static str, Vec<u8>)> {
    let seeds = checks::seeds();
    let n = seeds.len();
    (
        0..n,
        vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 0..10),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(move |(i, edits, cut, do_cut)| {
            let (target, mut bytes) = seeds[i].clone();
            for (at, byte, op) in edits {
                let pos = at.index(bytes.len() + 1);
                match op {
                    0 if pos < bytes.len() => bytes[pos] = byte,
                    1 => bytes.insert(pos, byte),
                    2 if pos < bytes.len() => {
                        bytes.remove(pos);
                    }
                    _ if pos < bytes.len() => bytes[pos] ^= 1 << (byte % 8),
                    _ => {}
                }
            }
            if do_cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            (target, bytes)
        })
}

// ---------------------------------------------------------------------------------------------
// Structured inputs
// ---------------------------------------------------------------------------------------------

fn varint_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..64,
        64u64..16384,
        16384u64..(1 << 30),
        (1u64 << 30)..=varint::MAX,
        Just(varint::MAX),
    ]
}

fn capsule_strategy() -> impl Strategy<Value = Capsule> {
    prop_oneof![
        3 => (prop_oneof![Just(0u64), varint_value()], vec(any::<u8>(), 0..300)).prop_map(
            |(context_id, payload)| Capsule::Datagram { context_id, payload }
        ),
        1 => (varint_value().prop_filter("not DATAGRAM", |&t| t != 0), vec(any::<u8>(), 0..40))
            .prop_map(|(capsule_type, value)| Capsule::Other { capsule_type, value }),
    ]
}

fn settings_strategy() -> impl Strategy<Value = Settings> {
    (
        varint_value(),
        varint_value(),
        proptest::option::of(varint_value()),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(cap, blocked, size, connect, datagram, grease)| Settings {
            qpack_max_table_capacity: cap,
            qpack_blocked_streams: blocked,
            max_field_section_size: size,
            enable_connect_protocol: connect,
            h3_datagram: datagram,
            grease,
        })
}

fn frame_strategy() -> impl Strategy<Value = Frame> {
    prop_oneof![
        vec(any::<u8>(), 0..200).prop_map(Frame::Data),
        vec(any::<u8>(), 0..100).prop_map(Frame::Headers),
        (settings_strategy(), any::<u64>())
            .prop_map(|(settings, seed)| Frame::Settings { settings, seed }),
        varint_value().prop_map(Frame::Goaway),
        (any::<u64>(), vec(any::<u8>(), 0..50))
            .prop_map(|(seed, payload)| Frame::Grease { seed, payload }),
    ]
}

/// Field lines that hit the static table (exact and name-only matches) and literal ones.
fn field_strategy() -> impl Strategy<Value = Field> {
    let static_names = prop::sample::select(vec![
        &b":method"[..],
        b":path",
        b":protocol",
        b":scheme",
        b":authority",
        b"content-type",
        b"user-agent",
    ]);
    let static_values = prop::sample::select(vec![
        &b"CONNECT"[..],
        b"GET",
        b"/",
        b"https",
        b"",
        b"connect-udp",
    ]);
    prop_oneof![
        (static_names, static_values).prop_map(|(n, v)| Field::new(n, v)),
        (vec(any::<u8>(), 0..16), vec(any::<u8>(), 0..64)).prop_map(|(n, v)| Field::new(n, v)),
        ("[a-z][a-z0-9-]{0,15}", "[ -~]{0,40}").prop_map(|(n, v)| Field::new(n, v)),
    ]
}

fn dns_name() -> impl Strategy<Value = String> {
    let label = "[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?";
    (
        vec(label, 0..4),
        "[a-zA-Z]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?",
        any::<bool>(),
    )
        .prop_map(|(mut labels, last, dot)| {
            labels.push(last);
            let mut name = labels.join(".");
            if dot {
                name.push('.');
            }
            name
        })
}

fn target_spelling() -> impl Strategy<Value = TargetSpelling> {
    let host = prop_oneof![
        any::<u32>().prop_map(|ip| TargetHost::Ip(IpAddr::V4(Ipv4Addr::from(ip)))),
        any::<u128>().prop_map(|ip| TargetHost::Ip(IpAddr::V6(Ipv6Addr::from(ip)))),
        any::<u32>().prop_map(|ip| TargetHost::Ip(IpAddr::V6(Ipv4Addr::from(ip).to_ipv6_mapped()))),
        dns_name().prop_map(TargetHost::Name),
    ];
    (
        host,
        1u16..=u16::MAX,
        vec(prop::sample::select(b"aeZ09.-".to_vec()), 0..3),
        any::<bool>(),
        0usize..3,
    )
        .prop_map(
            |(host, port, encode_extra, lower_hex, port_zeros)| TargetSpelling {
                target: Target { host, port },
                encode_extra,
                lower_hex,
                port_zeros,
            },
        )
}

fn h1_request() -> impl Strategy<Value = H1Request> {
    (
        prop_oneof![Just("GET".to_owned()), "[A-Z]{1,8}"],
        "/[a-zA-Z0-9._~%/-]{0,60}(\\?[a-zA-Z0-9=&._%-]{0,30})?",
        proptest::option::of("[a-z0-9.-]{1,20}(:[0-9]{1,5})?"),
        proptest::option::of("[a-z0-9.-]{1,20}(:[0-9]{1,5})?"),
        any::<bool>(),
        proptest::option::of(prop_oneof![
            Just("connect-udp".to_owned()),
            Just("websocket, connect-udp".to_owned()),
            "[a-z-]{1,12}",
        ]),
        proptest::option::of(prop_oneof![Just("?1".to_owned()), Just("?0".to_owned())]),
        vec(("x-[a-z]{1,8}", "[!-~]([ -~]{0,20}[!-~])?"), 0..4),
        vec(any::<u8>(), 0..40),
    )
        .prop_map(
            |(
                method,
                path,
                absolute,
                host,
                connection_upgrade,
                upgrade,
                capsule_protocol,
                extra,
                after,
            )| {
                H1Request {
                    method,
                    path,
                    absolute,
                    host,
                    connection_upgrade,
                    upgrade,
                    capsule_protocol,
                    extra,
                    after,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_target_takes_arbitrary_bytes(
        i in 0..checks::TARGETS.len(),
        data in vec(any::<u8>(), 0..600),
    ) {
        (checks::TARGETS[i].1)(&data);
    }

    #[test]
    fn every_target_takes_mutated_seeds((target, data) in mutated_seed()) {
        target_fn(target)(&data);
    }
}

proptest! {
    #[test]
    fn varint_values_round_trip(v in varint_value()) {
        checks::varint_value(v);
    }

    #[test]
    fn capsules_round_trip(
        max_payload in prop_oneof![0usize..400, Just(masque_relay::proto::capsule::MAX_UDP_PAYLOAD)],
        capsules in vec(capsule_strategy(), 0..8),
        mode in any::<u8>(),
        cut in any::<usize>(),
    ) {
        checks::capsule_round_trip(max_payload, &capsules, mode, cut);
    }

    #[test]
    fn frames_round_trip(frames in vec(frame_strategy(), 0..8), mode in any::<u8>()) {
        checks::frame_round_trip(&frames, mode);
    }

    #[test]
    fn settings_round_trip(settings in settings_strategy(), seed in any::<u64>()) {
        checks::settings_round_trip(&settings, seed);
    }

    #[test]
    fn qpack_round_trips(fields in vec(field_strategy(), 0..8)) {
        checks::qpack_round_trip(&fields);
    }

    #[test]
    fn qpack_limits_are_exact(fields in vec(field_strategy(), 0..8), max in 0u64..600) {
        let pairs: Vec<(&[u8], &[u8])> =
            fields.iter().map(|f| (&f.name[..], &f.value[..])).collect();
        let mut block = Vec::new();
        masque_relay::proto::h3::qpack::encode_field_section(&pairs, &mut block);
        checks::qpack_block(&block, max);
    }

    #[test]
    fn huffman_round_trips(s in vec(any::<u8>(), 0..200)) {
        checks::huffman_round_trip(&s);
        let mut coded = Vec::new();
        masque_relay::proto::h3::huffman::encode(&s, &mut coded);
        checks::huffman_string(&coded, s.len());
    }

    #[test]
    fn huffman_strings_decode_or_fail_cleanly(
        input in vec(any::<u8>(), 0..100),
        max_len in 0usize..200,
    ) {
        checks::huffman_string(&input, max_len);
    }

    #[test]
    fn targets_round_trip_through_templates(spelling in target_spelling()) {
        checks::target_round_trip(&spelling);
    }

    #[test]
    fn raw_target_values_never_panic(
        host in proptest::option::of("[a-zA-Z0-9%:.\\[\\]_-]{0,40}"),
        port in proptest::option::of("[0-9%a-fA-F+ -]{0,8}"),
    ) {
        checks::target_strings(host.as_deref(), port.as_deref());
    }

    #[test]
    fn templates_match_what_they_expand_to(
        i in 0..checks::TEMPLATES.len(),
        path in "/[a-zA-Z0-9._~%/?&=,;+:-]{0,80}",
    ) {
        let template = checks::parse_template(checks::TEMPLATES[i]).unwrap();
        checks::match_and_parse(&template, &path);
    }

    #[test]
    fn request_streams_round_trip(
        spelling in target_spelling(),
        capsules in vec(capsule_strategy(), 0..6),
        mode in any::<u8>(),
    ) {
        checks::request_round_trip(&spelling, &capsules, mode);
    }

    #[test]
    fn http1_heads_round_trip(request in h1_request()) {
        checks::http1_round_trip(&request);
    }
}
