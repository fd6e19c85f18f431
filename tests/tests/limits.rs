//! Listener limits against a real mosquitto: a client id reconnecting in a tight loop
//! is refused with CONNACK 0x9F (MQTT 5, paho sees the reason code) or 3 (3.1.1)
//! while other ids connect; a source over `max_connections_per_source` gets 0x97; a
//! reconnect storm of 2,000 clients reaches the broker at `new_connection_rate`
//! (counted in the broker's own log, second by second), and without the limit the
//! test shows the peak. Refused clients never reach the broker.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use mqttlb::mqtt::Version;
use tests::*;
use tokio::{io::AsyncWriteExt, net::TcpStream};

/// The CONNACK the daemon or the broker answers to a CONNECT with `id`.
async fn connack(addr: SocketAddr, version: Version, id: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&packets::connect(version, id, 60, true))
        .await
        .expect("CONNECT");
    let (first, body) = tokio::time::timeout(Duration::from_secs(30), mqttc::read_packet(&mut s))
        .await
        .expect("a CONNACK within 30 s")
        .expect("CONNACK");
    [vec![first, body.len() as u8], body].concat()
}

/// An MQTT 5 CONNACK with reason 0 (the broker adds properties).
fn is_accepted(connack: &[u8]) -> bool {
    connack.len() >= 4 && connack[0] == 0x20 && connack[3] == 0
}

fn with_listener_keys(t: String, keys: &str) -> String {
    t.replace(
        "inspect_timeout = \"10s\"\n",
        &format!("inspect_timeout = \"10s\"\n{keys}\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_reconnecting_too_fast_is_refused_with_the_reason() {
    if !privileged("listener limits") {
        return;
    }
    let broker = Mosquitto::start();
    let lb = Daemon::start_edited("copy", &[broker.addr], |t| {
        with_listener_keys(
            t,
            "connect_rate_per_client_id = 0.1\nconnect_burst_per_client_id = 5",
        )
    });
    // 50 reconnects of one id as fast as they go: the burst passes, the rest refused.
    // One place comes back every 10 s, long after paho's three tries below (at one a
    // second a busy host gave paho's first try a new place).
    let mut answers = Vec::new();
    for _ in 0..50 {
        answers.push(connack(lb.addr, Version::V5, "looping-device").await);
    }
    let accepted = answers.iter().filter(|a| is_accepted(a)).count();
    let refused = answers
        .iter()
        .filter(|a| a.as_slice() == [0x20, 3, 0, 0x9F, 0])
        .count();
    assert!((5..=6).contains(&accepted), "{answers:?}");
    assert_eq!(accepted + refused, 50, "{answers:?}");
    // A 3.1.1 client with the same trouble: CONNACK 3 (Server unavailable).
    assert_eq!(
        connack(lb.addr, Version::V311, "looping-device").await,
        [0x20, 2, 0, 3]
    );
    // Other ids are not affected.
    for i in 0..10 {
        assert!(is_accepted(
            &connack(lb.addr, Version::V5, &format!("fine-{i}")).await
        ));
    }
    // paho-mqtt (MQTT 5) sees the reason code.
    let script = format!(
        r#"
import paho.mqtt.client as mqtt
codes = []
for i in range(3):
    c = mqtt.Client(client_id="looping-device", protocol=mqtt.MQTTv5)
    c.on_connect = lambda c, u, f, rc, p=None: codes.append(rc.value if hasattr(rc, "value") else rc)
    c.connect("127.0.0.1", {port})
    for _ in range(50):
        c.loop(0.05)
        if codes and len(codes) > i: break
    c.disconnect()
print(codes)
"#,
        port = lb.addr.port()
    );
    let out = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .output()
        .expect("python3 with paho-mqtt");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.trim() == "[159, 159, 159]",
        "paho's reason codes: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = refused as u64 + 1 + 3;
    wait_for("the refusals counted", Duration::from_secs(3), || {
        lb.stat("limit_client_id_rate") == want
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_over_its_connection_quota_gets_0x97() {
    if !privileged("listener limits") {
        return;
    }
    let broker = Mosquitto::start();
    let lb = Daemon::start_edited("copy", &[broker.addr], |t| {
        with_listener_keys(t, "max_connections_per_source = 3")
    });
    let mut held = Vec::new();
    for i in 0..3 {
        let s = mqttc::session(lb.addr, &format!("held-{i}"), true)
            .await
            .expect("within the quota");
        held.push(s);
    }
    assert_eq!(
        connack(lb.addr, Version::V5, "fourth").await,
        [0x20, 3, 0, 0x97, 0]
    );
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if is_accepted(&connack(lb.addr, Version::V5, "after-one-left").await) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed place was not given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for("the refusal counted", Duration::from_secs(3), || {
        lb.stat("limit_source_connections") >= 1
    })
    .await;
}

/// Connections the broker logged as new, by second (mosquitto's `log_timestamp`).
fn connected_per_second(log: &str) -> BTreeMap<u64, usize> {
    let mut by = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("New client connected")) {
        if let Some(t) = line.split(':').next().and_then(|t| t.parse().ok()) {
            *by.entry(t).or_insert(0) += 1;
        }
    }
    by
}

/// 2,000 clients connecting at once through `lb`: how long until all had their
/// CONNACK, and how many the broker took in each second.
async fn storm(lb: &Daemon, log: &std::path::Path) -> (Duration, BTreeMap<u64, usize>) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..2000 {
        let addr = lb.addr;
        tasks.push(tokio::spawn(async move {
            let s = mqttc::session(addr, &format!("storm-{i}"), true).await;
            s.map(|s| (s, Instant::now()))
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        held.push(t.await.expect("task").expect("every storm client connects"));
    }
    let took = started.elapsed();
    // Mosquitto writes its log as it goes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = std::fs::read_to_string(log).expect("broker log");
    drop(held);
    (took, connected_per_second(&text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_reaches_the_broker_at_new_connection_rate() {
    if !privileged("listener limits") {
        return;
    }
    let dir = TempDir::new("storm-broker");
    let log = dir.0.join("mosquitto.log");
    let extra = format!(
        "log_dest file {}\nlog_type notice\nlog_timestamp true\nmax_connections -1\n",
        log.display()
    );
    let broker = Mosquitto::start_with(free_port(), &extra);

    // Patient with the broker: without the limit its accept queue overflows and its
    // SYNs are retried (no passive failure marking, a connect timeout that waits).
    let patient = |t: String| {
        t.replace("connect_timeout = \"1s\"", "connect_timeout = \"30s\"")
            .replace(
                &format!("address = \"{}\"\n", broker.addr),
                &format!("address = \"{}\"\nmax_fails = 0\n", broker.addr),
            )
    };
    // Without a limit: the peak the broker takes.
    let open = Daemon::start_edited("copy", &[broker.addr], patient);
    let (_, free) = storm(&open, &log).await;
    let free_peak = free.values().max().copied().unwrap_or(0);
    drop(open);
    std::fs::write(&log, "").expect("clear the log");

    let limited = Daemon::start_edited("copy", &[broker.addr], |t| {
        with_listener_keys(patient(t), "new_connection_rate = 500")
    });
    let (took, by_second) = storm(&limited, &log).await;
    let counts: Vec<usize> = by_second.values().copied().collect();
    eprintln!("without the limit: peak {free_peak}/s {free:?}; with 500/s: {counts:?} in {took:?}");
    assert_eq!(counts.iter().sum::<usize>(), 2000, "{by_second:?}");
    // 500 a second plus the burst (50) where a second's edge cuts a burst.
    assert!(counts.iter().all(|&n| n <= 560), "{by_second:?}");
    assert!(
        free_peak > 560,
        "without the limit the broker took {free_peak} in its busiest second"
    );
    // 2,000 at 500/s: about four seconds, all connected.
    assert!(
        took >= Duration::from_millis(3500) && took < Duration::from_secs(15),
        "{took:?}"
    );
    assert_eq!(limited.stat("limit_new_connection_rate"), 0, "none refused");
    assert!(limited.stat("limit_delayed") > 1400);
}
