//! `cargo xtask run` (the demo a new user starts first) stops everything it started
//! when it gets SIGTERM by pid, not only Ctrl-C to its process group: no broker, no
//! mqttlb and no pin but the sticky table is left, and a second run starts.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tests::*;

fn xtask() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/xtask")
}

/// Processes whose command line contains `pattern`.
fn running(pattern: &str) -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-af", pattern])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("pgrep"))
        .map(str::to_owned)
        .collect()
}

/// Starts the demo and waits for its MQTT listener and its "mqttlb pid" line.
fn start_demo() -> Child {
    let mut demo = Command::new(xtask())
        .arg("run")
        .env("MQTTLB_BIN", bin())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("xtask run");
    let stdout = demo.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("mqttlb pid") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the demo printed mqttlb's pid");
    assert!(line.contains("kill -HUP"), "{line}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect("127.0.0.1:1883").is_err() {
        assert!(
            Instant::now() < deadline,
            "the demo's listener never came up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    demo
}

fn stop_by_pid(mut demo: Child) {
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(demo.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if demo.try_wait().expect("wait").is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_demo_stops_everything_on_sigterm_by_pid_and_starts_again() {
    if !privileged("the demo (BPF, ports 1883...)") {
        return;
    }
    for round in 0..2 {
        let demo = start_demo();
        assert_eq!(
            running("target/demo/node").len(),
            3,
            "round {round}: brokers"
        );
        // The demo turns the admin listener on: its stats page and health endpoint.
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], 8888));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(admin).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: no admin listener"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let (health, page) = rt.block_on(async {
            (
                http::get(admin, "/healthz").await,
                http::get(admin, "/").await,
            )
        });
        assert_eq!(health.status, 200, "round {round}");
        assert!(
            page.body.contains("<title>mqttlb stats</title>"),
            "round {round}"
        );
        stop_by_pid(demo);
        assert_eq!(
            running("target/demo/node"),
            Vec::<String>::new(),
            "round {round}"
        );
        assert_eq!(
            running("target/demo/mqttlb.toml"),
            Vec::<String>::new(),
            "round {round}"
        );
        let left = pins_left("demo");
        assert!(
            left.iter().all(|n| n == "sticky"),
            "round {round}: {left:?}"
        );
    }
}
