//! An HA pair with keepalived, as `deploy/keepalived/keepalived.conf` sets it up: two
//! balancer namespaces and a broker and a client namespace on one bridge; the
//! floating address follows `/readyz`. Stopping the master's mqttlb moves the address
//! to the backup (the time is measured and must be within 3 s), and clients
//! reconnecting through it land on the same brokers (the same Maglev table, no shared
//! state).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::Child,
    time::{Duration, Instant},
};

use tests::{
    netns::{Lan, Netns},
    *,
};

const VIP: &str = "10.88.0.100";

/// A child killed (SIGTERM, then waited for) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn spawn(ns: &Netns, program: &str, args: &[&str], log: &std::path::Path) -> Proc {
    let log = std::fs::File::create(log).expect("log");
    Proc(
        ns.exec(program)
            .args(args)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e}")),
    )
}

/// The node each client id reaches through the floating address, from the client's
/// namespace.
fn placements(client: &Netns, ids: &[String]) -> BTreeMap<String, String> {
    let ids = ids.to_vec();
    client.run(move || {
        Box::pin(async move {
            let vip: SocketAddr = format!("{VIP}:1883").parse().expect("vip");
            let mut out = BTreeMap::new();
            for id in ids {
                let node = mqttc::which_node(vip, &id).await.expect("through the VIP");
                out.insert(id, node);
            }
            out
        })
    })
}

#[test]
fn the_floating_address_moves_to_the_backup_within_3s_and_clients_keep_their_brokers() {
    if !privileged("keepalived HA pair (network namespaces)") {
        return;
    }
    let tag = format!("ha{}", std::process::id() % 10_000);
    let lan = Lan::new(&tag);
    let lbs = [
        lan.host("l1", "10.88.0.11/24"),
        lan.host("l2", "10.88.0.12/24"),
    ];
    let brokers = lan.host("bk", "10.88.0.50/24");
    let client = lan.host("cl", "10.88.0.99/24");
    let dir = TempDir::new("ha");

    // Two brokers, each answering which it is (a retained message).
    let mut procs = Vec::new();
    for (i, port) in [1883, 1884].into_iter().enumerate() {
        let conf = dir.0.join(format!("node{}.conf", i + 1));
        std::fs::write(
            &conf,
            format!("listener {port} 0.0.0.0\nallow_anonymous true\nuser root\n"),
        )
        .expect("conf");
        let log = dir.0.join(format!("node{}.log", i + 1));
        procs.push(spawn(
            &brokers,
            "mosquitto",
            &["-c", &conf.display().to_string()],
            &log,
        ));
    }
    std::thread::sleep(Duration::from_millis(300));
    for (i, port) in [1883, 1884].into_iter().enumerate() {
        let ok = brokers
            .exec("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-r",
                "-t",
                "mqttlb/whoami",
            ])
            .args(["-m", &format!("node{}", i + 1)])
            .status()
            .expect("mosquitto_pub");
        assert!(ok.success());
    }

    // mqttlb and keepalived on both balancers; keepalived from the documented file,
    // only the address, the interface's name and the backup's priority changed.
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/keepalived/keepalived.conf"
    ))
    .expect("deploy/keepalived/keepalived.conf");
    let mut daemons = Vec::new();
    for (i, ns) in lbs.iter().enumerate() {
        let config = dir.0.join(format!("lb{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "[global]\nname = \"{tag}{i}\"\nshutdown_delay = \"5s\"\nshutdown_grace = \"1s\"\n\n[admin]\nbind = \"127.0.0.1:8888\"\n\n[[listeners]]\nname = \"mqtt\"\nbind = \"0.0.0.0:1883\"\ncluster = \"c\"\n\n[[clusters]]\nname = \"c\"\nbalance = \"client-id\"\nhealth = {{ kind = \"none\" }}\n\n[[clusters.servers]]\nname = \"node1\"\naddress = \"10.88.0.50:1883\"\n\n[[clusters.servers]]\nname = \"node2\"\naddress = \"10.88.0.50:1884\"\n"
            ),
        )
        .expect("config");
        let log = dir.0.join(format!("mqttlb{i}.log"));
        daemons.push(Some(spawn(
            ns,
            &bin().display().to_string(),
            &["run", "-c", &config.display().to_string()],
            &log,
        )));
        let conf = dir.0.join(format!("keepalived{i}.conf"));
        let mut text = doc.replace("192.0.2.100/24", &format!("{VIP}/24"));
        if i == 1 {
            text = text.replace("priority 150", "priority 100");
        }
        std::fs::write(&conf, text).expect("keepalived conf");
        let pid = |what: &str| dir.0.join(format!("{what}{i}.pid")).display().to_string();
        let log = dir.0.join(format!("keepalived{i}.log"));
        procs.push(spawn(
            ns,
            "keepalived",
            &[
                "-n",
                "-l",
                "-P",
                "-f",
                &conf.display().to_string(),
                "-p",
                &pid("k"),
                "-r",
                &pid("v"),
                "-c",
                &pid("c"),
            ],
            &log,
        ));
    }
    let logs = || {
        [
            "mqttlb0.log",
            "mqttlb1.log",
            "keepalived0.log",
            "keepalived1.log",
        ]
        .iter()
        .map(|f| {
            format!(
                "== {f}\n{}",
                std::fs::read_to_string(dir.0.join(f)).unwrap_or_default()
            )
        })
        .collect::<String>()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lbs[0].has_addr(VIP) {
        assert!(
            Instant::now() < deadline,
            "the master never took {VIP}: {}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!lbs[1].has_addr(VIP));

    let ids: Vec<String> = (0..20).map(|i| format!("ha-device-{i}")).collect();
    let before = placements(&client, &ids);
    assert!(
        before.values().any(|n| n == "node1") && before.values().any(|n| n == "node2"),
        "{before:?}"
    );

    // The master's mqttlb stops: /readyz fails at once, keepalived moves the address.
    let stopped = Instant::now();
    // SAFETY: a signal to our own child.
    unsafe {
        libc::kill(
            daemons[0].as_ref().expect("lb0").0.id() as i32,
            libc::SIGTERM,
        )
    };
    while !lbs[1].has_addr(VIP) {
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "no failover: {}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let moved = stopped.elapsed();
    eprintln!(
        "floating address on the backup {} ms after SIGTERM",
        moved.as_millis()
    );
    assert!(
        moved <= Duration::from_secs(3),
        "failover took {moved:?}: {}",
        logs()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while lbs[0].has_addr(VIP) {
        assert!(Instant::now() < deadline, "both hold the address");
        std::thread::sleep(Duration::from_millis(20));
    }
    daemons[0] = None;

    // The same ids through the address, now the backup: the same brokers.
    let after = placements(&client, &ids);
    assert_eq!(after, before);
    drop(procs);
}
