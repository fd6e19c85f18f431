//! Running under systemd: the daemon speaks `sd_notify` (READY only once it accepts,
//! the watchdog from its event loop, RELOADING/READY around SIGHUP, STOPPING at
//! SIGTERM), checked against a notify socket the test holds, alone and as the
//! supervisor of two workers (READY once both accept); and
//! `deploy/mqttlb.service` passes `systemd-analyze verify` without a warning.

use std::{
    net::TcpStream,
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tests::*;

/// The next datagram on `sock`, as text (panics after 10 s).
fn next(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a notification within 10 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Datagrams until one contains `what`; returns it and how many came before.
fn until(sock: &UnixDatagram, what: &str) -> (String, usize) {
    let mut before = 0;
    loop {
        let m = next(sock);
        if m.lines().any(|l| l == what) {
            return (m, before);
        }
        before += 1;
    }
}

#[test]
fn the_daemon_tells_systemd_when_it_serves_reloads_and_stops() {
    if !privileged("sd_notify (BPF maps)") {
        return;
    }
    speaks_sd_notify(1);
}

/// With `[global] workers`, the supervisor speaks for them all.
#[test]
fn the_supervisor_of_workers_tells_systemd_the_same() {
    if !privileged("sd_notify with workers (SO_REUSEPORT program, BPF maps)") {
        return;
    }
    speaks_sd_notify(2);
}

fn speaks_sd_notify(workers: u32) {
    let node = Mosquitto::start();
    let dir = TempDir::new("notify");
    let notify = dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&notify).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let port = free_port();
    let instance = format!("sd{}", std::process::id());
    let config = dir.0.join("mqttlb.toml");
    let text = config_text(&instance, "auto", port, &[node.addr])
        .replace("[global]\n", &format!("[global]\nworkers = {workers}\n"));
    std::fs::write(&config, text).expect("config");
    let mut child = Command::new(bin())
        .args(["run", "-c"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mqttlb");
    let pid = child.id() as i32;

    // READY=1 (with a status line) only once the listener accepts.
    let (ready, _) = until(&sock, "READY=1");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "READY=1 before the listener accepted"
    );
    assert!(ready.contains("STATUS=serving 1 listeners"), "{ready}");
    if workers > 1 {
        assert!(
            ready.contains(&format!("with {workers} workers")),
            "{ready}"
        );
    }

    // The watchdog, at half of WATCHDOG_USEC: about 10 pings in a second.
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_secs(1) {
        if next(&sock).lines().any(|l| l == "WATCHDOG=1") {
            pings += 1;
        }
    }
    assert!((5..=15).contains(&pings), "{pings} watchdog pings in 1 s");

    // SIGHUP: RELOADING=1 (with the monotonic time), then READY=1.
    // SAFETY: signals to our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let (reloading, _) = until(&sock, "RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    until(&sock, "READY=1");

    // SIGTERM: STOPPING=1, then a clean exit.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    until(&sock, "STOPPING=1");
    let status = child.wait().expect("exit");
    assert!(status.success(), "{status}");
}

#[test]
fn the_systemd_unit_verifies_cleanly() {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/mqttlb.service");
    let text = std::fs::read_to_string(unit).expect("deploy/mqttlb.service");
    // verify checks that the executables exist: point them at the built binary.
    let dir = TempDir::new("unit");
    let copy = dir.0.join("mqttlb.service");
    let bin = bin();
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/mqttlb", &bin.display().to_string()),
    )
    .expect("unit copy");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "AmbientCapabilities=",
        "ProtectSystem=strict",
        "LimitNOFILE=",
    ] {
        assert!(text.contains(key), "the unit lacks {key}");
    }
}

#[test]
fn the_example_configuration_checks() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/mqttlb.toml");
    let out = Command::new(bin())
        .args(["check", "-c", example])
        .output()
        .expect("mqttlb check");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("configuration OK"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
