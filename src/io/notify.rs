//! The service manager's readiness protocol (`sd_notify(3)`), without libsystemd.
//!
//! Under `Type=notify` systemd passes the path of a datagram socket in `$NOTIFY_SOCKET` and waits
//! for `READY=1` before it calls the unit started; `STOPPING=1`, `RELOADING=1` and `STATUS=...`
//! keep `systemctl status` honest while the relay drains or reloads. A message is one datagram of
//! newline-separated `KEY=VALUE` lines. A path starting with `@` names a socket in the abstract
//! namespace (the `@` stands for the leading NUL byte).
//!
//! Without `$NOTIFY_SOCKET` (run by hand, in a test, under another supervisor) every function
//! here does nothing and returns `Ok`. A failed send is returned so the caller can log it; it is
//! never fatal, because the relay relays whether or not anyone listens.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Where notifications go: a socket path from `$NOTIFY_SOCKET` (or given directly, in tests).
#[derive(Debug, Clone)]
pub struct Notifier {
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier systemd asked for, or `None` when `$NOTIFY_SOCKET` is unset or empty.
    /// A value this module cannot use (a `vsock:` address, a malformed name) is an error.
    pub fn from_env() -> io::Result<Option<Self>> {
        match std::env::var_os(NOTIFY_SOCKET) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => {
                let v = v.into_string().map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, "NOTIFY_SOCKET is not UTF-8")
                })?;
                Self::new(&v).map(Some)
            }
        }
    }

    /// A notifier for `socket`: a file-system path (`/run/systemd/notify`) or an abstract name
    /// written with a leading `@`.
    pub fn new(socket: &str) -> io::Result<Self> {
        let addr = if let Some(name) = socket.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes())?
        } else if socket.starts_with('/') {
            SocketAddr::from_pathname(Path::new(socket))?
        } else {
            // systemd ≥ 254 may also pass `vsock:CID:PORT` (for VMs); the relay does not run
            // inside a VM's service manager that way, so say so rather than guess.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unsupported NOTIFY_SOCKET {socket:?}"),
            ));
        };
        Ok(Self { addr })
    }

    /// Sends one notification message (`KEY=VALUE` lines separated by `\n`).
    pub fn send(&self, message: &str) -> io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let n = sock.send_to_addr(message.as_bytes(), &self.addr)?;
        if n != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "notification truncated",
            ));
        }
        Ok(())
    }
}

fn send_env(message: &str) -> io::Result<()> {
    match Notifier::from_env()? {
        Some(n) => n.send(message),
        None => Ok(()),
    }
}

/// `READY=1`: the listeners are bound and the workers run; systemd now calls the unit started
/// (and, after a reload, done reloading).
pub fn ready() -> io::Result<()> {
    send_env(READY)
}

/// `STOPPING=1`: the relay is shutting down (draining); systemd shows the unit as deactivating.
pub fn stopping() -> io::Result<()> {
    send_env(STOPPING)
}

/// `RELOADING=1` with `MONOTONIC_USEC=`: a reload has started; follow it with [`ready`] when it
/// is done (or failed). systemd ≥ 253 wants the timestamp to tell this reload from an old one.
pub fn reloading() -> io::Result<()> {
    send_env(&reloading_message(monotonic_usec()?))
}

/// `STATUS=...`: one line shown by `systemctl status`. Newlines are replaced by spaces, since a
/// newline would start another `KEY=VALUE` line.
pub fn status(text: &str) -> io::Result<()> {
    send_env(&status_message(text))
}

const READY: &str = "READY=1";
const STOPPING: &str = "STOPPING=1";

fn reloading_message(monotonic_usec: u64) -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")
}

fn status_message(text: &str) -> String {
    format!("STATUS={}", text.replace(['\n', '\r'], " "))
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares `MONOTONIC_USEC` against.
/// (`std::time::Instant` uses the same clock but does not expose its value.)
fn monotonic_usec() -> io::Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable timespec on our stack; clock_gettime writes one timespec
    // into it and keeps no pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn receiver_at(path: &Path) -> UnixDatagram {
        let r = UnixDatagram::bind(path).unwrap();
        r.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        r
    }

    fn recv(r: &UnixDatagram) -> String {
        let mut buf = [0u8; 1024];
        let n = r.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let r = receiver_at(&path);
        let n = Notifier::new(path.to_str().unwrap()).unwrap();
        n.send(READY).unwrap();
        assert_eq!(recv(&r), "READY=1");
        n.send(&status_message("listening on 127.0.0.1:4433\nworkers 2"))
            .unwrap();
        assert_eq!(recv(&r), "STATUS=listening on 127.0.0.1:4433 workers 2");
        n.send(STOPPING).unwrap();
        assert_eq!(recv(&r), "STOPPING=1");
    }

    #[test]
    fn messages_reach_an_abstract_socket() {
        let name = format!("masque-relay-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let r = UnixDatagram::bind_addr(&addr).unwrap();
        r.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::new(&format!("@{name}")).unwrap();
        n.send(READY).unwrap();
        assert_eq!(recv(&r), "READY=1");
    }

    #[test]
    fn reloading_carries_a_monotonic_timestamp() {
        let a = monotonic_usec().unwrap();
        let msg = reloading_message(a);
        let mut lines = msg.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"));
        let ts: u64 = lines
            .next()
            .unwrap()
            .strip_prefix("MONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(ts, a);
        assert!(monotonic_usec().unwrap() >= a);
    }

    #[test]
    fn unusable_socket_names_are_errors() {
        assert!(Notifier::new("vsock:2:1234").is_err());
        assert!(Notifier::new("relative/path").is_err());
        let long = format!("/{}", "x".repeat(200));
        assert!(Notifier::new(&long).is_err());
    }

    #[test]
    fn no_listener_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::new(dir.path().join("nobody").to_str().unwrap()).unwrap();
        assert!(n.send(READY).is_err());
    }
}
