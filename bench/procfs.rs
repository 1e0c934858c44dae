//! What the bench reads about the relay (or the forwarder) it measures: CPU time and RSS from
//! `/proc/<pid>`, and, when the relay serves one, flow and datagram counts from `/metrics`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub at: Instant,
    /// utime + stime, in nanoseconds.
    pub cpu_ns: u64,
    /// Resident set size in KiB.
    pub rss_kib: u64,
    /// Open file descriptors (entries of `/proc/<pid>/fd`), when readable.
    pub fds: Option<u64>,
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
fn ticks_per_sec() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .map(|t| t as u64)
        .unwrap_or(100)
}

/// utime + stime in clock ticks from the text of `/proc/<pid>/stat`. The command name (field
/// 2) is in parentheses and may hold spaces, so fields are counted after the last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ... utime is field 14, stime field 15 (1-based, man 5 proc).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS in KiB from the text of `/proc/<pid>/status`.
pub fn parse_status_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Reads a process; `pid` 0 is this process.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let dir = if pid == 0 {
        "/proc/self".to_owned()
    } else {
        format!("/proc/{pid}")
    };
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    let ticks = parse_stat_ticks(&stat)?;
    let fds = std::fs::read_dir(format!("{dir}/fd"))
        .ok()
        .map(|d| d.count() as u64);
    Some(ProcSample {
        at: Instant::now(),
        cpu_ns: ticks * 1_000_000_000 / ticks_per_sec(),
        rss_kib: parse_status_rss(&status).unwrap_or(0),
        fds,
    })
}

/// Sums of the relay's metrics the bench uses.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RelayMetrics {
    pub flows_open: f64,
    /// `masque_relay_datagrams_total`, both directions, every protocol.
    pub datagrams: f64,
    /// `masque_relay_datagrams_dropped_total`, every reason.
    pub dropped: f64,
    /// The datagram engine, summed over workers: `masque_relay_io_loop_passes_total`,
    /// `masque_relay_io_completions_total`, `masque_relay_io_send_messages_total`.
    pub io_passes: f64,
    pub io_completions: f64,
    pub io_send_messages: f64,
    /// `masque_relay_buffer_pool_free`, both pools, every worker (a gauge).
    pub buffer_pool_free: f64,
    /// `masque_relay_egress_sockets`, every worker (a gauge); `None` when the relay has none.
    pub egress_sockets: Option<f64>,
    /// The `backend` label of `masque_relay_io_backend_info` (`io_uring`, `mmsg`; `mixed` when
    /// workers differ), once a worker has set it.
    pub io_backend: Option<&'static str>,
}

/// The value of label `name` in a series such as `m{a="1",name="x"}`.
fn label<'a>(series: &'a str, name: &str) -> Option<&'a str> {
    let labels = series.split_once('{')?.1.strip_suffix('}')?;
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// A backend label as a static name (the report keeps `RelayMetrics` `Copy`).
fn backend_name(label: &str) -> Option<&'static str> {
    match label {
        "io_uring" | "uring" => Some("io_uring"),
        "mmsg" => Some("mmsg"),
        "none" | "" => None,
        _ => Some("other"),
    }
}

/// Sums the series the bench needs from a Prometheus text exposition.
pub fn parse_metrics(text: &str) -> RelayMetrics {
    let mut m = RelayMetrics::default();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        match name {
            "masque_relay_flows_open" => m.flows_open += v,
            "masque_relay_datagrams_total" => m.datagrams += v,
            "masque_relay_datagrams_dropped_total" => m.dropped += v,
            "masque_relay_io_loop_passes_total" => m.io_passes += v,
            "masque_relay_io_completions_total" => m.io_completions += v,
            "masque_relay_io_send_messages_total" => m.io_send_messages += v,
            "masque_relay_buffer_pool_free" => m.buffer_pool_free += v,
            "masque_relay_egress_sockets" => {
                *m.egress_sockets.get_or_insert(0.0) += v;
            }
            "masque_relay_io_backend_info" if v > 0.0 => {
                if let Some(b) = label(series, "backend").and_then(backend_name) {
                    m.io_backend = match m.io_backend {
                        Some(a) if a != b => Some("mixed"),
                        _ => Some(b),
                    };
                }
            }
            _ => {}
        }
    }
    m
}

/// Fetches `/metrics` from `addr` (plain HTTP/1.1); `None` on any failure.
pub fn scrape(addr: SocketAddr) -> Option<RelayMetrics> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (head, text) = body.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    Some(parse_metrics(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_in_the_name() {
        let stat = "1234 (masque relay) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 \
                    3 0 100 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(300));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let s = sample(0).unwrap();
        assert!(s.rss_kib > 0);
        // At least standard input, output and error, and the directory being read.
        assert!(s.fds.is_some_and(|n| n >= 3), "{:?}", s.fds);
    }

    #[test]
    fn status_rss() {
        assert_eq!(
            parse_status_rss("Name:\tx\nVmRSS:\t   12345 kB\nThreads: 2\n"),
            Some(12345)
        );
    }

    #[test]
    fn metrics_are_summed_over_labels() {
        let text = "# HELP x\nmasque_relay_flows_open{worker=\"0\"} 3\n\
                    masque_relay_flows_open{worker=\"1\"} 4\n\
                    masque_relay_datagrams_total{protocol=\"h3\",direction=\"to_target\",worker=\"0\"} 10\n\
                    masque_relay_datagrams_total{protocol=\"h2\",direction=\"to_client\",worker=\"0\"} 5\n\
                    masque_relay_flows_opened_total{worker=\"0\"} 99\n";
        let m = parse_metrics(text);
        assert_eq!(m.flows_open, 7.0);
        assert_eq!(m.datagrams, 15.0);
        assert_eq!(m.io_backend, None);
        assert_eq!(m.egress_sockets, None);
        let egress = "masque_relay_egress_sockets{worker=\"0\"} 1563\n\
                      masque_relay_egress_sockets{worker=\"1\"} 1562\n";
        assert_eq!(parse_metrics(egress).egress_sockets, Some(3125.0));
    }

    #[test]
    fn engine_metrics_and_backend() {
        let text = "masque_relay_io_backend_info{worker=\"0\",backend=\"io_uring\"} 1\n\
                    masque_relay_io_loop_passes_total{worker=\"0\"} 10\n\
                    masque_relay_io_completions_total{worker=\"0\"} 40\n\
                    masque_relay_io_send_messages_total{worker=\"0\"} 5\n\
                    masque_relay_buffer_pool_free{worker=\"0\",pool=\"quic\"} 64\n\
                    masque_relay_buffer_pool_free{worker=\"0\",pool=\"target\"} 2000\n";
        let m = parse_metrics(text);
        assert_eq!(m.io_backend, Some("io_uring"));
        assert_eq!((m.io_passes, m.io_completions), (10.0, 40.0));
        assert_eq!(m.io_send_messages, 5.0);
        assert_eq!(m.buffer_pool_free, 2064.0);
        let two =
            format!("{text}masque_relay_io_backend_info{{backend=\"mmsg\",worker=\"1\"}} 1\n");
        assert_eq!(parse_metrics(&two).io_backend, Some("mixed"));
        let none = "masque_relay_io_backend_info{worker=\"0\",backend=\"none\"} 1\n";
        assert_eq!(parse_metrics(none).io_backend, None);
    }
}
