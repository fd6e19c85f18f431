//! The `mqttlb` binary under test: started with a generated configuration, its log,
//! counters and `ctl` views read back, stopped, reloaded; process probes (`/proc`);
//! and what every test needs (free ports, temporary directories, waiting).

use std::{
    net::{SocketAddr, TcpListener as StdListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// The data planes every acceptance test runs against.
pub const PLANES: [&str; 2] = ["sockmap", "copy"];

/// Whether privileged tests can run; under `CI=true` a missing privilege fails.
pub fn privileged(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{what} needs root (BPF); CI runs as root, so this is a failure");
        }
        eprintln!("skipping {what}: needs root (run `cargo xtask test` as root)");
    }
    root
}

/// Path of the built `mqttlb` binary.
pub fn bin() -> PathBuf {
    if let Ok(p) = std::env::var("MQTTLB_BIN") {
        return p.into();
    }
    // target/<profile>/deps/<test-binary> -> target/<profile>/mqttlb
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("mqttlb")
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);

/// A running `mqttlb run` process.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    pub instance: String,
    pub plane: String,
    pub config: PathBuf,
    /// Open-files limit (soft and hard) the daemon runs under, when the test sets one.
    pub nofile: Option<u64>,
    /// Arguments after `run -c CONFIG`.
    pub args: Vec<String>,
    /// The network namespace it runs in (`ip netns exec`), when not the test's.
    pub netns: Option<String>,
    /// The process that took over after `mqttlb upgrade` (not the test's child).
    pub successor: Option<u32>,
    _dir: TempDir,
}

/// Runs `mqttlb run -c config`, its log appended to `dir/mqttlb.log`, under an
/// open-files limit of `nofile` (soft and hard) when given.
fn spawn_daemon(
    config: &std::path::Path,
    dir: &std::path::Path,
    nofile: Option<u64>,
    args: &[String],
    netns: Option<&str>,
) -> Child {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("mqttlb.log"))
        .expect("log");
    let mut cmd = match netns {
        // `ip netns exec` execs mqttlb in place: the child's pid is the daemon's.
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin());
            c
        }
        None => Command::new(bin()),
    };
    if let Some(n) = nofile {
        // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.args(["run", "-c"])
        .arg(config)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("MQTTLB_TEST_LOG").unwrap_or_else(|_| "mqttlb=info".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn mqttlb (built by cargo xtask test)")
}

/// Runs `mqttlb ctl ARGS --instance INSTANCE`.
pub fn ctl_output(instance: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .arg("ctl")
        .args(args)
        .args(["--instance", instance])
        .output()
        .expect("run mqttlb ctl")
}

/// [`ctl_output`], which must succeed.
pub fn ctl_ok(instance: &str, args: &[&str]) {
    let out = ctl_output(instance, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ctl {args:?}: {err}");
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "mqttlb-test-{tag}-{}-{}",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }

    /// A file `name` in it holding `secret`, readable by its owner only (as the
    /// daemon wants a token file).
    pub fn secret(&self, name: &str, secret: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.0.join(name);
        std::fs::write(&path, format!("{secret}\n")).expect("secret file");
        let mode = std::fs::Permissions::from_mode(0o600);
        std::fs::set_permissions(&path, mode).expect("chmod 600");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Config text for one listener in front of `servers` (one process: no `workers`).
pub fn config_text(instance: &str, plane: &str, port: u16, servers: &[SocketAddr]) -> String {
    let mut t = format!(
        "[global]\nname = \"{instance}\"\ndata_plane = \"{plane}\"\n\n[[listeners]]\nname = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\ncluster = \"c\"\ninspect_timeout = \"10s\"\n\n[[clusters]]\nname = \"c\"\nconnect_timeout = \"1s\"\n"
    );
    // No active health checks: these tests count the connections their servers get.
    t += "\n[clusters.health]\nkind = \"none\"\n";
    for (i, s) in servers.iter().enumerate() {
        t += &format!("\n[[clusters.servers]]\nname = \"s{i}\"\naddress = \"{s}\"\n");
    }
    t
}

/// Whether a log shows a start of workers not yet all accepting (a log that holds
/// several starts, after restarts, counts them).
pub fn workers_pending(log: &str) -> bool {
    log.matches("starting workers").count() > log.matches("all workers accepting").count()
}

/// `text` with `[global] workers = 1` unless it says how many workers: the default
/// is one per core, and the suite's tests of everything but workers count on one
/// process (one round-robin, one descriptor table, `kill -9` of one pid). The
/// default itself runs in the tests that start mqttlb as a user does (`demo`,
/// `deploy`, `container`) and in `workers`.
pub fn one_process(text: &str) -> String {
    if text.contains("workers") {
        return text.to_owned();
    }
    match text.find("[global]") {
        Some(at) => {
            let end = text[at..].find('\n').map_or(text.len(), |n| at + n + 1);
            format!("{}\nworkers = 1\n{}", text[..end].trim_end(), &text[end..])
        }
        None => format!("[global]\nworkers = 1\n\n{text}"),
    }
}

/// `mqttlb upgrade --instance INSTANCE [--binary BINARY]`: its output line and the
/// new process's pid, or its error output when it failed.
pub fn upgrade_instance(
    instance: &str,
    binary: Option<&std::path::Path>,
) -> Result<(String, u32), String> {
    let mut cmd = Command::new(bin());
    cmd.args(["upgrade", "--instance", instance]);
    if let Some(b) = binary {
        cmd.arg("--binary").arg(b);
    }
    let out = cmd.output().expect("run mqttlb upgrade");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let pid = line
        .strip_prefix("upgraded: new process ")
        .and_then(|rest| rest.split(',').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected upgrade output {line:?}"));
    Ok((line, pid))
}

impl Daemon {
    pub fn start(plane: &str, servers: &[SocketAddr]) -> Self {
        Self::start_edited(plane, servers, |t| t)
    }

    /// Starts with the generated config text passed through `edit` first.
    pub fn start_edited(
        plane: &str,
        servers: &[SocketAddr],
        edit: impl FnOnce(String) -> String,
    ) -> Self {
        let instance = format!(
            "t{}x{}",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        );
        let port = free_port();
        Self::start_text(
            plane,
            port,
            &instance,
            &edit(config_text(&instance, plane, port, servers)),
        )
    }

    /// Starts with this config text (listening on 127.0.0.1:`port`, instance `instance`).
    pub fn start_text(plane: &str, port: u16, instance: &str, text: &str) -> Self {
        Self::start_limited(plane, port, instance, text, None)
    }

    /// [`Daemon::start_text`] under an open-files limit of `nofile`.
    pub fn start_limited(
        plane: &str,
        port: u16,
        instance: &str,
        text: &str,
        nofile: Option<u64>,
    ) -> Self {
        Self::spawn(plane, port, instance, text, nofile, Vec::new())
    }

    /// Starts inside network namespace `netns`, listening on `addr` there (the
    /// config's listener is moved to it).
    pub fn start_in(
        netns: &crate::netns::Netns,
        addr: SocketAddr,
        instance: &str,
        text: &str,
    ) -> Self {
        let dir = TempDir::new("lb");
        let config = dir.0.join("mqttlb.toml");
        std::fs::write(&config, one_process(text)).expect("write config");
        let netns = Some(netns.0.clone());
        let mut d = Daemon {
            child: spawn_daemon(&config, &dir.0, None, &[], netns.as_deref()),
            addr,
            instance: instance.to_owned(),
            plane: "copy".into(),
            config,
            nofile: None,
            args: Vec::new(),
            netns,
            successor: None,
            _dir: dir,
        };
        d.wait_ready();
        d
    }

    /// [`Daemon::start_text`] with more arguments after `run -c CONFIG`.
    pub fn start_args(plane: &str, port: u16, instance: &str, text: &str, args: &[&str]) -> Self {
        let args = args.iter().map(|a| (*a).to_owned()).collect();
        Self::spawn(plane, port, instance, text, None, args)
    }

    fn spawn(
        plane: &str,
        port: u16,
        instance: &str,
        text: &str,
        nofile: Option<u64>,
        args: Vec<String>,
    ) -> Self {
        let dir = TempDir::new("lb");
        let config = dir.0.join("mqttlb.toml");
        std::fs::write(&config, one_process(text)).expect("write config");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut d = Daemon {
            child: spawn_daemon(&config, &dir.0, nofile, &args, None),
            addr,
            instance: instance.to_owned(),
            plane: plane.into(),
            config,
            nofile,
            args,
            netns: None,
            successor: None,
            _dir: dir,
        };
        d.wait_ready();
        d
    }

    /// SIGTERM and wait for the exit (pins stay for a restart; drop removes them).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "mqttlb did not stop within 10 s after SIGTERM: {}",
            self.log()
        );
    }

    /// Stops and starts the daemon again with the same config and instance.
    pub fn restart(&mut self) {
        let status = self.stop();
        assert!(status.success(), "exit status {status}: {}", self.log());
        self.child = spawn_daemon(
            &self.config,
            &self._dir.0,
            self.nofile,
            &self.args,
            self.netns.as_deref(),
        );
        self.wait_ready();
    }

    /// Writes a new config and sends SIGHUP; returns once the daemon counted the
    /// reload (panics if it refused the file).
    pub fn reload(&self, text: &str) {
        let before = (self.reloads(), self.stat("reload_failures"));
        std::fs::write(&self.config, one_process(text)).expect("write config");
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = (self.reloads(), self.stat("reload_failures"));
            assert_eq!(now.1, before.1, "reload refused: {}", self.log());
            // Every worker (one without workers) has reloaded.
            if now.0.iter().zip(&before.0).all(|(n, b)| n > b) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "reload not applied: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The config file.
    pub fn config_path(&self) -> &std::path::Path {
        &self.config
    }

    /// The config file's current text.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).expect("read config")
    }

    fn wait_ready(&mut self) {
        self.wait_ready_inner();
    }

    fn wait_ready_inner(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!("mqttlb exited early ({status}): {}", self.log());
            }
            let addr = self.addr;
            let probe = move || std::net::TcpStream::connect(addr).is_ok();
            let listening = match &self.netns {
                Some(ns) => crate::netns::within(ns, probe),
                None => probe(),
            };
            // With workers the supervisor's sockets accept before the workers serve
            // (worker 0's admin listener, the others' control sockets): wait for all.
            if listening && !workers_pending(&self.log()) {
                // The probe connection is closed without a CONNECT: rejected, counted.
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("mqttlb did not listen within 20 s: {}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.0.join("mqttlb.log")).unwrap_or_default()
    }

    /// The serving process: the one started, or the one that took over after an
    /// upgrade.
    pub fn pid(&self) -> u32 {
        self.successor.unwrap_or_else(|| self.child.id())
    }

    /// `mqttlb upgrade --instance ... [--binary BINARY]`: its output line, or its
    /// error output when it failed. The new process is the one [`Daemon::pid`] and
    /// the drop then stop.
    pub fn upgrade(&mut self, binary: Option<&std::path::Path>) -> Result<String, String> {
        let (line, pid) = upgrade_instance(&self.instance, binary)?;
        self.successor = Some(pid);
        Ok(line)
    }

    /// The pid the latest "worker accepting" log line of worker `index` names
    /// (`[global] workers`).
    pub fn worker_pid(&self, index: u32) -> Option<u32> {
        let log = self.log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("worker accepting") && l.contains(&format!("worker={index} ")))?;
        line.split("pid=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// `mqttlb ctl <what> --json` for this instance.
    pub fn ctl(&self, what: &str) -> serde_json::Value {
        let out = ctl_output(&self.instance, &[what, "--json"]);
        assert!(
            out.status.success(),
            "ctl {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("ctl json")
    }

    /// Reloads done, by worker (one entry without workers).
    fn reloads(&self) -> Vec<u64> {
        let stats = self.ctl("stats");
        let count = |s: &serde_json::Value| s["reloads"].as_u64().expect("reloads");
        match stats["workers"].as_array() {
            Some(workers) => workers.iter().map(count).collect(),
            None => vec![count(&stats["stats"])],
        }
    }

    /// A daemon counter (sockmap plane: read through `ctl stats`).
    pub fn stat(&self, name: &str) -> u64 {
        self.ctl("stats")["stats"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no stat {name}"))
    }

    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("proc fd")
            .count()
    }

    /// Resident memory (VmRSS), bytes.
    pub fn rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    pub fn thread_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .expect("proc task")
            .count()
    }

    /// `rchar + wchar` from `/proc/PID/io`.
    pub fn io_chars(&self) -> u64 {
        let io = std::fs::read_to_string(format!("/proc/{}/io", self.pid())).expect("proc io");
        io.lines()
            .filter(|l| l.starts_with("rchar:") || l.starts_with("wchar:"))
            .map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }
}

/// Whether process `pid` still exists (zombies of our own children count as gone).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            != Some("Z")
    })
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.successor {
            // SAFETY: kill on the pid that took over this instance.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while process_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A killed daemon leaves its pinned maps (and their kernel memory) behind, and
        // a stopped one its sticky table: test instances are not reused.
        let _ = std::fs::remove_dir_all(
            std::path::Path::new("/sys/fs/bpf/mqttlb").join(&self.instance),
        );
    }
}

/// Waits until `f` is true, polling; panics with `what` after `limit`.
pub async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Slab plus TCP buffer pages of the whole machine, bytes.
pub fn kernel_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    let slab: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("Slab");
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").expect("sockstat");
    let pages: u64 = sockstat
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(f.iter().position(|w| *w == "mem")? + 1)?.parse().ok()
        })
        .unwrap_or(0);
    slab * 1024 + pages * 4096
}

/// The files pinned in the pin directory of `instance` (none when it is gone).
pub fn pins_left(instance: &str) -> Vec<String> {
    let dir = std::path::Path::new("/sys/fs/bpf/mqttlb").join(instance);
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The server named `name` in a `ctl backends --json` answer.
pub fn backend<'a>(backends: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    backends["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no backend {name}: {backends}"))
}
