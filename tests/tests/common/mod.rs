//! Shared helpers for the integration tests: start the real `mqttlb` binary with a
//! generated config, in-test echo/sink servers, real mosquitto brokers, and process
//! probes (`/proc`). Tests bind port 0 where they can and wait for readiness instead
//! of sleeping.
#![allow(dead_code)]

use std::{
    io::Write,
    net::{SocketAddr, TcpListener as StdListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// The data planes every acceptance test runs against.
pub const PLANES: [&str; 2] = ["sockmap", "copy"];

/// A valid MQTT 3.1.1 CONNECT with this client id.
pub fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut p = vec![0x10, body.len() as u8];
    p.extend_from_slice(&body);
    p
}

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
    _dir: TempDir,
}

/// Runs `mqttlb run -c config`, its log appended to `dir/mqttlb.log`, under an
/// open-files limit of `nofile` (soft and hard) when given.
fn spawn_daemon(config: &std::path::Path, dir: &std::path::Path, nofile: Option<u64>) -> Child {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("mqttlb.log"))
        .expect("log");
    let mut cmd = Command::new(bin());
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
        .env(
            "RUST_LOG",
            std::env::var("MQTTLB_TEST_LOG").unwrap_or_else(|_| "mqttlb=info".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn mqttlb (built by cargo xtask test)")
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
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Config text for one listener in front of `servers`.
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
        let dir = TempDir::new("lb");
        let config = dir.0.join("mqttlb.toml");
        std::fs::write(&config, text).expect("write config");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut d = Daemon {
            child: spawn_daemon(&config, &dir.0, nofile),
            addr,
            instance: instance.to_owned(),
            plane: plane.into(),
            config,
            nofile,
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
        self.child = spawn_daemon(&self.config, &self._dir.0, self.nofile);
        self.wait_ready();
    }

    /// Writes a new config and sends SIGHUP; returns once the daemon counted the
    /// reload (panics if it refused the file).
    pub fn reload(&self, text: &str) {
        let before = (self.stat("reloads"), self.stat("reload_failures"));
        std::fs::write(&self.config, text).expect("write config");
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = (self.stat("reloads"), self.stat("reload_failures"));
            assert_eq!(now.1, before.1, "reload refused: {}", self.log());
            if now.0 > before.0 {
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
            if std::net::TcpStream::connect(self.addr).is_ok() {
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `mqttlb ctl <what> --json` for this instance.
    pub fn ctl(&self, what: &str) -> serde_json::Value {
        let out = Command::new(bin())
            .args(["ctl", what, "--json", "--instance", &self.instance])
            .output()
            .expect("run mqttlb ctl");
        assert!(
            out.status.success(),
            "ctl {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("ctl json")
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

impl Drop for Daemon {
    fn drop(&mut self) {
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

/// An in-test echo server: every connection gets its bytes back, then FIN after EOF.
pub struct Echo {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    pub async fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = l.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match r.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if w.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = w.shutdown().await;
                });
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `payload` (then FIN) on a connection to `addr` while reading everything back
/// until EOF; returns what was read.
pub async fn roundtrip(addr: SocketAddr, payload: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await?;
    let _w = writer.await.expect("writer task")?;
    Ok(got)
}

/// Reads and drops bytes until EOF or an error; whether that happened within `limit`.
pub async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, limit: Duration) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(limit, async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    })
    .await
    .is_ok()
}

/// Connects, sends `bytes`, and returns everything received until the other side
/// closes (panics if that takes longer than `limit`).
pub async fn reply_until_close(addr: SocketAddr, bytes: &[u8], limit: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut reply = Vec::new();
    let r = tokio::time::timeout(limit, s.read_to_end(&mut reply))
        .await
        .expect("closed in time");
    // A reset after the reply is a close too.
    if let Err(e) = r {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "read: {e}");
    }
    reply
}

/// Waits until `f` is true, polling; panics with `what` after `limit`.
pub async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real mosquitto broker on a free loopback port, started by the test.
pub struct Mosquitto {
    pub child: Child,
    pub addr: SocketAddr,
    _dir: TempDir,
}

impl Mosquitto {
    pub fn start() -> Self {
        Self::start_with(free_port(), "")
    }

    /// A broker on `port` with `extra` appended to its configuration (bridges...).
    pub fn start_with(port: u16, extra: &str) -> Self {
        let dir = TempDir::new("mosq");
        let conf = dir.0.join("mosquitto.conf");
        let mut f = std::fs::File::create(&conf).expect("conf");
        writeln!(
            f,
            "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence false\n{extra}"
        )
        .expect("conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto not found: install it with `apt-get install -y mosquitto` (cargo xtask test does)");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sets a retained message naming this node on `mqttlb/whoami` (see
    /// [`mqttc::which_node`]).
    pub fn set_whoami(&self, name: &str) {
        let out = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.addr.port().to_string()])
            .args(["-t", "mqttlb/whoami", "-m", name, "-r", "-q", "1", "-i"])
            .arg(format!("whoami-{name}"))
            .output()
            .expect("mosquitto_pub (apt-get install -y mosquitto-clients)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), for streams too large to keep.
pub fn prng_fill(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// MemAvailable from /proc/meminfo, bytes.
pub fn mem_available() -> u64 {
    let m = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    m.lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("MemAvailable")
        * 1024
}

/// A tiny raw MQTT 3.1.1 client for the tests that need to know which broker node a
/// connection reached, or to hold sessions open.
pub mod mqttc {
    use std::{io, net::SocketAddr, time::Duration};

    use tokio::{
        io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
        net::TcpStream,
        time::timeout,
    };

    const WAIT: Duration = Duration::from_secs(10);

    /// CONNECT with a client id and the clean-session flag.
    pub fn connect(client_id: &str, clean: bool) -> Vec<u8> {
        let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04];
        body.push(if clean { 0x02 } else { 0x00 });
        body.extend_from_slice(&60u16.to_be_bytes());
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        packet(0x10, &body)
    }

    /// A packet with a fixed header.
    pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut p = vec![first];
        let mut n = body.len();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            p.push(b);
            if n == 0 {
                break;
            }
        }
        p.extend_from_slice(body);
        p
    }

    /// SUBSCRIBE to one filter.
    pub fn subscribe(packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
        let mut body = packet_id.to_be_bytes().to_vec();
        body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
        body.extend_from_slice(filter.as_bytes());
        body.push(qos);
        packet(0x82, &body)
    }

    /// Reads one packet: (first byte, body).
    pub async fn read_packet<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<(u8, Vec<u8>)> {
        let first = s.read_u8().await?;
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let b = s.read_u8().await?;
            len |= usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; len];
        s.read_exact(&mut body).await?;
        Ok((first, body))
    }

    /// Connects and expects an accepting CONNACK; returns the session's stream.
    pub async fn session(addr: SocketAddr, client_id: &str, clean: bool) -> io::Result<TcpStream> {
        let s = TcpStream::connect(addr).await?;
        session_on(s, client_id, clean).await
    }

    /// [`session`] over an established stream (TLS...).
    pub async fn session_on<S: AsyncRead + AsyncWrite + Unpin>(
        mut s: S,
        client_id: &str,
        clean: bool,
    ) -> io::Result<S> {
        s.write_all(&connect(client_id, clean)).await?;
        let (first, body) = timeout(WAIT, read_packet(&mut s))
            .await
            .map_err(|_| io::Error::other("no CONNACK within 10 s"))??;
        if first != 0x20 || body.len() != 2 || body[1] != 0 {
            return Err(io::Error::other(format!("CONNACK {first:02x} {body:02x?}")));
        }
        Ok(s)
    }

    /// PINGREQ, expect PINGRESP.
    pub async fn ping<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<()> {
        s.write_all(&[0xc0, 0]).await?;
        let (first, _) = timeout(WAIT, read_packet(s))
            .await
            .map_err(|_| io::Error::other("no PINGRESP within 10 s"))??;
        if first != 0xd0 {
            return Err(io::Error::other(format!(
                "expected PINGRESP, got {first:02x}"
            )));
        }
        Ok(())
    }

    /// Reads PUBLISH packets until `quiet` passes without one (acknowledging QoS 1);
    /// returns their payloads.
    pub async fn collect<S: AsyncRead + AsyncWrite + Unpin>(
        s: &mut S,
        quiet: Duration,
    ) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        while let Ok(r) = timeout(quiet, read_packet(s)).await {
            let (first, body) = r?;
            if first >> 4 != 3 {
                continue;
            }
            let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let mut at = 2 + topic_len;
            if (first >> 1) & 3 > 0 {
                let id = [body[at], body[at + 1]];
                at += 2;
                s.write_all(&[0x40, 2, id[0], id[1]]).await?;
            }
            out.push(body[at..].to_vec());
        }
        Ok(out)
    }

    /// The node a new clean session for `client_id` through `addr` reaches: the
    /// payload of the retained `mqttlb/whoami` message (set per node with
    /// `Mosquitto::set_whoami`). Disconnects cleanly.
    pub async fn which_node(addr: SocketAddr, client_id: &str) -> io::Result<String> {
        which_node_on(TcpStream::connect(addr).await?, client_id).await
    }

    /// [`which_node`] over an established stream (TLS...).
    pub async fn which_node_on<S: AsyncRead + AsyncWrite + Unpin>(
        s: S,
        client_id: &str,
    ) -> io::Result<String> {
        let mut s = session_on(s, client_id, true).await?;
        s.write_all(&subscribe(1, "mqttlb/whoami", 0)).await?;
        let node = loop {
            let (first, body) = timeout(WAIT, read_packet(&mut s))
                .await
                .map_err(|_| io::Error::other("no retained whoami within 10 s"))??;
            if first >> 4 == 3 {
                let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                break String::from_utf8_lossy(&body[2 + topic_len..]).into_owned();
            }
        };
        s.write_all(&[0xe0, 0]).await?;
        let _ = s.shutdown().await;
        Ok(node)
    }
}

/// A test PKI made with the `openssl` command: a CA, a server certificate for
/// `localhost`/127.0.0.1, a client certificate (`O=Acme, CN=device-7`, serial
/// 0A1B2C3D, SAN e-mail and DNS), the same client with an expired certificate, and a
/// client certificate from another CA.
pub struct Pki {
    pub dir: TempDir,
}

impl Pki {
    pub fn new() -> Self {
        let dir = TempDir::new("pki");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir.0)
                .output()
                .expect("openssl (apt-get install -y openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key = |name: &str, subject: &str, csr: &str| {
            run(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                name,
                "-out",
                csr,
                "-subj",
                subject,
            ]);
        };
        for ca in ["ca", "other-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "3650",
                "-subj",
                &format!("/CN=mqttlb test {ca}"),
            ]);
        }
        let sign = |name: &str, ca: &str, serial: &str, ext: &str| {
            std::fs::write(dir.0.join(format!("{name}.ext")), ext).expect("ext");
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-set_serial",
                serial,
                "-days",
                "365",
                "-out",
                &format!("{name}.pem"),
                "-extfile",
                &format!("{name}.ext"),
            ]);
        };
        key("server.key", "/CN=localhost", "server.csr");
        sign(
            "server",
            "ca",
            "0x1001",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        );
        let client_ext = "subjectAltName=email:device7@example.com,DNS:device7.example.com\nbasicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n";
        key("client.key", "/O=Acme/CN=device-7", "client.csr");
        sign("client", "ca", "0x0A1B2C3D", client_ext);
        key("stranger.key", "/CN=stranger", "stranger.csr");
        sign("stranger", "other-ca", "0x77", client_ext);
        // The client's key in a certificate that expired yesterday.
        run(&[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "0x78",
            "-days",
            "-1",
            "-out",
            "expired.pem",
            "-extfile",
            "client.ext",
        ]);
        std::fs::copy(dir.0.join("client.key"), dir.0.join("expired.key")).expect("key");
        Self { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.0.join(name).display().to_string()
    }

    /// A rustls client trusting the CA, presenting `cert` (`client`, `stranger`) if given.
    pub fn client(&self, cert: Option<&str>) -> tokio_rustls::TlsConnector {
        self.client_versions(cert, rustls::DEFAULT_VERSIONS)
    }

    /// TLS to `addr` as `localhost` with only this protocol version.
    pub async fn connect_version(
        &self,
        addr: SocketAddr,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        self.client_versions(None, &[version])
            .connect(name, tcp)
            .await
    }

    fn client_versions(
        &self,
        cert: Option<&str>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> tokio_rustls::TlsConnector {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.path("ca.pem")).expect("ca") {
            roots.add(c.expect("ca cert")).expect("add ca");
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots);
        let config = match cert {
            None => builder.with_no_client_auth(),
            Some(name) => {
                let chain = CertificateDer::pem_file_iter(self.path(&format!("{name}.pem")))
                    .expect("cert")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("certs");
                let key =
                    PrivateKeyDer::from_pem_file(self.path(&format!("{name}.key"))).expect("key");
                builder
                    .with_client_auth_cert(chain, key)
                    .expect("client auth")
            }
        };
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
    }

    /// TLS to `addr` as `localhost`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        cert: Option<&str>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        self.client(cert).connect(name, tcp).await
    }
}

/// A small WebSocket terminator in front of a real broker's TCP listener (Debian's
/// mosquitto is built without WebSocket support): it answers the upgrade on `/mqtt`
/// (subprotocol `mqtt`/`mqttv3.1`), unwraps client frames to the broker and wraps the
/// broker's bytes in binary frames. It records the `X-Forwarded-For` and `X-Real-IP`
/// headers of each upgrade it answers.
pub struct WsBridge {
    pub addr: SocketAddr,
    pub forwarded: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WsBridge {
    pub async fn start(broker: SocketAddr) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let forwarded = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = forwarded.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let _ = Self::serve(s, broker, seen).await;
                });
            }
        });
        Self {
            addr,
            forwarded,
            task,
        }
    }

    async fn serve(
        mut s: TcpStream,
        broker: SocketAddr,
        seen: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    ) -> std::io::Result<()> {
        let mut buf = Vec::new();
        let upgrade = loop {
            match mqttlb::ws::parse_request(&buf, "/mqtt") {
                mqttlb::ws::Request::Upgrade(u) => break u,
                mqttlb::ws::Request::Refuse(..) => return Ok(()),
                mqttlb::ws::Request::Incomplete => {
                    if s.read_buf(&mut buf).await? == 0 {
                        return Ok(());
                    }
                }
            }
        };
        let head = String::from_utf8_lossy(&buf[..upgrade.len]).into_owned();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_owned())
                })
                .unwrap_or_default()
        };
        seen.lock()
            .expect("lock")
            .push((header("x-forwarded-for"), header("x-real-ip")));
        s.write_all(&mqttlb::ws::switching_protocols(&upgrade))
            .await?;
        let mut frames = buf.split_off(upgrade.len);
        let b = TcpStream::connect(broker).await?;
        let (mut sr, mut sw) = s.into_split();
        let (mut br, mut bw) = b.into_split();
        let up = async move {
            let mut chunk = vec![0u8; 16384];
            loop {
                // Whole frames at the front of `frames` go to the broker unwrapped.
                while let Some(n) = whole_frames(&frames) {
                    if frames[0] & 0x0f == 0x8 {
                        return bw.shutdown().await;
                    }
                    let payload = mqttlb::ws::client_payload(&frames[..n], 1 << 24)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    bw.write_all(&payload).await?;
                    frames.drain(..n);
                }
                let k = sr.read(&mut chunk).await?;
                if k == 0 {
                    return bw.shutdown().await;
                }
                frames.extend_from_slice(&chunk[..k]);
            }
        };
        let down = async move {
            let mut chunk = vec![0u8; 16384];
            loop {
                let k = br.read(&mut chunk).await?;
                if k == 0 {
                    return sw.shutdown().await;
                }
                sw.write_all(&mqttlb::ws::binary_frame(&chunk[..k])).await?;
            }
        };
        let (a, b) = tokio::join!(up, down);
        a.and(b)
    }
}

/// Length of the first complete frame of `buf`, if there is one.
fn whole_frames(buf: &[u8]) -> Option<usize> {
    if buf.len() < 2 {
        return None;
    }
    let masked = if buf[1] & 0x80 != 0 { 4 } else { 0 };
    let (len, header) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n) as usize, 10)
        }
        126 | 127 => return None,
        n => (usize::from(n), 2),
    };
    let total = header + masked + len;
    (buf.len() >= total).then_some(total)
}

impl Drop for WsBridge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A raw WebSocket client: the upgrade request, masked client frames of any length,
/// server frames read back.
pub mod wsc {
    use std::{net::SocketAddr, time::Duration};

    use tokio::{
        io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
        net::TcpStream,
    };

    pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    /// An upgrade request for `path` (subprotocol `mqtt`).
    pub fn request(path: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        )
    }

    /// Sends `request` on `s`; returns the response head.
    pub async fn upgrade_on<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, request: &str) -> String {
        s.write_all(request.as_bytes()).await.expect("request");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
                .await
                .expect("response in time")
                .expect("read");
            if n == 0 {
                break;
            }
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    /// Connects and sends an upgrade request; returns the stream and the response head.
    pub async fn upgrade(addr: SocketAddr, request: &str) -> (TcpStream, String) {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let head = upgrade_on(&mut s, request).await;
        (s, head)
    }

    /// A masked client frame: first byte `opcode_fin`, any payload length.
    pub fn masked(opcode_fin: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = mqttlb::ws::masked_binary_frame(payload, [0x11, 0x22, 0x33, 0x44]);
        f[0] = opcode_fin;
        f
    }

    /// Reads one server frame: (first byte, payload).
    pub async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(u8, Vec<u8>)> {
        let b0 = s.read_u8().await?;
        let len = match s.read_u8().await? & 0x7f {
            126 => usize::from(s.read_u16().await?),
            127 => s.read_u64().await? as usize,
            n => usize::from(n),
        };
        let mut p = vec![0u8; len];
        s.read_exact(&mut p).await?;
        Ok((b0, p))
    }
}
