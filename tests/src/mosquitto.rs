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
