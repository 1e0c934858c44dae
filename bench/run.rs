//! One run: open the flows, warm up, measure, drain, then ask the target what it counted and
//! put the figures together. The client of the chosen protocol runs as a task next to a monitor
//! that prints the progress line, samples the relay's `/proc` at the window's edges and ends the
//! run; both on one thread (pinned when asked), so the load generator costs one core.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::load::{Clock, Phase, Recorder, Shape};
use crate::procfs::{self, ProcSample, RelayMetrics};
use crate::report::{Direction, ProcFigures, Rtt, RunReport, Setup};
use crate::spawn::IoBackend;
use crate::wire::{self, DownloadRequest, Kind, DOWNLOAD_REQUEST_LEN, HEADER_LEN};
use crate::BenchError;

/// The client side of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// CONNECT-UDP over HTTP/3, payloads in QUIC DATAGRAM frames.
    H3,
    /// CONNECT-UDP over HTTP/2, payloads in DATAGRAM capsules.
    H2,
    /// CONNECT-UDP over HTTP/1.1 Upgrade, one connection per flow.
    Http1,
    /// Plain UDP to the address given as relay (the target itself, or the raw forwarder).
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::H3 => "h3",
            Protocol::H2 => "h2",
            Protocol::Http1 => "http1",
            Protocol::Udp => "udp",
        }
    }
}

/// The shape of the traffic, and what the target does with the payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The target echoes: round-trip times, both directions.
    Echo,
    /// The target counts and drops: throughput one way.
    Oneway,
    /// Closed loop of small requests per flow; the target answers each with a burst of
    /// `--burst` datagrams of `--size` bytes sent as UDP GSO trains (an inner QUIC server's
    /// download). Throughput is what reaches the client.
    Download,
    /// Bursts of `--burst` datagrams per flow back to back (UDP GSO trains where the client
    /// speaks plain UDP); the target counts and drops them.
    Upload,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Echo => "echo",
            Mode::Oneway => "oneway",
            Mode::Download => "download",
            Mode::Upload => "upload",
        }
    }

    /// Traffic that comes back to the client (echoes, download bursts).
    pub fn answered(self) -> bool {
        matches!(self, Mode::Echo | Mode::Download)
    }
}

/// Everything a run needs to know.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub label: String,
    pub protocol: Protocol,
    /// The relay (for [`Protocol::Udp`], where the datagrams go: target or forwarder).
    pub relay: SocketAddr,
    pub target: SocketAddr,
    /// TLS server name.
    pub server_name: String,
    /// Payload bytes of each datagram (in a download run, of those the target sends).
    pub size: usize,
    /// Download and upload runs: datagrams per burst.
    pub burst: u16,
    pub flows: usize,
    pub connections: usize,
    /// The flows go to this many consecutive target ports from `target`'s (flow i to port
    /// `target.port() + i % target_ports`); plain UDP runs use `target` alone.
    pub target_ports: u16,
    pub duration: Duration,
    pub warmup: Duration,
    /// Datagrams per second over all flows; 0 = closed loop (echo) or unlimited (one-way).
    pub rate: u64,
    pub inflight: u32,
    /// Closed loop: a datagram unanswered this long is counted as lost and replaced.
    pub loss_timeout: Duration,
    pub mode: Mode,
    pub insecure: bool,
    pub ca: Option<PathBuf>,
    pub uri_template: String,
    /// The process whose CPU and memory are measured (the relay, or the forwarder).
    pub measured_pid: Option<u32>,
    /// The relay's `/metrics` address, when it has one.
    pub metrics: Option<SocketAddr>,
    /// Core the client thread is pinned to.
    pub core: Option<usize>,
    pub quiet: bool,
    /// Longest wait for the flows to open; the run goes on with those that did.
    pub setup_timeout: Duration,
    /// Stop sending after this many datagrams (tests).
    pub max_datagrams: Option<u64>,
    /// The `--io-backend` the relay was started with, when this tool started it.
    pub io_backend_requested: Option<IoBackend>,
}

impl RunSpec {
    /// How the flows of one group (connection or socket) send.
    pub fn shape(&self, group_flows: usize) -> Shape {
        // Upload: a flow's datagrams go in bursts, back to back.
        let burst = if self.mode == Mode::Upload {
            u32::from(self.burst.max(1))
        } else {
            1
        };
        if self.rate > 0 {
            Shape::Rate {
                per_sec: self.rate as f64 * group_flows as f64 / self.flows.max(1) as f64,
                burst,
            }
        } else if self.mode.answered() {
            Shape::Closed {
                inflight: self.inflight.max(1),
                loss_timeout: self.loss_timeout.max(Duration::from_millis(1)),
            }
        } else {
            Shape::Unlimited { burst }
        }
    }

    /// Bytes of each payload the client sends: a download request, or `size`.
    pub fn payload_size(&self) -> usize {
        match self.mode {
            Mode::Download => DOWNLOAD_REQUEST_LEN,
            _ => self.size,
        }
    }

    /// What a download request asks of the target.
    pub fn download_request(&self) -> Option<DownloadRequest> {
        (self.mode == Mode::Download).then_some(DownloadRequest {
            burst: self.burst.max(1),
            size: self.size as u32,
        })
    }

    /// The target of flow `i` (see `target_ports`).
    pub fn target_of(&self, i: usize) -> SocketAddr {
        let n = usize::from(self.target_ports.max(1));
        let mut t = self.target;
        t.set_port(self.target.port().wrapping_add((i % n) as u16));
        t
    }

    /// The same spec, noting the `--io-backend` the relay under test was started with.
    pub fn with_io_backend(mut self, b: Option<IoBackend>) -> Self {
        self.io_backend_requested = b;
        self
    }

    /// The request path for flow `i`'s target, from the URI template.
    pub fn path_for(&self, i: usize) -> String {
        expand_template(&self.uri_template, self.target_of(i))
    }

    pub fn kind(&self) -> Kind {
        match self.mode {
            Mode::Echo => Kind::Echo,
            Mode::Oneway | Mode::Upload => Kind::Sink,
            Mode::Download => Kind::Download,
        }
    }
}

/// Expands `{target_host}` and `{target_port}` (also as `{?target_host,target_port}` query
/// form) the way RFC 9298 §2 clients do; an IPv6 host is written with `:` percent-encoded. A
/// full `https://authority/...` template is reduced to its path.
pub fn expand_template(template: &str, target: SocketAddr) -> String {
    let host = match target {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => a.ip().to_string().replace(':', "%3A"),
    };
    let port = target.port().to_string();
    let t = match template.find("://") {
        Some(i) => {
            let rest = &template[i + 3..];
            &rest[rest.find('/').unwrap_or(rest.len())..]
        }
        None => template,
    };
    t.replace(
        "{?target_host,target_port}",
        &format!("?target_host={host}&target_port={port}"),
    )
    .replace("{target_host}", &host)
    .replace("{target_port}", &port)
}

/// Splits `flows` over `groups` as evenly as possible: the flow indices of each group.
pub fn split(flows: usize, groups: usize) -> Vec<Range<usize>> {
    let groups = groups.clamp(1, flows.max(1));
    let (each, extra) = (flows / groups, flows % groups);
    let mut start = 0;
    (0..groups)
        .map(|g| {
            let n = each + usize::from(g < extra);
            let r = start..start + n;
            start += n;
            r
        })
        .collect()
}

/// How far the setup got.
#[derive(Debug, Default)]
pub struct SetupState {
    pub connections_open: usize,
    pub flows_open: usize,
    pub flows_failed: usize,
    pub refused: BTreeMap<u16, u64>,
    pub errors: Vec<String>,
    /// When the last connection completed its handshake.
    pub connected_at: Option<Instant>,
    pub done_at: Option<Instant>,
}

/// What the client tasks and the monitor share (one thread).
#[derive(Debug)]
pub struct Ctx {
    pub spec: RunSpec,
    pub rec: RefCell<Recorder>,
    pub setup: RefCell<SetupState>,
    pub started: Instant,
    /// Set by the monitor when the run is over; clients close and return.
    pub stop: Cell<bool>,
    /// Wakes clients (stop).
    pub wake: Notify,
}

impl Ctx {
    pub fn new(spec: RunSpec) -> Rc<Ctx> {
        let drain = if spec.mode.answered() {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(300)
        };
        let clock = Clock::new(spec.warmup, spec.duration, drain);
        let mut rec = Recorder::new(clock, wire::new_tag(), spec.kind(), spec.payload_size());
        if let Some(d) = spec.download_request() {
            rec = rec.with_download(d);
        }
        Rc::new(Ctx {
            spec,
            rec: RefCell::new(rec),
            setup: RefCell::new(SetupState::default()),
            started: Instant::now(),
            stop: Cell::new(false),
            wake: Notify::new(),
        })
    }

    pub fn connection_opened(&self) {
        let mut s = self.setup.borrow_mut();
        s.connections_open += 1;
        if s.connections_open >= self.spec.connections {
            s.connected_at.get_or_insert(Instant::now());
        }
    }

    pub fn flow_opened(&self, now: Instant) {
        self.setup.borrow_mut().flows_open += 1;
        self.check_setup(now);
    }

    /// A flow will not open: `status` is the response status, or 0 for a transport failure.
    pub fn flow_failed(&self, now: Instant, status: u16) {
        {
            let mut s = self.setup.borrow_mut();
            s.flows_failed += 1;
            *s.refused.entry(status).or_default() += 1;
        }
        self.check_setup(now);
    }

    /// Remembers the first few errors for the report.
    pub fn error(&self, e: impl Into<String>) {
        let mut s = self.setup.borrow_mut();
        if s.errors.len() < 5 {
            let e = e.into();
            if !self.spec.quiet {
                eprintln!("masque-bench: {e}");
            }
            s.errors.push(e);
        }
    }

    fn check_setup(&self, now: Instant) {
        let done = {
            let s = self.setup.borrow();
            s.flows_open + s.flows_failed >= self.spec.flows
        };
        if done {
            self.start_load(now);
        }
    }

    /// Ends the setup phase: the load starts now with the flows that are open.
    pub fn start_load(&self, now: Instant) {
        let mut s = self.setup.borrow_mut();
        if s.done_at.is_none() {
            s.done_at = Some(now);
            self.rec.borrow_mut().clock.start_load(now);
        }
    }

    /// True while a client may send: load started, not past the window, under the cap.
    pub fn sending(&self, now: Instant) -> bool {
        let rec = self.rec.borrow();
        rec.sending(now) && self.spec.max_datagrams.is_none_or(|m| rec.sent_all < m)
    }
}

/// Pins the calling thread to `core`, if given and it exists.
pub fn pin(core: Option<usize>) {
    if let Some(c) = core {
        if let Some(id) = core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .find(|id| id.id == c)
        {
            core_affinity::set_for_current(id);
        }
    }
}

/// Samples taken at one edge of the measured window.
#[derive(Debug, Clone, Copy)]
struct Edge {
    relay: Option<ProcSample>,
    me: Option<ProcSample>,
    metrics: Option<RelayMetrics>,
}

fn edge(spec: &RunSpec) -> Edge {
    Edge {
        relay: spec.measured_pid.and_then(procfs::sample),
        me: procfs::sample(0),
        metrics: spec.metrics.and_then(procfs::scrape),
    }
}

/// Runs the load on this thread and returns the report.
pub fn run(spec: RunSpec) -> Result<RunReport, BenchError> {
    if spec.size < HEADER_LEN {
        return Err(BenchError::Args(format!(
            "--size must be at least {HEADER_LEN} bytes (the bench header)"
        )));
    }
    if spec.mode == Mode::Download && spec.size > wire::MAX_PAYLOAD {
        return Err(BenchError::Args(format!(
            "--size must be at most {} bytes in a download run",
            wire::MAX_PAYLOAD
        )));
    }
    if !(1..=wire::MAX_BURST).contains(&spec.burst) {
        return Err(BenchError::Args(format!(
            "--burst must be 1 to {}",
            wire::MAX_BURST
        )));
    }
    if spec.flows == 0 {
        return Err(BenchError::Args("--flows must be at least 1".into()));
    }
    pin(spec.core);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let ctx = Ctx::new(spec.clone());
    let (start, end) = local.block_on(&rt, drive(ctx.clone()))?;
    drop(local);
    drop(rt);

    let spec = &ctx.spec;
    let rec = ctx.rec.borrow();
    let target = wire::query_target(spec.target, rec.tag).filter(|c| c.total > 0);
    let secs = spec.duration.as_secs_f64();
    let echo = spec.mode == Mode::Echo;
    let to_target = Direction::new(
        rec.sent,
        target.map(|t| t.measured),
        spec.payload_size(),
        secs,
    );
    // What the target sent back (echoes, or burst datagrams), as it counted it; without its
    // answer, what the client asked for.
    let to_client = spec.mode.answered().then(|| {
        let asked = match spec.mode {
            Mode::Download => rec.sent * u64::from(spec.burst.max(1)),
            _ => rec.sent,
        };
        let offered = target.map(|t| t.echoed).unwrap_or(asked);
        Direction::new(offered, Some(rec.received), spec.size, secs)
    });
    let relayed = RunReport::relayed_by_count(&rec, target.as_ref());
    let relay = match (spec.measured_pid, start.relay, end.relay) {
        (Some(pid), Some(a), Some(b)) => Some(ProcFigures::new(
            pid,
            &a,
            &b,
            start.metrics.zip(end.metrics),
            relayed,
        )),
        _ => None,
    };
    let client_cpu = match (start.me, end.me) {
        (Some(a), Some(b)) => {
            crate::report::per_datagram(b.cpu_ns - a.cpu_ns, rec.sent + rec.received)
        }
        _ => None,
    };
    let setup = ctx.setup.borrow();
    let setup_secs = setup
        .done_at
        .map(|t| t.saturating_duration_since(ctx.started).as_secs_f64())
        .unwrap_or(0.0);
    Ok(RunReport {
        label: spec.label.clone(),
        protocol: spec.protocol.as_str().into(),
        mode: spec.mode.as_str().into(),
        size: spec.size,
        burst: matches!(spec.mode, Mode::Download | Mode::Upload).then_some(spec.burst),
        request_size: (spec.mode == Mode::Download).then_some(spec.payload_size()),
        target_ports: spec.target_ports.max(1),
        flows: spec.flows,
        connections: spec.connections,
        rate: spec.rate,
        inflight: spec.inflight,
        warmup_secs: spec.warmup.as_secs_f64(),
        duration_secs: secs,
        setup: {
            let since = |t: Option<Instant>, from: Instant| {
                t.map(|t| t.saturating_duration_since(from).as_secs_f64())
            };
            let connect = since(setup.connected_at, ctx.started);
            let flows_after = setup.connected_at.and_then(|c| since(setup.done_at, c));
            let rate = |n: usize, s: Option<f64>| s.filter(|s| *s > 0.0).map(|s| n as f64 / s);
            Setup {
                connections_open: setup.connections_open,
                flows_open: setup.flows_open,
                seconds: setup_secs,
                connect_seconds: connect,
                handshakes_per_sec: rate(setup.connections_open, connect),
                flows_per_sec: rate(setup.flows_open, flows_after),
                refused: setup.refused.iter().map(|(k, v)| (*k, *v)).collect(),
            }
        },
        to_target,
        to_client,
        round_trip_loss: echo.then(|| crate::report::loss(rec.sent, rec.received)),
        rtt: Rtt::from_histogram(&rec.rtt),
        relay,
        client_cpu_ns_per_datagram: client_cpu,
        client_blocked: rec.blocked,
        client_timed_out: rec.timed_out,
        client_foreign: rec.foreign,
        target,
        io_backend_requested: spec.io_backend_requested.map(IoBackend::as_str),
    })
}

async fn drive(ctx: Rc<Ctx>) -> Result<(Edge, Edge), BenchError> {
    let client = {
        let ctx = ctx.clone();
        tokio::task::spawn_local(async move {
            let r = match ctx.spec.protocol {
                Protocol::H3 => crate::h3c::run(ctx.clone()).await,
                Protocol::H2 => crate::h2c::run(ctx.clone()).await,
                Protocol::Http1 => crate::h1c::run(ctx.clone()).await,
                Protocol::Udp => crate::udpc::run(ctx.clone()).await,
            };
            if let Err(e) = &r {
                ctx.error(e.to_string());
                // Nothing more will open: let the monitor end the run.
                ctx.stop.set(true);
            }
            r
        })
    };
    let spec = &ctx.spec;
    // Datagrams that come back for each one sent (echo: 1; download: the burst).
    let answers_per_send = match spec.mode {
        Mode::Download => u64::from(spec.burst.max(1)),
        _ => 1,
    };
    let mut start_edge = None;
    let mut end_edge = None;
    let mut next_print = Instant::now() + Duration::from_secs(1);
    let mut last = (Instant::now(), 0u64, 0u64);
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = Instant::now();
        if ctx.stop.get() && ctx.setup.borrow().done_at.is_none() {
            break;
        }
        let phase = ctx.rec.borrow().clock.phase(now);
        if phase == Phase::Setup && now.saturating_duration_since(ctx.started) > spec.setup_timeout
        {
            let open = ctx.setup.borrow().flows_open;
            ctx.error(format!(
                "setup timeout: {open} of {} flows open after {:?}",
                spec.flows, spec.setup_timeout
            ));
            if open == 0 {
                break;
            }
            ctx.start_load(now);
        }
        if phase >= Phase::Measure && start_edge.is_none() {
            start_edge = Some(edge(spec));
        }
        if phase >= Phase::Drain && end_edge.is_none() {
            end_edge = Some(edge(spec));
        }
        if phase == Phase::Done {
            break;
        }
        if phase == Phase::Drain {
            let rec = ctx.rec.borrow();
            if spec.mode.answered() && rec.received >= rec.sent * answers_per_send {
                break;
            }
        }
        if now >= next_print {
            next_print += Duration::from_secs(1);
            if !spec.quiet {
                let rec = ctx.rec.borrow();
                let dt = now
                    .saturating_duration_since(last.0)
                    .as_secs_f64()
                    .max(1e-3);
                let sent = (rec.sent_all - last.1) as f64 / dt;
                let recv = (rec.received_all - last.2) as f64 / dt;
                last = (now, rec.sent_all, rec.received_all);
                let p99 = if rec.rtt.is_empty() {
                    "-".to_owned()
                } else {
                    format!("{:.0}us", rec.rtt.value_at_quantile(0.99) as f64 / 1000.0)
                };
                let loss = if spec.mode.answered() && sent > 0.0 {
                    let expected = sent * answers_per_send as f64;
                    format!("{:.2}%", (1.0 - recv / expected).max(0.0) * 100.0)
                } else {
                    "-".to_owned()
                };
                let setup = ctx.setup.borrow();
                eprintln!(
                    "[{:5.1}s {:>7}] {} sent {}/s recv {}/s loss {} p99 {} flows {}/{}",
                    now.saturating_duration_since(ctx.started).as_secs_f64(),
                    format!("{phase:?}").to_lowercase(),
                    spec.label,
                    crate::report::si(sent),
                    crate::report::si(recv),
                    loss,
                    p99,
                    setup.flows_open,
                    spec.flows,
                );
            }
        }
    }
    ctx.stop.set(true);
    ctx.wake.notify_waiters();
    // Give the client a moment to close its connections cleanly, so the relay frees the flows.
    let _ = tokio::time::timeout(Duration::from_secs(2), client).await;
    let (Some(a), Some(b)) = (start_edge, end_edge) else {
        let errors = ctx.setup.borrow().errors.join("; ");
        return Err(BenchError::Setup(format!(
            "the run did not reach its measured window: {errors}"
        )));
    };
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_expansion() {
        let t: SocketAddr = "127.0.0.1:5353".parse().unwrap();
        assert_eq!(
            expand_template("/.well-known/masque/udp/{target_host}/{target_port}/", t),
            "/.well-known/masque/udp/127.0.0.1/5353/"
        );
        assert_eq!(
            expand_template("https://relay.example/masque{?target_host,target_port}", t),
            "/masque?target_host=127.0.0.1&target_port=5353"
        );
        let v6: SocketAddr = "[::1]:443".parse().unwrap();
        assert_eq!(
            expand_template("/udp/{target_host}/{target_port}/", v6),
            "/udp/%3A%3A1/443/"
        );
    }

    /// A small open-loop spec against `relay`, to `target`.
    pub fn test_spec(protocol: Protocol, relay: SocketAddr, target: SocketAddr) -> RunSpec {
        RunSpec {
            label: "test".into(),
            protocol,
            relay,
            target,
            server_name: "localhost".into(),
            size: 100,
            burst: 16,
            flows: 4,
            connections: 2,
            target_ports: 1,
            duration: Duration::from_millis(600),
            warmup: Duration::from_millis(200),
            rate: 1000,
            inflight: 1,
            loss_timeout: crate::load::LOSS_TIMEOUT,
            mode: Mode::Echo,
            insecure: true,
            ca: None,
            uri_template: "/.well-known/masque/udp/{target_host}/{target_port}/".into(),
            measured_pid: None,
            metrics: None,
            core: None,
            quiet: true,
            setup_timeout: Duration::from_secs(10),
            max_datagrams: Some(5_000),
            io_backend_requested: None,
        }
    }

    /// Every count of a run against a known echo target agrees exactly: what the client sent in
    /// the window is what the target counted, echoed, and the client got back.
    pub fn assert_exact_echo(r: &RunReport) {
        let t = r.target.expect("the target answers queries");
        assert!(r.to_target.offered > 0);
        assert_eq!(r.to_target.delivered, Some(t.measured));
        assert_eq!(t.measured, r.to_target.offered, "{r:?}");
        assert_eq!(t.echoed, t.measured);
        let back = r.to_client.as_ref().unwrap();
        assert_eq!(back.offered, t.echoed);
        assert_eq!(back.delivered, Some(r.to_target.offered));
        assert_eq!(r.round_trip_loss, Some(0.0));
        assert_eq!(r.rtt.as_ref().unwrap().samples, r.to_target.offered);
        assert_eq!(t.measured_bytes, t.measured * 100);
        assert_eq!(r.client_foreign, 0);
    }

    #[test]
    fn direct_run_counts_exactly() {
        let target =
            crate::target::TargetThread::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let r = run(test_spec(Protocol::Udp, target.addr, target.addr)).unwrap();
        assert_exact_echo(&r);
        assert_eq!(r.setup.flows_open, 4);
        // Open loop at 1000/s over 0.6 s: about 600 in the window; counts, not timing, are
        // checked, so only that the rate was in the window at all.
        assert!(r.to_target.offered <= 5_000);
    }

    #[test]
    fn oneway_run_counts_at_the_target() {
        let target =
            crate::target::TargetThread::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let mut spec = test_spec(Protocol::Udp, target.addr, target.addr);
        spec.mode = Mode::Oneway;
        let r = run(spec).unwrap();
        let t = r.target.unwrap();
        assert_eq!(r.to_target.delivered, Some(r.to_target.offered));
        assert_eq!(t.echoed, 0);
        assert!(r.to_client.is_none() && r.rtt.is_none());
    }

    /// A download run straight to the target: every request is answered by its burst (GSO
    /// trains), and what reached the client is exactly what the target sent.
    fn assert_exact_download(r: &RunReport, burst: u64) {
        let t = r.target.expect("the target answers queries");
        assert!(r.to_target.offered > 0);
        assert_eq!(r.to_target.delivered, Some(r.to_target.offered), "{r:?}");
        assert_eq!(t.measured_bytes, t.measured * DOWNLOAD_REQUEST_LEN as u64);
        let back = r.to_client.as_ref().unwrap();
        assert_eq!(back.offered, t.measured * burst, "{r:?}");
        assert_eq!(back.delivered, Some(back.offered), "{r:?}");
        assert_eq!(r.rtt.as_ref().unwrap().samples, back.offered);
        assert_eq!((r.client_foreign, r.mode.as_str()), (0, "download"));
        assert_eq!(r.delivered_per_sec(), back.delivered_per_sec.unwrap());
    }

    #[test]
    fn direct_download_counts_exactly() {
        let target =
            crate::target::TargetThread::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let mut spec = test_spec(Protocol::Udp, target.addr, target.addr);
        spec.mode = Mode::Download;
        spec.rate = 200;
        spec.max_datagrams = Some(500);
        let r = run(spec).unwrap();
        assert_exact_download(&r, 16);
    }

    /// Upload straight to the target: bursts leave as GSO trains, and the target counts every
    /// datagram of them.
    #[test]
    fn direct_upload_counts_exactly() {
        let target =
            crate::target::TargetThread::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let mut spec = test_spec(Protocol::Udp, target.addr, target.addr);
        spec.mode = Mode::Upload;
        spec.burst = 8;
        let r = run(spec).unwrap();
        let t = r.target.unwrap();
        assert!(r.to_target.offered > 0);
        assert_eq!(r.to_target.delivered, Some(r.to_target.offered), "{r:?}");
        assert_eq!(t.measured_bytes, t.measured * 100);
        assert_eq!(t.echoed, 0);
        assert!(r.to_client.is_none() && r.rtt.is_none());
        assert_eq!(r.burst, Some(8));
    }

    /// Flows spread over target ports: flow i asks for port base + i % N.
    #[test]
    fn flows_are_spread_over_target_ports() {
        let t: SocketAddr = "127.0.0.1:20000".parse().unwrap();
        let mut spec = test_spec(Protocol::H3, t, t);
        assert_eq!(spec.target_of(5), t);
        spec.target_ports = 4;
        let ports: Vec<u16> = (0..6).map(|i| spec.target_of(i).port()).collect();
        assert_eq!(ports, vec![20000, 20001, 20002, 20003, 20000, 20001]);
        assert_eq!(spec.path_for(3), "/.well-known/masque/udp/127.0.0.1/20003/");
    }

    /// A relay in this process on a free loopback port, loopback targets allowed.
    fn relay() -> masque_relay::Relay {
        let cfg = masque_relay::config::Config {
            listen: "127.0.0.1:0".to_owned(),
            workers: 1,
            pin_workers: false,
            allow_targets: vec!["127.0.0.0/8".to_owned()],
            metrics: "off".to_owned(),
            ..masque_relay::config::Config::default()
        };
        masque_relay::Relay::start(cfg.validate().unwrap()).unwrap()
    }

    fn through_the_relay(protocol: Protocol) {
        let relay = relay();
        let target =
            crate::target::TargetThread::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let r = run(test_spec(protocol, relay.local_addr(), target.addr)).unwrap();
        assert_eq!(r.setup.flows_open, 4, "{r:?}");
        assert_exact_echo(&r);
        relay.shutdown();
    }

    #[test]
    fn h3_run_counts_exactly() {
        through_the_relay(Protocol::H3);
    }

    /// Download through the relay over HTTP/3, flows spread over two target ports: the
    /// target's GSO bursts reach the client in full.
    #[test]
    fn h3_download_counts_exactly() {
        let relay = relay();
        let target =
            crate::target::TargetThread::start_ports("127.0.0.1:0".parse().unwrap(), 2, None)
                .unwrap();
        let mut spec = test_spec(Protocol::H3, relay.local_addr(), target.addr);
        spec.mode = Mode::Download;
        spec.target_ports = 2;
        spec.rate = 200;
        spec.max_datagrams = Some(500);
        let r = run(spec).unwrap();
        assert_eq!(r.setup.flows_open, 4, "{r:?}");
        assert_exact_download(&r, 16);
        relay.shutdown();
    }

    #[test]
    fn h2_run_counts_exactly() {
        through_the_relay(Protocol::H2);
    }

    #[test]
    fn http1_run_counts_exactly() {
        through_the_relay(Protocol::Http1);
    }

    #[test]
    fn flows_split_evenly() {
        assert_eq!(split(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(split(2, 5), vec![0..1, 1..2]);
        assert_eq!(split(1, 1), vec![0..1]);
    }
}
