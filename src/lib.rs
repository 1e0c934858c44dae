//! masque-relay: a CONNECT-UDP (RFC 9298) relay.
//!
//! Modules that do no I/O and read no clock: [`proto`] (codecs and request rules) and [`relay`]
//! (the flow table, flow state, admission, the HTTP/3 session, target policy). Modules at the
//! I/O edge: [`io`] (sockets and the datagram engine; the only `unsafe`), [`transport`] (the
//! QUIC endpoint, TLS, the HTTP/2 and HTTP/1.1 connection tasks), [`worker`] (threads and the
//! worker pass). Leaves every part may use: [`ctx`] (configuration, phase, the worker's
//! context), [`counter`], [`config`].
//! [`Relay::start`] wires them together; `main.rs` adds the command line and signals.

pub mod config;
pub mod counter;
pub mod ctx;
pub mod io;
pub mod metrics;
pub mod proto;
pub mod relay;
pub mod transport;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::watch;
use tracing::info;

use config::{Checked, TlsSource};
use ctx::{Phase, Shared, WorkerCtx};
use metrics::WorkerStats;
use relay::policy::TargetPolicy;
use transport::tls::{Identity, TlsError};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("auth.credentials_file {path}: {reason}")]
    Credentials { path: String, reason: String },
    #[error("cannot start worker thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("io.backend: {0}")]
    IoBackend(#[from] io::dgram::SelectError),
}

/// Everything a reload may replace, built from a configuration: certificates and TLS
/// configurations, credentials, target policy. `own` is the relay's listening address once
/// known. Returns whether the certificate was generated.
fn live_state(
    config: Checked,
    own: Option<SocketAddr>,
    resolver: Arc<dyn io::resolve::Resolve>,
    limiter: Arc<relay::limits::FlowLimiter>,
    memory_pressure: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(Shared, bool), StartError> {
    let identity = Identity::load(&config.tls)?;
    let client_ca = config.auth.client_ca.as_deref();
    let tls = transport::tls::tcp_server_config(&identity, client_ca)?;
    let quic = if config.http3.enabled {
        Some(transport::quic::server_config(
            &identity,
            &config.http3,
            client_ca,
        )?)
    } else {
        None
    };
    let credentials = match &config.auth.credentials_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| StartError::Credentials {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            let store = relay::auth::CredentialStore::parse(&text).map_err(|e| {
                StartError::Credentials {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                }
            })?;
            Some(Arc::new(store))
        }
        None => None,
    };
    let policy = TargetPolicy::new(
        config.allow_targets.clone(),
        config.deny_targets.clone(),
        own.into_iter().collect(),
    );
    let shared = Shared {
        config,
        policy,
        tls,
        quic,
        resolver,
        credentials,
        limiter,
        memory_pressure,
    };
    Ok((shared, identity.self_signed))
}

/// Watches the memory cgroup ten times a second and sets `flag` while usage is above
/// `limits.memory_high_percent` of the limit; no thread when there is no cgroup to read.
fn memory_watch(
    live: watch::Receiver<Arc<Shared>>,
    flag: Arc<std::sync::atomic::AtomicBool>,
    stop: watch::Receiver<bool>,
) -> Option<JoinHandle<()>> {
    use std::sync::atomic::Ordering;
    let cgroup = io::memory::CgroupMemory::find()?;
    std::thread::Builder::new()
        .name("memory-watch".into())
        .spawn(move || {
            while !*stop.borrow() {
                let percent = live.borrow().config.limits.memory_high_percent;
                if let Some((usage, limit)) = cgroup.read() {
                    let over = io::memory::over(usage, limit, percent);
                    if over != flag.swap(over, Ordering::Relaxed) {
                        if over {
                            tracing::warn!(
                                usage,
                                ?limit,
                                percent,
                                "memory pressure: refusing new flows"
                            );
                        } else {
                            info!(usage, ?limit, "memory pressure over: accepting new flows");
                        }
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        })
        .ok()
}

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    local_addr: SocketAddr,
    phase: watch::Sender<Phase>,
    live: watch::Sender<Arc<Shared>>,
    metrics_stop: watch::Sender<bool>,
    quic_keep: Vec<std::net::UdpSocket>,
    memory_watch: Option<JoinHandle<()>>,
    threads: Vec<JoinHandle<()>>,
    stats: Vec<Arc<WorkerStats>>,
    metrics: Option<metrics::MetricsServer>,
    identity_self_signed: bool,
    io_backend: io::dgram::Selected,
}

impl Relay {
    /// Binds the listeners and starts the workers. Returns once every worker has its listener,
    /// so a client may connect as soon as this returns.
    pub fn start(config: Checked) -> Result<Relay, StartError> {
        Self::start_with_resolver(config, Arc::new(io::resolve::SystemResolver))
    }

    /// [`Relay::start`] with another resolver for target host names.
    pub fn start_with_resolver(
        config: Checked,
        resolver: Arc<dyn io::resolve::Resolve>,
    ) -> Result<Relay, StartError> {
        // Certificates, credentials and policy first: a bad file stops the start before any
        // socket is bound. The policy's own address is filled in once the port is known.
        let limiter = relay::limits::FlowLimiter::new(
            config.limits.max_flows,
            config.limits.max_flows_per_identity,
        );
        let memory_pressure = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (mut shared, self_signed) =
            live_state(config, None, resolver, limiter, memory_pressure.clone())?;
        let config = shared.config.clone();
        // The datagram backend: probed once here, so every worker runs the same one.
        let io_backend = io::dgram::select(config.io.backend)?;
        tracing::info!(
            backend = io_backend.backend.as_str(),
            reason = %io_backend.reason,
            gso = io::dgram::gso_supported(),
            "datagram I/O backend"
        );
        // The first listener fixes the port (port 0 picks one); the others share it. HTTP/3
        // needs the same port on UDP: when the kernel picked a TCP port whose UDP twin is
        // taken, pick again.
        let mut attempts = 0;
        let (first, local_addr) = loop {
            let first = io::tcp::reuseport_listener(config.listen, 1024).map_err(|source| {
                StartError::Listen {
                    addr: config.listen,
                    source,
                }
            })?;
            let local_addr = first.local_addr().map_err(|source| StartError::Listen {
                addr: config.listen,
                source,
            })?;
            attempts += 1;
            let udp_taken = config.http3.enabled
                && config.listen.port() == 0
                && attempts < 16
                && std::net::UdpSocket::bind(local_addr).is_err();
            if !udp_taken {
                break (first, local_addr);
            }
        };
        let mut listeners = vec![first];
        for _ in 1..config.workers {
            listeners.push(
                io::tcp::reuseport_listener(local_addr, 1024).map_err(|source| {
                    StartError::Listen {
                        addr: local_addr,
                        source,
                    }
                })?,
            );
        }
        // Bound before any worker starts, so a taken metrics port stops the relay cleanly.
        let metrics_listener = config
            .metrics
            .map(|addr| {
                metrics::MetricsServer::bind(addr)
                    .map_err(|source| StartError::Metrics { addr, source })
            })
            .transpose()?;
        // One QUIC socket per worker on the same port (UDP), bound in worker order: the i-th
        // socket of the reuseport group is worker i, which the CID steering program relies on.
        let mut quic_sockets = Vec::new();
        if config.http3.enabled {
            let addr = local_addr;
            for _ in 0..config.workers {
                let s = io::quic_socket::bind_reuseport(addr, config.http3.socket_buffer)
                    .map_err(|source| StartError::Listen { addr, source })?;
                quic_sockets.push(s);
            }
            if config.workers > 1 {
                if let Err(e) =
                    io::bpf::attach_cid_steering(&quic_sockets[0], config.workers as u32)
                {
                    tracing::warn!(error = %e, "cannot attach the QUIC steering program: clients that change address may lose their connection");
                }
            }
        }
        let quic = shared.quic.clone();
        // Duplicates kept by the control thread, released in descending order at exit: see
        // `Relay::shutdown`.
        let quic_keep = quic_sockets
            .iter()
            .map(|s| s.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| StartError::Listen {
                addr: local_addr,
                source,
            })?;
        let mut quic_sockets = quic_sockets.into_iter();
        shared.policy = TargetPolicy::new(
            config.allow_targets.clone(),
            config.deny_targets.clone(),
            vec![local_addr],
        );
        let cores = if config.pin_workers {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let shared = Arc::new(shared);
        let (phase, phase_rx) = watch::channel(Phase::Run);
        let (live, live_rx) = watch::channel(shared);
        let (metrics_stop, metrics_stop_rx) = watch::channel(false);
        let mut threads = Vec::new();
        let mut stats = Vec::new();
        for (id, listener) in listeners.into_iter().enumerate() {
            let ctx = WorkerCtx {
                id,
                live: live_rx.clone(),
                stats: Arc::new(WorkerStats::default()),
                phase: phase_rx.clone(),
            };
            stats.push(ctx.stats.clone());
            let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
            let quic = quic.clone().zip(quic_sockets.next());
            let io = (io_backend.backend, config.io.sizes());
            let t = std::thread::Builder::new()
                .name(format!("worker-{id}"))
                .spawn(move || worker::run(ctx, listener, quic, core, io))
                .map_err(StartError::Thread)?;
            threads.push(t);
        }
        let metrics = metrics_listener
            .map(|l| {
                let registry = metrics::RelayCollector::registry(&stats);
                metrics::MetricsServer::start(l, registry, metrics_stop_rx.clone())
            })
            .transpose()
            .map_err(StartError::Thread)?;
        let memory_watch = memory_watch(live_rx.clone(), memory_pressure, metrics_stop_rx.clone());
        Ok(Relay {
            local_addr,
            phase,
            live,
            metrics_stop,
            quic_keep,
            memory_watch,
            threads,
            stats,
            metrics,
            identity_self_signed: self_signed,
            io_backend,
        })
    }

    /// The datagram I/O backend the workers run on, and why it was chosen.
    pub fn io_backend(&self) -> &io::dgram::Selected {
        &self.io_backend
    }

    /// The address the TCP listener is bound to (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Each worker's counters.
    pub fn stats(&self) -> &[Arc<WorkerStats>] {
        &self.stats
    }

    /// The address `/metrics` is served on (with the real port when 0 was asked), unless off.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .as_ref()
            .map(metrics::MetricsServer::local_addr)
    }

    /// True when the TLS certificate was generated at start.
    pub fn self_signed(&self) -> bool {
        self.identity_self_signed
    }

    /// Starts the graceful drain: listeners close, HTTP/2 and HTTP/3 GOAWAY go out, new
    /// requests are refused, established flows keep relaying. [`Relay::shutdown`] ends it.
    pub fn drain(&self) {
        info!("draining: no new connections or requests; established flows go on");
        let _ = self.phase.send(Phase::Drain);
    }

    /// Flows open on all workers.
    pub fn flows_open(&self) -> u64 {
        self.stats.iter().map(|s| s.flows_open()).sum()
    }

    /// The configuration in force.
    pub fn config(&self) -> Checked {
        self.live.borrow().config.clone()
    }

    /// Applies a new configuration to new connections and flows: certificates, target policy,
    /// limits. Established flows keep what they started with. Settings that need new sockets or
    /// threads (listen address, workers, HTTP/3 on or off, metrics address) are kept as they
    /// are, with a warning. On error nothing changes.
    pub fn reload(&self, mut config: Checked) -> Result<(), StartError> {
        let old = self.live.borrow().clone();
        let fixed = &old.config;
        for (name, changed) in [
            ("listen", config.listen != fixed.listen),
            ("workers", config.workers != fixed.workers),
            ("pin_workers", config.pin_workers != fixed.pin_workers),
            ("http3.enabled", config.http3.enabled != fixed.http3.enabled),
            ("metrics", config.metrics != fixed.metrics),
        ] {
            if changed {
                tracing::warn!(
                    field = name,
                    "changing this needs a restart; keeping the running value"
                );
            }
        }
        config.listen = fixed.listen;
        config.workers = fixed.workers;
        config.pin_workers = fixed.pin_workers;
        config.http3.enabled = fixed.http3.enabled;
        config.metrics = fixed.metrics;
        let caps = (
            config.limits.max_flows,
            config.limits.max_flows_per_identity,
        );
        let (shared, _) = live_state(
            config,
            Some(self.local_addr),
            old.resolver.clone(),
            old.limiter.clone(),
            old.memory_pressure.clone(),
        )?;
        old.limiter.set_caps(caps.0, caps.1);
        let shared = Arc::new(shared);
        let _ = self.live.send(shared);
        info!("configuration reloaded: new connections and flows use it");
        Ok(())
    }

    /// Stops every worker and waits for the threads to end. Open flows end their streams.
    pub fn shutdown(self) {
        let _ = self.phase.send(Phase::Stop);
        let _ = self.metrics_stop.send(true);
        for t in self.threads {
            let _ = t.join();
        }
        if let Some(t) = self.memory_watch {
            let _ = t.join();
        }
        // Leave the QUIC reuseport group from the last socket to the first. The kernel fills a
        // vacated slot with the group's last socket, so this order leaves a successor process's
        // sockets (bound after ours, during a restart) in their worker order, which is what the
        // CID steering program relies on.
        let mut keep = self.quic_keep;
        while let Some(s) = keep.pop() {
            drop(s);
        }
        if let Some(m) = self.metrics {
            m.join();
        }
        // Every flow ever opened has been counted as closed by now (the workers end what is
        // left when they stop): the two totals agree unless a flow escaped its accounting.
        let opened: u64 = self.stats.iter().map(|s| s.flows_opened.get()).sum();
        let open: u64 = self.stats.iter().map(|s| s.flows_open()).sum();
        info!(
            flows_opened = opened,
            flows_closed = opened - open,
            "relay stopped"
        );
    }

    /// Logs what the relay runs with.
    pub fn log_summary(&self, config: &Checked) {
        let cert = match &config.tls {
            TlsSource::Files { cert, .. } => cert.display().to_string(),
            TlsSource::SelfSigned => "self-signed (generated at start)".to_owned(),
        };
        info!(
            listen = %self.local_addr,
            protocols = if config.http3.enabled {
                "h3 (UDP), h2 and http/1.1 (TCP+TLS)"
            } else {
                "h2 and http/1.1 (TCP+TLS)"
            },
            workers = config.workers,
            pinned = config.pin_workers,
            uri_template = config.uri_template.as_str(),
            %cert,
            "masque-relay listening"
        );
        let allow: Vec<String> = config.allow_targets.iter().map(|r| r.to_string()).collect();
        let deny: Vec<String> = config.deny_targets.iter().map(|r| r.to_string()).collect();
        info!(
            ?allow,
            ?deny,
            idle_timeout_s = config.flow_idle_timeout.as_secs(),
            "target policy: default deny list (loopback, private, link-local, CGNAT, multicast, \
             reserved, own address) plus these rules"
        );
        match self.metrics_addr() {
            Some(addr) => info!("metrics served at http://{addr}/metrics"),
            None => info!("metrics endpoint off"),
        }
    }
}
