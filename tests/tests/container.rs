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
//!
//! And the compose quick start as written (`podman-compose up`): mqttlb in front of
//! three bridged mosquitto containers, messages crossing nodes through it, the splice
//! loaded, `/metrics` with the token.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use mqttlb::mqtt::Version;
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

/// `Containerfile` as an image named `tag`, from `context`.
fn build(context: &Path, containerfile: &Path, tag: &str) {
    run_ok(
        podman()
            .args(["build", "--network", "host", "-t", tag, "-f"])
            .arg(containerfile)
            .arg(context),
        "podman build",
    );
}

/// Builds the image from `dir`; returns its size in bytes.
fn build_image(dir: &Path) -> u64 {
    build(dir, &dir.join("Containerfile"), IMAGE);
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
        // With workers (the default, one per core) the supervisor's sockets accept
        // before the workers serve: wait for every start to say all accept.
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
            || workers_pending(&self.logs())
        {
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
    let lines: Vec<String> = (0..n).map(|i| format!("m{i:05}")).collect();
    let want: Vec<Vec<u8>> = lines.iter().map(|l| l.clone().into_bytes()).collect();
    let publisher = tokio::task::spawn_blocking(move || publish_lines(port, &topic, &lines, None));
    let got = mqttc::collect(&mut sub, Duration::from_secs(2))
        .await
        .expect("collect");
    publisher.await.expect("publisher");
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
    // The default: one worker per core, each loading BPF under the profile.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores > 1 {
        assert!(
            c.logs()
                .contains(&format!("all workers accepting (each connection to the worker its client source port selects) instance={instance} workers={}", cores.min(64))),
            "{}",
            c.logs()
        );
    }
    carry(port, 1000, "caps-sub").await;
    // 1,000 PUBLISH of about 34 bytes each way, carried on the splice plane (the
    // program redirects, the daemon forwards what it passes up while throttled). The
    // daemon publishes its counters to the pinned map once a second, and a pair's
    // bytes once they are counted (at its end, for pairs this small): waited for.
    let carried = |stats: &serde_json::Value| {
        ["spliced_bytes_c2s", "spliced_bytes_s2c"]
            .iter()
            .all(|way| stats[way].as_u64() > Some(30_000))
    };
    wait_for(
        "both clients spliced, their bytes counted",
        Duration::from_secs(5),
        || {
            let stats = &c.ctl("stats", &instance)["stats"];
            stats["spliced"].as_u64() >= Some(2) && carried(stats)
        },
    )
    .await;
    let stats = c.ctl("stats", &instance)["stats"].clone();
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
    // Workers could not share a sticky table here: one process, and why.
    if cores > 1 {
        assert!(
            logs.contains("one process, not one worker per core")
                && !logs.contains("starting workers"),
            "{logs}"
        );
    }
    drop(c);

    // The capabilities under podman's default seccomp profile: bpf() is refused all
    // the same, and the log says why.
    let (c, _) = Container::start("mqttlb-test-seccomp", &conf, &caps, port);
    let logs = c.logs();
    assert!(
        logs.contains("a seccomp filter is active") && logs.contains("data_plane=\"copy\""),
        "{logs}"
    );
    if cores > 1 {
        assert!(
            logs.contains("the kernel refuses BPF maps to this process"),
            "{logs}"
        );
    }
    drop(c);

    for i in ["ct", "cp", "cn"] {
        let _ = ctl_output(
            &format!("{i}{}", std::process::id()),
            &["cleanup", "--sticky"],
        );
    }
}

/// `/etc/containers/containers.conf` with default rlimits this host accepts (podman
/// raises nofile and nproc by default, which is refused here: podman-compose gives
/// no `--ulimit` of its own); the previous file is put back when dropped.
struct ContainersConf {
    before: Option<Vec<u8>>,
}

const CONTAINERS_CONF: &str = "/etc/containers/containers.conf";

impl ContainersConf {
    fn write() -> Self {
        let before = std::fs::read(CONTAINERS_CONF).ok();
        std::fs::write(
            CONTAINERS_CONF,
            "[containers]\ndefault_ulimits = [\"nofile=4096:4096\", \"nproc=4096:4096\"]\n",
        )
        .expect("containers.conf");
        Self { before }
    }
}

impl Drop for ContainersConf {
    fn drop(&mut self) {
        let _ = match &self.before {
            Some(b) => std::fs::write(CONTAINERS_CONF, b),
            None => std::fs::remove_file(CONTAINERS_CONF),
        };
    }
}

/// `podman-compose -p PROJECT ARGS` in `dir`, with the test's images.
fn compose(dir: &Path, project: &str, args: &[&str]) -> Output {
    Command::new("podman-compose")
        .current_dir(dir)
        .args(["-p", project])
        .args(args)
        .env("MQTTLB_IMAGE", IMAGE)
        .env("MOSQUITTO_IMAGE", "localhost/mosquitto:test")
        .output()
        .expect("podman-compose (Debian package podman-compose)")
}

/// The project brought down (and its pins removed) when dropped.
struct Project<'a> {
    dir: &'a Path,
    name: &'a str,
}

impl Drop for Project<'_> {
    fn drop(&mut self) {
        let _ = compose(self.dir, self.name, &["down", "-t", "5"]);
        let _ = ctl_output("compose", &["cleanup", "--sticky"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_quick_start_balances_over_three_bridged_brokers() {
    if !privileged("compose (podman needs root here)") {
        return;
    }
    let dist = dist();
    base_image();
    build_image(&dist);
    let mosquitto = TempDir::new("mosquitto-image");
    let containerfile = mosquitto.0.join("Containerfile");
    std::fs::write(
        &containerfile,
        "FROM localhost/bookworm:base\nRUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto && rm -rf /var/lib/apt/lists/*\n",
    )
    .expect("Containerfile");
    build(&mosquitto.0, &containerfile, "localhost/mosquitto:test");

    // The dist folder as a user has it, the ports moved off 1883/8888 and a token made
    // as the quick start says.
    let dir = TempDir::new("compose");
    run_ok(
        Command::new("cp")
            .arg("-r")
            .arg(dist.join("compose"))
            .arg(&dir.0),
        "cp",
    );
    for f in ["compose.yaml", "seccomp.json"] {
        std::fs::copy(dist.join(f), dir.0.join(f)).expect("copy");
    }
    let (port, admin) = (free_port(), free_port());
    let yaml = std::fs::read_to_string(dir.0.join("compose.yaml")).expect("compose.yaml");
    let moved = yaml
        .replace("\"1883:1883\"", &format!("\"{port}:1883\""))
        .replace(
            "\"127.0.0.1:8888:8888\"",
            &format!("\"127.0.0.1:{admin}:8888\""),
        );
    assert_ne!(moved, yaml, "the ports of compose.yaml moved");
    std::fs::write(dir.0.join("compose.yaml"), moved).expect("compose.yaml");
    let token = "compose-test-token";
    {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.0.join("compose/admin.token");
        std::fs::write(&path, token).expect("token");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }

    let _conf = ContainersConf::write();
    let project = format!("mqttlbtest{}", std::process::id());
    let _up = Project {
        dir: &dir.0,
        name: &project,
    };
    let out = compose(&dir.0, &project, &["up", "-d"]);
    assert!(
        out.status.success(),
        "podman-compose up: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let logs = || {
        let out = podman()
            .args(["logs", &format!("{project}_mqttlb_1")])
            .output()
            .expect("podman logs");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while mqttc::session(addr, "probe", true).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "no MQTT through compose: {}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(logs().contains("data_plane=\"auto\""), "{}", logs());

    // Subscribers on three client ids (spread by Maglev over the nodes), one publisher:
    // every message reaches every subscriber across the bridges.
    let mut subs = Vec::new();
    for i in 0..3 {
        let mut s = mqttc::session(addr, &format!("compose-sub-{i}"), true)
            .await
            .expect("subscriber");
        s.write_all(&mqttc::subscribe(1, "demo/#", 1))
            .await
            .expect("SUBSCRIBE");
        mqttc::read_packet(&mut s).await.expect("SUBACK");
        subs.push(s);
    }
    // The bridges connect a moment after the brokers start: wait until a probe crosses.
    let mut publisher = mqttc::session(addr, "compose-pub", true)
        .await
        .expect("publisher");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        publisher
            .write_all(&packets::publish(
                Version::V311,
                "demo/probe",
                b"probe",
                0,
                0,
            ))
            .await
            .expect("probe");
        let mut all = true;
        for s in &mut subs {
            all &= !mqttc::collect(s, Duration::from_millis(300))
                .await
                .expect("collect")
                .is_empty();
        }
        if all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bridges never carried a probe"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for s in &mut subs {
        mqttc::collect(s, Duration::from_millis(200))
            .await
            .expect("drain probes");
    }
    for i in 0..100u32 {
        publisher
            .write_all(&packets::publish(
                Version::V311,
                "demo/count",
                &i.to_be_bytes(),
                0,
                0,
            ))
            .await
            .expect("publish");
    }
    let want: Vec<Vec<u8>> = (0..100u32).map(|i| i.to_be_bytes().to_vec()).collect();
    for s in &mut subs {
        let got = mqttc::collect(s, Duration::from_secs(2))
            .await
            .expect("collect");
        assert_eq!(got, want);
    }

    // The client ids landed on more than one node (so messages crossed bridges).
    let out = run_ok(
        podman()
            .args([
                "exec",
                &format!("{project}_mqttlb_1"),
                "/usr/local/bin/mqttlb",
            ])
            .args(["ctl", "backends", "--json", "--instance", "compose"]),
        "ctl backends in the container",
    );
    let backends: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let used = backends["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .filter(|b| b["active"].as_u64() > Some(0))
        .count();
    assert!(used >= 2, "{backends}");

    // The stats as an operator reads them: /metrics with the token.
    let metrics = http::request(
        ([127, 0, 0, 1], admin).into(),
        "GET",
        "/metrics",
        Some(token),
        "",
    )
    .await;
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    assert_eq!(
        http::metric(&metrics.body, "mqttlb_connections_active", &[]),
        Some(4.0),
        "three subscribers and the publisher"
    );
}
