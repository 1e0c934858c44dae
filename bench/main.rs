//! masque-bench: the load generator, echo target, baselines and benchmark suite of masque-relay
//! (BENCH.md). Works against any RFC 9298 relay; the URI template is a flag.
//!
//! ```text
//!  target      UDP echo + sink, counts per run (recvmmsg/sendmmsg)
//!  forward     the raw forwarder baseline (started by `baseline` and `suite`)
//!  run         CONNECT-UDP clients over h3 / h2 / http1 against a relay
//!  baseline    run + the same load direct and through the raw forwarder, with ratios
//!  suite       the BENCH.md matrix, 3 repetitions, one Markdown table
//!  flow-scale  relay memory per open flow
//!  setup-rate  QUIC handshakes per second and flows per second
//! ```

#![forbid(unsafe_code)]

mod forward;
mod h1c;
mod h2c;
mod h3c;
mod load;
mod mmsg;
mod procfs;
mod report;
mod run;
mod spawn;
mod suite;
mod target;
mod tls;
mod udpc;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use report::{Ratios, RunReport};
pub use run::pin;
use run::{Mode, Protocol, RunSpec};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Args(String),
}

#[derive(Debug, Parser)]
#[command(
    name = "masque-bench",
    version,
    about = "Load generator, echo target and benchmark suite for CONNECT-UDP relays"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// A UDP echo, sink and download target; prints what it receives each second.
    Target {
        #[arg(long, default_value = "127.0.0.1:5353")]
        listen: SocketAddr,
        /// Listen on this many consecutive ports from --listen's (one thread serves them all);
        /// with port 0, a free range is picked.
        #[arg(long, default_value_t = 1)]
        ports: u16,
        /// Exit after this many seconds (0 = until interrupted).
        #[arg(long, default_value_t = 0)]
        duration: u64,
        #[arg(long)]
        quiet: bool,
    },
    /// The raw forwarder (recvmmsg/sendmmsg, no HTTP, no crypto); prints "listening ADDR".
    Forward {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long)]
        target: SocketAddr,
        /// Exit after this many seconds.
        #[arg(long, default_value_t = 600)]
        duration: u64,
    },
    /// Load through a relay: CONNECT-UDP clients, progress each second, a final table.
    Run(LoadArgs),
    /// `run`, then the same load direct to the target and through the raw forwarder; ratios.
    Baseline(LoadArgs),
    /// The BENCH.md matrix with baselines, three repetitions, one Markdown table.
    Suite(suite::SuiteArgs),
    /// Opens flows in steps up to --flows and reports the relay's memory per flow.
    FlowScale(suite::ScaleArgs),
    /// QUIC handshakes per second, then flows (request streams) per second.
    SetupRate(suite::SetupArgs),
}

/// The load of a run.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// The relay (host:port of its TLS/QUIC listener).
    #[arg(long, default_value = "127.0.0.1:4433")]
    relay: SocketAddr,
    /// Start this relay binary (one worker, loopback targets allowed, metrics on) instead of
    /// using --relay; its CPU is then measured without --relay-pid.
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// The relay's process ID, for its CPU time and RSS from /proc.
    #[arg(long)]
    relay_pid: Option<u32>,
    /// The relay's Prometheus endpoint, for its flow and datagram counts.
    #[arg(long)]
    relay_metrics: Option<SocketAddr>,
    /// The UDP target (a `masque-bench target`); without it one runs inside this process.
    #[arg(long)]
    target: Option<SocketAddr>,
    #[arg(long, value_enum, default_value = "h3")]
    protocol: Protocol,
    /// UDP payload bytes (at least 24, the bench header); in download runs, of each datagram
    /// the target sends.
    #[arg(long, default_value_t = 1200)]
    size: usize,
    /// Download and upload runs: datagrams per burst (the target's GSO train per request, or
    /// what a flow sends back to back).
    #[arg(long, default_value_t = 16)]
    burst: u16,
    /// Spread the flows over this many consecutive target ports (flow i to port
    /// base + i % N): the in-process target listens on all of them, an external one
    /// (`--target`) must too (`masque-bench target --ports N`). The direct and raw-forward
    /// baselines use the first port only.
    #[arg(long, default_value_t = 1)]
    target_ports: u16,
    #[arg(long, default_value_t = 1)]
    flows: usize,
    /// Connections the flows are spread over (0: one per 100 flows; HTTP/1.1 always uses one
    /// per flow).
    #[arg(long, default_value_t = 0)]
    connections: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of load before the measurement starts.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Datagrams per second over all flows; 0: closed loop (echo) or as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Closed loop: datagrams in flight per flow (download runs: requests, each answered by a
    /// burst).
    #[arg(long, default_value_t = 1)]
    inflight: u32,
    /// Closed loop: milliseconds after which an unanswered datagram counts as lost and a
    /// replacement is sent (scanned every quarter of it).
    #[arg(long, default_value_t = 250)]
    loss_timeout_ms: u64,
    /// With --relay-bin: the relay's datagram I/O backend (passed as its --io-backend).
    #[arg(long, value_enum, default_value = "auto")]
    io_backend: spawn::IoBackend,
    #[arg(long, value_enum, default_value = "echo")]
    mode: Mode,
    /// Do not check the relay's certificate.
    #[arg(long)]
    insecure: bool,
    /// PEM file with the CA (or self-signed certificate) of the relay.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// TLS server name and :authority host.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    #[arg(
        long,
        default_value = "/.well-known/masque/udp/{target_host}/{target_port}/"
    )]
    uri_template: String,
    /// Core for the relay (and the raw forwarder) when this tool starts them.
    #[arg(long, default_value_t = 0)]
    relay_core: usize,
    /// Core for the load generator and the in-process target.
    #[arg(long, default_value_t = 1)]
    client_core: usize,
    /// Longest wait for the flows to open, in seconds.
    #[arg(long, default_value_t = 30)]
    setup_timeout: u64,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

impl LoadArgs {
    fn connections(&self) -> usize {
        match (self.protocol, self.connections) {
            (Protocol::Http1, _) => self.flows,
            (_, 0) => self.flows.div_ceil(100).max(1),
            (_, n) => n,
        }
    }

    /// The run spec against `relay` (and its pid and metrics), to `target`.
    pub fn spec(
        &self,
        label: &str,
        relay: SocketAddr,
        target: SocketAddr,
        pid: Option<u32>,
        metrics: Option<SocketAddr>,
    ) -> RunSpec {
        RunSpec {
            label: label.to_owned(),
            protocol: self.protocol,
            relay,
            target,
            server_name: self.server_name.clone(),
            size: self.size,
            burst: self.burst,
            flows: self.flows,
            connections: self.connections(),
            target_ports: if self.protocol == Protocol::Udp {
                1
            } else {
                self.target_ports.max(1)
            },
            duration: Duration::from_secs_f64(self.duration.max(0.1)),
            warmup: Duration::from_secs_f64(self.warmup.max(0.0)),
            rate: self.rate,
            inflight: self.inflight,
            loss_timeout: Duration::from_millis(self.loss_timeout_ms),
            mode: self.mode,
            insecure: self.insecure,
            ca: self.ca.clone(),
            uri_template: self.uri_template.clone(),
            measured_pid: pid,
            metrics,
            core: Some(self.client_core),
            quiet: self.quiet,
            setup_timeout: Duration::from_secs(self.setup_timeout),
            max_datagrams: None,
            io_backend_requested: None,
        }
    }
}

/// The relay a command measures: started here, or given.
pub struct RelayUnderTest {
    proc: Option<spawn::Proc>,
    addr: SocketAddr,
    pid: Option<u32>,
    metrics: Option<SocketAddr>,
    /// The `--io-backend` it was started with, when this tool started it.
    io_backend: Option<spawn::IoBackend>,
}

impl std::fmt::Debug for RelayUnderTest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayUnderTest")
            .field("addr", &self.addr)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

fn relay_under_test(a: &mut LoadArgs) -> Result<RelayUnderTest, BenchError> {
    if let Some(bin) = &a.relay_bin {
        spawn::raise_nofile(2 * a.flows as u64 + 4096);
        let p = spawn::start_relay(bin, Some(a.relay_core), &a.io_backend.relay_args())?;
        eprintln!(
            "relay {} (pid {}): I/O backend {} (asked {})",
            p.addr,
            p.pid(),
            p.io_backend.unwrap_or("unknown"),
            a.io_backend.as_str()
        );
        // Its certificate is generated at start.
        a.insecure = true;
        Ok(RelayUnderTest {
            addr: p.addr,
            pid: Some(p.pid()),
            metrics: p.metrics,
            io_backend: Some(a.io_backend),
            proc: Some(p),
        })
    } else {
        Ok(RelayUnderTest {
            proc: None,
            addr: a.relay,
            pid: a.relay_pid,
            metrics: a.relay_metrics,
            io_backend: None,
        })
    }
}

/// The target a command sends to: given, or started in this process.
fn target_for(a: &LoadArgs) -> Result<(SocketAddr, Option<target::TargetThread>), BenchError> {
    match a.target {
        Some(t) => Ok((t, None)),
        None => {
            let t = target::TargetThread::start_ports(
                "127.0.0.1:0".parse().expect("literal"),
                a.target_ports.max(1),
                Some(a.client_core),
            )?;
            Ok((t.addr, Some(t)))
        }
    }
}

pub fn write_json(path: &Option<PathBuf>, value: &serde_json::Value) -> Result<(), BenchError> {
    if let Some(p) = path {
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| BenchError::Setup(format!("JSON: {e}")))?;
        std::fs::write(p, text + "\n")?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

fn cmd_run(mut a: LoadArgs) -> Result<(), BenchError> {
    let relay = relay_under_test(&mut a)?;
    let (target, _t) = target_for(&a)?;
    let label = format!(
        "{}-{}B-{}f-{}",
        a.protocol.as_str(),
        a.size,
        a.flows,
        a.mode.as_str()
    );
    let r = run::run(
        a.spec(&label, relay.addr, target, relay.pid, relay.metrics)
            .with_io_backend(relay.io_backend),
    )?;
    print!("{}", report::table(&[&r]));
    write_json(&a.json, &serde_json::json!({ "run": r }))?;
    drop(relay.proc);
    Ok(())
}

/// The relay run and its two baselines, in one invocation.
#[derive(Debug)]
pub struct BaselineSet {
    pub relay: RunReport,
    pub direct: RunReport,
    pub raw_forward: RunReport,
    pub ratios: Ratios,
}

/// Runs `a` through the relay, then direct, then through a raw forwarder pinned like the relay.
pub fn baseline_set(
    a: &LoadArgs,
    relay: &RelayUnderTest,
    target: SocketAddr,
) -> Result<BaselineSet, BenchError> {
    let label = |what: &str| format!("{what}-{}B-{}f-{}", a.size, a.flows, a.mode.as_str());
    let r = run::run(
        a.spec(
            &label(a.protocol.as_str()),
            relay.addr,
            target,
            relay.pid,
            relay.metrics,
        )
        .with_io_backend(relay.io_backend),
    )?;
    let mut udp = a.clone();
    udp.protocol = Protocol::Udp;
    udp.connections = a.connections();
    let direct = run::run(udp.spec(&label("direct"), target, target, None, None))?;
    let lifetime =
        Duration::from_secs_f64(a.warmup + a.duration) + Duration::from_secs(a.setup_timeout + 10);
    let fwd = spawn::start_forwarder(target, Some(a.relay_core), lifetime)?;
    let raw = run::run(udp.spec(
        &label("raw-forward"),
        fwd.addr,
        target,
        Some(fwd.pid()),
        None,
    ))?;
    drop(fwd);
    let ratios = Ratios::compute(&r, Some(&direct), Some(&raw));
    Ok(BaselineSet {
        relay: r,
        direct,
        raw_forward: raw,
        ratios,
    })
}

fn cmd_baseline(mut a: LoadArgs) -> Result<(), BenchError> {
    let relay = relay_under_test(&mut a)?;
    let (target, _t) = target_for(&a)?;
    let set = baseline_set(&a, &relay, target)?;
    print!(
        "{}",
        report::table(&[&set.relay, &set.direct, &set.raw_forward])
    );
    print!("{}", report::ratio_lines(&set.ratios));
    write_json(
        &a.json,
        &serde_json::json!({
            "relay": set.relay,
            "direct": set.direct,
            "raw_forward": set.raw_forward,
            "ratios": set.ratios,
        }),
    )?;
    drop(relay.proc);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Target {
            listen,
            ports,
            duration,
            quiet,
        } => (|| {
            let socks = target::bind_ports(listen, ports)?;
            eprintln!(
                "masque-bench target on {}{}",
                socks[0].local_addr()?,
                if socks.len() > 1 {
                    format!(" and the {} ports after it", socks.len() - 1)
                } else {
                    String::new()
                }
            );
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let until = (duration > 0).then(|| Instant::now() + Duration::from_secs(duration));
            let s = stop.clone();
            let totals = rt.block_on(async move {
                let serve = target::serve(socks, s.clone(), until, !quiet);
                tokio::pin!(serve);
                tokio::select! {
                    r = &mut serve => r,
                    _ = tokio::signal::ctrl_c() => {
                        s.store(true, std::sync::atomic::Ordering::Relaxed);
                        serve.await
                    }
                }
            })?;
            eprintln!("target totals: {totals:?}");
            Ok(())
        })(),
        Cmd::Forward {
            listen,
            target,
            duration,
        } => (|| {
            let sock = mmsg::bind(listen)?;
            println!("listening {}", sock.local_addr()?);
            use std::io::Write;
            let _ = std::io::stdout().flush();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            let until = Instant::now() + Duration::from_secs(duration);
            let totals = local.block_on(&rt, forward::serve(sock, target, until))?;
            eprintln!("forwarder totals: {totals:?}");
            Ok(())
        })(),
        Cmd::Run(a) => cmd_run(a),
        Cmd::Baseline(a) => cmd_baseline(a),
        Cmd::Suite(a) => suite::suite(a),
        Cmd::FlowScale(a) => suite::flow_scale(a),
        Cmd::SetupRate(a) => suite::setup_rate(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("masque-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
