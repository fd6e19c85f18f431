//! `cargo xtask bench [--quick]`: every workload against every system, side by side in
//! one run; results to `bench/results/latest.json` and `docs/BENCHMARKS.md` (+ chart).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    net::{SocketAddr, TcpStream},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{install, prepare, root};

/// Systems, in report order; names are part of the results format.
pub const SYSTEMS: [&str; 6] = [
    "direct",
    "mqttlb-auto",
    "mqttlb-sockmap",
    "mqttlb-copy",
    "haproxy",
    "nginx",
];
/// Workloads, in report order.
pub const WORKLOADS: [&str; 10] = ["W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "W9", "W10"];
/// Workloads over TLS (no `direct` figure: the servers speak plain MQTT).
const TLS_WORKLOADS: [&str; 3] = ["W7", "W8", "W9"];
/// Runs per (system, workload); figures are their median, min and max.
const RUNS: usize = 3;

/// Packages only the benchmark needs.
const BENCH_APT: &[(&str, &str)] = &[
    ("haproxy", "/usr/sbin/haproxy"),
    ("nginx", "/usr/sbin/nginx"),
    (
        "libnginx-mod-stream",
        "/usr/lib/nginx/modules/ngx_stream_module.so",
    ),
];

const SERVER: &str = "127.0.0.1:19100";
const FRONT: &str = "127.0.0.1:19101";
const BROKER_FRONT: &str = "127.0.0.1:19102";
const BROKER: &str = "127.0.0.1:19103";
const TLS_FRONT: &str = "127.0.0.1:19104";

/// What each workload reports, headline first, and whether more is better.
const METRICS: &[(&str, &str, bool)] = &[
    ("W1", "MB/s", true),
    ("W1", "cpu_s_per_GiB", false),
    ("W2", "cpu_s_per_Mmsg", false),
    ("W2", "msg/s", true),
    ("W3", "sessions/s", true),
    ("W3", "p99_ms", false),
    ("W4", "rss_bytes_per_conn", false),
    ("W4", "kernel_bytes_per_conn", false),
    ("W5", "p50_us", false),
    ("W5", "p99_us", false),
    ("W5", "p999_us", false),
    ("W6", "msg/s", true),
    ("W10", "msg/s", true),
    ("W10", "msg/s_qos0", true),
    ("W7", "sessions/s", true),
    ("W7", "p99_ms", false),
    ("W8", "sessions/s", true),
    ("W8", "resumed_fraction", true),
    ("W9", "MB/s", true),
    ("W9", "cpu_s_per_GiB", false),
];

pub fn bench(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    if args.iter().any(|a| a == "--report-only") {
        // Rewrites docs/BENCHMARKS.md from the last results (after editing the text).
        let root = root();
        let text = std::fs::read_to_string(root.join("bench/results/latest.json"))
            .context("bench/results/latest.json: run `cargo xtask bench` first")?;
        return write_report(&root, &serde_json::from_str(&text)?);
    }
    let only = Only::parse(args)?;
    prepare()?;
    install(BENCH_APT)?;
    raise_fd_limit();
    let root = root();
    crate::sh(Command::new(env!("CARGO")).current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "lb-user",
        "-p",
        "mqttlb-loadgen",
    ]))?;
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    crate::make_pki(&dir.join("pki"))?;
    // HAProxy wants the chain and the key in one file: a private key, so mode 0600.
    let pki = dir.join("pki");
    let bundle = pki.join("server.bundle.pem");
    let _ = std::fs::remove_file(&bundle);
    std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&bundle)?
        .write_all(
            &[
                std::fs::read(pki.join("server.pem"))?,
                std::fs::read(pki.join("server.key"))?,
            ]
            .concat(),
        )?;
    let started = Instant::now();
    let broker = Broker::start(&dir)?;
    let mut samples: BTreeMap<(String, String, String), Vec<f64>> = BTreeMap::new();
    let mut errors: BTreeMap<(String, String), u64> = BTreeMap::new();
    // Rounds: every system runs every workload once per round, so each system's
    // three figures come from the start, the middle and the end of the suite. This
    // VM shares its cores and drifts by up to a third over minutes; with one system's
    // runs back to back, the ratios between systems measured the drift as much as
    // the systems.
    for round in 1..=RUNS {
        for system in SYSTEMS.into_iter().filter(|s| only.system(s)) {
            eprintln!("xtask bench: round {round} of {RUNS}: {system}");
            let mut proxy = Proxy::start(system, &root, &dir)?;
            for workload in WORKLOADS.into_iter().filter(|w| only.workload(w)) {
                if system == "direct" && TLS_WORKLOADS.contains(&workload) {
                    continue;
                }
                if workload == "W4" {
                    // Memory per connection from a fresh process: one that ran the
                    // other workloads first holds freed memory its allocator hands
                    // out again, and W4 then measured a fraction of a connection's
                    // cost (0.5-0.7 KB for mqttlb against 5.9 KB fresh).
                    drop(proxy);
                    proxy = Proxy::start(system, &root, &dir)?;
                }
                let errs = errors.entry((workload.into(), system.into())).or_default();
                // A failed run is counted and reported, and the suite goes on.
                let run = if workload == "W10" {
                    real_clients(system, quick)
                } else {
                    loadgen(&root, workload, system, quick, &proxy, broker.pid())
                };
                let report = match run {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("xtask bench: {workload} against {system}: {e:#}");
                        *errs += 1;
                        continue;
                    }
                };
                *errs += report["errors"].as_u64().unwrap_or(0);
                if let Some(m) = report["metrics"].as_object() {
                    for (k, v) in m {
                        if let Some(v) = v.as_f64() {
                            samples
                                .entry((workload.into(), system.into(), k.clone()))
                                .or_default()
                                .push(v);
                        }
                    }
                }
            }
            drop(proxy);
        }
    }
    drop(broker);
    let results: Vec<Value> = samples
        .iter()
        .map(|((w, s, m), v)| {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            json!({
                "workload": w, "system": s, "metric": m,
                "median": v[v.len() / 2], "min": v[0], "max": v[v.len() - 1],
            })
        })
        .collect();
    let doc = json!({
        "machine": machine(),
        "mode": if quick { "quick" } else { "full" },
        "runs": RUNS,
        "duration_s": started.elapsed().as_secs(),
        "errors": errors.iter().map(|((w, s), n)| json!({"workload": w, "system": s, "errors": n})).collect::<Vec<_>>(),
        "results": results,
    });
    if only.any() {
        // A part of the suite is for looking at one thing by hand: it leaves the
        // published results and the page alone.
        let out = dir.join("partial.json");
        std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")?;
        for r in &results {
            eprintln!(
                "{:<4} {:<15} {:<16} {:>10.3} ({:.3}-{:.3})",
                r["workload"].as_str().unwrap_or(""),
                r["system"].as_str().unwrap_or(""),
                r["metric"].as_str().unwrap_or(""),
                r["median"].as_f64().unwrap_or(f64::NAN),
                r["min"].as_f64().unwrap_or(f64::NAN),
                r["max"].as_f64().unwrap_or(f64::NAN),
            );
        }
        eprintln!(
            "xtask bench: wrote {} in {} s",
            out.display(),
            started.elapsed().as_secs()
        );
        return Ok(());
    }
    let out = root.join("bench/results/latest.json");
    std::fs::create_dir_all(out.parent().context("results dir")?)?;
    std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")?;
    write_report(&root, &doc)?;
    eprintln!(
        "xtask bench: wrote {} and docs/BENCHMARKS.md in {} s",
        out.display(),
        started.elapsed().as_secs()
    );
    Ok(())
}

/// `--only W2,mqttlb-auto,haproxy`: the workloads and systems named (all of a kind
/// when none of it is named), for a look by hand.
#[derive(Debug)]
struct Only {
    workloads: Vec<String>,
    systems: Vec<String>,
}

impl Only {
    fn parse(args: &[String]) -> Result<Self> {
        let mut only = Only {
            workloads: Vec::new(),
            systems: Vec::new(),
        };
        let Some(i) = args.iter().position(|a| a == "--only") else {
            return Ok(only);
        };
        let list = args
            .get(i + 1)
            .context("--only needs a list: --only W2,mqttlb-auto")?;
        for name in list.split(',').filter(|n| !n.is_empty()) {
            if WORKLOADS.contains(&name) {
                only.workloads.push(name.into());
            } else if SYSTEMS.contains(&name) {
                only.systems.push(name.into());
            } else {
                bail!(
                    "--only: {name:?} is neither a workload ({}) nor a system ({})",
                    WORKLOADS.join(", "),
                    SYSTEMS.join(", ")
                );
            }
        }
        // An empty list would run the whole suite and overwrite the published results.
        if !only.any() {
            bail!("--only needs at least one workload or system: --only W2,mqttlb-auto");
        }
        Ok(only)
    }

    fn any(&self) -> bool {
        !self.workloads.is_empty() || !self.systems.is_empty()
    }

    fn workload(&self, w: &str) -> bool {
        self.workloads.is_empty() || self.workloads.iter().any(|x| x == w)
    }

    fn system(&self, s: &str) -> bool {
        self.systems.is_empty() || self.systems.iter().any(|x| x == s)
    }
}

/// Runs one workload once; returns the load generator's report.
fn loadgen(
    root: &Path,
    workload: &str,
    system: &str,
    quick: bool,
    proxy: &Proxy,
    broker_pid: u32,
) -> Result<Value> {
    let (target, server) = match (system, workload) {
        ("direct", "W6") => (BROKER, None),
        ("direct", _) => (SERVER, Some(SERVER)),
        (_, "W6") => (BROKER_FRONT, None),
        (_, w) if TLS_WORKLOADS.contains(&w) => (TLS_FRONT, Some(SERVER)),
        _ => (FRONT, Some(SERVER)),
    };
    let mut cmd = Command::new(root.join("target/release/mqttlb-loadgen"));
    cmd.args(["--workload", &workload.to_lowercase(), "--target", target])
        .args(["--exclude-pid", &broker_pid.to_string()]);
    if TLS_WORKLOADS.contains(&workload) {
        cmd.arg("--ca").arg(root.join("target/bench/pki/ca.pem"));
    }
    if let Some(s) = server {
        cmd.args(["--server", s]);
    }
    if quick {
        cmd.arg("--quick");
    }
    for pid in proxy.pids() {
        cmd.args(["--proxy-pid", &pid.to_string()]);
    }
    let out = cmd.stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("mqttlb-loadgen failed ({})", out.status);
    }
    let report: Value = serde_json::from_slice(&out.stdout).context("loadgen output")?;
    eprintln!("  {system} {workload}: {}", report["metrics"]);
    Ok(report)
}

/// W10: the W6 broker path driven by real clients instead of our load generator:
/// `mosquitto_sub` counting `n` messages while `mosquitto_pub -l` publishes `n` lines,
/// QoS 1 then QoS 0; delivered messages per second, publisher start to the
/// subscriber's last message.
fn real_clients(system: &str, quick: bool) -> Result<Value> {
    let target = if system == "direct" {
        BROKER
    } else {
        BROKER_FRONT
    };
    let (host, port) = target.rsplit_once(':').context("target")?;
    let mut metrics = serde_json::Map::new();
    let mut errors = 0;
    for qos in ["1", "0"] {
        // QoS 0 runs four times as fast: with as many messages its full run lasted
        // half a second, and the clients' start weighed on it as much as the proxy.
        let n: u64 = match (quick, qos) {
            (true, _) => 10_000,
            (false, "1") => 50_000,
            (false, _) => 200_000,
        };
        let topic = format!("bench/w10/{qos}");
        let mut sub = Command::new("mosquitto_sub")
            .args(["-h", host, "-p", port, "-t", &topic, "-q", qos])
            .args([
                "-C",
                &n.to_string(),
                "-W",
                "120",
                "-i",
                &format!("w10-sub-{qos}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("mosquitto_sub (apt-get install -y mosquitto-clients)")?;
        // The subscription must exist before the first message.
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let mut publisher = Command::new("mosquitto_pub")
            .args(["-h", host, "-p", port, "-t", &topic, "-q", qos, "-l"])
            .args(["-i", &format!("w10-pub-{qos}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("mosquitto_pub")?;
        {
            let mut stdin = publisher.stdin.take().context("publisher stdin")?;
            let mut lines = String::with_capacity(n as usize * 8);
            for i in 0..n {
                let _ = writeln!(lines, "m{i}");
            }
            stdin.write_all(lines.as_bytes())?;
        }
        let got = sub.wait()?;
        let secs = started.elapsed().as_secs_f64();
        let _ = publisher.wait();
        if !got.success() {
            errors += 1;
            continue;
        }
        let key = if qos == "1" { "msg/s" } else { "msg/s_qos0" };
        metrics.insert(key.into(), json!(n as f64 / secs));
    }
    eprintln!("  {system} W10: {}", Value::Object(metrics.clone()));
    Ok(json!({ "metrics": metrics, "errors": errors }))
}

/// Waits up to 60 s for a service-manager notification with `READY=1`.
fn wait_ready(socket: &std::os::unix::net::UnixDatagram) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        socket.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let n = socket.recv(&mut buf)?;
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "READY=1")
        {
            return Ok(());
        }
    }
    bail!("no READY=1 within 60 s")
}

/// The system under test, stopped on drop.
struct Proxy {
    child: Option<Child>,
}

impl Proxy {
    fn start(system: &str, root: &Path, dir: &Path) -> Result<Self> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let render = |template: &str| -> Result<PathBuf> {
            let text = std::fs::read_to_string(root.join("bench").join(template))
                .with_context(|| format!("bench/{template}"))?
                .replace("{FRONT}", FRONT)
                .replace("{SERVER}", SERVER)
                .replace("{BROKER_FRONT}", BROKER_FRONT)
                .replace("{BROKER}", BROKER)
                .replace("{TLS_FRONT}", TLS_FRONT)
                .replace("{THREADS}", &threads.to_string())
                .replace("{DIR}", &dir.display().to_string());
            let path = dir.join(template);
            std::fs::write(&path, text)?;
            Ok(path)
        };
        let mut cmd = match system {
            "direct" => return Ok(Self { child: None }),
            // mqttlb-auto runs the default exactly as a user does (`auto`, no flag).
            "mqttlb-auto" => {
                let mut c = Command::new(root.join("target/release/mqttlb"));
                c.args(["run", "-c"]).arg(render("mqttlb.toml")?);
                c.env("RUST_LOG", "warn");
                c
            }
            "mqttlb-sockmap" | "mqttlb-copy" => {
                let mut c = Command::new(root.join("target/release/mqttlb"));
                c.args(["run", "-c"])
                    .arg(render("mqttlb.toml")?)
                    .args(["--data-plane", system.trim_start_matches("mqttlb-")]);
                c.env("RUST_LOG", "warn");
                c
            }
            "haproxy" => {
                let mut c = Command::new("haproxy");
                c.arg("-db").arg("-f").arg(render("haproxy.cfg")?);
                c
            }
            "nginx" => {
                let mut c = Command::new("nginx");
                c.arg("-c").arg(render("nginx.conf")?).arg("-p").arg(dir);
                c
            }
            other => bail!("unknown system {other}"),
        };
        // mqttlb says READY=1 once it serves: with workers (one per core, the
        // default) its listeners accept before the workers are forked, and their
        // memory and CPU would go uncounted.
        let notify = dir.join("notify.sock");
        let _ = std::fs::remove_file(&notify);
        let ready = match system.starts_with("mqttlb") {
            true => {
                let socket = std::os::unix::net::UnixDatagram::bind(&notify)?;
                cmd.env("NOTIFY_SOCKET", &notify);
                Some(socket)
            }
            false => None,
        };
        let child = cmd
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {system}"))?;
        let p = Self { child: Some(child) };
        if let Some(socket) = ready {
            wait_ready(&socket).with_context(|| format!("{system} did not say READY=1"))?;
        }
        wait_port(FRONT).with_context(|| format!("{system} did not listen on {FRONT}"))?;
        wait_port(BROKER_FRONT)?;
        wait_port(TLS_FRONT)?;
        Ok(p)
    }

    /// The proxy's processes (nginx has workers under its master).
    fn pids(&self) -> Vec<u32> {
        let Some(c) = &self.child else {
            return Vec::new();
        };
        let mut pids = vec![c.id()];
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", c.id()))
            .unwrap_or_default();
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
        pids
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
            // Let the ports and sockets of this system drain before the next one.
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// The mosquitto node of W6.
struct Broker {
    child: Child,
}

impl Broker {
    fn start(dir: &Path) -> Result<Self> {
        let conf = dir.join("mosquitto.conf");
        let port = BROKER.rsplit(':').next().context("broker port")?;
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence false\nmax_queued_messages 1000000\nmax_inflight_messages 0\n"
            ),
        )?;
        let child = crate::spawn_mosquitto(&conf)?;
        wait_port(BROKER)?;
        Ok(Self { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_port(addr: &str) -> Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Children inherit it: tens of thousands of sockets per process.
fn raise_fd_limit() {
    let n = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1 << 20);
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit with a valid struct; failure leaves the old limit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let version = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .map(|o| {
                let s = String::from_utf8_lossy(&o.stdout).to_string()
                    + &String::from_utf8_lossy(&o.stderr);
                s.lines().next().unwrap_or_default().trim().to_owned()
            })
            .unwrap_or_default()
    };
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_bytes": mem_kib * 1024,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "haproxy": version("haproxy", "-v"),
        "nginx": version("nginx", "-v"),
        "mosquitto": version("mosquitto", "-h"),
    })
}

/// docs/BENCHMARKS.md (tables from the results) and docs/benchmarks.svg (chart).
fn write_report(root: &Path, doc: &Value) -> Result<()> {
    let results = doc["results"].as_array().context("results")?;
    let get = |w: &str, s: &str, m: &str| {
        results
            .iter()
            .find(|r| r["workload"] == w && r["system"] == s && r["metric"] == m)
    };
    let mut md = String::new();
    let intro = std::fs::read_to_string(root.join("bench/BENCHMARKS.head.md"))
        .context("bench/BENCHMARKS.head.md")?;
    md += &intro;
    let m = &doc["machine"];
    writeln!(
        md,
        "\n## Results\n\nRun: `cargo xtask bench{}` ({} runs per figure, {} s in all) on {} ({} cores, {:.0} GiB), kernel {}; {}; {}; {}.\n",
        if doc["mode"] == "quick" {
            " --quick"
        } else {
            ""
        },
        doc["runs"],
        doc["duration_s"],
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["memory_bytes"].as_f64().unwrap_or(0.0) / f64::from(1u32 << 30),
        m["kernel"].as_str().unwrap_or("?"),
        m["haproxy"].as_str().unwrap_or("?"),
        m["nginx"].as_str().unwrap_or("?"),
        m["mosquitto"].as_str().unwrap_or("?"),
    )?;
    md += "Each cell: median (min-max). `x direct` and `x haproxy`: the median as a multiple of theirs, from the same run.\n\n![chart](benchmarks.svg)\n";
    for w in WORKLOADS {
        let metrics: Vec<(&str, bool)> = METRICS
            .iter()
            .filter(|(mw, ..)| *mw == w)
            .map(|(_, m, up)| (*m, *up))
            .collect();
        writeln!(md, "\n### {w}\n")?;
        md += "| system |";
        for (m, up) in &metrics {
            write!(
                md,
                " {m} ({}) | x direct | x haproxy |",
                if *up {
                    "higher is better"
                } else {
                    "lower is better"
                }
            )?;
        }
        md += "\n|---|";
        md += &"---|---|---|".repeat(metrics.len());
        md += "\n";
        for s in SYSTEMS {
            write!(md, "| {s} |")?;
            for (m, _) in &metrics {
                match get(w, s, m) {
                    Some(r) => {
                        let med = r["median"].as_f64().unwrap_or(0.0);
                        let ratio = |base: &str| {
                            get(w, base, m)
                                .and_then(|b| b["median"].as_f64())
                                .filter(|b| *b != 0.0)
                                .map_or("-".to_owned(), |b| format!("{:.2}", med / b))
                        };
                        write!(
                            md,
                            " {} ({}-{}) | {} | {} |",
                            fmt(med),
                            fmt(r["min"].as_f64().unwrap_or(0.0)),
                            fmt(r["max"].as_f64().unwrap_or(0.0)),
                            ratio("direct"),
                            ratio("haproxy")
                        )?;
                    }
                    None => md += " - | - | - |",
                }
            }
            md += "\n";
        }
    }
    let errors: Vec<String> = doc["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["errors"].as_u64().unwrap_or(0) > 0)
        .map(|e| format!("{} {}: {}", e["workload"], e["system"], e["errors"]))
        .collect();
    writeln!(
        md,
        "\nErrors and lost messages over all runs: {}.",
        if errors.is_empty() {
            "none".to_owned()
        } else {
            errors.join("; ")
        }
    )?;
    md += &std::fs::read_to_string(root.join("bench/BENCHMARKS.tail.md"))
        .context("bench/BENCHMARKS.tail.md")?;
    std::fs::write(root.join("docs/BENCHMARKS.md"), md)?;
    std::fs::write(root.join("docs/benchmarks.svg"), chart(&get))?;
    Ok(())
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A grouped bar chart: each headline metric relative to HAProxy (1.0), oriented so
/// that a longer bar is always better.
fn chart<'a>(get: &dyn Fn(&str, &str, &str) -> Option<&'a Value>) -> String {
    let headline: Vec<(&str, &str, bool)> = METRICS
        .iter()
        .copied()
        .filter(|(w, m, _)| {
            matches!(
                (*w, *m),
                ("W1", "MB/s")
                    | ("W1", "cpu_s_per_GiB")
                    | ("W2", "cpu_s_per_Mmsg")
                    | ("W3", "sessions/s")
                    | ("W4", "rss_bytes_per_conn")
                    | ("W5", "p50_us")
                    | ("W5", "p99_us")
                    | ("W6", "msg/s")
                    | ("W7", "sessions/s")
                    | ("W8", "sessions/s")
                    | ("W9", "MB/s")
            )
        })
        .collect();
    let colors = [
        "#888888", "#ff7f0e", "#1f77b4", "#2ca02c", "#d62728", "#9467bd",
    ];
    let (group_w, bar_w, left, top, height) = (130.0, 18.0, 60.0, 40.0, 260.0);
    let width = left + group_w * headline.len() as f64 + 20.0;
    let max = 3.0f64;
    let y = |v: f64| top + height - (v.min(max) / max) * height;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="20" font-size="13">Relative to HAProxy (1.0 = HAProxy; longer is better; capped at {max})</text>
"#,
        top + height + 90.0
    );
    for t in [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0] {
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" x2="{0}" y1="{1}" y2="{1}" stroke="{2}"/><text x="{3}" y="{4}" text-anchor="end">{t}</text>"##,
            width - 10.0,
            y(t),
            if t == 1.0 { "#000" } else { "#ddd" },
            left - 5.0,
            y(t) + 4.0
        );
    }
    for (g, (w, m, up)) in headline.iter().enumerate() {
        let x0 = left + group_w * g as f64 + 8.0;
        let base = get(w, "haproxy", m).and_then(|r| r["median"].as_f64());
        for (i, s) in SYSTEMS.iter().enumerate() {
            let v = get(w, s, m).and_then(|r| r["median"].as_f64());
            let rel = match (v, base) {
                (Some(v), Some(b)) if v > 0.0 && b > 0.0 => {
                    if *up {
                        v / b
                    } else {
                        b / v
                    }
                }
                _ => 0.0,
            };
            let x = x0 + bar_w * i as f64;
            let _ = writeln!(
                svg,
                r#"<rect x="{x}" y="{}" width="{}" height="{}" fill="{}"><title>{s} {w} {m}: {rel:.2}</title></rect>"#,
                y(rel),
                bar_w - 2.0,
                top + height - y(rel),
                colors[i]
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{w} {m}</text>"#,
            x0 + bar_w * SYSTEMS.len() as f64 / 2.0,
            top + height + 15.0
        );
    }
    for (i, s) in SYSTEMS.iter().enumerate() {
        let x = left + 130.0 * i as f64;
        let yy = top + height + 45.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{s}</text>"#,
            yy - 10.0,
            colors[i],
            x + 16.0,
            yy
        );
    }
    svg += "</svg>\n";
    svg
}

#[cfg(test)]
mod tests {
    use super::Only;

    fn args(list: &str) -> Vec<String> {
        vec!["--only".into(), list.into()]
    }

    #[test]
    fn only_sorts_names_into_workloads_and_systems_and_refuses_others() {
        let only = Only::parse(&args("W2,mqttlb-auto,W10")).expect("valid list");
        assert_eq!(only.workloads, ["W2", "W10"]);
        assert_eq!(only.systems, ["mqttlb-auto"]);
        assert!(only.workload("W10") && !only.workload("W1"));
        assert!(only.system("mqttlb-auto") && !only.system("haproxy"));
        // Naming only systems keeps every workload.
        let only = Only::parse(&args("haproxy")).expect("valid list");
        assert!(only.workload("W7") && only.system("haproxy") && !only.system("nginx"));
        let e = Only::parse(&args("W2,envoy")).expect_err("unknown name");
        assert!(e.to_string().contains("\"envoy\""), "{e}");
        assert!(Only::parse(&args(",")).is_err());
        assert!(Only::parse(&["--only".to_string()]).is_err());
        let none = Only::parse(&["--quick".to_string()]).expect("no --only");
        assert!(!none.any() && none.workload("W1") && none.system("nginx"));
    }
}
