//! Project tasks: `cargo xtask run [-- ARGS]`, `cargo xtask test`,
//! `cargo xtask bench [--quick] [--only ...]`, `cargo xtask fuzz [--seconds N]`.
//!
//! `run` and `test` install what a fresh Debian bookworm machine lacks (as root, with
//! apt-get), mount bpffs, build in release mode, then do their job.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
};

use anyhow::{Context, Result, bail};

mod bench;
mod fuzz;

/// Debian packages the build and the tests need, with a file that proves each present.
const APT: &[(&str, &str)] = &[
    ("clang-19", "/usr/bin/clang-19"),
    ("llvm-19", "/usr/bin/llvm-objdump-19"),
    ("libbpf-dev", "/usr/include/bpf/bpf_helpers.h"),
    ("mosquitto", "/usr/sbin/mosquitto"),
    ("mosquitto-clients", "/usr/bin/mosquitto_sub"),
    ("iproute2", "/usr/bin/ss"),
    // Test and demo certificates, and `s_client` for the resumption test.
    ("openssl", "/usr/bin/openssl"),
    // paho-mqtt (MQTT 5 client of the broker tests), for Debian's own python3.
    (
        "python3-paho-mqtt",
        "/usr/lib/python3/dist-packages/paho/mqtt/client.py",
    ),
];

/// Packages only the tests need: a real Prometheus (scraping `/metrics`, `promtool`)
/// and a headless browser (the stats page).
const TEST_APT: &[(&str, &str)] = &[
    ("prometheus", "/usr/bin/prometheus"),
    ("chromium", "/usr/bin/chromium"),
    // `systemd-analyze verify` of deploy/mqttlb.service.
    ("systemd", "/usr/bin/systemd-analyze"),
    // The container test: a base image made with debootstrap, built and run with
    // podman on runc (crun fails on these hosts), default seccomp profile included.
    ("podman", "/usr/bin/podman"),
    ("runc", "/usr/sbin/runc"),
    ("debootstrap", "/usr/sbin/debootstrap"),
    (
        "golang-github-containers-common",
        "/usr/share/containers/seccomp.json",
    ),
    // The compose quick start, run as written; its services find each other by name
    // through podman's CNI `dnsname` plugin (only recommended by podman, so not
    // installed with `--no-install-recommends`).
    ("podman-compose", "/usr/bin/podman-compose"),
    (
        "golang-github-containernetworking-plugin-dnsname",
        "/usr/lib/cni/dnsname",
    ),
    // The guard test's SYN flood.
    ("hping3", "/usr/sbin/hping3"),
    // The HA pair test (deploy/keepalived/: its check is curl on /readyz).
    ("keepalived", "/usr/sbin/keepalived"),
    ("curl", "/usr/bin/curl"),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("run") => run(&args[1..]),
        Some("bench") => bench::bench(&args[1..]),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        Some("dist") => dist(),
        _ => {
            eprintln!(
                "usage: cargo xtask run [-- MQTTLB-ARGS] | cargo xtask test | cargo xtask bench [--quick] [--only W2,mqttlb-auto,...] | cargo xtask bench --report-only | cargo xtask fuzz [--seconds N] | cargo xtask dist"
            );
            return ExitCode::from(1);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"))
}

/// Installs missing packages and mounts bpffs.
fn prepare() -> Result<()> {
    install(APT)?;
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(" /sys/fs/bpf bpf "));
    if !mounted && is_root() {
        sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
            .context("cannot mount bpffs at /sys/fs/bpf (the sockmap data plane needs it)")?;
    }
    Ok(())
}

/// Installs the packages whose proof file is missing (`apt-get`, as root).
fn install(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, f)| !Path::new(f).exists())
        .map(|(p, _)| *p)
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "missing packages {missing:?}: run as root, or `apt-get install -y {}`",
                missing.join(" ")
            );
        }
        eprintln!("xtask: installing {}", missing.join(" "));
        sh(Command::new("apt-get").arg("update").arg("-qq"))
            .context("apt-get update failed; check that the Debian mirrors are reachable")?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .with_context(|| format!("apt-get install {} failed", missing.join(" ")))?;
    }
    Ok(())
}

/// Builds in release mode: everything (tests and benches too) when `all`, else only
/// the `mqttlb` binary (the demo needs nothing more).
fn build(all: bool) -> Result<PathBuf> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(root()).args(["build", "--release"]);
    if all {
        cmd.args(["--workspace", "--all-targets"]);
    } else {
        cmd.args(["-p", "lb-user", "--bin", "mqttlb"]);
    }
    sh(&mut cmd)?;
    Ok(root().join("target/release/mqttlb"))
}

/// `target/dist/`: what an installation needs (README "Deploy" says where each goes).
fn dist() -> Result<()> {
    install(&APT[..3])?;
    let bin = build(false)?;
    write_dist(&bin, &root().join("target/dist"))
}

/// Writes into `out`: the binary `bin` without its debug sections (symbols stay, so
/// `perf` still names functions; 69 MB of DWARF go), the systemd unit, the example
/// configuration, the Containerfile and the compose quick start, the README, and
/// `seccomp.json` where this host has podman's default profile.
fn write_dist(bin: &Path, out: &Path) -> Result<()> {
    let root = root();
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out.join("compose"))?;
    let stripped = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(out.join("mqttlb"))
        .arg(bin)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        eprintln!("xtask: strip (binutils) failed; the binary keeps its debug sections");
        std::fs::copy(bin, out.join("mqttlb")).context("copy the binary")?;
    }
    for (from, to) in [
        ("deploy/mqttlb.service", "mqttlb.service"),
        ("deploy/mqttlb.toml", "mqttlb.toml"),
        ("Containerfile", "Containerfile"),
        ("deploy/compose.yaml", "compose.yaml"),
        ("deploy/compose/mqttlb.toml", "compose/mqttlb.toml"),
        ("deploy/compose/node1.conf", "compose/node1.conf"),
        ("deploy/compose/node2.conf", "compose/node2.conf"),
        ("deploy/compose/node3.conf", "compose/node3.conf"),
        ("README.md", "README.md"),
    ] {
        let from = root.join(from);
        std::fs::copy(&from, out.join(to)).with_context(|| format!("copy {}", from.display()))?;
    }
    let host_profile = Path::new("/usr/share/containers/seccomp.json");
    match std::fs::read(host_profile) {
        Ok(text) => {
            let profile = seccomp_with_bpf(serde_json::from_slice(&text)?)?;
            std::fs::write(
                out.join("seccomp.json"),
                serde_json::to_vec_pretty(&profile)?,
            )?;
        }
        Err(_) => eprintln!(
            "xtask: no {} (Debian package golang-github-containers-common): seccomp.json not written",
            host_profile.display()
        ),
    }
    eprintln!("xtask: wrote {}", out.display());
    Ok(())
}

/// Podman's default seccomp profile (containers-common) with `bpf()` allowed to a
/// container holding CAP_BPF: as shipped, only CAP_SYS_ADMIN unlocks it, so
/// `--cap-add BPF` alone still gets EPERM from every bpf() call.
fn seccomp_with_bpf(mut profile: serde_json::Value) -> Result<serde_json::Value> {
    let calls = profile["syscalls"]
        .as_array_mut()
        .context("seccomp profile without syscalls")?;
    let names_bpf = |c: &serde_json::Value| {
        c["names"]
            .as_array()
            .is_some_and(|n| n.iter().any(|x| x == "bpf"))
    };
    let mut refused = false;
    for call in calls.iter_mut().filter(|c| names_bpf(c)) {
        // The rule that refuses bpf() unless CAP_SYS_ADMIN: not with CAP_BPF either.
        if call["action"] == "SCMP_ACT_ERRNO"
            && let Some(caps) = call["excludes"]["caps"].as_array_mut()
        {
            caps.push("CAP_BPF".into());
            refused = true;
        }
    }
    if !refused {
        bail!("the host's seccomp profile has no rule refusing bpf(): unknown layout");
    }
    calls.push(serde_json::json!({
        "names": ["bpf"],
        "action": "SCMP_ACT_ALLOW",
        "args": [],
        "comment": "mqttlb: the splice program and its maps, with CAP_BPF",
        "includes": {"caps": ["CAP_BPF"]},
        "excludes": {}
    }));
    Ok(profile)
}

fn test() -> Result<()> {
    prepare()?;
    install(TEST_APT)?;
    let bin = build(true)?;
    // What `cargo xtask dist` makes, from the binary under test: the container test
    // builds its image from it.
    let dist = root().join("target/dist-test");
    write_dist(&bin, &dist)?;
    // Privileged tests share kernel state (pinned maps, ports): one at a time.
    sh(Command::new(env!("CARGO"))
        .current_dir(root())
        .args(["test", "--release", "--workspace", "--", "--test-threads=1"])
        .env("MQTTLB_BIN", &bin)
        .env("MQTTLB_DIST", &dist))
    .context("tests failed")
}

fn run(args: &[String]) -> Result<()> {
    prepare()?;
    // A binary named by MQTTLB_BIN (the demo test's) is used as it is.
    let bin = match std::env::var_os("MQTTLB_BIN") {
        Some(b) => PathBuf::from(b),
        None => build(false)?,
    };
    let args: Vec<&String> = args.iter().skip_while(|a| *a == "--").collect();
    if !args.is_empty() {
        return sh(Command::new(&bin).args(args));
    }
    demo(&bin)
}

/// Starts mosquitto with the config file at `conf`, its output discarded.
fn spawn_mosquitto(conf: &Path) -> Result<Child> {
    demo_command(Path::new("mosquitto"))
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start mosquitto (apt-get install -y mosquitto)")
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate (for
/// the demo's and the benchmark's TLS listeners), made with `openssl` on first run and
/// kept.
pub(crate) fn make_pki(dir: &Path) -> Result<()> {
    if dir.join("client.pem").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("cannot run openssl (apt-get install -y openssl)")?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "3650",
            "-subj",
            "/CN=mqttlb demo CA",
        ],
    ]
    .concat())?;
    for (name, subject, serial, ext) in [
        (
            "server",
            "/CN=localhost",
            "0x1001",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "client",
            "/CN=demo-device",
            "0x2001",
            "subjectAltName=email:demo@example.com\nextendedKeyUsage=clientAuth\n",
        ),
    ] {
        let (key, csr, pem, extfile) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(dir.join(&extfile), ext)?;
        run(&[
            &["req"][..],
            &ec,
            &["-keyout", &key, "-out", &csr, "-subj", subject],
        ]
        .concat())?;
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            serial,
            "-days",
            "825",
            "-out",
            &pem,
            "-extfile",
            &extfile,
        ])?;
    }
    Ok(())
}

/// Three mosquitto nodes bridged into one cluster and mqttlb in front (1883 MQTT, 8883
/// TLS, 8083 WebSocket, 8084 WebSocket over TLS).
fn demo(bin: &Path) -> Result<()> {
    // First: a stop signal from now on stops the brokers too.
    let signals = demo_signals()?;
    let dir = root().join("target/demo");
    std::fs::create_dir_all(&dir)?;
    let mut children: Vec<Child> = Vec::new();
    for n in 1..=3 {
        let mut conf = format!(
            "listener {} 127.0.0.1\nallow_anonymous true\nuser root\npersistence false\n",
            18830 + n
        );
        if n > 1 {
            conf += &format!(
                "connection bridge-node{n}-to-node1\naddress 127.0.0.1:18831\nbridge_protocol_version mqttv50\ntry_private true\ncleansession true\nnotifications false\nrestart_timeout 1 5\ntopic # both 2\n"
            );
        }
        let path = dir.join(format!("node{n}.conf"));
        std::fs::write(&path, conf)?;
        children.push(spawn_mosquitto(&path)?);
    }
    let pki = dir.join("pki");
    make_pki(&pki)?;
    // The admin API's token: made once, private to root.
    let token_file = dir.join("admin.token");
    if !token_file.exists() {
        use std::os::unix::fs::PermissionsExt;
        let token: String = (0..4).map(|_| format!("{:08x}", rand_u32())).collect();
        std::fs::write(&token_file, token + "\n")?;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
    }
    let config = dir.join("mqttlb.toml");
    std::fs::write(
        &config,
        r#"[global]
name = "demo"
data_plane = "auto"

# Stats page, Prometheus metrics, health endpoints and the JSON API.
[admin]
bind = "127.0.0.1:8888"
token_file = "admin.token"

[[listeners]]
name = "mqtt"
bind = "0.0.0.0:1883"
cluster = "brokers"

[[listeners]]
name = "mqtts"
bind = "0.0.0.0:8883"
kind = "mqtts"
cluster = "brokers"

[listeners.tls]
cert = "pki/server.pem"
key = "pki/server.key"
client_ca = "pki/ca.pem"
verify = "optional"          # mutual TLS when the client has a certificate

# MQTT over WebSocket: the servers have no ws_address, so mqttlb terminates the
# WebSocket and speaks plain MQTT to them.
[[listeners]]
name = "ws"
bind = "0.0.0.0:8083"
kind = "ws"
cluster = "brokers"

[[listeners]]
name = "wss"
bind = "0.0.0.0:8084"
kind = "wss"
cluster = "brokers"

[listeners.tls]
cert = "pki/server.pem"
key = "pki/server.key"

[[clusters]]
name = "brokers"
balance = "client-id"
sticky = "client-id"

[clusters.health]
kind = "mqtt"

[[clusters.servers]]
name = "node1"
address = "127.0.0.1:18831"

[[clusters.servers]]
name = "node2"
address = "127.0.0.1:18832"

[[clusters.servers]]
name = "node3"
address = "127.0.0.1:18833"
"#,
    )?;
    let p = |f: &str| pki.join(f).display().to_string();
    println!("mqttlb demo: three mosquitto nodes (18831-18833, bridged) behind mqttlb");
    println!("  MQTT on 1883:");
    println!("    mosquitto_sub -h 127.0.0.1 -p 1883 -t 'demo/#' -v");
    println!("    mosquitto_pub -h 127.0.0.1 -p 1883 -t demo/hello -m hi");
    println!("  MQTT over TLS on 8883 (CA {}):", p("ca.pem"));
    println!(
        "    mosquitto_pub -h localhost -p 8883 --cafile {} -t demo/hello -m 'over TLS'",
        p("ca.pem")
    );
    println!(
        "    mosquitto_pub -h localhost -p 8883 --cafile {} --cert {} --key {} -t demo/hello -m 'mutual TLS'",
        p("ca.pem"),
        p("client.pem"),
        p("client.key")
    );
    println!("  MQTT over WebSocket on 8083 (ws) and 8084 (wss), path /mqtt:");
    println!(
        "    /usr/bin/python3 -c \"import paho.mqtt.client as m; c = m.Client(transport='websockets'); c.connect('127.0.0.1', 8083); c.loop_start(); c.publish('demo/hello', 'over WS').wait_for_publish()\""
    );
    println!(
        "    /usr/bin/python3 -c \"import paho.mqtt.client as m; c = m.Client(transport='websockets'); c.tls_set(ca_certs='{}'); c.connect('localhost', 8084); c.loop_start(); c.publish('demo/hello', 'over WSS').wait_for_publish()\"",
        p("ca.pem")
    );
    println!(
        "  config:    {}   (edit, then reload: kill -HUP, pid below)",
        config.display()
    );
    println!(
        "  inspect:   {} ctl conns|backends|sticky|stats --instance demo",
        bin.display()
    );
    println!("  stats page: http://127.0.0.1:8888/   metrics: http://127.0.0.1:8888/metrics");
    println!(
        "  drain a node: curl -X POST -H \"Authorization: Bearer $(cat {})\" -d '{{\"state\":\"drain\"}}' http://127.0.0.1:8888/api/v1/servers/brokers/node1",
        token_file.display()
    );
    // SIGINT/SIGTERM/SIGHUP to this process (Ctrl-C, or `kill PID` by pid) are taken
    // by a thread and passed on, so the brokers and mqttlb stop with it and a second
    // run finds the ports free.
    let mut lb = demo_command(bin)
        .args(["run", "-c"])
        .arg(&config)
        .spawn()
        .context("cannot start mqttlb")?;
    println!(
        "  mqttlb pid {}: reload with kill -HUP {}; this demo (pid {}) stops on Ctrl-C or kill {}",
        lb.id(),
        lb.id(),
        std::process::id(),
        std::process::id()
    );
    let lb_pid = lb.id() as libc::pid_t;
    std::thread::spawn(move || {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `signals` is a valid set; sigwait writes one int.
            if unsafe { libc::sigwait(&signals, &mut sig) } != 0 {
                return;
            }
            // SIGHUP reloads mqttlb; the others stop it (it stops gracefully).
            let pass = if sig == libc::SIGHUP {
                libc::SIGHUP
            } else {
                libc::SIGTERM
            };
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(lb_pid, pass) };
        }
    });
    let status = lb.wait();
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    let status = status.context("mqttlb")?;
    if !status.success() {
        bail!("mqttlb exited with {status}");
    }
    println!("mqttlb demo: stopped (brokers stopped, pins removed by mqttlb)");
    Ok(())
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this process (and the threads it starts
/// after), so that one thread can `sigwait` for them; returns the set.
fn demo_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("cannot block signals for the demo");
        }
        Ok(set)
    }
}

/// A command for a demo child: the signal mask blocked here is not inherited, and
/// the child is its own process group, so a Ctrl-C reaches it only through us (once).
fn demo_command(program: &Path) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(program);
    c.process_group(0);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    c
}

/// Four random bytes from the kernel (`/dev/urandom`), for the demo's admin token.
fn rand_u32() -> u32 {
    use std::io::Read;
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    u32::from_ne_bytes(b)
}
