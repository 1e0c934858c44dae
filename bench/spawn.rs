//! Processes the bench starts: the relay under test (from `--relay-bin`) and the raw
//! forwarder (this binary's `forward` subcommand), each pinned to the measured core, and
//! stopped when dropped.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::BenchError;

/// The relay's datagram I/O backend as `--io-backend` asks for it (passed through to the relay
/// this tool starts).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum IoBackend {
    /// io_uring when the relay's probe finds it usable, else recvmmsg/sendmmsg.
    #[default]
    Auto,
    /// io_uring; the relay refuses to start without it.
    Uring,
    /// recvmmsg/sendmmsg + epoll.
    Mmsg,
}

impl IoBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            IoBackend::Auto => "auto",
            IoBackend::Uring => "uring",
            IoBackend::Mmsg => "mmsg",
        }
    }

    /// The relay's command-line arguments for this choice.
    pub fn relay_args(self) -> Vec<String> {
        vec!["--io-backend".to_owned(), self.as_str().to_owned()]
    }
}

/// A child process killed on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    pub addr: SocketAddr,
    pub metrics: Option<SocketAddr>,
    /// The backend the relay says it runs on (`masque_relay_io_backend_info`), when it says.
    pub io_backend: Option<&'static str>,
    /// Where the relay's standard error goes (removed on drop).
    log: Option<PathBuf>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(p) = &self.log {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The last lines of the relay's standard error, for a start-up failure.
fn log_tail(log: &Option<PathBuf>) -> String {
    let text = log
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join("\n");
    if tail.is_empty() {
        String::new()
    } else {
        format!(":\n{tail}")
    }
}

/// A loopback port free for both TCP and UDP right now.
pub fn free_port() -> Result<u16, BenchError> {
    for _ in 0..50 {
        let t = TcpListener::bind("127.0.0.1:0")?;
        let port = t.local_addr()?.port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(BenchError::Setup("no free loopback port".into()))
}

fn taskset() -> Option<PathBuf> {
    ["/usr/bin/taskset", "/bin/taskset"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A command for `program`, under `taskset -c core` when both are available.
fn pinned(program: &Path, core: Option<usize>) -> (Command, bool) {
    match (core, taskset()) {
        (Some(c), Some(ts)) => {
            let mut cmd = Command::new(ts);
            cmd.arg("-c").arg(c.to_string()).arg(program);
            (cmd, true)
        }
        _ => (Command::new(program), false),
    }
}

/// Starts the relay at `bin` on a free loopback port with one worker, loopback targets allowed,
/// metrics on another free port, pinned to `core`, with `extra` arguments (`--io-backend` among
/// them, see [`IoBackend::relay_args`]); returns once it accepts TCP connections, with the I/O
/// backend it reports. Its standard error goes to a temporary file, shown if it fails to start.
pub fn start_relay(bin: &Path, core: Option<usize>, extra: &[String]) -> Result<Proc, BenchError> {
    let port = free_port()?;
    let mport = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let metrics: SocketAddr = ([127, 0, 0, 1], mport).into();
    let (mut cmd, under_taskset) = pinned(bin, core);
    let log = std::env::temp_dir().join(format!(
        "masque-bench-relay-{}-{port}.log",
        std::process::id()
    ));
    // Its start-up warnings (self-signed certificate, sysctls) would bury the progress.
    let (stderr, log) = match std::fs::File::create(&log) {
        Ok(f) => (Stdio::from(f), Some(log)),
        Err(_) => (Stdio::null(), None),
    };
    cmd.args(["--listen", &addr.to_string(), "--workers", "1"])
        .args(["--allow-target", "127.0.0.0/8"])
        .args(["--metrics", &metrics.to_string()])
        .args(["--log", "warn"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    if under_taskset {
        // The relay would otherwise pin its worker to core 0 itself.
        cmd.arg("--no-pin");
    }
    let child = cmd
        .spawn()
        .map_err(|e| BenchError::Setup(format!("cannot start {}: {e}", bin.display())))?;
    let mut p = Proc {
        child,
        addr,
        metrics: Some(metrics),
        io_backend: None,
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            break;
        }
        if let Ok(Some(status)) = p.child.try_wait() {
            return Err(BenchError::Setup(format!(
                "{} exited at start: {status}{}",
                bin.display(),
                log_tail(&p.log)
            )));
        }
        if Instant::now() > deadline {
            return Err(BenchError::Setup(format!(
                "{} did not listen on {addr} within 10 s{}",
                bin.display(),
                log_tail(&p.log)
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The worker names its backend once its engine runs, a moment after the listener is up.
    for _ in 0..50 {
        if let Some(b) = crate::procfs::scrape(metrics).and_then(|m| m.io_backend) {
            p.io_backend = Some(b);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(p)
}

/// Starts this binary's raw forwarder towards `target`, pinned to `core`, for at most
/// `lifetime`; returns once it has said where it listens.
pub fn start_forwarder(
    target: SocketAddr,
    core: Option<usize>,
    lifetime: Duration,
) -> Result<Proc, BenchError> {
    let exe = std::env::current_exe()?;
    let (mut cmd, _) = pinned(&exe, core);
    cmd.args(["forward", "--listen", "127.0.0.1:0", "--target"])
        .arg(target.to_string())
        .arg("--duration")
        .arg(lifetime.as_secs().max(1).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| BenchError::Setup(format!("cannot start the forwarder: {e}")))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|a| a.parse().ok());
    match addr {
        Some(addr) => Ok(Proc {
            child,
            addr,
            metrics: None,
            io_backend: None,
            log: None,
        }),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(BenchError::Setup(format!(
                "the forwarder did not start: {line:?}"
            )))
        }
    }
}

/// Raises this process's open-file limit (children inherit it) as far as allowed, for runs
/// with many flows.
pub fn raise_nofile(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft >= want {
            return;
        }
        if setrlimit(Resource::RLIMIT_NOFILE, want.max(hard), want.max(hard)).is_err() {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(want).max(soft), hard);
        }
    }
}
