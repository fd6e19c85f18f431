//! The container image: built with podman from a debootstrapped Debian base and the
//! `cargo xtask dist` output (`MQTTLB_DIST`, written by `cargo xtask test`), run with
//! host networking and /sys/fs/bpf mounted in front of a mosquitto on the host:
//!
//! - with the three capabilities and the dist's seccomp profile, as `[global] user`:
//!   1,000 QoS 1 messages through it, none lost, spliced (`ctl stats` inside the
//!   container), and the sticky table survives `podman restart`;
//! - `--privileged`: the same, spliced;
//! - without the capabilities: the log names them, `auto` serves on the copy plane;
//!   with them but podman's default seccomp profile: the log says so.

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use tests::*;
use tokio::io::AsyncWriteExt;

const BASE: &str = "localhost/bookworm:base";
const IMAGE: &str = "localhost/mqttlb:test";

/// podman on runc (crun fails on these hosts) with cgroupfs.
fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    c
}

fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (Debian packages podman, runc, debootstrap)"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The dist directory: `MQTTLB_DIST`, or `target/dist` from `cargo xtask dist`.
fn dist() -> PathBuf {
    let dir = std::env::var_os("MQTTLB_DIST").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/dist")),
        PathBuf::from,
    );
    assert!(
        dir.join("Containerfile").exists() && dir.join("seccomp.json").exists(),
        "{}: no dist output; run `cargo xtask test` (it writes target/dist-test) or `cargo xtask dist`",
        dir.display()
    );
    dir
}

/// Debian bookworm as a local image: debootstrap into a folder, then `podman import`
/// (no registry is reachable). Made once per machine.
fn base_image() {
    let exists = podman().args(["image", "exists", BASE]).status();
    if exists.is_ok_and(|s| s.success()) {
        return;
    }
    let root = TempDir::new("bookworm");
    run_ok(
        Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&root.0)
            .arg("http://deb.debian.org/debian"),
        "debootstrap",
    );
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&root.0)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("tar");
    let stream = tar.stdout.take().expect("tar output");
    run_ok(
        podman().args(["import", "-", BASE]).stdin(stream),
        "podman import",
    );
    assert!(tar.wait().expect("tar").success(), "tar of the base failed");
}

/// Builds the image from `dir`; returns its size in bytes.
fn build_image(dir: &Path) -> u64 {
    run_ok(
        podman()
            .args(["build", "--network", "host", "-t", IMAGE, "-f"])
            .arg(dir.join("Containerfile"))
            .arg(dir),
        "podman build",
    );
    let out = run_ok(
        podman().args(["image", "inspect", "--format", "{{.Size}}", IMAGE]),
        "podman image inspect",
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("image size")
}

/// A running container, removed when dropped.
struct Container {
    name: String,
}

impl Container {
    /// `podman run -d` of the image with `flags`, host networking, /sys/fs/bpf and the
    /// config file mounted; returns once `port` accepts (and the time it took).
    fn start(name: &str, config: &Path, flags: &[&str], port: u16) -> (Self, Duration) {
        let _ = podman().args(["rm", "-f", name]).output();
        let started = Instant::now();
        run_ok(
            podman()
                .args(["run", "-d", "--name", name, "--network", "host"])
                // Podman raises rlimits by default, which these hosts refuse.
                .args([
                    "--ulimit",
                    "nofile=4096:4096",
                    "--ulimit",
                    "nproc=4096:4096",
                ])
                .args(["-v", "/sys/fs/bpf:/sys/fs/bpf", "-v"])
                .arg(format!("{}:/etc/mqttlb/mqttlb.toml:ro", config.display()))
                .args(flags)
                .arg(IMAGE),
            "podman run",
        );
        let c = Self {
            name: name.to_owned(),
        };
        let ready = c.wait_ready(port, started);
        (c, ready)
    }

    fn wait_ready(&self, port: u16, since: Instant) -> Duration {
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                since.elapsed() < Duration::from_secs(30),
                "no listener within 30 s: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        since.elapsed()
    }

    fn logs(&self) -> String {
        let out = podman()
            .args(["logs", &self.name])
            .output()
            .expect("podman logs");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// `mqttlb ctl WHAT --json` run inside the container.
    fn ctl(&self, what: &str, instance: &str) -> serde_json::Value {
        let out = run_ok(
            podman().args([
                "exec",
                &self.name,
                "/usr/local/bin/mqttlb",
                "ctl",
                what,
                "--json",
                "--instance",
                instance,
            ]),
            "ctl in the container",
        );
        serde_json::from_slice(&out.stdout).expect("ctl json")
    }

    fn stat(&self, name: &str, instance: &str) -> u64 {
        self.ctl("stats", instance)["stats"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no stat {name}"))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "-f", "-t", "5", &self.name]).output();
    }
}

/// Config for one listener on `port` in front of `broker`, sticky by client id.
fn config(dir: &TempDir, instance: &str, plane: &str, port: u16, broker: SocketAddr) -> PathBuf {
    let text = format!(
        "[global]\nname = \"{instance}\"\ndata_plane = \"{plane}\"\nuser = \"mqttlb\"\n\n[[listeners]]\nname = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\ncluster = \"c\"\n\n[[clusters]]\nname = \"c\"\nsticky = \"client-id\"\n\n[clusters.health]\nkind = \"none\"\n\n[[clusters.servers]]\nname = \"host-mosquitto\"\naddress = \"{broker}\"\n"
    );
    let path = dir.0.join(format!("{instance}.toml"));
    std::fs::write(&path, text).expect("config");
    path
}

/// `n` QoS 1 messages from `mosquitto_pub -l` through `port`, received by a subscriber
/// through the same port; asserts every one arrived, in order.
async fn carry(port: u16, n: usize, sub_id: &str) {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut sub = mqttc::session(addr, sub_id, true)
        .await
        .expect("subscriber");
    let topic = format!("container/{sub_id}");
    sub.write_all(&mqttc::subscribe(1, &topic, 1))
        .await
        .expect("SUBSCRIBE");
    mqttc::read_packet(&mut sub).await.expect("SUBACK");
    let publisher = tokio::task::spawn_blocking(move || {
        let mut child = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", &topic])
            .args(["-q", "1", "-l"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("mosquitto_pub");
        let mut stdin = child.stdin.take().expect("stdin");
        for i in 0..n {
            writeln!(stdin, "m{i:05}").expect("line");
        }
        drop(stdin);
        assert!(child.wait().expect("mosquitto_pub").success());
    });
    let got = mqttc::collect(&mut sub, Duration::from_secs(2))
        .await
        .expect("collect");
    publisher.await.expect("publisher");
    let want: Vec<Vec<u8>> = (0..n).map(|i| format!("m{i:05}").into_bytes()).collect();
    assert_eq!(got.len(), n, "messages lost");
    assert_eq!(got, want);
}

fn sticky_keys(c: &Container, instance: &str) -> Vec<String> {
    c.ctl("sticky", instance)["sticky"]
        .as_array()
        .expect("sticky")
        .iter()
        .map(|e| e["key"].as_str().expect("key").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_splices_keeps_its_sticky_table_and_says_what_it_lacks() {
    if !privileged("container (podman needs root here)") {
        return;
    }
    let dist = dist();
    let built = Instant::now();
    base_image();
    let size = build_image(&dist);
    eprintln!(
        "image {IMAGE}: {:.1} MB, base and build {:.1} s",
        size as f64 / 1e6,
        built.elapsed().as_secs_f64()
    );
    assert!(
        size < 40_000_000,
        "the runtime image holds more than it needs: {size} bytes"
    );
    let broker = Mosquitto::start();
    let dir = TempDir::new("container");
    let seccomp = format!("seccomp={}", dist.join("seccomp.json").display());
    let caps = [
        "--cap-add",
        "BPF",
        "--cap-add",
        "NET_ADMIN",
        "--cap-add",
        "PERFMON",
    ];

    // The three capabilities, the dist's seccomp profile, [global] user.
    let instance = format!("ct{}", std::process::id());
    let port = free_port();
    let conf = config(&dir, &instance, "sockmap", port, broker.addr);
    let flags: Vec<&str> = caps
        .iter()
        .copied()
        .chain(["--security-opt", &seccomp])
        .collect();
    let (c, ready) = Container::start("mqttlb-test-caps", &conf, &flags, port);
    eprintln!("start to ready: {} ms", ready.as_millis());
    assert!(
        c.logs()
            .contains("switched to [global] user user=mqttlb uid=65532"),
        "{}",
        c.logs()
    );
    carry(port, 1000, "caps-sub").await;
    // (The daemon publishes its counters to the pinned map once a second.)
    wait_for("both clients spliced", Duration::from_secs(3), || {
        c.stat("spliced", &instance) >= 2
    })
    .await;
    // 1,000 PUBLISH of about 34 bytes each way, carried on the splice plane (the
    // program redirects, the daemon forwards what it passes up while throttled).
    let stats = c.ctl("stats", &instance)["stats"].clone();
    for way in ["spliced_bytes_c2s", "spliced_bytes_s2c"] {
        assert!(stats[way].as_u64() > Some(30_000), "{stats}");
    }
    assert!(stats["bpf_redirected"].as_u64() > Some(0), "{stats}");
    assert_eq!(c.stat("splice_fallback_to_copy", &instance), 0);
    assert!(sticky_keys(&c, &instance).contains(&"caps-sub".to_owned()));
    // `podman restart`: SIGTERM, a clean stop, a new daemon on the same pins.
    run_ok(
        podman().args(["restart", "-t", "20", &c.name]),
        "podman restart",
    );
    c.wait_ready(port, Instant::now());
    assert!(
        c.logs().contains("sticky table kept from the previous run"),
        "{}",
        c.logs()
    );
    assert!(sticky_keys(&c, &instance).contains(&"caps-sub".to_owned()));
    drop(c);

    // --privileged.
    let instance = format!("cp{}", std::process::id());
    let port = free_port();
    let conf = config(&dir, &instance, "sockmap", port, broker.addr);
    let (c, _) = Container::start("mqttlb-test-privileged", &conf, &["--privileged"], port);
    carry(port, 1000, "privileged-sub").await;
    wait_for("spliced", Duration::from_secs(3), || {
        c.stat("spliced_bytes_s2c", &instance) > 30_000
    })
    .await;
    assert!(c.stat("bpf_redirected", &instance) > 0, "{}", c.logs());
    drop(c);

    // No capabilities: auto names them and serves on the copy plane.
    let instance = format!("cn{}", std::process::id());
    let port = free_port();
    let conf = config(&dir, &instance, "auto", port, broker.addr);
    let (c, _) = Container::start("mqttlb-test-nocaps", &conf, &[], port);
    carry(port, 200, "nocaps-sub").await;
    let logs = c.logs();
    assert!(
        logs.contains("missing=CAP_BPF and CAP_NET_ADMIN and CAP_PERFMON")
            && logs.contains("data_plane=\"copy\""),
        "{logs}"
    );
    drop(c);

    // The capabilities under podman's default seccomp profile: bpf() is refused all
    // the same, and the log says why.
    let (c, _) = Container::start("mqttlb-test-seccomp", &conf, &caps, port);
    let logs = c.logs();
    assert!(
        logs.contains("a seccomp filter is active") && logs.contains("data_plane=\"copy\""),
        "{logs}"
    );
    drop(c);

    for i in ["ct", "cp", "cn"] {
        let _ = ctl_output(
            &format!("{i}{}", std::process::id()),
            &["cleanup", "--sticky"],
        );
    }
}
