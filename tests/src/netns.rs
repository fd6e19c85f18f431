//! Network namespaces for tests that need several "hosts": made with `ip netns`,
//! removed when dropped; commands and async code run inside them.

use std::{os::fd::AsRawFd, path::PathBuf, process::Command};

/// `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) {
    let mut c = Command::new("ip");
    c.args(args);
    succeed(&mut c, "Debian package iproute2");
}

/// Runs `cmd`, which must succeed (`package`: where its program comes from).
fn succeed(cmd: &mut Command, package: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} ({package})"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with its loopback up, deleted when dropped.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        Self(name.to_owned())
    }

    /// `ip netns exec NAME PROGRAM`.
    pub fn exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }

    /// A veth pair: `name` here with `addr` (CIDR), `peer` in `other`; both up.
    pub fn veth(&self, name: &str, addr: Option<&str>, other: &Netns, peer: &str) {
        ip(&[
            "link", "add", name, "netns", &self.0, "type", "veth", "peer", "name", peer, "netns",
            &other.0,
        ]);
        if let Some(a) = addr {
            ip(&["-n", &self.0, "addr", "add", a, "dev", name]);
        }
        ip(&["-n", &self.0, "link", "set", name, "up"]);
        ip(&["-n", &other.0, "link", "set", peer, "up"]);
    }

    /// Whether `addr` is configured on an interface here.
    pub fn has_addr(&self, addr: &str) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.0, "-o", "addr", "show"])
            .output()
            .expect("ip addr");
        String::from_utf8_lossy(&out.stdout).contains(&format!(" {addr}/"))
    }

    /// A namespace holding a bridge `br0`, the switch the hosts of [`Netns::host`]
    /// plug into.
    pub fn switch(name: &str) -> Self {
        let sw = Self::new(name);
        ip(&["-n", &sw.0, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw.0, "link", "set", "br0", "up"]);
        sw
    }

    /// A namespace `name` with `eth0` at `addr` (CIDR), plugged into `switch`'s bridge
    /// through port `port`.
    pub fn host(name: &str, addr: &str, switch: &Netns, port: &str) -> Self {
        let ns = Self::new(name);
        ns.veth("eth0", Some(addr), switch, port);
        ip(&["-n", &switch.0, "link", "set", port, "master", "br0"]);
        ns
    }

    /// `sysctl -w SETTING` inside this namespace (the `net.` settings are per
    /// namespace), which must succeed.
    pub fn sysctl(&self, setting: &str) {
        let mut c = self.exec("sysctl");
        c.args(["-q", "-w", setting]);
        succeed(&mut c, "Debian package procps");
    }

    /// Runs `f` on a thread of its own inside this namespace, with a runtime of its
    /// own (a socket belongs to the namespace of the thread that made it).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
    ) -> T {
        self.within(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(f())
        })
    }

    /// Runs `f` on a thread of its own inside this namespace; threads it starts (a
    /// runtime's workers) are in the namespace too.
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        within(&self.0, f)
    }
}

/// [`Netns::within`] by namespace name.
pub fn within<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = PathBuf::from("/var/run/netns").join(name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns file");
        // SAFETY: setns on a descriptor we hold; affects this thread only.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in the namespace")
}

/// A bridge and the hosts plugged into it, their namespaces named after `tag`.
pub struct Lan {
    tag: String,
    /// Holds the bridge.
    pub switch: Netns,
}

impl Lan {
    pub fn new(tag: &str) -> Self {
        Self {
            tag: tag.to_owned(),
            switch: Netns::switch(&format!("{tag}-sw")),
        }
    }

    /// A host `name` at `addr` (CIDR) on the bridge.
    pub fn host(&self, name: &str, addr: &str) -> Netns {
        let tag = &self.tag;
        Netns::host(
            &format!("{tag}-{name}"),
            addr,
            &self.switch,
            &format!("{tag}{name}"),
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}
