//! The figures of a run, as BENCH.md lists them, computed from what the client recorded, what
//! the target counted and what `/proc` said about the relay; and the ratios between runs.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::load::Recorder;
use crate::procfs::{ProcSample, RelayMetrics};
use crate::wire::TargetCounts;

/// One direction of traffic over the measured window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Direction {
    /// Datagrams sent inside the measured window.
    pub offered: u64,
    /// Of those, how many arrived (`None` when the receiving side could not be asked).
    pub delivered: Option<u64>,
    pub offered_per_sec: f64,
    pub delivered_per_sec: Option<f64>,
    /// UDP payload bits per second.
    pub offered_gbps: f64,
    pub delivered_gbps: Option<f64>,
    /// 1 - delivered / offered.
    pub loss: Option<f64>,
}

impl Direction {
    pub fn new(offered: u64, delivered: Option<u64>, size: usize, secs: f64) -> Self {
        let rate = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let gbps = |n: u64| rate(n) * size as f64 * 8.0 / 1e9;
        Direction {
            offered,
            delivered,
            offered_per_sec: rate(offered),
            delivered_per_sec: delivered.map(rate),
            offered_gbps: gbps(offered),
            delivered_gbps: delivered.map(gbps),
            loss: delivered.map(|d| loss(offered, d)),
        }
    }
}

/// 1 - delivered / offered, 0 when nothing was offered; never negative (a duplicate cannot make
/// loss negative).
pub fn loss(offered: u64, delivered: u64) -> f64 {
    if offered == 0 {
        0.0
    } else {
        (1.0 - delivered as f64 / offered as f64).max(0.0)
    }
}

/// Round-trip times in microseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rtt {
    pub samples: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Rtt {
    /// `None` for an empty histogram (of nanoseconds).
    pub fn from_histogram(h: &Histogram<u64>) -> Option<Rtt> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(Rtt {
            samples: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        })
    }
}

/// CPU, memory and flows of the measured process (the relay, or the raw forwarder).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProcFigures {
    pub pid: u32,
    /// CPU seconds (user + system) over the measured window.
    pub cpu_seconds: f64,
    /// CPU seconds per wall-clock second (1.0 = one core busy).
    pub cpu_utilisation: f64,
    /// Datagrams relayed in the window, both directions.
    pub datagrams: u64,
    /// Where `datagrams` comes from: `metrics` (the relay's own counter over the same window)
    /// or `bench` (what the target and the client received).
    pub datagrams_source: &'static str,
    pub cpu_ns_per_datagram: Option<f64>,
    pub rss_kib: u64,
    /// Resident set size at the start of the window (after set-up and warm-up).
    pub rss_start_kib: u64,
    /// Open file descriptors at the end of the window (`/proc/<pid>/fd`).
    pub fds: Option<u64>,
    /// From the relay's `/metrics`, when it serves one.
    pub flows_open: Option<u64>,
    /// Egress UDP sockets open at the end of the window, summed over workers
    /// (`masque_relay_egress_sockets`).
    pub egress_sockets: Option<u64>,
    pub dropped: Option<u64>,
    /// The datagram I/O backend the relay says it runs on (`io_uring`, `mmsg`), from
    /// `masque_relay_io_backend_info`.
    pub io_backend: Option<&'static str>,
    /// Its datagram engine over the window, when the relay reports it.
    pub engine: Option<EngineFigures>,
}

/// The relay's datagram engine over the measured window (`masque_relay_io_*` counters).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EngineFigures {
    /// Engine passes, completions (io_uring) or datagrams read (mmsg), send messages handed
    /// to the kernel (one GSO message may carry several datagrams).
    pub passes: u64,
    pub completions: u64,
    pub send_messages: u64,
    pub completions_per_pass: Option<f64>,
    pub send_messages_per_pass: Option<f64>,
    /// Relayed datagrams per pass (the relay's own datagram count over the same window).
    pub datagrams_per_pass: Option<f64>,
    /// Receive buffers free in the pools at the end of the window.
    pub buffer_pool_free: u64,
}

impl EngineFigures {
    /// `None` when the relay counted no passes (it has no such metrics).
    pub fn new(a: &RelayMetrics, b: &RelayMetrics) -> Option<Self> {
        let d = |x: f64, y: f64| (y - x).max(0.0) as u64;
        let passes = d(a.io_passes, b.io_passes);
        if passes == 0 {
            return None;
        }
        let per = |n: u64| Some(n as f64 / passes as f64);
        let completions = d(a.io_completions, b.io_completions);
        let send_messages = d(a.io_send_messages, b.io_send_messages);
        Some(EngineFigures {
            passes,
            completions,
            send_messages,
            completions_per_pass: per(completions),
            send_messages_per_pass: per(send_messages),
            datagrams_per_pass: per(d(a.datagrams, b.datagrams)),
            buffer_pool_free: b.buffer_pool_free.max(0.0) as u64,
        })
    }
}

impl ProcFigures {
    /// Figures from two samples taken at the window's edges; `metrics` are the relay's counters
    /// at the same edges, when available; `fallback` is the datagram count the bench saw.
    pub fn new(
        pid: u32,
        start: &ProcSample,
        end: &ProcSample,
        metrics: Option<(RelayMetrics, RelayMetrics)>,
        fallback: u64,
    ) -> Self {
        let cpu = end.cpu_ns.saturating_sub(start.cpu_ns);
        let wall = end.at.saturating_duration_since(start.at).as_secs_f64();
        let (datagrams, source) = match metrics {
            Some((a, b)) if b.datagrams > a.datagrams => {
                ((b.datagrams - a.datagrams) as u64, "metrics")
            }
            _ => (fallback, "bench"),
        };
        ProcFigures {
            pid,
            cpu_seconds: cpu as f64 / 1e9,
            cpu_utilisation: if wall > 0.0 {
                cpu as f64 / 1e9 / wall
            } else {
                0.0
            },
            datagrams,
            datagrams_source: source,
            cpu_ns_per_datagram: per_datagram(cpu, datagrams),
            rss_kib: end.rss_kib,
            rss_start_kib: start.rss_kib,
            fds: end.fds,
            flows_open: metrics.map(|(_, b)| b.flows_open as u64),
            egress_sockets: metrics
                .and_then(|(_, b)| b.egress_sockets)
                .map(|v| v.max(0.0) as u64),
            dropped: metrics.map(|(a, b)| (b.dropped - a.dropped).max(0.0) as u64),
            io_backend: metrics.and_then(|(a, b)| b.io_backend.or(a.io_backend)),
            engine: metrics.and_then(|(a, b)| EngineFigures::new(&a, &b)),
        }
    }
}

/// Nanoseconds per datagram; `None` without datagrams.
pub fn per_datagram(cpu_ns: u64, datagrams: u64) -> Option<f64> {
    (datagrams > 0).then(|| cpu_ns as f64 / datagrams as f64)
}

/// How the flows were set up.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Setup {
    pub connections_open: usize,
    pub flows_open: usize,
    /// Start of the run to the last flow open (or the setup timeout).
    pub seconds: f64,
    /// Start of the run to the last connection established.
    pub connect_seconds: Option<f64>,
    pub handshakes_per_sec: Option<f64>,
    /// Flows opened per second after the last connection was established (HTTP/3 and HTTP/2
    /// open flows as soon as their own connection is up, so this is an upper bound when
    /// connections are many).
    pub flows_per_sec: Option<f64>,
    /// Responses other than success, by status.
    pub refused: Vec<(u16, u64)>,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub label: String,
    pub protocol: String,
    pub mode: String,
    /// Payload bytes of each datagram (download runs: of those the target sends).
    pub size: usize,
    /// Download and upload runs: datagrams per burst.
    pub burst: Option<u16>,
    /// Download runs: bytes of each request the client sends.
    pub request_size: Option<usize>,
    /// Target ports the flows were spread over.
    pub target_ports: u16,
    pub flows: usize,
    pub connections: usize,
    /// Requested rate (datagrams/s, 0 = closed loop or unlimited) and closed-loop depth.
    pub rate: u64,
    pub inflight: u32,
    pub warmup_secs: f64,
    pub duration_secs: f64,
    pub setup: Setup,
    /// What the client sent (download runs: the requests).
    pub to_target: Direction,
    /// Echo and download runs: what the target sent back (echoes, burst datagrams) and how
    /// much of it arrived.
    pub to_client: Option<Direction>,
    /// Echo mode: 1 - echoes received / datagrams sent, known even when the target cannot be
    /// asked.
    pub round_trip_loss: Option<f64>,
    pub rtt: Option<Rtt>,
    /// The process between client and target (relay or forwarder), when there is one and its
    /// pid is known.
    pub relay: Option<ProcFigures>,
    /// The load generator's own CPU per datagram it sent or received, to show it is not the
    /// bottleneck.
    pub client_cpu_ns_per_datagram: Option<f64>,
    pub client_blocked: u64,
    /// Closed loop: datagrams the client gave up as lost after `--loss-timeout-ms` and
    /// replaced (warm-up included).
    pub client_timed_out: u64,
    pub client_foreign: u64,
    pub target: Option<TargetCounts>,
    /// The `--io-backend` the relay was started with, when this tool started it (what it
    /// actually ran on is `relay.io_backend`).
    pub io_backend_requested: Option<&'static str>,
}

impl RunReport {
    /// Datagrams the relay moved by the bench's own count (to the target, and back).
    pub fn relayed_by_count(rec: &Recorder, target: Option<&TargetCounts>) -> u64 {
        target.map(|t| t.measured).unwrap_or(rec.sent) + rec.received
    }

    /// The direction whose throughput the run measures: to the client in a download run, to
    /// the target otherwise.
    pub fn payload_direction(&self) -> &Direction {
        match (&self.to_client, self.mode.as_str()) {
            (Some(d), "download") => d,
            _ => &self.to_target,
        }
    }

    /// Datagrams per second delivered in that direction (offered, when the receiver could not
    /// be asked).
    pub fn delivered_per_sec(&self) -> f64 {
        let d = self.payload_direction();
        d.delivered_per_sec.unwrap_or(d.offered_per_sec)
    }

    /// The run's loss: round trip for echo, to the client for download, to the target else.
    pub fn loss(&self) -> Option<f64> {
        self.round_trip_loss
            .or_else(|| self.payload_direction().loss)
    }
}

/// The ratios of BENCH.md, from runs made in the same invocation.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct Ratios {
    /// Relay CPU per relayed datagram / raw-forward CPU per forwarded datagram.
    pub cpu_vs_raw_forward: Option<f64>,
    /// Relay round trip minus direct round trip, p50 and p99, in microseconds.
    pub added_rtt_p50_us: Option<f64>,
    pub added_rtt_p99_us: Option<f64>,
    /// Same for the raw forwarder.
    pub raw_forward_added_rtt_p99_us: Option<f64>,
    /// Datagrams per second delivered through the relay / directly (to the target; in
    /// download runs, to the client).
    pub delivered_vs_direct: Option<f64>,
    pub delivered_vs_raw_forward: Option<f64>,
}

impl Ratios {
    pub fn compute(relay: &RunReport, direct: Option<&RunReport>, raw: Option<&RunReport>) -> Self {
        let cpu = |r: &RunReport| r.relay.as_ref().and_then(|p| p.cpu_ns_per_datagram);
        let rate = |r: &RunReport| r.payload_direction().delivered_per_sec;
        let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let rtt = |r: &RunReport, f: fn(&Rtt) -> f64| r.rtt.as_ref().map(f);
        let sub = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a - b);
        Ratios {
            cpu_vs_raw_forward: div(cpu(relay), raw.and_then(cpu)),
            added_rtt_p50_us: sub(
                rtt(relay, |r| r.p50_us),
                direct.and_then(|d| rtt(d, |r| r.p50_us)),
            ),
            added_rtt_p99_us: sub(
                rtt(relay, |r| r.p99_us),
                direct.and_then(|d| rtt(d, |r| r.p99_us)),
            ),
            raw_forward_added_rtt_p99_us: sub(
                raw.and_then(|r| rtt(r, |r| r.p99_us)),
                direct.and_then(|d| rtt(d, |r| r.p99_us)),
            ),
            delivered_vs_direct: div(rate(relay), direct.and_then(rate)),
            delivered_vs_raw_forward: div(rate(relay), raw.and_then(rate)),
        }
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".to_owned())
}

/// A human-readable count per second: 1234567 -> "1.23M".
pub fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// The final table of one or more runs, one column per run.
pub fn table(runs: &[&RunReport]) -> String {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&RunReport) -> String| {
        rows.push((name.to_owned(), runs.iter().map(|r| f(r)).collect()));
    };
    row("run", &|r| r.label.clone());
    row("flows open", &|r| {
        format!(
            "{}/{} in {:.2}s",
            r.setup.flows_open, r.flows, r.setup.seconds
        )
    });
    row("mode", &|r| match r.burst {
        Some(b) => format!("{} (burst {b})", r.mode),
        None => r.mode.clone(),
    });
    row("to target offered/s", &|r| si(r.to_target.offered_per_sec));
    row("to target delivered/s", &|r| {
        opt(r.to_target.delivered_per_sec, si)
    });
    row("to target Gbit/s", &|r| {
        opt(r.to_target.delivered_gbps, |v| format!("{v:.3}"))
    });
    row("to target loss", &|r| {
        opt(r.to_target.loss, |v| format!("{:.3}%", v * 100.0))
    });
    row("to client offered/s", &|r| {
        opt(r.to_client.as_ref().map(|d| d.offered_per_sec), si)
    });
    row("to client delivered/s", &|r| {
        opt(r.to_client.as_ref().and_then(|d| d.delivered_per_sec), si)
    });
    row("to client Gbit/s", &|r| {
        opt(r.to_client.as_ref().and_then(|d| d.delivered_gbps), |v| {
            format!("{v:.3}")
        })
    });
    row("to client loss", &|r| {
        opt(r.to_client.as_ref().and_then(|d| d.loss), |v| {
            format!("{:.3}%", v * 100.0)
        })
    });
    row("round-trip loss", &|r| {
        opt(r.round_trip_loss, |v| format!("{:.3}%", v * 100.0))
    });
    for (name, f) in [
        ("rtt p50 us", (|r: &Rtt| r.p50_us) as fn(&Rtt) -> f64),
        ("rtt p90 us", |r| r.p90_us),
        ("rtt p99 us", |r| r.p99_us),
        ("rtt p99.9 us", |r| r.p999_us),
        ("rtt max us", |r| r.max_us),
    ] {
        row(name, &|r| opt(r.rtt.as_ref().map(f), |v| format!("{v:.1}")));
    }
    row("relay CPU ns/datagram", &|r| {
        opt(r.relay.as_ref().and_then(|p| p.cpu_ns_per_datagram), |v| {
            format!("{v:.0}")
        })
    });
    row("relay CPU use", &|r| {
        opt(r.relay.as_ref().map(|p| p.cpu_utilisation), |v| {
            format!("{:.0}%", v * 100.0)
        })
    });
    row("relay RSS MiB", &|r| {
        opt(r.relay.as_ref().map(|p| p.rss_kib as f64), |v| {
            format!("{:.1}", v / 1024.0)
        })
    });
    row("relay I/O backend", &|r| {
        let used = r.relay.as_ref().and_then(|p| p.io_backend);
        match (used, r.io_backend_requested) {
            (Some(u), Some(a)) => format!("{u} (asked {a})"),
            (Some(u), None) => u.to_owned(),
            (None, Some(a)) => format!("? (asked {a})"),
            (None, None) => "-".to_owned(),
        }
    });
    row("engine completions/pass", &|r| {
        opt(
            r.relay
                .as_ref()
                .and_then(|p| p.engine.as_ref())
                .and_then(|e| e.completions_per_pass),
            |v| format!("{v:.2}"),
        )
    });
    row("engine send msgs/pass", &|r| {
        opt(
            r.relay
                .as_ref()
                .and_then(|p| p.engine.as_ref())
                .and_then(|e| e.send_messages_per_pass),
            |v| format!("{v:.2}"),
        )
    });
    row("relay flows open", &|r| {
        r.relay
            .as_ref()
            .and_then(|p| p.flows_open)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "-".to_owned())
    });
    row("relay egress sockets", &|r| {
        r.relay
            .as_ref()
            .and_then(|p| p.egress_sockets)
            .map_or_else(|| "-".to_owned(), |v| v.to_string())
    });
    row("relay fds", &|r| {
        r.relay
            .as_ref()
            .and_then(|p| p.fds)
            .map_or_else(|| "-".to_owned(), |v| v.to_string())
    });
    row("client CPU ns/datagram", &|r| {
        opt(r.client_cpu_ns_per_datagram, |v| format!("{v:.0}"))
    });
    row("client loss timeouts", &|r| r.client_timed_out.to_string());
    let w0 = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..runs.len())
        .map(|i| rows.iter().map(|(_, v)| v[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (name, vals) in &rows {
        out.push_str(&format!("{name:<w0$}"));
        for (v, w) in vals.iter().zip(&widths) {
            out.push_str(&format!("  {v:>w$}"));
        }
        out.push('\n');
    }
    out
}

/// The ratio lines printed under a baseline table.
pub fn ratio_lines(r: &Ratios) -> String {
    let mut out = String::new();
    let line = |name: &str, v: Option<f64>, unit: &str| match v {
        Some(v) => format!("{name}: {v:.3}{unit}\n"),
        None => format!("{name}: -\n"),
    };
    out.push_str(&line(
        "relay CPU per datagram / raw-forward",
        r.cpu_vs_raw_forward,
        "",
    ));
    out.push_str(&line(
        "added rtt p50 over direct",
        r.added_rtt_p50_us,
        " us",
    ));
    out.push_str(&line(
        "added rtt p99 over direct",
        r.added_rtt_p99_us,
        " us",
    ));
    out.push_str(&line(
        "raw-forward added rtt p99 over direct",
        r.raw_forward_added_rtt_p99_us,
        " us",
    ));
    out.push_str(&line(
        "delivered rate, relay / direct",
        r.delivered_vs_direct,
        "",
    ));
    out.push_str(&line(
        "delivered rate, relay / raw-forward",
        r.delivered_vs_raw_forward,
        "",
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn direction_rates_and_loss() {
        let d = Direction::new(1000, Some(990), 1250, 2.0);
        assert_eq!(d.offered_per_sec, 500.0);
        assert_eq!(d.delivered_per_sec, Some(495.0));
        // 495 * 1250 * 8 = 4.95 Mbit/s
        assert!((d.delivered_gbps.unwrap() - 0.00495).abs() < 1e-12);
        assert!((d.loss.unwrap() - 0.01).abs() < 1e-12);
        assert_eq!(loss(0, 0), 0.0);
        assert_eq!(loss(10, 12), 0.0);
        assert_eq!(Direction::new(5, None, 64, 1.0).loss, None);
    }

    #[test]
    fn percentiles_from_the_histogram() {
        let mut h = crate::load::new_histogram();
        // 1..=1000 microseconds, once each.
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let r = Rtt::from_histogram(&h).unwrap();
        assert_eq!(r.samples, 1000);
        let near = |a: f64, b: f64| (a - b).abs() <= b * 0.001 + 0.001;
        assert!(near(r.p50_us, 500.0), "{}", r.p50_us);
        assert!(near(r.p90_us, 900.0), "{}", r.p90_us);
        assert!(near(r.p99_us, 990.0), "{}", r.p99_us);
        assert!(near(r.p999_us, 999.0), "{}", r.p999_us);
        assert!(near(r.max_us, 1000.0), "{}", r.max_us);
        assert!(near(r.mean_us, 500.5), "{}", r.mean_us);
        assert_eq!(Rtt::from_histogram(&crate::load::new_histogram()), None);
    }

    fn report(cpu_ns: Option<f64>, p50: f64, p99: f64, delivered: f64) -> RunReport {
        RunReport {
            label: "x".into(),
            protocol: "h3".into(),
            mode: "echo".into(),
            size: 1200,
            burst: None,
            request_size: None,
            target_ports: 1,
            flows: 1,
            connections: 1,
            rate: 0,
            inflight: 1,
            warmup_secs: 0.0,
            duration_secs: 1.0,
            setup: Setup::default(),
            to_target: Direction::new(delivered as u64, Some(delivered as u64), 1200, 1.0),
            to_client: None,
            round_trip_loss: None,
            rtt: Some(Rtt {
                samples: 1,
                p50_us: p50,
                p90_us: p50,
                p99_us: p99,
                p999_us: p99,
                max_us: p99,
                mean_us: p50,
            }),
            relay: cpu_ns.map(|c| ProcFigures {
                pid: 1,
                cpu_seconds: 0.0,
                cpu_utilisation: 0.0,
                datagrams: 1,
                datagrams_source: "bench",
                cpu_ns_per_datagram: Some(c),
                rss_kib: 0,
                rss_start_kib: 0,
                fds: None,
                flows_open: None,
                egress_sockets: None,
                dropped: None,
                io_backend: None,
                engine: None,
            }),
            client_cpu_ns_per_datagram: None,
            client_blocked: 0,
            client_timed_out: 0,
            client_foreign: 0,
            target: None,
            io_backend_requested: None,
        }
    }

    #[test]
    fn ratios() {
        let relay = report(Some(700.0), 60.0, 120.0, 50_000.0);
        let direct = report(None, 20.0, 40.0, 100_000.0);
        let raw = report(Some(1750.0), 30.0, 70.0, 80_000.0);
        let r = Ratios::compute(&relay, Some(&direct), Some(&raw));
        assert_eq!(r.cpu_vs_raw_forward, Some(0.4));
        assert_eq!(r.added_rtt_p50_us, Some(40.0));
        assert_eq!(r.added_rtt_p99_us, Some(80.0));
        assert_eq!(r.raw_forward_added_rtt_p99_us, Some(30.0));
        assert_eq!(r.delivered_vs_direct, Some(0.5));
        assert_eq!(r.delivered_vs_raw_forward, Some(0.625));
        let none = Ratios::compute(&relay, None, None);
        assert_eq!(none, Ratios::default());
        assert!(table(&[&relay, &direct]).contains("rtt p99 us"));
    }

    /// A download run's throughput and loss are those of what reached the client; its ratios
    /// compare that.
    #[test]
    fn download_runs_count_what_reached_the_client() {
        let mut relay = report(Some(500.0), 0.0, 0.0, 1_000.0);
        relay.mode = "download".into();
        relay.to_client = Some(Direction::new(16_000, Some(15_200), 1200, 1.0));
        let mut direct = relay.clone();
        direct.to_client = Some(Direction::new(32_000, Some(32_000), 1200, 1.0));
        assert_eq!(relay.delivered_per_sec(), 15_200.0);
        assert!((relay.loss().unwrap() - 0.05).abs() < 1e-12);
        let r = Ratios::compute(&relay, Some(&direct), None);
        assert_eq!(r.delivered_vs_direct, Some(0.475));
        let echo = report(None, 1.0, 1.0, 2_000.0);
        assert_eq!(echo.delivered_per_sec(), 2_000.0);
        assert_eq!(echo.loss(), Some(0.0));
    }

    #[test]
    fn proc_figures_prefer_the_relays_own_count() {
        let t = Instant::now();
        let a = ProcSample {
            at: t,
            cpu_ns: 1_000_000_000,
            rss_kib: 1000,
            fds: Some(10),
        };
        let b = ProcSample {
            at: t + Duration::from_secs(2),
            cpu_ns: 2_000_000_000,
            rss_kib: 2000,
            fds: Some(12),
        };
        let p = ProcFigures::new(7, &a, &b, None, 1_000_000);
        assert_eq!(p.cpu_ns_per_datagram, Some(1000.0));
        assert_eq!(p.cpu_utilisation, 0.5);
        assert_eq!(p.datagrams_source, "bench");
        assert_eq!((p.rss_start_kib, p.rss_kib, p.fds), (1000, 2000, Some(12)));
        assert_eq!((p.io_backend, p.engine.as_ref()), (None, None));
        let m0 = RelayMetrics {
            flows_open: 10.0,
            datagrams: 100.0,
            dropped: 0.0,
            io_passes: 1_000.0,
            io_completions: 5_000.0,
            io_send_messages: 500.0,
            buffer_pool_free: 2_000.0,
            egress_sockets: Some(3.0),
            io_backend: Some("io_uring"),
        };
        let m1 = RelayMetrics {
            flows_open: 10.0,
            datagrams: 2_000_100.0,
            dropped: 3.0,
            io_passes: 101_000.0,
            io_completions: 1_005_000.0,
            io_send_messages: 250_500.0,
            buffer_pool_free: 2_100.0,
            egress_sockets: Some(5.0),
            io_backend: Some("io_uring"),
        };
        let p = ProcFigures::new(7, &a, &b, Some((m0, m1)), 1_000_000);
        assert_eq!(p.cpu_ns_per_datagram, Some(500.0));
        assert_eq!(p.datagrams_source, "metrics");
        assert_eq!(p.flows_open, Some(10));
        assert_eq!((p.egress_sockets, p.fds), (Some(5), Some(12)));
        assert_eq!(p.dropped, Some(3));
        assert_eq!(p.io_backend, Some("io_uring"));
        let e = p.engine.unwrap();
        assert_eq!(e.passes, 100_000);
        assert_eq!(e.completions_per_pass, Some(10.0));
        assert_eq!(e.send_messages_per_pass, Some(2.5));
        assert_eq!(e.datagrams_per_pass, Some(20.0));
        assert_eq!(e.buffer_pool_free, 2_100);
    }
}
