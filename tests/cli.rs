//! The `masque-relay` binary as a user runs it: help, bad configuration, and a real start.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn relay() -> Command {
    Command::new(env!("CARGO_BIN_EXE_masque-relay"))
}

#[test]
fn help_explains_every_flag() {
    let out = relay().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--config",
        "--listen",
        "--workers",
        "--cert",
        "--key",
        "--allow-target",
        "--deny-target",
        "--uri-template",
        "--idle-timeout",
    ] {
        assert!(text.contains(flag), "--help does not mention {flag}");
    }
    // Every client protocol the relay serves is named.
    for proto in ["HTTP/3", "HTTP/2", "HTTP/1.1"] {
        assert!(text.contains(proto), "--help does not mention {proto}");
    }
}

#[test]
fn bad_values_exit_2_naming_the_field() {
    let cases: &[(&[&str], &str)] = &[
        (&["--listen", "not-an-address"], "listen"),
        (&["--allow-target", "10.0.0.0/40"], "allow_targets"),
        (&["--uri-template", "/no/variables"], "uri_template"),
        (&["--idle-timeout", "0"], "flow_idle_timeout_secs"),
        (
            &[
                "--cert",
                "/nonexistent/cert.pem",
                "--key",
                "/nonexistent/key.pem",
            ],
            "cert",
        ),
    ];
    for (args, field) in cases {
        let out = relay().args(*args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{args:?}: {err}");
    }
}

#[test]
fn bad_config_file_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, "workers = \"many\"\n").unwrap();
    let out = relay().arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    std::fs::write(&path, "listen = \"127.0.0.1:0\"\nno_such_field = 1\n").unwrap();
    let out = relay().arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_field"));
}

#[test]
fn starts_with_defaults_and_stops_on_sigterm() {
    // The README's first command, on a free port instead of 4433.
    let mut child = relay()
        .args(["--listen", "127.0.0.1:0", "--workers", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    let mut listening = false;
    let mut warned = false;
    while Instant::now() < deadline && !(listening && warned) {
        let Some(Ok(line)) = lines.next() else { break };
        listening |= line.contains("masque-relay listening");
        warned |= line.contains("self-signed");
        seen.push_str(&line);
        seen.push('\n');
    }
    assert!(listening && warned, "start-up log:\n{seen}");
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "exit status {st:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `THP_enabled` of a process, from /proc (the prctl flag, inherited by children).
fn thp_enabled(pid: u32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim() == "1")
}

/// Starts the relay with `args`, waits until it listens, returns its THP flag, stops it.
fn relay_thp(args: &[&str]) -> Option<bool> {
    let mut child = relay()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--metrics",
            "off",
        ])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    while !seen.contains("masque-relay listening") {
        match lines.next() {
            Some(Ok(line)) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            _ => panic!("the relay did not start:\n{seen}"),
        }
    }
    let thp = thp_enabled(child.id());
    let _ = child.kill();
    let _ = child.wait();
    thp
}

#[test]
fn transparent_huge_pages_are_off_unless_configured() {
    let Some(ours) = thp_enabled(std::process::id()) else {
        println!("SKIP: this kernel does not report THP_enabled in /proc/<pid>/status");
        return;
    };
    assert_eq!(relay_thp(&[]), Some(false), "THP still on with the default");
    if !ours {
        println!("SKIP (the configured case): THP is already off for this test process");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("thp.toml");
    std::fs::write(&cfg, "[io]\ntransparent_huge_pages = true\n").unwrap();
    assert_eq!(
        relay_thp(&["--config", cfg.to_str().unwrap()]),
        Some(true),
        "THP off although the configuration allows it"
    );
}
