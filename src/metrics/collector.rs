//! The Prometheus view of the workers' numbers: a [`Collector`] that reads every worker's
//! [`WorkerStats`] at scrape time and turns them into metric families with a `worker` label.
//!
//! Nothing here runs on the data path. The families are declared once in [`FAMILIES`], which
//! both [`Collector::desc`] and [`Collector::collect`] follow (a test checks they agree), and
//! which the README's metric list mirrors.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{
    Bucket, Counter as PCounter, Gauge as PGauge, Histogram as PHistogram, LabelPair, Metric,
    MetricFamily, MetricType,
};

use super::{
    ConnectionClose, Counter, Direction, HandshakeFailure, HistogramSnapshot, WorkerStats,
    PROTOCOLS, STATUS_CODES,
};
use crate::proto::sf::ProxyError;
use crate::relay::flow::{CloseReason, DropReason};

/// One metric family: its name, help text, type and label names.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: MetricType,
    pub labels: &'static [&'static str],
}

const fn family(
    name: &'static str,
    kind: MetricType,
    labels: &'static [&'static str],
    help: &'static str,
) -> Family {
    Family {
        name,
        help,
        kind,
        labels,
    }
}

use MetricType::{COUNTER, GAUGE, HISTOGRAM};

const BUILD_INFO: Family = family(
    "masque_relay_build_info",
    GAUGE,
    &["version"],
    "Always 1; the version label says which relay build is running.",
);
const IO_BACKEND_INFO: Family = family(
    "masque_relay_io_backend_info",
    GAUGE,
    &["worker", "backend"],
    "Always 1; the backend label names the I/O backend the worker runs on.",
);
const CONNECTIONS_ACCEPTED: Family = family(
    "masque_relay_connections_accepted_total",
    COUNTER,
    &["worker", "protocol"],
    "Client connections whose handshake completed.",
);
const CONNECTIONS_OPEN: Family = family(
    "masque_relay_connections_open",
    GAUGE,
    &["worker", "protocol"],
    "Client connections open now.",
);
const CONNECTIONS_CLOSED: Family = family(
    "masque_relay_connections_closed_total",
    COUNTER,
    &["worker", "protocol", "reason"],
    "Client connections closed, by reason.",
);
const HANDSHAKE_FAILURES: Family = family(
    "masque_relay_handshake_failures_total",
    COUNTER,
    &["worker", "reason"],
    "Client handshakes that did not complete, by reason.",
);
const HANDSHAKE_DURATION: Family = family(
    "masque_relay_handshake_duration_seconds",
    HISTOGRAM,
    &["worker"],
    "Time from TCP accept (QUIC: first packet) to a completed handshake.",
);
const REQUESTS: Family = family(
    "masque_relay_requests_total",
    COUNTER,
    &["worker", "protocol", "status"],
    "CONNECT-UDP requests answered, by response status (\"other\" for unlisted codes).",
);
const REFUSALS: Family = family(
    "masque_relay_refusals_total",
    COUNTER,
    &["worker", "error"],
    "Refused requests, by Proxy-Status error type (RFC 9209).",
);
const REQUEST_TO_RESPONSE: Family = family(
    "masque_relay_request_to_response_seconds",
    HISTOGRAM,
    &["worker"],
    "Time from a complete request head to the response sent, resolution and socket included.",
);
const FLOWS_OPENED: Family = family(
    "masque_relay_flows_opened_total",
    COUNTER,
    &["worker"],
    "UDP flows opened.",
);
const FLOWS_OPEN: Family = family(
    "masque_relay_flows_open",
    GAUGE,
    &["worker"],
    "UDP flows open now.",
);
const FLOWS_CLOSED: Family = family(
    "masque_relay_flows_closed_total",
    COUNTER,
    &["worker", "reason"],
    "UDP flows closed, by reason.",
);
const FLOW_LIFETIME: Family = family(
    "masque_relay_flow_lifetime_seconds",
    HISTOGRAM,
    &["worker"],
    "Lifetime of closed UDP flows.",
);
const DATAGRAMS: Family = family(
    "masque_relay_datagrams_total",
    COUNTER,
    &["worker", "protocol", "direction"],
    "UDP datagrams relayed, by direction (to_target, to_client).",
);
const BYTES: Family = family(
    "masque_relay_bytes_total",
    COUNTER,
    &["worker", "protocol", "direction"],
    "UDP payload bytes relayed, by direction (to_target, to_client).",
);
const DROPS: Family = family(
    "masque_relay_datagrams_dropped_total",
    COUNTER,
    &["worker", "reason"],
    "Datagrams dropped instead of relayed, by reason.",
);
const TARGET_ERRORS: Family = family(
    "masque_relay_target_errors_total",
    COUNTER,
    &["worker", "kind"],
    "Target-side errors: icmp (an ICMP error ended a flow), resolve (a name did not resolve).",
);
const CAPSULES_UNKNOWN: Family = family(
    "masque_relay_capsules_unknown_total",
    COUNTER,
    &["worker"],
    "Capsules of unknown type skipped.",
);
const H3_CONNECTION_ERRORS: Family = family(
    "masque_relay_h3_connection_errors_total",
    COUNTER,
    &["worker"],
    "HTTP/3 connection errors detected by the relay (each closes its connection).",
);
const H3_STREAM_ERRORS: Family = family(
    "masque_relay_h3_stream_errors_total",
    COUNTER,
    &["worker"],
    "HTTP/3 stream errors (malformed requests or messages); each resets its stream.",
);
const QUIC_AMPLIFICATION_HELD: Family = family(
    "masque_relay_quic_amplification_held_total",
    COUNTER,
    &["worker"],
    "QUIC datagrams held back to keep within 3x of what an unvalidated client sent.",
);
const QUIC_MISROUTED: Family = family(
    "masque_relay_quic_misrouted_packets_total",
    COUNTER,
    &["worker"],
    "QUIC packets that reached a worker not owning their connection ID (dropped).",
);
const QUIC_SEND_ERRORS: Family = family(
    "masque_relay_quic_send_errors_total",
    COUNTER,
    &["worker"],
    "QUIC packets the UDP socket did not take (lost; QUIC recovers them).",
);

const IO_PASSES: Family = family(
    "masque_relay_io_loop_passes_total",
    COUNTER,
    &["worker"],
    "Datagram engine passes: buffers returned, completions drained, sends submitted.",
);
const IO_COMPLETIONS: Family = family(
    "masque_relay_io_completions_total",
    COUNTER,
    &["worker"],
    "Completions (io_uring) or datagrams read (mmsg) handled by the passes; divide by passes for completions per pass.",
);
const IO_SUBMISSIONS: Family = family(
    "masque_relay_io_send_messages_total",
    COUNTER,
    &["worker"],
    "Send messages handed to the kernel (one GSO message may carry several datagrams).",
);
const RECEIVE_PAUSED: Family = family(
    "masque_relay_receive_paused_total",
    COUNTER,
    &["worker", "pool"],
    "Times receiving paused because the pool had no free buffer (datagrams wait in the kernel).",
);
const EGRESS_SOCKETS: Family = family(
    "masque_relay_egress_sockets",
    GAUGE,
    &["worker"],
    "Egress UDP sockets open (shared by the flows to different targets).",
);
const POOL_FREE: Family = family(
    "masque_relay_buffer_pool_free",
    GAUGE,
    &["worker", "pool"],
    "Receive buffers free in the worker's pool (target or quic).",
);

/// Every family the collector emits, in output order.
pub const FAMILIES: [&Family; 30] = [
    &BUILD_INFO,
    &IO_BACKEND_INFO,
    &CONNECTIONS_ACCEPTED,
    &CONNECTIONS_OPEN,
    &CONNECTIONS_CLOSED,
    &HANDSHAKE_FAILURES,
    &HANDSHAKE_DURATION,
    &REQUESTS,
    &REFUSALS,
    &REQUEST_TO_RESPONSE,
    &FLOWS_OPENED,
    &FLOWS_OPEN,
    &FLOWS_CLOSED,
    &FLOW_LIFETIME,
    &DATAGRAMS,
    &BYTES,
    &DROPS,
    &TARGET_ERRORS,
    &CAPSULES_UNKNOWN,
    &H3_CONNECTION_ERRORS,
    &H3_STREAM_ERRORS,
    &QUIC_AMPLIFICATION_HELD,
    &QUIC_MISROUTED,
    &QUIC_SEND_ERRORS,
    &IO_PASSES,
    &IO_COMPLETIONS,
    &IO_SUBMISSIONS,
    &POOL_FREE,
    &RECEIVE_PAUSED,
    &EGRESS_SOCKETS,
];

/// Drop reasons the issue names that no code path produces yet; exported as 0 so dashboards and
/// alerts can be written now. A reason moves out of this list by becoming a [`DropReason`]
/// (the collector then reads it from the counters and skips it here).
pub const RESERVED_DROP_REASONS: [&str; 4] = [
    "no_flow",
    "buffer_pool_empty",
    "rate_limit",
    "truncated_receive",
];

/// Reads all workers' stats at scrape time.
#[derive(Debug)]
pub struct RelayCollector {
    workers: Vec<Arc<WorkerStats>>,
    worker_labels: Vec<String>,
    descs: Vec<Desc>,
}

impl RelayCollector {
    /// A collector over these workers (worker `i` is labelled `worker="i"`).
    pub fn new(workers: &[Arc<WorkerStats>]) -> Self {
        let descs = FAMILIES
            .iter()
            .map(|f| {
                Desc::new(
                    f.name.to_owned(),
                    f.help.to_owned(),
                    f.labels.iter().map(|l| (*l).to_owned()).collect(),
                    HashMap::new(),
                )
                .expect("metric families are valid")
            })
            .collect();
        Self {
            workers: workers.to_vec(),
            worker_labels: (0..workers.len()).map(|i| i.to_string()).collect(),
            descs,
        }
    }

    /// A registry holding only this collector.
    pub fn registry(workers: &[Arc<WorkerStats>]) -> prometheus::Registry {
        let registry = prometheus::Registry::new();
        registry
            .register(Box::new(Self::new(workers)))
            .expect("a fresh registry accepts the collector");
        registry
    }

    fn workers(&self) -> impl Iterator<Item = (&str, &WorkerStats)> {
        self.worker_labels
            .iter()
            .map(String::as_str)
            .zip(self.workers.iter().map(|w| &**w))
    }
}

/// Builds one family's samples.
struct Builder {
    family: &'static Family,
    metrics: Vec<Metric>,
}

impl Builder {
    fn new(family: &'static Family) -> Self {
        Self {
            family,
            metrics: Vec::new(),
        }
    }

    fn labelled(&self, values: &[&str]) -> Metric {
        debug_assert_eq!(
            values.len(),
            self.family.labels.len(),
            "{}",
            self.family.name
        );
        let labels = self
            .family
            .labels
            .iter()
            .zip(values)
            .map(|(name, value)| {
                let mut l = LabelPair::default();
                l.set_name((*name).to_owned());
                l.set_value((*value).to_owned());
                l
            })
            .collect();
        Metric::from_label(labels)
    }

    /// A counter or gauge sample (by the family's type).
    fn value(&mut self, labels: &[&str], v: u64) {
        let mut m = self.labelled(labels);
        match self.family.kind {
            COUNTER => {
                let mut c = PCounter::default();
                c.set_value(v as f64);
                m.set_counter(c);
            }
            _ => {
                let mut g = PGauge::default();
                g.set_value(v as f64);
                m.set_gauge(g);
            }
        }
        self.metrics.push(m);
    }

    fn histogram(&mut self, labels: &[&str], snap: &HistogramSnapshot) {
        debug_assert_eq!(self.family.kind, HISTOGRAM);
        let mut m = self.labelled(labels);
        let mut h = PHistogram::default();
        h.set_sample_count(snap.count);
        h.set_sample_sum(snap.sum);
        h.set_bucket(
            snap.buckets
                .iter()
                .map(|&(le, n)| {
                    let mut b = Bucket::default();
                    b.set_upper_bound(le);
                    b.set_cumulative_count(n);
                    b
                })
                .collect(),
        );
        m.set_histogram(h);
        self.metrics.push(m);
    }

    fn finish(self) -> MetricFamily {
        let mut mf = MetricFamily::default();
        mf.set_name(self.family.name.to_owned());
        mf.set_help(self.family.help.to_owned());
        mf.set_field_type(self.family.kind);
        mf.set_metric(self.metrics);
        mf
    }
}

fn status_label(code: u16) -> String {
    if code == 0 {
        "other".to_owned()
    } else {
        code.to_string()
    }
}

impl Collector for RelayCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let statuses: Vec<String> = STATUS_CODES.iter().map(|&c| status_label(c)).collect();
        let mut out = Vec::with_capacity(FAMILIES.len());

        let mut b = Builder::new(&BUILD_INFO);
        b.value(&[env!("CARGO_PKG_VERSION")], 1);
        out.push(b.finish());

        let mut b = Builder::new(&IO_BACKEND_INFO);
        for (w, s) in self.workers() {
            b.value(&[w, s.io_backend()], 1);
        }
        out.push(b.finish());

        let mut b = Builder::new(&CONNECTIONS_ACCEPTED);
        for (w, s) in self.workers() {
            for (p, v) in PROTOCOLS.iter().enumerate() {
                b.value(&[w, v.as_str()], s.connections_accepted[p].get());
            }
        }
        out.push(b.finish());

        let mut b = Builder::new(&CONNECTIONS_OPEN);
        for (w, s) in self.workers() {
            for v in PROTOCOLS {
                b.value(&[w, v.as_str()], s.connections_open(v));
            }
        }
        out.push(b.finish());

        let mut b = Builder::new(&CONNECTIONS_CLOSED);
        for (w, s) in self.workers() {
            for v in PROTOCOLS {
                for r in ConnectionClose::ALL {
                    b.value(&[w, v.as_str(), r.as_str()], s.connections_closed_for(v, r));
                }
            }
        }
        out.push(b.finish());

        let mut b = Builder::new(&HANDSHAKE_FAILURES);
        for (w, s) in self.workers() {
            for r in HandshakeFailure::ALL {
                b.value(&[w, r.as_str()], s.handshake_failures_for(r));
            }
        }
        out.push(b.finish());

        let mut b = Builder::new(&HANDSHAKE_DURATION);
        for (w, s) in self.workers() {
            b.histogram(&[w], &s.handshake_seconds.snapshot());
        }
        out.push(b.finish());

        let mut b = Builder::new(&REQUESTS);
        for (w, s) in self.workers() {
            for (p, v) in PROTOCOLS.iter().enumerate() {
                for (i, status) in statuses.iter().enumerate() {
                    b.value(&[w, v.as_str(), status], s.requests[p][i].get());
                }
            }
        }
        out.push(b.finish());

        let mut b = Builder::new(&REFUSALS);
        for (w, s) in self.workers() {
            for (i, e) in ProxyError::ALL.iter().enumerate() {
                b.value(&[w, e.as_str()], s.refusals[i].get());
            }
        }
        out.push(b.finish());

        let mut b = Builder::new(&REQUEST_TO_RESPONSE);
        for (w, s) in self.workers() {
            b.histogram(&[w], &s.request_seconds.snapshot());
        }
        out.push(b.finish());

        let mut b = Builder::new(&FLOWS_OPENED);
        for (w, s) in self.workers() {
            b.value(&[w], s.flows_opened.get());
        }
        out.push(b.finish());

        let mut b = Builder::new(&FLOWS_OPEN);
        for (w, s) in self.workers() {
            b.value(&[w], s.flows_open());
        }
        out.push(b.finish());

        let mut b = Builder::new(&FLOWS_CLOSED);
        for (w, s) in self.workers() {
            for r in CloseReason::ALL {
                b.value(&[w, r.as_str()], s.flows_closed_for(r));
            }
        }
        out.push(b.finish());

        let mut b = Builder::new(&FLOW_LIFETIME);
        for (w, s) in self.workers() {
            b.histogram(&[w], &s.flow_lifetime_seconds.snapshot());
        }
        out.push(b.finish());

        for (family, which) in [(&DATAGRAMS, 0), (&BYTES, 1)] {
            let mut b = Builder::new(family);
            for (w, s) in self.workers() {
                for v in PROTOCOLS {
                    for d in Direction::ALL {
                        let n = if which == 0 {
                            s.datagrams_for(v, d)
                        } else {
                            s.bytes_for(v, d)
                        };
                        b.value(&[w, v.as_str(), d.as_str()], n);
                    }
                }
            }
            out.push(b.finish());
        }

        let mut b = Builder::new(&DROPS);
        let reserved = RESERVED_DROP_REASONS
            .iter()
            .filter(|name| DropReason::ALL.iter().all(|r| r.as_str() != **name));
        for (w, s) in self.workers() {
            for r in DropReason::ALL {
                b.value(&[w, r.as_str()], s.drops_for(r));
            }
            for name in reserved.clone() {
                b.value(&[w, name], 0);
            }
        }
        out.push(b.finish());

        let mut b = Builder::new(&TARGET_ERRORS);
        for (w, s) in self.workers() {
            // A flow ends at the first ICMP error its socket reports, so the two are one count.
            b.value(&[w, "icmp"], s.flows_closed_for(CloseReason::TargetError));
            b.value(&[w, "resolve"], s.resolve_failures.get());
        }
        out.push(b.finish());

        for (family, counter) in [
            (
                &CAPSULES_UNKNOWN,
                (|s| &s.capsules_unknown) as fn(&WorkerStats) -> &Counter,
            ),
            (&H3_CONNECTION_ERRORS, |s| &s.h3_connection_errors),
            (&H3_STREAM_ERRORS, |s| &s.h3_stream_errors),
            (&QUIC_AMPLIFICATION_HELD, |s| &s.quic_amplification_held),
            (&QUIC_MISROUTED, |s| &s.quic_misrouted),
            (&QUIC_SEND_ERRORS, |s| &s.io.quic_send_errors),
            (&IO_PASSES, |s| &s.io.passes),
            (&IO_COMPLETIONS, |s| &s.io.completions),
            (&IO_SUBMISSIONS, |s| &s.io.submissions),
        ] {
            let mut b = Builder::new(family);
            for (w, s) in self.workers() {
                b.value(&[w], counter(s).get());
            }
            out.push(b.finish());
        }

        let mut b = Builder::new(&POOL_FREE);
        for (w, s) in self.workers() {
            b.value(&[w, "target"], s.io.pool_free[0].get());
            b.value(&[w, "quic"], s.io.pool_free[1].get());
        }
        out.push(b.finish());

        let mut b = Builder::new(&RECEIVE_PAUSED);
        for (w, s) in self.workers() {
            b.value(&[w, "target"], s.io.receive_paused[0].get());
            b.value(&[w, "quic"], s.io.receive_paused[1].get());
        }
        out.push(b.finish());

        let mut b = Builder::new(&EGRESS_SOCKETS);
        for (w, s) in self.workers() {
            b.value(&[w], s.egress_sockets.get());
        }
        out.push(b.finish());

        debug_assert_eq!(out.len(), FAMILIES.len());
        out
    }
}

/// The text exposition (format 0.0.4) of everything in `registry`.
pub fn encode(registry: &prometheus::Registry) -> String {
    let mut text = String::new();
    // Encoding fails only for a family without samples or name, which gather() never returns.
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut text) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    text
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::proto::connect_udp::{HttpVersion, Rejection};

    fn find<'a>(mfs: &'a [MetricFamily], name: &str) -> &'a MetricFamily {
        mfs.iter()
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("no family {name}"))
    }

    fn value(mf: &MetricFamily, labels: &[(&str, &str)]) -> f64 {
        let m = mf
            .get_metric()
            .iter()
            .find(|m| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            .unwrap_or_else(|| panic!("{}: no sample {labels:?}", mf.name()));
        match mf.get_field_type() {
            COUNTER => m.get_counter().get_value(),
            _ => m.get_gauge().get_value(),
        }
    }

    #[test]
    fn desc_and_collect_agree() {
        let stats: Vec<Arc<WorkerStats>> = (0..3).map(|_| Arc::default()).collect();
        let c = RelayCollector::new(&stats);
        let mfs = c.collect();
        assert_eq!(c.desc().len(), FAMILIES.len());
        for (mf, (desc, fam)) in mfs.iter().zip(c.desc().iter().zip(FAMILIES)) {
            assert_eq!(mf.name(), desc.fq_name);
            assert_eq!(mf.name(), fam.name);
            assert_eq!(mf.get_field_type(), fam.kind);
            assert!(!mf.get_metric().is_empty(), "{} is empty", fam.name);
            for m in mf.get_metric() {
                let names: Vec<&str> = m.get_label().iter().map(|l| l.name()).collect();
                assert_eq!(names, desc.variable_labels, "{}", fam.name);
            }
            // Conventions: counters end in _total, histograms in a base unit.
            match fam.kind {
                COUNTER => assert!(fam.name.ends_with("_total"), "{}", fam.name),
                HISTOGRAM => assert!(fam.name.ends_with("_seconds"), "{}", fam.name),
                _ => assert!(!fam.name.ends_with("_total"), "{}", fam.name),
            }
            assert!(fam.name.starts_with("masque_relay_"));
        }
        // Every per-worker family has a sample for each worker.
        let workers = find(&mfs, "masque_relay_flows_opened_total");
        assert_eq!(workers.get_metric().len(), 3);
    }

    #[test]
    fn collects_each_workers_numbers_with_its_label() {
        let stats: Vec<Arc<WorkerStats>> = (0..2).map(|_| Arc::default()).collect();
        let (w0, w1) = (&stats[0], &stats[1]);
        let h2 = HttpVersion::Http2;
        w0.connection_accepted(h2);
        w0.request(h2, 200);
        w0.flows_opened.inc();
        w0.datagram(h2, Direction::ToTarget, 100);
        w0.datagram(h2, Direction::ToTarget, 50);
        w0.datagram(h2, Direction::ToClient, 7);
        w1.refused(
            HttpVersion::Http11,
            &Rejection::new(502, Some(ProxyError::DnsError), "x"),
        );
        w1.resolve_failures.inc();
        w1.flows_opened.inc();
        w1.flow_closed(CloseReason::TargetError);
        w1.dropped(DropReason::ClientNotReading);
        w1.handshake_failure(HandshakeFailure::Timeout);
        w0.handshake_seconds.observe(Duration::from_millis(3));
        w0.flow_lifetime_seconds.observe(Duration::from_secs(2));

        let mfs = RelayCollector::registry(&stats).gather();
        let f = |n| find(&mfs, n);
        assert_eq!(
            value(
                f("masque_relay_connections_open"),
                &[("worker", "0"), ("protocol", "h2")]
            ),
            1.0
        );
        assert_eq!(
            value(
                f("masque_relay_requests_total"),
                &[("worker", "0"), ("protocol", "h2"), ("status", "200")]
            ),
            1.0
        );
        assert_eq!(
            value(
                f("masque_relay_requests_total"),
                &[("worker", "1"), ("protocol", "http1"), ("status", "502")]
            ),
            1.0
        );
        assert_eq!(
            value(
                f("masque_relay_refusals_total"),
                &[("worker", "1"), ("error", "dns_error")]
            ),
            1.0
        );
        assert_eq!(
            value(
                f("masque_relay_bytes_total"),
                &[
                    ("worker", "0"),
                    ("protocol", "h2"),
                    ("direction", "to_target")
                ]
            ),
            150.0
        );
        assert_eq!(
            value(
                f("masque_relay_datagrams_total"),
                &[
                    ("worker", "0"),
                    ("protocol", "h2"),
                    ("direction", "to_client")
                ]
            ),
            1.0
        );
        assert_eq!(value(f("masque_relay_flows_open"), &[("worker", "0")]), 1.0);
        assert_eq!(value(f("masque_relay_flows_open"), &[("worker", "1")]), 0.0);
        assert_eq!(
            value(
                f("masque_relay_target_errors_total"),
                &[("worker", "1"), ("kind", "icmp")]
            ),
            1.0
        );
        assert_eq!(
            value(
                f("masque_relay_target_errors_total"),
                &[("worker", "1"), ("kind", "resolve")]
            ),
            1.0
        );
        assert_eq!(
            value(
                f("masque_relay_datagrams_dropped_total"),
                &[("worker", "1"), ("reason", "client_not_reading")]
            ),
            1.0
        );
        assert_eq!(
            value(
                f("masque_relay_datagrams_dropped_total"),
                &[("worker", "1"), ("reason", "no_flow")]
            ),
            0.0
        );
        assert_eq!(
            value(
                f("masque_relay_handshake_failures_total"),
                &[("worker", "1"), ("reason", "timeout")]
            ),
            1.0
        );
        assert_eq!(
            value(
                f("masque_relay_io_backend_info"),
                &[("worker", "1"), ("backend", "none")]
            ),
            1.0
        );
        let hs = f("masque_relay_handshake_duration_seconds")
            .get_metric()
            .iter()
            .find(|m| m.get_label().iter().any(|l| l.value() == "0"))
            .unwrap()
            .get_histogram()
            .clone();
        assert_eq!(hs.get_sample_count(), 1);
        assert!((hs.get_sample_sum() - 0.003).abs() < 1e-9);
        let le_5ms = hs
            .get_bucket()
            .iter()
            .find(|b| b.upper_bound() == 0.005)
            .unwrap();
        assert_eq!(le_5ms.cumulative_count(), 1);
    }

    #[test]
    fn text_exposition_names_units_and_labels() {
        let stats = vec![Arc::new(WorkerStats::default())];
        stats[0]
            .flow_lifetime_seconds
            .observe(Duration::from_millis(1500));
        let text = encode(&RelayCollector::registry(&stats));
        assert!(text.contains("# TYPE masque_relay_flow_lifetime_seconds histogram\n"));
        assert!(
            text.contains("masque_relay_flow_lifetime_seconds_bucket{worker=\"0\",le=\"5\"} 1\n")
        );
        assert!(text
            .contains("masque_relay_flow_lifetime_seconds_bucket{worker=\"0\",le=\"+Inf\"} 1\n"));
        assert!(text.contains("masque_relay_flow_lifetime_seconds_sum{worker=\"0\"} 1.5\n"));
        assert!(text.contains(&format!(
            "masque_relay_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains("# TYPE masque_relay_requests_total counter\n"));
    }
}
