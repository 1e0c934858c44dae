//! The suite of BENCH.md ({h3, h2} x {64, 1200 B} x {1, 100, 10 000 flows} x {echo, one-way},
//! and download and upload at 1200 B; baselines in the same repetition, three repetitions,
//! medians with min-max in one Markdown table), and the flow-scale and setup-rate measurements.
//!
//! The relay is started fresh for every measured run (so its RSS and flow count belong to that
//! run), pinned to `--relay-core`; the raw forwarder is pinned there too; the load generator and
//! the target share `--client-core`.
//!
//! A second section, "io_uring vs mmsg", runs the same relay build with `--io-backend uring`
//! and `--io-backend mmsg` back to back on the cells BENCH.md sets targets for (HTTP/3 1200 B
//! and 64 B echo, HTTP/2 1200 B echo, 100 flows), with a raw-forward baseline per cell, and
//! reports relay CPU per relayed datagram for each backend, their ratio within each repetition,
//! and the engine's completions and send messages per pass from the relay's metrics.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::report::{Ratios, RunReport};
use crate::run::{Mode, Protocol};
use crate::spawn::IoBackend;
use crate::{spawn, target, BenchError, LoadArgs, RelayUnderTest};

#[derive(Debug, clap::Args)]
pub struct SuiteArgs {
    /// The relay binary to measure.
    #[arg(long, default_value = "target/release/masque-relay")]
    relay_bin: PathBuf,
    /// Shorter runs and fewer cells (1 and 100 flows), for a small box or a short session.
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Protocols measured.
    #[arg(long, value_delimiter = ',', default_value = "h3,h2")]
    protocols: Vec<Protocol>,
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    #[arg(long, value_delimiter = ',')]
    flows: Option<Vec<usize>>,
    /// Traffic shapes (echo, oneway, download, upload). Default: echo and oneway in every cell,
    /// download and upload at 1200 B only (download only where flows x burst <= 16384, so the
    /// bursts in flight fit the socket buffers on the way).
    #[arg(long, value_delimiter = ',')]
    modes: Option<Vec<Mode>>,
    /// Download and upload: datagrams per burst.
    #[arg(long, default_value_t = 16)]
    burst: u16,
    /// Measured seconds per run (default 5, or 2 with --quick).
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up seconds per run (default 1, or 0.5 with --quick).
    #[arg(long)]
    warmup: Option<f64>,
    #[arg(long, default_value_t = 0)]
    relay_core: usize,
    #[arg(long, default_value_t = 1)]
    client_core: usize,
    /// Skip the direct and raw-forward baselines.
    #[arg(long)]
    no_baselines: bool,
    /// Also write the Markdown table here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Every run of every repetition as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The relay's datagram I/O backend for the matrix (passed as its --io-backend).
    #[arg(long, value_enum, default_value = "auto")]
    io_backend: IoBackend,
    /// Skip the "io_uring vs mmsg" section.
    #[arg(long, conflicts_with = "io_compare_only")]
    no_io_compare: bool,
    /// Run only the "io_uring vs mmsg" section, not the matrix.
    #[arg(long)]
    io_compare_only: bool,
    /// Repetitions of the "io_uring vs mmsg" section (default --reps, or 1 with --quick).
    #[arg(long)]
    io_compare_reps: Option<usize>,
    /// Measured seconds per run of that section (default as the matrix, or 3 with --quick).
    #[arg(long)]
    io_compare_duration: Option<f64>,
}

/// The cells of the "io_uring vs mmsg" section: the BENCH.md ratio targets, 100 flows, echo.
const IO_COMPARE_CELLS: [(Protocol, usize); 3] = [
    (Protocol::H3, 1200),
    (Protocol::H3, 64),
    (Protocol::H2, 1200),
];
const IO_COMPARE_FLOWS: usize = 100;

/// The size at which the default matrix measures download and upload.
const BURST_CELL_SIZE: usize = 1200;
/// Default matrix: download cells only where flows x burst stays within this many datagrams in
/// flight.
const MAX_DOWNLOAD_IN_FLIGHT: usize = 16_384;

/// The (size, flows, mode) cells of the matrix, in order: every combination of `modes` when
/// given; else echo and oneway everywhere, download and upload at [`BURST_CELL_SIZE`] only.
fn matrix_cells(
    sizes: &[usize],
    flows: &[usize],
    modes: Option<&[Mode]>,
    burst: u16,
) -> Vec<(usize, usize, Mode)> {
    let all = [Mode::Echo, Mode::Oneway, Mode::Download, Mode::Upload];
    let mut out = Vec::new();
    for &size in sizes {
        for &f in flows {
            for &mode in modes.unwrap_or(&all) {
                let default_cell = match mode {
                    Mode::Echo | Mode::Oneway => true,
                    Mode::Upload => size == BURST_CELL_SIZE,
                    Mode::Download => {
                        size == BURST_CELL_SIZE
                            && f.saturating_mul(usize::from(burst)) <= MAX_DOWNLOAD_IN_FLIGHT
                    }
                };
                if modes.is_some() || default_cell {
                    out.push((size, f, mode));
                }
            }
        }
    }
    out
}

/// Download and upload bursts when not told.
const DEFAULT_BURST: u16 = 16;

/// Closed loop: 64 datagrams in flight in total for few flows, one per flow for many (a
/// download request stands for its burst).
fn closed_inflight(flows: usize, mode: Mode, burst: u16) -> u32 {
    let per_request = if mode == Mode::Download {
        usize::from(burst.max(1))
    } else {
        1
    };
    (64 / flows.max(1).saturating_mul(per_request)).max(1) as u32
}

/// The `udp` load through a raw forwarder started for it (pinned to `core`, living `lifetime`):
/// `Err` when the forwarder does not start, `None` (and a line on standard error) when the run
/// fails.
fn raw_forward(
    udp: &LoadArgs,
    label: &str,
    target: std::net::SocketAddr,
    core: usize,
    lifetime: Duration,
) -> Result<Option<crate::report::RunReport>, BenchError> {
    let fwd = spawn::start_forwarder(target, Some(core), lifetime)?;
    match crate::run::run(udp.spec(label, fwd.addr, target, Some(fwd.pid()), None)) {
        Ok(r) => Ok(Some(r)),
        Err(e) => {
            eprintln!("suite: {label}: {e}");
            Ok(None)
        }
    }
}

/// The LoadArgs of a suite cell.
fn cell_args(
    relay_core: usize,
    client_core: usize,
    protocol: Protocol,
    size: usize,
    flows: usize,
    mode: Mode,
    (warmup, duration): (f64, f64),
) -> LoadArgs {
    let burst = DEFAULT_BURST;
    LoadArgs {
        relay: "127.0.0.1:4433".parse().expect("literal"),
        relay_bin: None,
        relay_pid: None,
        relay_metrics: None,
        target: None,
        protocol,
        size,
        burst,
        flows,
        connections: 0,
        target_ports: 1,
        duration,
        warmup,
        rate: 0,
        inflight: closed_inflight(flows, mode, burst),
        loss_timeout_ms: crate::load::LOSS_TIMEOUT.as_millis() as u64,
        io_backend: IoBackend::Auto,
        mode,
        insecure: true,
        ca: None,
        server_name: "localhost".into(),
        uri_template: "/.well-known/masque/udp/{target_host}/{target_port}/".into(),
        relay_core,
        client_core,
        setup_timeout: 60,
        json: None,
        quiet: true,
    }
}

/// One run of the suite, with the repetition it belongs to.
#[derive(Debug, Clone, Serialize)]
struct SuiteRun {
    rep: usize,
    /// `h3`, `h2`, `direct` or `raw-forward`.
    what: String,
    report: RunReport,
    /// Ratios to the baselines of the same repetition (relay runs only).
    ratios: Option<Ratios>,
}

/// One run of the "io_uring vs mmsg" section.
#[derive(Debug, Clone, Serialize)]
struct IoRun {
    rep: usize,
    /// `h3`, `h2` or `raw-forward`.
    what: String,
    /// The backend asked for (`uring`, `mmsg`); `None` for the raw forwarder.
    backend: Option<IoBackend>,
    report: RunReport,
    /// Relay CPU per datagram over the raw forwarder's, same cell and repetition.
    cpu_vs_raw_forward: Option<f64>,
    /// On the io_uring run: its CPU per datagram over the mmsg run's, same cell and repetition.
    uring_over_mmsg: Option<f64>,
}

/// "median [min–max]" of the values, or "-".
pub fn median_range(values: &[f64], fmt: impl Fn(f64) -> String) -> String {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return "-".into();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    if n == 1 {
        fmt(median)
    } else {
        format!("{} [{}–{}]", fmt(median), fmt(v[0]), fmt(v[n - 1]))
    }
}

fn markdown(runs: &[SuiteRun], keys: &[(String, usize, usize, Mode)]) -> String {
    let mut out = String::from(
        "| run | size B | flows | mode | delivered /s | relay CPU ns/datagram | \
         CPU vs raw-forward | RTT p50 us | RTT p99 us | added p99 vs direct us | loss |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (what, size, flows, mode) in keys {
        let sel: Vec<&SuiteRun> = runs
            .iter()
            .filter(|r| {
                &r.what == what
                    && r.report.size == *size
                    && r.report.flows == *flows
                    && r.report.mode == mode.as_str()
            })
            .collect();
        if sel.is_empty() {
            continue;
        }
        let col = |f: &dyn Fn(&SuiteRun) -> Option<f64>| -> Vec<f64> {
            sel.iter().filter_map(|r| f(r)).collect()
        };
        let rate = col(&|r| Some(r.report.delivered_per_sec()));
        let cpu = col(&|r| r.report.relay.as_ref().and_then(|p| p.cpu_ns_per_datagram));
        let ratio = col(&|r| r.ratios.as_ref().and_then(|x| x.cpu_vs_raw_forward));
        let p50 = col(&|r| r.report.rtt.as_ref().map(|x| x.p50_us));
        let p99 = col(&|r| r.report.rtt.as_ref().map(|x| x.p99_us));
        let added = col(&|r| r.ratios.as_ref().and_then(|x| x.added_rtt_p99_us));
        let loss = col(&|r| r.report.loss());
        out.push_str(&format!(
            "| {what} | {size} | {flows} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            mode.as_str(),
            median_range(&rate, crate::report::si),
            median_range(&cpu, |v| format!("{v:.0}")),
            median_range(&ratio, |v| format!("{v:.2}")),
            median_range(&p50, |v| format!("{v:.0}")),
            median_range(&p99, |v| format!("{v:.0}")),
            median_range(&added, |v| format!("{v:.0}")),
            median_range(&loss, |v| format!("{:.2}%", v * 100.0)),
        ));
    }
    out
}

pub fn suite(a: SuiteArgs) -> Result<(), BenchError> {
    let sizes = a.sizes.clone().unwrap_or(vec![64, 1200]);
    let flows = a.flows.clone().unwrap_or(if a.quick {
        vec![1, 100]
    } else {
        vec![1, 100, 10_000]
    });
    let duration = a.duration.unwrap_or(if a.quick { 2.0 } else { 5.0 });
    let warmup = a.warmup.unwrap_or(if a.quick { 0.5 } else { 1.0 });
    spawn::raise_nofile(2 * flows.iter().copied().max().unwrap_or(1) as u64 + 4096);
    let target =
        target::TargetThread::start("127.0.0.1:0".parse().expect("literal"), Some(a.client_core))?;
    crate::pin(Some(a.client_core));
    let cells = matrix_cells(&sizes, &flows, a.modes.as_deref(), a.burst);
    let mut keys = Vec::new();
    for &(size, f, mode) in &cells {
        for p in &a.protocols {
            keys.push((p.as_str().to_owned(), size, f, mode));
        }
        if !a.no_baselines {
            keys.push(("raw-forward".to_owned(), size, f, mode));
            keys.push(("direct".to_owned(), size, f, mode));
        }
    }
    let mut runs: Vec<SuiteRun> = Vec::new();
    let mut n = 0;
    let matrix_reps = if a.io_compare_only { 0 } else { a.reps };
    for rep in 1..=matrix_reps {
        for &(size, f, mode) in &cells {
            n += 1;
            eprintln!(
                "suite: repetition {rep}/{}, cell {n}/{} ({size} B, {f} flows, {})",
                a.reps,
                cells.len() * a.reps,
                mode.as_str()
            );
            let mut base = cell_args(
                a.relay_core,
                a.client_core,
                Protocol::Udp,
                size,
                f,
                mode,
                (warmup, duration),
            );
            base.burst = a.burst;
            base.inflight = closed_inflight(f, mode, a.burst);
            let (mut direct, mut raw) = (None, None);
            if !a.no_baselines {
                let mut udp = base.clone();
                udp.connections = f.div_ceil(100).max(1);
                let label = format!("direct-{size}B-{f}f-{}", mode.as_str());
                match crate::run::run(udp.spec(&label, target.addr, target.addr, None, None)) {
                    Ok(r) => direct = Some(r),
                    Err(e) => eprintln!("suite: {label}: {e}"),
                }
                let lifetime = Duration::from_secs_f64(warmup + duration + 90.0);
                let label = format!("raw-forward-{size}B-{f}f-{}", mode.as_str());
                raw = raw_forward(&udp, &label, target.addr, a.relay_core, lifetime)?;
            }
            for &p in &a.protocols {
                let mut args = base.clone();
                args.protocol = p;
                let label = format!("{}-{size}B-{f}f-{}", p.as_str(), mode.as_str());
                match relay_run(&a, &args, &label, a.io_backend, target.addr) {
                    Ok(r) => {
                        let ratios = Ratios::compute(&r, direct.as_ref(), raw.as_ref());
                        eprintln!(
                            "suite: {label}: {}/s delivered, relay {} ns/datagram, \
                             ratio to raw-forward {}",
                            crate::report::si(r.delivered_per_sec()),
                            r.relay
                                .as_ref()
                                .and_then(|p| p.cpu_ns_per_datagram)
                                .map_or("-".into(), |v| format!("{v:.0}")),
                            ratios
                                .cpu_vs_raw_forward
                                .map_or("-".into(), |v| format!("{v:.2}")),
                        );
                        runs.push(SuiteRun {
                            rep,
                            what: p.as_str().into(),
                            report: r,
                            ratios: Some(ratios),
                        });
                    }
                    Err(e) => eprintln!("suite: {label}: {e}"),
                }
            }
            for (what, r) in [("direct", direct), ("raw-forward", raw)] {
                if let Some(report) = r {
                    runs.push(SuiteRun {
                        rep,
                        what: what.into(),
                        report,
                        ratios: None,
                    });
                }
            }
        }
        n = 0;
    }
    let io_runs = if a.no_io_compare {
        Vec::new()
    } else {
        io_compare(&a, warmup, duration, &target)
    };
    let mut table = String::new();
    if !a.io_compare_only {
        table.push_str(&markdown(&runs, &keys));
        if cells
            .iter()
            .any(|c| matches!(c.2, Mode::Download | Mode::Upload))
        {
            table.push_str(&format!(
                "\ndelivered /s: datagrams that reached the target, or in download rows the \
                 client (each request answered by a burst of {} datagrams sent as GSO trains); \
                 upload rows send bursts of {} per flow back to back (GSO trains over plain \
                 UDP). Loss: round trip (echo), to the client (download), to the target \
                 (oneway, upload).\n",
                a.burst, a.burst
            ));
        }
        table.push_str(&backend_line(
            runs.iter()
                .filter(|r| r.report.relay.is_some() && r.ratios.is_some())
                .map(|r| &r.report),
            a.io_backend,
        ));
    }
    if !a.no_io_compare {
        if !table.is_empty() {
            table.push('\n');
        }
        table.push_str(&io_markdown(&io_runs));
    }
    println!("{table}");
    if let Some(p) = &a.markdown {
        std::fs::write(p, &table)?;
    }
    crate::write_json(
        &a.json,
        &serde_json::json!({ "runs": runs, "io_compare": io_runs }),
    )?;
    Ok(())
}

/// Starts a fresh relay with `backend`, runs `args` through it to `target`, stops it.
fn relay_run(
    a: &SuiteArgs,
    args: &LoadArgs,
    label: &str,
    backend: IoBackend,
    target: std::net::SocketAddr,
) -> Result<RunReport, BenchError> {
    let proc = spawn::start_relay(&a.relay_bin, Some(a.relay_core), &backend.relay_args())?;
    let relay = RelayUnderTest {
        addr: proc.addr,
        pid: Some(proc.pid()),
        metrics: proc.metrics,
        proc: None,
        io_backend: Some(backend),
    };
    let r = crate::run::run(
        args.spec(label, relay.addr, target, relay.pid, relay.metrics)
            .with_io_backend(relay.io_backend),
    );
    drop(proc);
    r
}

/// "relay I/O backend: io_uring (asked auto)", from what the relays of `runs` reported.
fn backend_line<'a>(runs: impl Iterator<Item = &'a RunReport>, asked: IoBackend) -> String {
    let mut used: Vec<&str> = runs
        .map(|r| {
            r.relay
                .as_ref()
                .and_then(|p| p.io_backend)
                .unwrap_or("unknown")
        })
        .collect();
    used.sort_unstable();
    used.dedup();
    if used.is_empty() {
        return String::new();
    }
    format!(
        "\nrelay I/O backend: {} (asked {})\n",
        used.join(", "),
        asked.as_str()
    )
}

/// The "io_uring vs mmsg" section: per repetition and cell, a raw-forward baseline, then the
/// relay with each backend (the order alternates between repetitions, so drift of the box
/// does not always favour the same one).
fn io_compare(
    a: &SuiteArgs,
    warmup: f64,
    matrix_duration: f64,
    target: &target::TargetThread,
) -> Vec<IoRun> {
    let reps = a
        .io_compare_reps
        .unwrap_or(if a.quick { 1 } else { a.reps })
        .max(1);
    let duration = a
        .io_compare_duration
        .unwrap_or(if a.quick { 3.0 } else { matrix_duration });
    let mut out: Vec<IoRun> = Vec::new();
    let sizes: Vec<usize> = {
        let mut s: Vec<usize> = IO_COMPARE_CELLS.iter().map(|c| c.1).collect();
        s.sort_unstable();
        s.dedup();
        s
    };
    for rep in 1..=reps {
        eprintln!("suite: io_uring vs mmsg, repetition {rep}/{reps}");
        for &size in &sizes {
            let base = cell_args(
                a.relay_core,
                a.client_core,
                Protocol::Udp,
                size,
                IO_COMPARE_FLOWS,
                Mode::Echo,
                (warmup, duration),
            );
            // The raw forwarder of this size, once per repetition.
            let mut raw = None;
            let mut udp = base.clone();
            udp.connections = IO_COMPARE_FLOWS.div_ceil(100);
            let label = format!("raw-forward-{size}B-{IO_COMPARE_FLOWS}f-echo");
            let lifetime = Duration::from_secs_f64(warmup + duration + 90.0);
            match raw_forward(&udp, &label, target.addr, a.relay_core, lifetime) {
                Ok(r) => raw = r,
                Err(e) => eprintln!("suite: {label}: {e}"),
            }
            let raw_cpu = raw
                .as_ref()
                .and_then(|r| r.relay.as_ref())
                .and_then(|p| p.cpu_ns_per_datagram);
            for &(p, _) in IO_COMPARE_CELLS.iter().filter(|c| c.1 == size) {
                let mut args = base.clone();
                args.protocol = p;
                let order = if rep % 2 == 1 {
                    [IoBackend::Uring, IoBackend::Mmsg]
                } else {
                    [IoBackend::Mmsg, IoBackend::Uring]
                };
                let mut got: Vec<IoRun> = Vec::new();
                for backend in order {
                    let label = format!(
                        "{}-{size}B-{IO_COMPARE_FLOWS}f-echo-{}",
                        p.as_str(),
                        backend.as_str()
                    );
                    match relay_run(a, &args, &label, backend, target.addr) {
                        Ok(r) => {
                            let cpu = r.relay.as_ref().and_then(|x| x.cpu_ns_per_datagram);
                            let engine = r.relay.as_ref().and_then(|x| x.engine.as_ref());
                            eprintln!(
                                "suite: {label}: relay {} ns/datagram on {}, {} completions/pass, \
                                 {} send msgs/pass",
                                cpu.map_or("-".into(), |v| format!("{v:.0}")),
                                r.relay
                                    .as_ref()
                                    .and_then(|x| x.io_backend)
                                    .unwrap_or("unknown"),
                                engine
                                    .and_then(|e| e.completions_per_pass)
                                    .map_or("-".into(), |v| format!("{v:.2}")),
                                engine
                                    .and_then(|e| e.send_messages_per_pass)
                                    .map_or("-".into(), |v| format!("{v:.2}")),
                            );
                            got.push(IoRun {
                                rep,
                                what: p.as_str().into(),
                                backend: Some(backend),
                                cpu_vs_raw_forward: cpu.zip(raw_cpu).map(|(c, r)| c / r),
                                report: r,
                                uring_over_mmsg: None,
                            });
                        }
                        Err(e) => eprintln!("suite: {label}: {e}"),
                    }
                }
                let cpu_of = |b: IoBackend, runs: &[IoRun]| {
                    runs.iter()
                        .find(|r| r.backend == Some(b))
                        .and_then(|r| r.report.relay.as_ref())
                        .and_then(|x| x.cpu_ns_per_datagram)
                };
                let ratio = cpu_of(IoBackend::Uring, &got)
                    .zip(cpu_of(IoBackend::Mmsg, &got))
                    .filter(|(_, m)| *m > 0.0)
                    .map(|(u, m)| u / m);
                if let Some(x) = ratio {
                    eprintln!(
                        "suite: {} {size} B: relay CPU per datagram, io_uring / mmsg = {x:.2}",
                        p.as_str()
                    );
                }
                for r in &mut got {
                    if r.backend == Some(IoBackend::Uring) {
                        r.uring_over_mmsg = ratio;
                    }
                }
                out.extend(got);
            }
            if let Some(report) = raw {
                out.push(IoRun {
                    rep,
                    what: "raw-forward".into(),
                    backend: None,
                    report,
                    cpu_vs_raw_forward: None,
                    uring_over_mmsg: None,
                });
            }
        }
    }
    out
}

/// The "io_uring vs mmsg" table: medians [min–max] over the repetitions.
fn io_markdown(runs: &[IoRun]) -> String {
    let mut out = String::from(
        "### io_uring vs mmsg (same build, same run)\n\n\
         | run | size B | flows | backend asked (used) | relay CPU ns/datagram | io_uring / mmsg | \
         CPU vs raw-forward | delivered to target /s | RTT p99 us | loss | completions/pass | \
         send msgs/pass | datagrams/pass |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut rows: Vec<(String, usize, Option<IoBackend>)> = Vec::new();
    for &(p, size) in &IO_COMPARE_CELLS {
        for b in [IoBackend::Uring, IoBackend::Mmsg] {
            rows.push((p.as_str().into(), size, Some(b)));
        }
    }
    for size in [1200, 64] {
        rows.push(("raw-forward".into(), size, None));
    }
    for (what, size, backend) in rows {
        let sel: Vec<&IoRun> = runs
            .iter()
            .filter(|r| r.what == what && r.report.size == size && r.backend == backend)
            .collect();
        if sel.is_empty() {
            continue;
        }
        let col = |f: &dyn Fn(&IoRun) -> Option<f64>| -> Vec<f64> {
            sel.iter().filter_map(|r| f(r)).collect()
        };
        let engine = |r: &IoRun| r.report.relay.as_ref().and_then(|p| p.engine.clone());
        let cpu = col(&|r| r.report.relay.as_ref().and_then(|p| p.cpu_ns_per_datagram));
        let ratio = col(&|r| r.uring_over_mmsg);
        let vs_raw = col(&|r| r.cpu_vs_raw_forward);
        let rate = col(&|r| {
            r.report
                .to_target
                .delivered_per_sec
                .or(Some(r.report.to_target.offered_per_sec))
        });
        let p99 = col(&|r| r.report.rtt.as_ref().map(|x| x.p99_us));
        let loss = col(&|r| r.report.round_trip_loss.or(r.report.to_target.loss));
        let cpp = col(&|r| engine(r).and_then(|e| e.completions_per_pass));
        let spp = col(&|r| engine(r).and_then(|e| e.send_messages_per_pass));
        let dpp = col(&|r| engine(r).and_then(|e| e.datagrams_per_pass));
        let mut used: Vec<&str> = sel
            .iter()
            .filter_map(|r| r.report.relay.as_ref().and_then(|p| p.io_backend))
            .collect();
        used.sort_unstable();
        used.dedup();
        let backend = match backend {
            Some(b) => format!(
                "{} ({})",
                b.as_str(),
                if used.is_empty() {
                    "unknown".to_owned()
                } else {
                    used.join(", ")
                }
            ),
            None => "-".into(),
        };
        let f2 = |v: f64| format!("{v:.2}");
        out.push_str(&format!(
            "| {what} | {size} | {IO_COMPARE_FLOWS} | {backend} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            median_range(&cpu, |v| format!("{v:.0}")),
            median_range(&ratio, f2),
            median_range(&vs_raw, f2),
            median_range(&rate, crate::report::si),
            median_range(&p99, |v| format!("{v:.0}")),
            median_range(&loss, |v| format!("{:.2}%", v * 100.0)),
            median_range(&cpp, f2),
            median_range(&spp, f2),
            median_range(&dpp, f2),
        ));
    }
    let reps = runs.iter().map(|r| r.rep).max().unwrap_or(0);
    out.push_str(&format!(
        "\n{reps} repetition(s), echo, {IO_COMPARE_FLOWS} flows; \"io_uring / mmsg\" is relay CPU \
         per relayed datagram with `--io-backend uring` over `--io-backend mmsg`, paired within \
         each repetition (below 1: io_uring cheaper); per-pass figures are the relay's \
         masque_relay_io_* counters over the measured window.\n"
    ));
    out
}

#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    #[arg(long, default_value = "target/release/masque-relay")]
    relay_bin: PathBuf,
    #[arg(long, value_enum, default_value = "h3")]
    protocol: Protocol,
    /// Flow counts to open, one fresh relay each.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    steps: Vec<usize>,
    /// Flows per connection (the relay allows 256 by default).
    #[arg(long, default_value_t = 250)]
    per_connection: usize,
    /// Target ports the flows are spread over (flow i to port base + i % N; the in-process
    /// echo target serves them all on one thread). The relay shares an egress socket between
    /// flows to different targets, but flows to one target address need a local port each.
    #[arg(long, default_value_t = 64)]
    target_ports: u16,
    #[arg(long, default_value_t = 0)]
    relay_core: usize,
    #[arg(long, default_value_t = 1)]
    client_core: usize,
    /// The relay's datagram I/O backend (passed as its --io-backend).
    #[arg(long, value_enum, default_value = "auto")]
    io_backend: IoBackend,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct ScaleStep {
    /// The backend the relay reported running on, and the one asked for.
    io_backend: Option<&'static str>,
    io_backend_requested: IoBackend,
    flows_asked: usize,
    flows_open: usize,
    relay_flows_open: Option<u64>,
    target_ports: u16,
    /// The relay's egress UDP sockets with the flows open (`masque_relay_egress_sockets`,
    /// summed over workers).
    egress_sockets: Option<u64>,
    /// The relay's open file descriptors with the flows open (`/proc/<pid>/fd`).
    relay_fds: Option<u64>,
    setup_seconds: f64,
    /// The relay's RSS before any flow, with every flow open and idle (after set-up, before
    /// the first datagram), and after a datagram each way on every flow.
    rss_idle_kib: u64,
    rss_open_kib: u64,
    rss_kib: u64,
    /// RSS per flow with the flows open and idle: (rss_open - rss_idle) / flows_open.
    idle_bytes_per_flow: Option<f64>,
    /// RSS per flow after the traffic: (rss - rss_idle) / flows_open.
    bytes_per_flow: Option<f64>,
}

/// The relay's limits for a flow-scale run up to `max_step` flows: its default cap on flows
/// (`limits.max_flows`, 100 000) leaves no room at 100 000, so it is raised by a tenth.
fn scale_config(max_step: usize) -> String {
    format!(
        "# masque-bench flow-scale\n[limits]\nmax_flows = {}\n",
        (max_step + max_step / 10).max(100_000)
    )
}

pub fn flow_scale(a: ScaleArgs) -> Result<(), BenchError> {
    let max_step = a.steps.iter().copied().max().unwrap_or(1);
    spawn::raise_nofile(2 * max_step as u64 + 4096);
    let target = target::TargetThread::start_ports(
        "127.0.0.1:0".parse().expect("literal"),
        a.target_ports.max(1),
        Some(a.client_core),
    )?;
    eprintln!(
        "flow-scale: echo target on {} and the {} ports after it",
        target.addr,
        target.ports - 1
    );
    let config = std::env::temp_dir().join(format!(
        "masque-bench-flow-scale-{}.toml",
        std::process::id()
    ));
    std::fs::write(&config, scale_config(max_step))?;
    let mut relay_args = a.io_backend.relay_args();
    relay_args.push("--config".into());
    relay_args.push(config.display().to_string());
    let r = scale_steps(&a, &target, &relay_args);
    let _ = std::fs::remove_file(&config);
    let steps = r?;
    println!(
        "| flows asked | flows open | relay flows | target ports | egress sockets | relay fds | \
         setup s | relay RSS: no flows / flows open / after traffic MiB | bytes per idle flow | \
         bytes per flow after traffic | I/O backend |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let opt = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    for s in &steps {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.1} / {:.1} / {:.1} | {} | {} | {} (asked {}) |",
            s.flows_asked,
            s.flows_open,
            opt(s.relay_flows_open),
            s.target_ports,
            opt(s.egress_sockets),
            opt(s.relay_fds),
            s.setup_seconds,
            s.rss_idle_kib as f64 / 1024.0,
            s.rss_open_kib as f64 / 1024.0,
            s.rss_kib as f64 / 1024.0,
            s.idle_bytes_per_flow.map_or("-".into(), |v| format!("{v:.0}")),
            s.bytes_per_flow.map_or("-".into(), |v| format!("{v:.0}")),
            s.io_backend.unwrap_or("unknown"),
            s.io_backend_requested.as_str(),
        );
    }
    crate::write_json(&a.json, &serde_json::json!({ "steps": steps }))?;
    Ok(())
}

/// The steps of `flow_scale`, one fresh relay each.
fn scale_steps(
    a: &ScaleArgs,
    target: &target::TargetThread,
    relay_args: &[String],
) -> Result<Vec<ScaleStep>, BenchError> {
    let mut steps = Vec::new();
    for &flows in &a.steps {
        let proc = spawn::start_relay(&a.relay_bin, Some(a.relay_core), relay_args)?;
        let backend = proc.io_backend;
        eprintln!(
            "flow-scale: relay I/O backend {} (asked {})",
            backend.unwrap_or("unknown"),
            a.io_backend.as_str()
        );
        std::thread::sleep(Duration::from_millis(300));
        let idle = crate::procfs::sample(proc.pid()).map_or(0, |s| s.rss_kib);
        let mut args = cell_args(
            a.relay_core,
            a.client_core,
            a.protocol,
            64,
            flows,
            Mode::Echo,
            (0.0, 1.0),
        );
        args.quiet = false;
        // Idle flows: one datagram per flow over the second, to show they all work.
        args.rate = flows as u64;
        args.connections = flows.div_ceil(a.per_connection.max(1));
        args.target_ports = target.ports;
        args.setup_timeout = 300;
        let label = format!("flow-scale-{flows}");
        let r = crate::run::run(
            args.spec(
                &label,
                proc.addr,
                target.addr,
                Some(proc.pid()),
                proc.metrics,
            )
            .with_io_backend(Some(a.io_backend)),
        );
        drop(proc);
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                eprintln!("flow-scale: {flows} flows: {e}");
                continue;
            }
        };
        let rss = r.relay.as_ref().map_or(0, |p| p.rss_kib);
        let rss_open = r.relay.as_ref().map_or(0, |p| p.rss_start_kib);
        let open = r.setup.flows_open;
        let per_flow =
            |kib: u64| (open > 0).then(|| kib.saturating_sub(idle) as f64 * 1024.0 / open as f64);
        let step = ScaleStep {
            io_backend: backend,
            io_backend_requested: a.io_backend,
            flows_asked: flows,
            flows_open: open,
            relay_flows_open: r.relay.as_ref().and_then(|p| p.flows_open),
            target_ports: target.ports,
            egress_sockets: r.relay.as_ref().and_then(|p| p.egress_sockets),
            relay_fds: r.relay.as_ref().and_then(|p| p.fds),
            setup_seconds: r.setup.seconds,
            rss_idle_kib: idle,
            rss_open_kib: rss_open,
            rss_kib: rss,
            idle_bytes_per_flow: per_flow(rss_open),
            bytes_per_flow: per_flow(rss),
        };
        eprintln!("flow-scale: {step:?}");
        steps.push(step);
    }
    Ok(steps)
}

#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    #[arg(long, default_value = "target/release/masque-relay")]
    relay_bin: PathBuf,
    #[arg(long, value_enum, default_value = "h3")]
    protocol: Protocol,
    /// Connections opened as fast as possible (one flow each) for the handshake rate.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Flows opened on --flow-connections established connections for the flow rate.
    #[arg(long, default_value_t = 2000)]
    flows: usize,
    #[arg(long, default_value_t = 10)]
    flow_connections: usize,
    #[arg(long, default_value_t = 0)]
    relay_core: usize,
    #[arg(long, default_value_t = 1)]
    client_core: usize,
    /// The relay's datagram I/O backend (passed as its --io-backend).
    #[arg(long, value_enum, default_value = "auto")]
    io_backend: IoBackend,
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn setup_rate(a: SetupArgs) -> Result<(), BenchError> {
    spawn::raise_nofile(2 * a.connections.max(a.flows) as u64 + 4096);
    let target =
        target::TargetThread::start("127.0.0.1:0".parse().expect("literal"), Some(a.client_core))?;
    let mut results = Vec::new();
    for (what, flows, conns) in [
        ("handshakes", a.connections, a.connections),
        ("flows", a.flows, a.flow_connections),
    ] {
        let proc =
            spawn::start_relay(&a.relay_bin, Some(a.relay_core), &a.io_backend.relay_args())?;
        println!(
            "{}: relay I/O backend {} (asked {})",
            a.protocol.as_str(),
            proc.io_backend.unwrap_or("unknown"),
            a.io_backend.as_str()
        );
        let mut args = cell_args(
            a.relay_core,
            a.client_core,
            a.protocol,
            64,
            flows,
            Mode::Echo,
            (0.0, 0.5),
        );
        args.rate = flows as u64;
        args.connections = conns;
        args.setup_timeout = 120;
        let r = crate::run::run(
            args.spec(
                &format!("setup-rate-{what}"),
                proc.addr,
                target.addr,
                Some(proc.pid()),
                proc.metrics,
            )
            .with_io_backend(Some(a.io_backend)),
        );
        drop(proc);
        match r {
            Ok(r) => {
                let s = &r.setup;
                let line = match what {
                    "handshakes" => format!(
                        "{}: {} of {} connections in {:.2} s: {} handshakes/s",
                        a.protocol.as_str(),
                        s.connections_open,
                        conns,
                        s.connect_seconds.unwrap_or(0.0),
                        s.handshakes_per_sec
                            .map_or("-".into(), |v| format!("{v:.0}")),
                    ),
                    _ => format!(
                        "{}: {} of {} flows on {} connections: {} flows/s after the handshakes",
                        a.protocol.as_str(),
                        s.flows_open,
                        flows,
                        conns,
                        s.flows_per_sec.map_or("-".into(), |v| format!("{v:.0}")),
                    ),
                };
                println!("{line}");
                results.push(serde_json::json!({ "measure": what, "run": r }));
            }
            Err(e) => eprintln!("setup-rate: {what}: {e}"),
        }
    }
    crate::write_json(&a.json, &serde_json::json!({ "results": results }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default matrix adds download and upload at 1200 B only (download only where the
    /// bursts in flight stay bounded); --modes asks for every combination.
    #[test]
    fn default_cells_add_download_and_upload_at_1200_bytes() {
        let quick = matrix_cells(&[64, 1200], &[1, 100], None, 16);
        assert_eq!(quick.len(), 12, "{quick:?}");
        let at = |size, mode| quick.iter().filter(|c| c.0 == size && c.2 == mode).count();
        assert_eq!((at(64, Mode::Echo), at(64, Mode::Oneway)), (2, 2));
        assert_eq!((at(64, Mode::Download), at(64, Mode::Upload)), (0, 0));
        assert_eq!((at(1200, Mode::Download), at(1200, Mode::Upload)), (2, 2));
        let full = matrix_cells(&[64, 1200], &[1, 100, 10_000], None, 16);
        assert!(!full.contains(&(1200, 10_000, Mode::Download)));
        assert!(full.contains(&(1200, 10_000, Mode::Upload)));
        let asked = matrix_cells(&[64], &[1], Some(&[Mode::Download, Mode::Echo]), 16);
        assert_eq!(asked, vec![(64, 1, Mode::Download), (64, 1, Mode::Echo)]);
        // A download request stands for its burst in the closed-loop window.
        assert_eq!(closed_inflight(1, Mode::Download, 16), 4);
        assert_eq!(closed_inflight(100, Mode::Download, 16), 1);
        assert_eq!(closed_inflight(1, Mode::Echo, 16), 64);
        assert!(scale_config(100_000).contains("max_flows = 110000"));
    }

    #[test]
    fn median_and_range() {
        let f = |v: f64| format!("{v:.1}");
        assert_eq!(median_range(&[3.0, 1.0, 2.0], f), "2.0 [1.0–3.0]");
        assert_eq!(median_range(&[4.0, 1.0, 2.0, 3.0], f), "2.5 [1.0–4.0]");
        assert_eq!(median_range(&[5.0], f), "5.0");
        assert_eq!(median_range(&[], f), "-");
    }
}
