//! The start-up kernel check: is this kernel tuned for what the configuration asks of it?
//!
//! A relay at the edge holds thousands of egress UDP sockets (one per flow to the same target)
//! and asks for large socket buffers; a stock
//! kernel silently caps the buffers at `net.core.rmem_max`/`wmem_max`, refuses sockets past
//! `RLIMIT_NOFILE`, and runs out of ephemeral ports at the end of `net.ipv4.ip_local_port_range`.
//! None of that fails at start; it shows up later as drops or refused flows under load. So at
//! start the relay reads those settings ([`KernelLimits::read`]), compares them with what it needs
//! ([`check`], a pure function) and logs one warning per shortfall, naming the setting, the
//! current value and the wanted one. `tuning/` has sysctl profiles that satisfy the check.
//!
//! Nothing here changes a sysctl; only the process's own soft `RLIMIT_NOFILE` may be raised to its
//! hard limit ([`raise_nofile_limit`]), which any process may do.

use std::fmt;
use std::io;
use std::path::Path;

/// Where the kernel exposes its settings.
pub const PROC_SYS: &str = "/proc/sys";

/// Socket buffer size (`SO_RCVBUF`/`SO_SNDBUF`) the UDP listener of the HTTP/3 transport asks
/// for: enough for a burst of ~2800 full-size QUIC packets between two loop passes.
pub const LISTENER_SOCKET_BUFFER: u64 = 4 * 1024 * 1024;

/// Open files the relay should be able to hold: one per flow socket and per connection, with
/// room for tens of thousands of flows.
pub const WANTED_OPEN_FILES: u64 = 65_536;

/// Ephemeral ports the relay should have: every flow binds one (`0.0.0.0:0` or `[::]:0`), so
/// the port range caps concurrent flows. Half the port space; the stock range (28232 ports)
/// falls short, `tuning/many-flows.conf` widens it.
pub const WANTED_LOCAL_PORTS: u64 = 32_768;

/// What the configuration needs from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// Socket buffer size the relay asks for, in bytes; `rmem_max`/`wmem_max` must allow it.
    pub socket_buffer: u64,
    /// Open files (`RLIMIT_NOFILE`, capped by `fs.nr_open`).
    pub open_files: u64,
    /// Ports in `net.ipv4.ip_local_port_range`.
    pub local_ports: u64,
}

impl Default for Needs {
    fn default() -> Self {
        Self {
            socket_buffer: LISTENER_SOCKET_BUFFER,
            open_files: WANTED_OPEN_FILES,
            local_ports: WANTED_LOCAL_PORTS,
        }
    }
}

/// The settings the check reads; `None` where one could not be read (a container without
/// `/proc/sys/net`, an unexpected format). Unreadable settings are not warned about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelLimits {
    /// `net.core.rmem_max`: the largest `SO_RCVBUF` an unprivileged socket gets.
    pub rmem_max: Option<u64>,
    /// `net.core.wmem_max`: the largest `SO_SNDBUF`.
    pub wmem_max: Option<u64>,
    /// `fs.nr_open`: the ceiling for any process's `RLIMIT_NOFILE`.
    pub nr_open: Option<u64>,
    /// This process's soft `RLIMIT_NOFILE` (`LimitNOFILE=` in the unit, `ulimit -n`).
    pub nofile_soft: Option<u64>,
    /// This process's hard `RLIMIT_NOFILE`.
    pub nofile_hard: Option<u64>,
    /// `net.ipv4.ip_local_port_range`: first and last ephemeral port.
    pub local_port_range: Option<(u16, u16)>,
}

impl KernelLimits {
    /// Reads the running kernel's settings and this process's file limit.
    pub fn read() -> Self {
        Self::read_at(Path::new(PROC_SYS))
    }

    /// [`KernelLimits::read`] with the sysctl tree at `root` instead of `/proc/sys`.
    pub fn read_at(root: &Path) -> Self {
        let (nofile_soft, nofile_hard) = match nofile_limit() {
            Ok((s, h)) => (Some(s), Some(h)),
            Err(_) => (None, None),
        };
        Self {
            rmem_max: read_u64(root, "net.core.rmem_max"),
            wmem_max: read_u64(root, "net.core.wmem_max"),
            nr_open: read_u64(root, "fs.nr_open"),
            nofile_soft,
            nofile_hard,
            local_port_range: read_sysctl(root, "net.ipv4.ip_local_port_range")
                .and_then(|v| parse_port_range(&v)),
        }
    }
}

/// A setting below what the relay needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The sysctl name or limit, as an operator would change it.
    pub setting: &'static str,
    /// Its current value, as the kernel writes it.
    pub current: String,
    /// The value the relay wants (at least this).
    pub wanted: String,
    /// What goes wrong while it stays below.
    pub consequence: &'static str,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is {}, wanted at least {}: {}",
            self.setting, self.current, self.wanted, self.consequence
        )
    }
}

/// Compares the kernel's settings with the relay's needs; one warning per shortfall, in a fixed
/// order. Settings that could not be read produce no warning.
pub fn check(kernel: &KernelLimits, needs: &Needs) -> Vec<Warning> {
    let mut out = Vec::new();
    let mut below = |setting, current: Option<u64>, wanted: u64, consequence| {
        if let Some(c) = current.filter(|&c| c < wanted) {
            out.push(Warning {
                setting,
                current: c.to_string(),
                wanted: wanted.to_string(),
                consequence,
            });
        }
    };
    below(
        "net.core.rmem_max",
        kernel.rmem_max,
        needs.socket_buffer,
        "receive buffers are capped below what the relay asks for; bursts are dropped \
         (tuning/throughput.conf)",
    );
    below(
        "net.core.wmem_max",
        kernel.wmem_max,
        needs.socket_buffer,
        "send buffers are capped below what the relay asks for; bursts are dropped \
         (tuning/throughput.conf)",
    );
    below(
        "RLIMIT_NOFILE",
        kernel.nofile_soft,
        needs.open_files,
        "new flows and connections fail with EMFILE past it (LimitNOFILE= in the unit, \
         ulimit -n)",
    );
    below(
        "fs.nr_open",
        kernel.nr_open,
        needs.open_files,
        "RLIMIT_NOFILE cannot be raised past it (tuning/many-flows.conf)",
    );
    if let Some((lo, hi)) = kernel.local_port_range {
        let ports = u64::from(hi.saturating_sub(lo)) + 1;
        if lo > hi || ports < needs.local_ports {
            out.push(Warning {
                setting: "net.ipv4.ip_local_port_range",
                current: format!("{lo} {hi} ({} ports)", if lo > hi { 0 } else { ports }),
                wanted: format!("{} ports", needs.local_ports),
                consequence: "every egress socket holds one ephemeral port (flows to the same \
                              target need one each); new flows fail with EADDRINUSE past it \
                              (tuning/many-flows.conf)",
            });
        }
    }
    out
}

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`; the kernel checks
/// it at each page fault, so it covers the allocator's arenas mapped before as well).
pub fn disable_transparent_huge_pages() -> io::Result<()> {
    nix::sys::prctl::set_thp_disable(true).map_err(io::Error::from)
}

/// Whether transparent huge pages are off for this process.
pub fn transparent_huge_pages_disabled() -> io::Result<bool> {
    nix::sys::prctl::get_thp_disable().map_err(io::Error::from)
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (what `LimitNOFILE=` or the
/// administrator allowed) and returns the new soft limit. Stock systems give a soft limit of
/// 1024 for the sake of programs using `select(2)`; the relay does not use `select`.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let lim = get_nofile()?;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a live, initialised rlimit on our stack; setrlimit only reads it.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(nofile_u64(lim.rlim_max))
}

/// This process's (soft, hard) `RLIMIT_NOFILE`; `RLIM_INFINITY` is reported as `u64::MAX`.
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    let lim = get_nofile()?;
    Ok((nofile_u64(lim.rlim_cur), nofile_u64(lim.rlim_max)))
}

fn get_nofile() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a live, writable rlimit on our stack; getrlimit writes one rlimit into it
    // and keeps no pointer.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

/// `rlim_t` is 32 bits on some 32-bit targets; `From` widens it there and is a no-op here.
#[allow(clippy::useless_conversion)]
fn nofile_u64(v: libc::rlim_t) -> u64 {
    if v == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        u64::from(v)
    }
}

/// Reads sysctl `name` (dotted) under `root`, trimmed; `None` when absent or unreadable.
pub fn read_sysctl(root: &Path, name: &str) -> Option<String> {
    let path = root.join(name.replace('.', "/"));
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn read_u64(root: &Path, name: &str) -> Option<u64> {
    read_sysctl(root, name)?.parse().ok()
}

/// Parses `ip_local_port_range` as the kernel writes it: two numbers separated by whitespace.
fn parse_port_range(v: &str) -> Option<(u16, u16)> {
    let mut it = v.split_whitespace();
    let lo = it.next()?.parse().ok()?;
    let hi = it.next()?.parse().ok()?;
    it.next().is_none().then_some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel that satisfies the default needs.
    fn tuned() -> KernelLimits {
        KernelLimits {
            rmem_max: Some(16 << 20),
            wmem_max: Some(16 << 20),
            nr_open: Some(1 << 20),
            nofile_soft: Some(1 << 20),
            nofile_hard: Some(1 << 20),
            local_port_range: Some((1024, 65535)),
        }
    }

    /// Debian 12's stock values, with the usual shell soft limit.
    fn stock() -> KernelLimits {
        KernelLimits {
            rmem_max: Some(212_992),
            wmem_max: Some(212_992),
            nr_open: Some(1_048_576),
            nofile_soft: Some(1024),
            nofile_hard: Some(524_288),
            local_port_range: Some((32768, 60999)),
        }
    }

    fn settings(w: &[Warning]) -> Vec<&'static str> {
        w.iter().map(|w| w.setting).collect()
    }

    #[test]
    fn a_tuned_kernel_gets_no_warning() {
        assert_eq!(check(&tuned(), &Needs::default()), vec![]);
    }

    #[test]
    fn unreadable_settings_are_not_warned_about() {
        assert_eq!(check(&KernelLimits::default(), &Needs::default()), vec![]);
    }

    #[test]
    fn a_stock_kernel_gets_one_warning_per_short_setting() {
        let w = check(&stock(), &Needs::default());
        assert_eq!(
            settings(&w),
            [
                "net.core.rmem_max",
                "net.core.wmem_max",
                "RLIMIT_NOFILE",
                "net.ipv4.ip_local_port_range"
            ]
        );
        assert_eq!(w[0].current, "212992");
        assert_eq!(w[0].wanted, "4194304");
        assert_eq!(w[2].current, "1024");
        assert_eq!(w[2].wanted, "65536");
        assert_eq!(w[3].current, "32768 60999 (28232 ports)");
        assert_eq!(w[3].wanted, "32768 ports");
        let line = w[0].to_string();
        assert!(
            line.starts_with("net.core.rmem_max is 212992, wanted at least 4194304: "),
            "{line}"
        );
    }

    #[test]
    fn the_wanted_socket_buffer_is_a_parameter() {
        let mut k = tuned();
        k.rmem_max = Some(2 << 20);
        k.wmem_max = Some(8 << 20);
        let small = Needs {
            socket_buffer: 1 << 20,
            ..Needs::default()
        };
        assert_eq!(check(&k, &small), vec![]);
        let big = Needs {
            socket_buffer: 4 << 20,
            ..Needs::default()
        };
        let w = check(&k, &big);
        assert_eq!(settings(&w), ["net.core.rmem_max"]);
        assert_eq!(
            (w[0].current.as_str(), w[0].wanted.as_str()),
            ("2097152", "4194304")
        );
        // Exactly enough is enough.
        k.rmem_max = Some(4 << 20);
        assert_eq!(check(&k, &big), vec![]);
    }

    #[test]
    fn file_limits() {
        let mut k = tuned();
        k.nofile_soft = Some(65535);
        k.nr_open = Some(4096);
        assert_eq!(
            settings(&check(&k, &Needs::default())),
            ["RLIMIT_NOFILE", "fs.nr_open"]
        );
        k.nofile_soft = Some(u64::MAX); // RLIM_INFINITY
        k.nr_open = Some(65536);
        assert_eq!(check(&k, &Needs::default()), vec![]);
    }

    #[test]
    fn port_ranges() {
        let mut k = tuned();
        k.local_port_range = Some((32768, 65535)); // exactly 32768 ports
        assert_eq!(check(&k, &Needs::default()), vec![]);
        k.local_port_range = Some((32769, 65535));
        assert_eq!(
            check(&k, &Needs::default())[0].current,
            "32769 65535 (32767 ports)"
        );
        k.local_port_range = Some((60000, 1024)); // nonsense the kernel would refuse
        assert_eq!(
            check(&k, &Needs::default())[0].current,
            "60000 1024 (0 ports)"
        );
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("32768"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
        assert_eq!(parse_port_range("a b"), None);
    }

    #[test]
    fn the_soft_file_limit_rises_to_the_hard_one() {
        let raised = raise_nofile_limit().unwrap();
        let (soft, hard) = nofile_limit().unwrap();
        assert_eq!((raised, soft), (hard, hard));
    }

    #[test]
    fn reads_a_fake_sysctl_tree() {
        let dir = tempfile::tempdir().unwrap();
        let put = |name: &str, v: &str| {
            let p = dir.path().join(name.replace('.', "/"));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, v).unwrap();
        };
        put("net.core.rmem_max", "212992\n");
        put("net.core.wmem_max", "garbage\n");
        put("net.ipv4.ip_local_port_range", "32768\t60999\n");
        let k = KernelLimits::read_at(dir.path());
        assert_eq!(k.rmem_max, Some(212_992));
        assert_eq!(k.wmem_max, None);
        assert_eq!(k.nr_open, None);
        assert_eq!(k.local_port_range, Some((32768, 60999)));
        // The file limit is the process's own (another test may raise it meanwhile).
        assert!(k.nofile_soft.unwrap() <= k.nofile_hard.unwrap());
    }
}
