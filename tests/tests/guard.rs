//! The XDP front guard, between network namespaces: an attacker, a good client and the
//! balancer (with its broker), joined by veth pairs, the guard attached to the
//! balancer's two veth ends.
//!
//! - A SYN flood from the attacker above `syn_rate`: the good client's 200 MQTT
//!   sessions all connect and exchange messages during it, the listen queue never
//!   overflows, the guard's counters account for the dropped SYNs and name the source.
//! - `ctl guard deny` of the attacker's network: its connections get no SYN-ACK (the
//!   counter moves, the daemon accepts nothing); `ctl guard remove` lets it in within
//!   a second.
//! - A hot upgrade: the new process's program takes the links over with the lists
//!   (runtime changes too), the sources and the counters, and the guard stays on after
//!   the old process exits; a new process that fails after it took them gives them
//!   back.

use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use tests::{
    netns::{Netns, ip},
    *,
};
use tokio::{io::AsyncWriteExt, net::TcpStream};

/// Three namespaces: `<tag>-lb` with 10.77.1.1 (towards the attacker, 10.77.1.2 in
/// `<tag>-bad`) and 10.77.2.1 (towards the good client, 10.77.2.2 in `<tag>-good`).
struct Hosts {
    lb: Netns,
    bad: Netns,
    good: Netns,
    /// The balancer's veth ends.
    lb_ends: [String; 2],
}

impl Hosts {
    fn new(tag: &str) -> Self {
        let lb = Netns::new(&format!("{tag}-lb"));
        let bad = Netns::new(&format!("{tag}-bad"));
        let good = Netns::new(&format!("{tag}-good"));
        let lb_ends = [format!("{tag}a0"), format!("{tag}g0")];
        lb.veth(&lb_ends[0], Some("10.77.1.1/24"), &bad, &format!("{tag}a1"));
        ip(&[
            "-n",
            &bad.0,
            "addr",
            "add",
            "10.77.1.2/24",
            "dev",
            &format!("{tag}a1"),
        ]);
        lb.veth(
            &lb_ends[1],
            Some("10.77.2.1/24"),
            &good,
            &format!("{tag}g1"),
        );
        ip(&[
            "-n",
            &good.0,
            "addr",
            "add",
            "10.77.2.2/24",
            "dev",
            &format!("{tag}g1"),
        ]);
        Self {
            lb,
            bad,
            good,
            lb_ends,
        }
    }

    /// `TcpExtListenOverflows` of the balancer's namespace.
    fn listen_overflows(&self) -> u64 {
        let out = self
            .lb
            .exec("nstat")
            .args(["-az", "TcpExtListenOverflows"])
            .output()
            .expect("nstat (iproute2)");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("TcpExtListenOverflows"))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .expect("TcpExtListenOverflows in nstat's output")
    }
}

/// The balancer: mosquitto and mqttlb in its namespace; both killed when dropped.
struct Balancer {
    children: Vec<Child>,
    dir: TempDir,
    instance: String,
    /// The daemon's pid after a hot upgrade.
    successor: Option<i32>,
}

impl Balancer {
    /// `global`: lines for `[global]` besides its name.
    fn start(hosts: &Hosts, port: u16, global: &str, guard: &str) -> Self {
        let dir = TempDir::new("guard");
        let broker = dir.0.join("mosquitto.conf");
        std::fs::write(
            &broker,
            "listener 1883 127.0.0.1\nallow_anonymous true\nuser root\n",
        )
        .expect("conf");
        let mosquitto = hosts
            .lb
            .exec("mosquitto")
            .arg("-c")
            .arg(&broker)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto");
        let instance = format!("g{}", std::process::id());
        let interfaces = format!("[\"{}\", \"{}\"]", hosts.lb_ends[0], hosts.lb_ends[1]);
        let config = dir.0.join("mqttlb.toml");
        std::fs::write(
            &config,
            format!(
                "[global]\nname = \"{instance}\"\n{global}\n[[listeners]]\nname = \"mqtt\"\nbind = \"0.0.0.0:{port}\"\ncluster = \"c\"\n\n[[clusters]]\nname = \"c\"\n\n[clusters.health]\nkind = \"none\"\n\n[[clusters.servers]]\nname = \"broker\"\naddress = \"127.0.0.1:1883\"\n\n[guard]\ninterfaces = {interfaces}\n{guard}\n"
            ),
        )
        .expect("config");
        let log = std::fs::File::create(dir.0.join("mqttlb.log")).expect("log");
        let daemon = hosts
            .lb
            .exec(bin())
            .args(["run", "-c"])
            .arg(&config)
            .env("RUST_LOG", "mqttlb=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mqttlb");
        let b = Self {
            children: vec![mosquitto, daemon],
            dir,
            instance,
            successor: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !b.log().contains("listening listener=mqtt") || workers_pending(&b.log()) {
            assert!(
                Instant::now() < deadline,
                "mqttlb did not start: {}",
                b.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        b
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("mqttlb.log")).unwrap_or_default()
    }

    fn ctl(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.push("--json");
        let out = ctl_output(&self.instance, &args);
        assert!(
            out.status.success(),
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("ctl json")
    }

    fn guard_counter(&self, name: &str) -> u64 {
        self.ctl(&["guard"])["guard"]["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no guard counter {name}"))
    }

    fn accepted(&self) -> u64 {
        self.ctl(&["stats"])["stats"]["accepted"]
            .as_u64()
            .expect("accepted")
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Some(pid) = self.successor {
            // SAFETY: signals to the daemon this test started (through an upgrade);
            // signal 0 only asks whether it is still there.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for c in &mut self.children {
            // SAFETY: signals to our own children.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

impl Balancer {
    fn config_path(&self) -> std::path::PathBuf {
        self.dir.0.join("mqttlb.toml")
    }

    /// `mqttlb upgrade`: the new process's pid, or what it said when it failed.
    fn upgrade(&mut self) -> Result<i32, String> {
        let (_, pid) = upgrade_instance(&self.instance, None)?;
        let pid = pid as i32;
        self.successor = Some(pid);
        Ok(pid)
    }
}

/// The id of the XDP program each of the balancer's guarded interfaces runs.
fn xdp_programs(hosts: &Hosts) -> Vec<u64> {
    hosts
        .lb_ends
        .iter()
        .map(|end| {
            let out = hosts
                .lb
                .exec("ip")
                .args(["-j", "link", "show", "dev", end])
                .output()
                .expect("ip (iproute2)");
            let links: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("ip -j output");
            links[0]["xdp"]["prog"]["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("no XDP program on {end}: {links}"))
        })
        .collect()
}

/// `n` MQTT sessions from the good host to `addr` (one every 10 ms), each subscribing to its own topic
/// and publishing one message to it, which must come back; returns how many did.
async fn sessions(addr: std::net::SocketAddr, n: usize) -> usize {
    let mut tasks = Vec::new();
    for i in 0..n {
        tasks.push(tokio::spawn(async move {
            // Spread over two seconds: 200 at once would overflow the accept queue
            // of the broker behind (mosquitto's backlog is 100), which shares the
            // namespace whose ListenOverflows the flood test reads.
            tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
            let id = format!("good-{i}");
            let mut s = mqttc::session(addr, &id, true).await.ok()?;
            let topic = format!("good/{i}");
            s.write_all(&mqttc::subscribe(1, &topic, 0)).await.ok()?;
            mqttc::read_packet(&mut s).await.ok()?;
            let publish =
                packets::publish(mqttlb::mqtt::Version::V311, &topic, id.as_bytes(), 0, 0);
            s.write_all(&publish).await.ok()?;
            let got = mqttc::collect(&mut s, Duration::from_millis(1500))
                .await
                .ok()?;
            (got == vec![id.into_bytes()]).then_some(())
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if matches!(t.await, Ok(Some(()))) {
            ok += 1;
        }
    }
    ok
}

/// Can the attacker open a TCP connection to `port` within `limit`?
fn attacker_connects(hosts: &Hosts, port: u16, limit: Duration) -> bool {
    let addr: std::net::SocketAddr = ([10, 77, 1, 1], port).into();
    hosts.bad.run(move || {
        Box::pin(async move {
            matches!(
                tokio::time::timeout(limit, TcpStream::connect(addr)).await,
                Ok(Ok(_))
            )
        })
    })
}

#[test]
fn a_syn_flood_is_dropped_per_source_while_good_clients_connect() {
    if !privileged("XDP guard (network namespaces, BPF)") {
        return;
    }
    let hosts = Hosts::new(&format!("xg{}", std::process::id() % 10_000));
    let port = 18830;
    // A burst the good client's 200 simultaneous sessions fit in (one address
    // opening them all at once); the attacker gets the same and then 50 a second.
    let lb = Balancer::start(&hosts, port, "", "syn_rate = 50\nsyn_burst = 250");
    let guard = lb.ctl(&["guard"]);
    assert_eq!(
        guard["guard"]["interfaces"].as_array().map(Vec::len),
        Some(2),
        "{guard}"
    );
    let overflows = hosts.listen_overflows();

    // The flood: 4 s of SYNs at about 20,000 a second from one source.
    let flood = hosts
        .bad
        .exec("timeout")
        .args([
            "4",
            "hping3",
            "-q",
            "-S",
            "-p",
            &port.to_string(),
            "-i",
            "u50",
            "10.77.1.1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("hping3 (Debian package hping3)");
    std::thread::sleep(Duration::from_millis(500));
    let good: std::net::SocketAddr = ([10, 77, 2, 1], port).into();
    let connected = hosts.good.run(move || Box::pin(sessions(good, 200)));
    let mut flood = flood;
    let _ = flood.wait();
    assert_eq!(
        connected, 200,
        "good sessions that connected and exchanged a message"
    );
    assert_eq!(
        hosts.listen_overflows(),
        overflows,
        "the listen queue overflowed"
    );

    let g = lb.ctl(&["guard"])["guard"].clone();
    let limited = g["counters"]["syn_limited"].as_u64().expect("syn_limited");
    let passed = g["counters"]["syn_passed"].as_u64().expect("syn_passed");
    assert!(limited > 20_000, "SYNs dropped: {g}");
    // The good client's 200 SYNs, the attacker's burst and 50 a second for 4 s.
    assert!(passed <= 200 + 250 + 4 * 50 + 50, "SYNs passed: {g}");
    let top = &g["top"][0];
    assert_eq!(top["source"], "10.77.1.2", "{g}");
    assert_eq!(top["dropped"].as_u64(), Some(limited), "{g}");
    let good = g["top"]
        .as_array()
        .and_then(|t| t.iter().find(|s| s["source"] == "10.77.2.2"))
        .unwrap_or_else(|| panic!("the good client is not listed: {g}"));
    assert_eq!(good["dropped"], 0, "{g}");
}

#[test]
fn a_denied_network_gets_no_syn_ack_until_removed() {
    if !privileged("XDP guard (network namespaces, BPF)") {
        return;
    }
    let hosts = Hosts::new(&format!("xd{}", std::process::id() % 10_000));
    let port = 18831;
    let lb = Balancer::start(&hosts, port, "", "deny = [\"192.0.2.0/24\"]");
    assert!(
        attacker_connects(&hosts, port, Duration::from_secs(2)),
        "{}",
        lb.log()
    );

    lb.ctl(&["guard", "deny", "10.77.1.0/24"]);
    let (denied, accepted) = (lb.guard_counter("denied"), lb.accepted());
    assert!(!attacker_connects(&hosts, port, Duration::from_secs(2)));
    assert!(
        lb.guard_counter("denied") > denied,
        "the denied counter did not move"
    );
    assert_eq!(
        lb.accepted(),
        accepted,
        "the daemon accepted a denied connection"
    );
    // The good side is not affected.
    let good: std::net::SocketAddr = ([10, 77, 2, 1], port).into();
    let ok = hosts.good.run(move || Box::pin(sessions(good, 5)));
    assert_eq!(ok, 5);

    // A reload keeps the runtime change over the file's list.
    let reloads = lb.ctl(&["stats"])["stats"]["reloads"].as_u64();
    // SAFETY: a signal to our own child (`ip netns exec` became mqttlb).
    unsafe { libc::kill(lb.children[1].id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while lb.ctl(&["stats"])["stats"]["reloads"].as_u64() == reloads {
        assert!(Instant::now() < deadline, "no reload: {}", lb.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let lists = lb.ctl(&["guard"]);
    assert_eq!(
        lists["guard"]["deny"],
        serde_json::json!(["10.77.1.0/24", "192.0.2.0/24"]),
        "{lists}"
    );
    assert!(!attacker_connects(&hosts, port, Duration::from_secs(1)));

    lb.ctl(&["guard", "remove", "10.77.1.0/24"]);
    let removed = Instant::now();
    assert!(attacker_connects(&hosts, port, Duration::from_secs(1)));
    assert!(removed.elapsed() < Duration::from_secs(1));
    let lists = lb.ctl(&["guard"]);
    assert_eq!(
        lists["guard"]["deny"],
        serde_json::json!(["192.0.2.0/24"]),
        "{lists}"
    );
    assert!(lb.log().contains("XDP guard attached"), "{}", lb.log());
}

/// A guard that cannot attach stops the start, naming the interface: an operator who
/// configured one relies on it.
#[test]
fn a_guard_that_cannot_attach_stops_the_start() {
    if !privileged("XDP guard") {
        return;
    }
    let dir = TempDir::new("guard-bad");
    let config = dir.0.join("mqttlb.toml");
    let port = free_port();
    std::fs::write(
        &config,
        format!(
            "[global]\nname = \"gb{}\"\n\n[[listeners]]\nname = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\ncluster = \"c\"\n\n[[clusters]]\nname = \"c\"\n\n[[clusters.servers]]\nname = \"s\"\naddress = \"127.0.0.1:1\"\n\n[guard]\ninterfaces = [\"nosuchif0\"]\n",
            std::process::id()
        ),
    )
    .expect("config");
    let out = std::process::Command::new(bin())
        .args(["run", "-c"])
        .arg(&config)
        .output()
        .expect("mqttlb");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("[guard]: cannot attach the XDP guard to \"nosuchif0\""),
        "{said}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the listener stayed open"
    );
}

#[test]
fn the_guard_moves_with_an_upgrade_and_comes_back_when_it_fails() {
    if !privileged("XDP guard and hot upgrade (network namespaces, BPF)") {
        return;
    }
    let hosts = Hosts::new(&format!("xu{}", std::process::id() % 10_000));
    let port = 18832;
    // Worker 0 holds the guard and hands it to its successor. (Without bpffs,
    // which `ip netns exec` does not mount, the default would be one process.) It
    // runs as `nobody` with no capability left, and still takes the links back.
    let mut lb = Balancer::start(
        &hosts,
        port,
        "workers = 2\nuser = \"nobody\"\n",
        "deny = [\"192.0.2.0/24\"]\nsyn_rate = 1000",
    );
    assert!(
        lb.log().contains("switched to [global] user"),
        "{}",
        lb.log()
    );
    lb.ctl(&["guard", "deny", "10.77.1.0/24"]);
    assert!(!attacker_connects(&hosts, port, Duration::from_secs(1)));
    let denied = lb.guard_counter("denied");
    assert!(denied > 0, "the denied counter did not move");
    let first = xdp_programs(&hosts);

    // A new worker 0 that fails after it put its program on the links (its admin
    // listener cannot bind: mosquitto holds the port): the old one takes them back.
    let config = std::fs::read_to_string(lb.config_path()).expect("config");
    std::fs::write(
        lb.config_path(),
        format!("{config}\n[admin]\nbind = \"127.0.0.1:1883\"\n"),
    )
    .expect("config");
    let failed = lb
        .upgrade()
        .expect_err("an upgrade whose admin listener cannot bind");
    assert!(failed.contains("did not take over"), "{failed}");
    assert!(
        lb.log()
            .contains("XDP guard taken over from the old process"),
        "the failing process did not reach the guard: {}",
        lb.log()
    );
    assert_eq!(xdp_programs(&hosts), first, "{}", lb.log());
    // The old process's lists are the ones in force.
    lb.ctl(&["guard", "remove", "10.77.1.0/24"]);
    assert!(attacker_connects(&hosts, port, Duration::from_secs(2)));
    lb.ctl(&["guard", "deny", "10.77.1.0/24"]);
    assert!(!attacker_connects(&hosts, port, Duration::from_secs(1)));
    let denied = lb.guard_counter("denied");

    std::fs::write(lb.config_path(), &config).expect("config");
    let pid = lb.upgrade().expect("upgrade");
    assert_ne!(pid, lb.children[1].id() as i32);
    let deadline = Instant::now() + Duration::from_secs(5);
    while lb.children[1].try_wait().expect("wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "the old process still runs: {}",
            lb.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = xdp_programs(&hosts);
    for (a, b) in first.iter().zip(&second) {
        assert_ne!(a, b, "the interfaces still run the old program");
    }
    let g = lb.ctl(&["guard"])["guard"].clone();
    assert_eq!(
        g["deny"],
        serde_json::json!(["10.77.1.0/24", "192.0.2.0/24"]),
        "the runtime change did not move: {g}"
    );
    assert!(
        g["counters"]["denied"].as_u64() >= Some(denied),
        "the counters started afresh: {g}"
    );
    assert!(
        g["top"]
            .as_array()
            .is_some_and(|t| t.iter().any(|s| s["source"] == "10.77.1.2")),
        "the sources started afresh: {g}"
    );
    assert_eq!(g["interfaces"].as_array().map(Vec::len), Some(2), "{g}");
    // Still guarded with the old process gone, by the new process's lists.
    assert!(!attacker_connects(&hosts, port, Duration::from_secs(1)));
    assert!(lb.guard_counter("denied") > denied);
    let good: std::net::SocketAddr = ([10, 77, 2, 1], port).into();
    assert_eq!(hosts.good.run(move || Box::pin(sessions(good, 5))), 5);
    lb.ctl(&["guard", "remove", "10.77.1.0/24"]);
    assert!(attacker_connects(&hosts, port, Duration::from_secs(2)));
}
