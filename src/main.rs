//! The `masque-relay` command: reads the configuration, starts the workers, waits for a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing::{error, info, warn};

use masque_relay::config::Config;
use masque_relay::io::{notify, sysctl};
use masque_relay::Relay;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A CONNECT-UDP (RFC 9298) relay: clients ask over HTTP/3 (QUIC), HTTP/2 or HTTP/1.1 (TLS) for a
/// UDP flow to host:port, and the relay moves datagrams both ways.
///
/// With no options it listens on 127.0.0.1:4433 with a self-signed certificate for localhost.
/// Flags override the configuration file.
#[derive(Debug, Parser)]
#[command(name = "masque-relay", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// TOML configuration file; every field is documented in the README.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,

    /// Address and port to listen on: UDP for HTTP/3, TCP for HTTP/2 and HTTP/1.1. Port 0 picks a
    /// free one.
    /// [default: 127.0.0.1:4433]
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,

    /// Worker threads, each pinned to a core; 0 = one per available core. [default: 0]
    #[arg(long, value_name = "N")]
    workers: Option<usize>,

    /// Do not pin worker threads to cores.
    #[arg(long)]
    no_pin: bool,

    /// PEM certificate chain. Without --cert and --key a self-signed certificate is generated.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,

    /// PEM private key for --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,

    /// Allow targets the default deny list refuses (loopback, private, ...): CIDR[:PORT[-PORT]],
    /// e.g. 127.0.0.0/8 or ::1/128:5000-6000. Repeatable; adds to the file's allow_targets.
    #[arg(long = "allow-target", value_name = "CIDR[:PORTS]")]
    allow_target: Vec<String>,

    /// Refuse targets, whatever else allows them: CIDR[:PORT[-PORT]]. Repeatable.
    #[arg(long = "deny-target", value_name = "CIDR[:PORTS]")]
    deny_target: Vec<String>,

    /// URI template clients use (RFC 6570 level 3, with {target_host} and {target_port}).
    /// [default: /.well-known/masque/udp/{target_host}/{target_port}/]
    #[arg(long, value_name = "TEMPLATE")]
    uri_template: Option<String>,

    /// Close a flow after this many seconds without a datagram either way. [default: 120]
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<u64>,

    /// Serve Prometheus metrics at http://ADDR:PORT/metrics, or `off`.
    /// [default: 127.0.0.1:9464]
    #[arg(long, value_name = "ADDR:PORT|off")]
    metrics: Option<String>,

    /// Datagram I/O backend: `auto` probes io_uring at start and falls back to
    /// recvmmsg/sendmmsg + epoll where it is disabled or forbidden; `uring` refuses to start
    /// without it. [default: auto]
    #[arg(long, value_name = "auto|uring|mmsg")]
    io_backend: Option<masque_relay::io::dgram::Choice>,

    /// On SIGTERM, keep established flows relaying for at most this many seconds while
    /// refusing new work, then exit. [default: 30]
    #[arg(long, value_name = "SECS")]
    drain_timeout: Option<u64>,

    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or `masque_relay=debug`.
    /// RUST_LOG is used when this is not given. [default: info]
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
}

/// Subcommands besides running the relay.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print a credentials-file line for a secret read from standard input (one line):
    /// `token NAME` for a Bearer token, `basic USER` for a Basic password.
    HashCredential {
        #[arg(value_parser = ["token", "basic"])]
        kind: String,
        name: String,
    },
}

/// `hash-credential`: reads the secret from stdin so it never shows in the process list.
fn hash_credential(kind: &str, name: &str) -> ExitCode {
    let mut secret = String::new();
    if std::io::stdin().read_line(&mut secret).is_err() {
        eprintln!("masque-relay: cannot read the secret from standard input");
        return ExitCode::from(2);
    }
    let secret = secret.trim_end_matches(['\r', '\n']);
    if secret.is_empty() || name.is_empty() || name.contains(char::is_whitespace) {
        eprintln!("masque-relay: need a non-empty secret on stdin and a name without spaces");
        return ExitCode::from(2);
    }
    let line = if kind == "token" {
        masque_relay::relay::auth::token_line(name, secret)
    } else {
        let salt: [u8; 16] = rand::random();
        masque_relay::relay::auth::basic_line(name, secret, &salt)
    };
    println!("{line}");
    ExitCode::SUCCESS
}

impl Cli {
    /// The configuration file (if any) with the flags applied over it. Called again on
    /// SIGHUP, so a reload re-reads the file and keeps the command line's overrides.
    fn load(&self) -> Result<Config, masque_relay::config::ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = &self.listen {
            cfg.listen = v.clone();
        }
        if let Some(v) = self.workers {
            cfg.workers = v;
        }
        if self.no_pin {
            cfg.pin_workers = false;
        }
        if self.cert.is_some() {
            cfg.cert = self.cert.clone();
            cfg.key = self.key.clone();
        }
        cfg.allow_targets.extend(self.allow_target.iter().cloned());
        cfg.deny_targets.extend(self.deny_target.iter().cloned());
        if let Some(v) = &self.uri_template {
            cfg.uri_template = v.clone();
        }
        if let Some(v) = self.idle_timeout {
            cfg.flow_idle_timeout_secs = v;
        }
        if let Some(v) = &self.metrics {
            cfg.metrics = v.clone();
        }
        if let Some(v) = self.drain_timeout {
            cfg.drain_timeout_secs = v;
        }
        if let Some(v) = self.io_backend {
            cfg.io.backend = v;
        }
        Ok(cfg)
    }
}

fn init_logging(filter: Option<&str>) {
    let filter = match filter {
        Some(f) => tracing_subscriber::EnvFilter::new(f),
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::HashCredential { kind, name }) = &cli.command {
        return hash_credential(kind, name);
    }
    init_logging(cli.log.as_deref());
    let checked = match cli.load().and_then(|c| c.validate()) {
        Ok(c) => c,
        Err(e) => {
            error!("invalid configuration: {e}");
            eprintln!("masque-relay: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    // Signal handlers go in before anything can be observed from outside, so that a SIGTERM
    // sent as soon as the relay says it is listening is a graceful stop, not the default kill.
    let control = match Control::new() {
        Ok(c) => c,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    // Before the workers allocate: their pools and tables then fault in 4 KiB pages.
    if !checked.io.transparent_huge_pages {
        if let Err(e) = sysctl::disable_transparent_huge_pages() {
            warn!("cannot turn transparent huge pages off: {e}");
        }
    }
    let relay = match Relay::start(checked.clone()) {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start: {e}");
            eprintln!("masque-relay: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    relay.log_summary(&checked);
    if relay.self_signed() {
        warn!("using a self-signed certificate generated at start: for local use only; set cert and key for anything else");
    }
    if !checked.listen.ip().is_loopback()
        && checked.auth.credentials_file.is_none()
        && checked.auth.client_ca.is_none()
    {
        warn!(listen = %checked.listen, "listening beyond loopback without client authentication");
    }
    check_kernel(&checked);
    notify_ready(&relay, &checked);
    control.run(&cli, &relay);
    relay.shutdown();
    ExitCode::SUCCESS
}

/// SIGHUP: re-reads the configuration; an invalid one is refused and the running one stays.
fn reload(cli: &Cli, relay: &Relay) {
    info!("SIGHUP received: reloading the configuration");
    let _ = notify::reloading();
    match cli.load().and_then(|c| c.validate()) {
        Err(e) => error!("reload refused, the running configuration stays: {e}"),
        Ok(checked) => {
            if let Err(e) = relay.reload(checked) {
                error!("reload refused, the running configuration stays: {e}");
            }
        }
    }
    let _ = notify::ready();
}

/// Raises the soft open-file limit to the hard one, then warns about every kernel setting below
/// what the relay needs (see `tuning/`). Never fatal: a small kernel still relays, just less.
fn check_kernel(checked: &masque_relay::config::Checked) {
    if let Err(e) = sysctl::raise_nofile_limit() {
        warn!("cannot raise RLIMIT_NOFILE to its hard limit: {e}");
    }
    let kernel = sysctl::KernelLimits::read();
    let needs = sysctl::Needs {
        socket_buffer: if checked.http3.enabled {
            checked.http3.socket_buffer as u64
        } else {
            0
        },
        ..sysctl::Needs::default()
    };
    for w in sysctl::check(&kernel, &needs) {
        warn!("kernel setting below what the relay needs: {w}");
    }
}

/// Tells systemd (`Type=notify`) the relay is up; does nothing outside systemd.
fn notify_ready(relay: &Relay, checked: &masque_relay::config::Checked) {
    let status = format!(
        "listening on {}, {} workers",
        relay.local_addr(),
        checked.workers
    );
    if let Err(e) = notify::ready().and_then(|()| notify::status(&status)) {
        warn!("cannot notify the service manager: {e}");
    }
}

/// The control thread's runtime and its signal streams.
struct Control {
    rt: tokio::runtime::Runtime,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Control {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (term, int, hup) = rt.block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
                signal(SignalKind::hangup())?,
            ))
        })?;
        Ok(Self { rt, term, int, hup })
    }

    /// Serves signals until the relay should exit: SIGHUP reloads the configuration; SIGTERM
    /// or SIGINT start the graceful drain, which ends when the last flow closes, when the drain
    /// timeout passes, or at a second SIGTERM/SIGINT.
    fn run(mut self, cli: &Cli, relay: &Relay) {
        self.rt.block_on(async {
            loop {
                tokio::select! {
                    _ = self.hup.recv() => reload(cli, relay),
                    _ = self.term.recv() => { info!("SIGTERM received"); break }
                    _ = self.int.recv() => { info!("SIGINT received"); break }
                }
            }
            if let Err(e) = notify::stopping() {
                warn!("cannot notify the service manager: {e}");
            }
            let timeout = relay.config().drain_timeout;
            relay.drain();
            let deadline = tokio::time::Instant::now() + timeout;
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
            loop {
                let open = relay.flows_open();
                if open == 0 {
                    info!("drain complete: no flow left");
                    break;
                }
                let _ = notify::status(&format!("draining, {open} flows open"));
                tokio::select! {
                    _ = tick.tick() => {}
                    () = tokio::time::sleep_until(deadline) => {
                        info!(flows = open, "drain timeout reached; closing what is left");
                        break;
                    }
                    _ = self.term.recv() => { info!("second signal: stopping now"); break }
                    _ = self.int.recv() => { info!("second signal: stopping now"); break }
                }
            }
        });
    }
}
