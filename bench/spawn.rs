//! Processes the bench starts: the relay under test (from `--relay-bin`) and the raw
//! forwarder (this binary's `forward` subcommand), each pinned to the measured core, and
//! stopped when dropped.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::BenchError;

/// A child process killed on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    pub addr: SocketAddr,
    pub metrics: Option<SocketAddr>,
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
/// metrics on another free port, pinned to `core`; returns once it accepts TCP connections.
pub fn start_relay(bin: &Path, core: Option<usize>, extra: &[String]) -> Result<Proc, BenchError> {
    let port = free_port()?;
    let mport = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let metrics: SocketAddr = ([127, 0, 0, 1], mport).into();
    let (mut cmd, under_taskset) = pinned(bin, core);
    cmd.args(["--listen", &addr.to_string(), "--workers", "1"])
        .args(["--allow-target", "127.0.0.0/8"])
        .args(["--metrics", &metrics.to_string()])
        .args(["--log", "warn"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Its start-up warnings (self-signed certificate, sysctls) would bury the progress.
        .stderr(Stdio::null());
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
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(p);
        }
        if let Ok(Some(status)) = p.child.try_wait() {
            return Err(BenchError::Setup(format!(
                "{} exited at start: {status}",
                bin.display()
            )));
        }
        if Instant::now() > deadline {
            return Err(BenchError::Setup(format!(
                "{} did not listen on {addr} within 10 s",
                bin.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
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
