//! A real Debian mosquitto broker, started by the test.

use std::{
    io::Write,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{TempDir, free_port};

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

/// `mosquitto_pub -l` of `lines` (QoS 1) to `topic` on 127.0.0.1:`port`, as client
/// `client_id` when given; panics unless it exits 0.
pub fn publish_lines(port: u16, topic: &str, lines: &[String], client_id: Option<&str>) {
    use std::io::Write;
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        topic,
        "-q",
        "1",
        "-l",
    ]);
    if let Some(id) = client_id {
        cmd.args(["-i", id]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (Debian package mosquitto-clients)");
    let mut stdin = child.stdin.take().expect("stdin");
    for line in lines {
        writeln!(stdin, "{line}").expect("line");
    }
    drop(stdin);
    assert!(child.wait().expect("mosquitto_pub").success());
}
