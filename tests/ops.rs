//! Operations files as an operator uses them: the sysctl profiles and `tuning/apply` (run
//! against a fake sysctl tree, never the real /proc/sys), the systemd unit and sysusers file
//! (checked by systemd's own tools where they are installed), the example configuration, and
//! the sd_notify messages the binary sends under `Type=notify`.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use masque_relay::config::Config;
use masque_relay::io::sysctl;

const PROFILES: [&str; 3] = ["throughput", "latency", "many-flows"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Runs `cmd` to completion, killing it (and failing the test) after `limit`.
fn run(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

// ---------------------------------------------------------------------------------------------
// sysctl profiles

#[derive(Debug, Clone)]
struct Setting {
    key: String,
    value: String,
}

fn is_sysctl_name(key: &str) -> bool {
    let mut parts = key.split('.');
    let first = parts.next().unwrap_or("");
    let rest: Vec<&str> = parts.collect();
    !first.is_empty()
        && first
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !rest.is_empty()
        && rest.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
}

/// Parses a profile as sysctl.d(5) does, more strictly: `key = value` lines with a dotted sysctl
/// name, `#`/`;` comments, blank lines, no key twice, and a comment right above every setting.
fn parse_profile(name: &str, text: &str) -> Vec<Setting> {
    let mut out: Vec<Setting> = Vec::new();
    let mut seen = HashSet::new();
    let mut previous_is_comment = false;
    for (i, line) in text.lines().enumerate() {
        let at = format!("{name}:{}", i + 1);
        let t = line.trim();
        if t.is_empty() {
            previous_is_comment = false;
            continue;
        }
        if t.starts_with('#') || t.starts_with(';') {
            previous_is_comment = true;
            continue;
        }
        let (key, value) = t
            .split_once('=')
            .unwrap_or_else(|| panic!("{at}: not `key = value`: {line}"));
        let (key, value) = (key.trim(), value.trim());
        assert!(is_sysctl_name(key), "{at}: not a sysctl name: {key:?}");
        assert!(!value.is_empty(), "{at}: {key} has no value");
        assert!(seen.insert(key.to_owned()), "{at}: {key} set twice");
        assert!(
            previous_is_comment,
            "{at}: {key} has no comment right above it saying why"
        );
        previous_is_comment = false;
        out.push(Setting {
            key: key.to_owned(),
            value: value.split_whitespace().collect::<Vec<_>>().join(" "),
        });
    }
    out
}

fn profile(name: &str) -> Vec<Setting> {
    let rel = format!("tuning/{name}.conf");
    parse_profile(&rel, &read(&rel))
}

#[test]
fn every_profile_parses_as_sysctl_d() {
    for name in PROFILES {
        let settings = profile(name);
        assert!(
            settings.len() >= 5,
            "{name}: only {} settings",
            settings.len()
        );
        // Commented-out conntrack keys are notes, not settings: the module may be absent.
        assert!(
            settings
                .iter()
                .all(|s| !s.key.starts_with("net.netfilter.")),
            "{name}: conntrack keys belong in comments"
        );
        assert!(
            read(&format!("tuning/{name}.conf")).contains("# conntrack:"),
            "{name}: no conntrack note"
        );
    }
}

#[test]
fn the_parser_rejects_what_sysctl_d_would_not_take() {
    let bad = [
        "# why\nnet.core.rmem_max 4\n",
        "# why\n../../etc/passwd = x\n",
        "# why\nnet.core.rmem_max =\n",
        "# why\nnet.core.rmem_max = 1\n# why\nnet.core.rmem_max = 2\n",
        "net.core.rmem_max = 1\n",
    ];
    for text in bad {
        let r = std::panic::catch_unwind(|| parse_profile("t", text));
        assert!(r.is_err(), "accepted {text:?}");
    }
}

/// A fake /proc/sys holding `entries` (dotted name -> content, as the kernel would print it).
fn fake_tree(entries: &[(String, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (k, v) in entries {
        let p = dir.path().join(k.replace('.', "/"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("{v}\n")).unwrap();
    }
    dir
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.insert(p.clone(), std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, &mut out);
    out
}

fn apply(root: &Path, args: &[&str]) -> Output {
    run(
        Command::new(repo().join("tuning/apply"))
            .args(args)
            .env("SYSCTL_ROOT", root),
        Duration::from_secs(30),
    )
}

/// The throughput profile against a tree where the first key is missing, odd ones already
/// hold the wanted value (written with tabs, as the kernel writes multi-value settings) and
/// even ones hold "1". Returns the tree, the missing key and the lines the dry run must print.
fn half_tuned_tree() -> (tempfile::TempDir, Vec<Setting>, String, Vec<String>) {
    let settings = profile("throughput");
    let mut entries = Vec::new();
    let mut expected = Vec::new();
    for (i, s) in settings.iter().enumerate().skip(1) {
        if i % 2 == 1 {
            entries.push((s.key.clone(), s.value.replace(' ', "\t")));
        } else {
            entries.push((s.key.clone(), "1".to_owned()));
            expected.push(format!("{}: 1 -> {}", s.key, s.value));
        }
    }
    assert!(expected.len() >= 3);
    let missing = settings[0].key.clone();
    (fake_tree(&entries), settings, missing, expected)
}

#[test]
fn dry_run_prints_exactly_the_differences_and_changes_nothing() {
    let (tree, _, missing, expected) = half_tuned_tree();
    let before = snapshot(tree.path());
    let out = apply(tree.path(), &["throughput"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected, "{stderr}");
    assert!(
        stderr.contains(&format!("{missing}: not on this kernel")),
        "{stderr}"
    );
    assert!(stderr.contains("nothing changed"), "{stderr}");
    assert_eq!(snapshot(tree.path()), before, "a dry run changed the tree");

    // --check: the same report, and a failing status while anything differs.
    let out = apply(tree.path(), &["throughput", "--check"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout).lines().collect::<Vec<_>>(), expected);
    assert_eq!(snapshot(tree.path()), before, "--check changed the tree");
}

#[test]
fn apply_writes_the_wanted_values() {
    let (tree, settings, missing, expected) = half_tuned_tree();
    let out = apply(tree.path(), &["throughput", "--apply"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().collect::<Vec<_>>(), expected);
    for s in &settings[1..] {
        let got = std::fs::read_to_string(tree.path().join(s.key.replace('.', "/"))).unwrap();
        let got = got.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(got, s.value, "{}", s.key);
    }
    assert!(
        !tree.path().join(missing.replace('.', "/")).exists(),
        "--apply created a setting the kernel does not have"
    );
    // Nothing left to do.
    let out = apply(tree.path(), &["throughput", "--check"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
}

#[test]
fn apply_reads_sysctl_d_syntax_from_any_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("custom.conf");
    std::fs::write(
        &file,
        "; a semicolon comment\n# a hash comment\n\nnet/core/somaxconn = 4096\n\
         -net.core.busy_poll=50\n   net.ipv4.tcp_rmem =   4096\t131072  6291456   \n",
    )
    .unwrap();
    let tree = fake_tree(&[
        ("net.core.somaxconn".into(), "128".into()),
        ("net.core.busy_poll".into(), "50".into()),
        ("net.ipv4.tcp_rmem".into(), "4096\t131072\t6291456".into()),
    ]);
    let out = apply(tree.path(), &[file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "net.core.somaxconn: 128 -> 4096\n");
}

#[test]
fn apply_refuses_bad_input_without_touching_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let tree = fake_tree(&[("net.core.somaxconn".into(), "128".into())]);
    let before = snapshot(tree.path());
    for (i, content) in [
        "net.core.somaxconn 4096\n",
        "../../etc/shadow = x\n",
        "net..core = 1\n",
    ]
    .into_iter()
    .enumerate()
    {
        let file = dir.path().join(format!("bad{i}.conf"));
        std::fs::write(&file, content).unwrap();
        let out = apply(tree.path(), &[file.to_str().unwrap(), "--apply"]);
        assert_eq!(out.status.code(), Some(2), "{content:?}");
    }
    for args in [&[][..], &["no-such-profile"], &["throughput", "--bogus"]] {
        let out = apply(tree.path(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(text(&out.stderr).contains("usage"), "{args:?}");
    }
    assert_eq!(snapshot(tree.path()), before);
}

/// Each profile satisfies the relay's own start-up check for the settings it sets: a kernel
/// tuned with it gets no warning about them.
#[test]
fn every_profile_satisfies_the_start_up_check() {
    for name in PROFILES {
        let settings = profile(name);
        let tree = fake_tree(
            &settings
                .iter()
                .map(|s| (s.key.clone(), s.value.clone()))
                .collect::<Vec<_>>(),
        );
        let kernel = sysctl::KernelLimits {
            // The file limit is the process's, which the unit sets (LimitNOFILE).
            nofile_soft: None,
            nofile_hard: None,
            ..sysctl::KernelLimits::read_at(tree.path())
        };
        assert!(
            kernel.rmem_max.is_some() && kernel.wmem_max.is_some(),
            "{name}"
        );
        if name == "many-flows" {
            // The profile that widens the port range the check asks for.
            assert!(kernel.local_port_range.is_some());
        }
        let warnings = sysctl::check(&kernel, &sysctl::Needs::default());
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// systemd

const UNIT: &str = "systemd/masque-relay.service";

/// `Key=value` lines of the unit, in order (a key may repeat).
fn unit_directives() -> Vec<(String, String)> {
    read(UNIT)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{UNIT}: {l}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn directive(key: &str) -> String {
    let all: Vec<String> = unit_directives()
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect();
    assert!(!all.is_empty(), "{UNIT}: no {key}=");
    all.join(" ")
}

#[test]
fn the_unit_has_what_the_relay_needs() {
    assert_eq!(directive("Type"), "notify");
    assert_eq!(
        directive("ExecStart"),
        "/usr/local/bin/masque-relay --config /etc/masque-relay/masque-relay.toml"
    );
    assert_eq!(directive("ExecReload"), "/bin/kill -HUP $MAINPID");
    // Longer than the 30 s default drain, so systemd does not SIGKILL a draining relay.
    let stop: u64 = directive("TimeoutStopSec").parse().unwrap();
    assert!((31..=120).contains(&stop), "TimeoutStopSec={stop}");
    assert_eq!(directive("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(directive("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("SystemCallArchitectures", "native"),
        ("Restart", "on-failure"),
        ("LimitNOFILE", "1048576"),
    ] {
        assert_eq!(directive(k), v, "{k}");
    }
    assert_eq!(
        directive("RestrictAddressFamilies"),
        "AF_INET AF_INET6 AF_UNIX AF_NETLINK"
    );
    let filter = directive("SystemCallFilter");
    for needed in [
        "@system-service",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
    ] {
        assert!(filter.split_whitespace().any(|w| w == needed), "{needed}");
    }
    assert!(directive("LimitMEMLOCK").ends_with('M'));
    // /proc/sys must stay readable for the start-up kernel check.
    assert!(unit_directives().iter().all(|(k, _)| k != "ProcSubset"));
    // The user is the one sysusers.d creates.
    let user = directive("User");
    let sysusers = read("systemd/masque-relay.sysusers");
    assert!(
        sysusers
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["u", user.as_str()])),
        "sysusers does not create {user}"
    );
}

/// The unit with ExecStart pointing at the binary this build made, since `systemd-analyze
/// verify` wants an executable there; everything else as shipped.
fn unit_for_this_build(dir: &Path) -> PathBuf {
    let unit = read(UNIT).replace(
        "ExecStart=/usr/local/bin/masque-relay ",
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_masque-relay")),
    );
    assert!(unit.contains(env!("CARGO_BIN_EXE_masque-relay")));
    let path = dir.join("masque-relay.service");
    std::fs::write(&path, unit).unwrap();
    path
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let Some(analyze) = which("systemd-analyze") else {
        eprintln!("note: systemd-analyze not installed, unit not verified (.ci/run installs it)");
        return;
    };
    assert!(
        Path::new("/bin/kill").exists(),
        "ExecReload's /bin/kill is missing"
    );
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_this_build(dir.path());
    // Works without systemd as PID 1: verify loads the file and its dependencies offline.
    let out = run(
        Command::new(&analyze)
            .args(["verify", "--man=no"])
            .arg(&unit),
        Duration::from_secs(60),
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "verify failed:\n{stderr}");
    // Unknown keys and bad values are only warnings for verify: none may name the unit.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("masque-relay"))
        .collect();
    assert!(complaints.is_empty(), "verify complained:\n{stderr}");

    // The sandbox should stay tight: systemd's own exposure score (0-100, lower is better).
    let out = run(
        Command::new(&analyze)
            .args(["security", "--offline=true", "--threshold=25", "--no-pager"])
            .arg(&unit),
        Duration::from_secs(60),
    );
    let stderr = text(&out.stderr);
    if stderr.contains("unrecognized option") {
        eprintln!("note: this systemd-analyze has no offline security check");
        return;
    }
    assert!(
        out.status.success(),
        "exposure above 2.5:\n{}{stderr}",
        text(&out.stdout)
    );
}

#[test]
fn sysusers_creates_the_service_user() {
    let Some(sysusers) = which("systemd-sysusers") else {
        eprintln!("note: systemd-sysusers not installed, sysusers file not checked");
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let conf = root.path().join("usr/lib/sysusers.d");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::copy(
        repo().join("systemd/masque-relay.sysusers"),
        conf.join("masque-relay.conf"),
    )
    .unwrap();
    let out = run(
        Command::new(sysusers).arg(format!("--root={}", root.path().display())),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let entry = passwd
        .lines()
        .find(|l| l.starts_with("masque-relay:"))
        .unwrap_or_else(|| panic!("no masque-relay in {passwd}"));
    assert!(entry.ends_with(":/usr/sbin/nologin"), "{entry}");
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(group.lines().any(|l| l.starts_with("masque-relay:")));
}

// ---------------------------------------------------------------------------------------------
// The example configuration

const EXAMPLE: &str = "systemd/masque-relay.toml";

/// The field names a section of the configuration accepts, from serde's own message for an
/// unknown field ("unknown field `x`, expected one of `a`, `b`, ...").
fn accepted_fields(section: Option<&str>) -> Vec<String> {
    let probe = match section {
        Some(s) => format!("[{s}]\nzz_not_a_field = 1\n"),
        None => "zz_not_a_field = 1\n".to_owned(),
    };
    let err = Config::from_toml(&probe).unwrap_err().reason;
    let list = err
        .split_once("expected")
        .unwrap_or_else(|| panic!("{err}"))
        .1;
    let names: Vec<String> = list
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert!(!names.is_empty(), "{err}");
    names
}

#[test]
fn the_example_config_lists_every_field_and_is_valid() {
    let text = read(EXAMPLE);
    let table: toml::Table = toml::from_str(&text).unwrap();
    for field in accepted_fields(None) {
        let value = table
            .get(&field)
            .unwrap_or_else(|| panic!("{EXAMPLE} lacks `{field}`"));
        if let toml::Value::Table(sub) = value {
            for inner in accepted_fields(Some(&field)) {
                // Optional fields whose default is "not set" cannot be written in TOML, so
                // the example shows them commented out.
                let commented = text.contains(&format!("# {inner} ="));
                assert!(
                    sub.contains_key(&inner) || commented,
                    "{EXAMPLE} lacks `{field}.{inner}`"
                );
            }
        }
    }
    // Valid as shipped, once the certificate and key it names exist.
    let mut cfg = Config::from_toml(&text).unwrap();
    assert_eq!(
        cfg.cert.as_deref(),
        Some(Path::new("/etc/masque-relay/cert.pem"))
    );
    let dir = tempfile::tempdir().unwrap();
    for (slot, name) in [(&mut cfg.cert, "cert.pem"), (&mut cfg.key, "key.pem")] {
        let p = dir.path().join(name);
        std::fs::write(&p, "placeholder").unwrap();
        *slot = Some(p);
    }
    let checked = cfg.validate().unwrap();
    assert_eq!(checked.listen.port(), 443);
    // It is installed where the unit reads it.
    assert!(directive("ExecStart").ends_with("--config /etc/masque-relay/masque-relay.toml"));
    assert!(text.contains("/etc/masque-relay/masque-relay.toml"));
}

// ---------------------------------------------------------------------------------------------
// sd_notify from the binary

/// A child process that is killed if the test fails before it exits.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_binary_notifies_ready_status_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let bin = env!("CARGO_BIN_EXE_masque-relay");
    let mut cmd = Command::new(bin);
    cmd.args(["--listen", "127.0.0.1:0", "--workers", "1", "--log", "warn"]);
    // Keep parallel tests off fixed ports where the binary has such listeners.
    let help = run(Command::new(bin).arg("--help"), Duration::from_secs(20));
    if text(&help.stdout).contains("--metrics") {
        cmd.args(["--metrics", "off"]);
    }
    let mut child = KillOnDrop(
        cmd.env("NOTIFY_SOCKET", &sock_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 4096];
    let mut next = || {
        let n = sock.recv(&mut buf).expect("no notification within 20 s");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    };
    let first = next();
    let second = next();
    let stopped = {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.0.id().to_string())
            .status();
        next()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(first, "READY=1");
    assert!(
        first != second && second.starts_with("STATUS=listening on 127.0.0.1:"),
        "{second}"
    );
    assert_eq!(stopped, "STOPPING=1");
    assert!(status.success(), "{status:?}");
}
