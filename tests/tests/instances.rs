//! Several mqttlb instances with no shared state send each client id to the same
//! server: the Maglev table depends only on the servers' names and weights. Two
//! daemons, each in a network namespace of its own (two hosts on a bridge) with the
//! same config, in front of three in-test servers on a third host that note which
//! client id reached them: 100,000 ids through either land on the same server, all of
//! them; with one server removed by a reload of both, the ids that move are those of
//! the removed server plus at most 1%, identically through both.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use mqttlb::mqtt::{Decode, decode_connect};
use tests::{netns::Lan, *};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

const IDS: usize = 100_000;

/// Client id -> index of the server it reached (the last time).
type Seen = Arc<Mutex<HashMap<String, usize>>>;

/// A server on `addr` that reads the CONNECT, notes its client id, answers CONNACK
/// and waits for the client to close.
async fn server(addr: SocketAddr, index: usize, seen: Seen) {
    let l = TcpListener::bind(addr).await.expect("bind");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    match decode_connect(&buf, 1 << 16) {
                        Decode::Connect(c) => {
                            let id = c.client_id.to_string();
                            seen.lock().expect("seen").insert(id, index);
                            break;
                        }
                        Decode::Invalid(_) => return,
                        Decode::Incomplete => {}
                    }
                    if matches!(s.read_buf(&mut buf).await, Ok(0) | Err(_)) {
                        return;
                    }
                }
                let _ = s.write_all(&[0x20, 2, 0, 0]).await;
                let mut sink = [0u8; 64];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
}

/// Every id through `lb`, 256 at a time; returns where each landed.
async fn place(lb: SocketAddr, seen: &Seen) -> HashMap<String, usize> {
    seen.lock().expect("seen").clear();
    let gate = Arc::new(Semaphore::new(256));
    let mut tasks = Vec::new();
    for i in 0..IDS {
        let permit = gate.clone().acquire_owned().await.expect("permit");
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(lb).await.expect("connect");
            s.write_all(&connect_packet(&format!("device-{i:06}")))
                .await
                .expect("CONNECT");
            let mut connack = [0u8; 4];
            s.read_exact(&mut connack).await.expect("CONNACK");
            assert_eq!(connack, [0x20, 2, 0, 0]);
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), IDS, "every id reached a server");
    seen
}

fn config(servers: &[SocketAddr]) -> impl Fn(String) -> String + '_ {
    move |t: String| {
        // Client-id Maglev, no sticky table (the table would be per instance state).
        // 5 s to connect: a SYN the in-test server's backlog dropped under the burst
        // is sent again after 1 s, and a 1 s timeout then failed the server for every
        // id (CONNACK 3, seen once in CI).
        let t = t.replace(
            "connect_timeout = \"1s\"\n",
            "connect_timeout = \"5s\"\nbalance = \"client-id\"\nsticky = \"none\"\n",
        );
        let mut t = t;
        for (i, s) in servers.iter().enumerate() {
            t = t.replace(
                &format!("name = \"s{i}\"\naddress = \"{s}\"\n"),
                &format!(
                    "name = \"node{}\"\naddress = \"{s}\"\nweight = {}\n",
                    i + 1,
                    i % 2 + 1
                ),
            );
        }
        t
    }
}

#[test]
fn two_instances_in_their_own_namespaces_send_every_client_id_to_the_same_server() {
    if !privileged("two instances (network namespaces)") {
        return;
    }
    let tag = format!("in{}", std::process::id() % 10_000);
    let lan = Lan::new(&tag);
    let hosts = [
        lan.host("a", "10.89.0.11/24"),
        lan.host("b", "10.89.0.12/24"),
    ];
    let client = lan.host("cl", "10.89.0.99/24");
    for ns in hosts.iter().chain([&client]) {
        // 200,000 connections each way within minutes: ports in TIME_WAIT reused.
        ns.sysctl("net.ipv4.tcp_tw_reuse=1");
        ns.sysctl("net.ipv4.ip_local_port_range=1024 65535");
    }
    let servers: Vec<SocketAddr> = (0..3)
        .map(|i| SocketAddr::from(([10, 89, 0, 99], 1883 + i)))
        .collect();
    // The same file on both hosts but for the listener's address and the name.
    let lbs: Vec<Daemon> = hosts
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let instance = format!("{tag}x{i}");
            let addr = SocketAddr::from(([10, 89, 0, 11 + i as u8], 1883));
            let text = config(&servers)(config_text(&instance, "copy", 1883, &servers))
                .replace("127.0.0.1:1883", &addr.to_string());
            Daemon::start_in(ns, addr, &instance, &text)
        })
        .collect();
    let lbs = client.within(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            agree_and_move_alike(&lbs, &servers).await;
            lbs
        })
    });
    drop(lbs);
}

/// Places every id through both instances, removes a server from both, places them
/// again.
async fn agree_and_move_alike(lbs: &[Daemon], servers: &[SocketAddr]) {
    let seen: Seen = Arc::default();
    for (i, s) in servers.iter().enumerate() {
        server(*s, i, seen.clone()).await;
    }
    let [a, b] = lbs else { panic!("two instances") };
    let started = std::time::Instant::now();
    let through_a = place(a.addr, &seen).await;
    let through_b = place(b.addr, &seen).await;
    eprintln!(
        "{} connections through the two instances in {:.1} s",
        2 * IDS,
        started.elapsed().as_secs_f64()
    );
    let agree = through_a
        .iter()
        .filter(|(id, s)| through_b.get(*id) == Some(s))
        .count();
    assert_eq!(agree, IDS, "ids placed alike by both instances");
    let mut shares = [0usize; 3];
    for s in through_a.values() {
        shares[*s] += 1;
    }
    eprintln!("shares by weight 1, 2, 1: {shares:?}");
    // Weights 1, 2, 1: a quarter, a half, a quarter, within 2 points.
    for (share, want) in shares.iter().zip([0.25, 0.5, 0.25]) {
        let got = *share as f64 / IDS as f64;
        assert!((got - want).abs() < 0.02, "{shares:?}");
    }

    // node2 (index 1) goes from both files.
    for lb in [a, b] {
        let text = lb.config_text();
        let start = text
            .find("[[clusters.servers]]\nname = \"node2\"")
            .expect("node2");
        let end = start
            + text[start + 1..]
                .find("[[clusters.servers]]")
                .expect("next")
            + 1;
        lb.reload(&[&text[..start], &text[end..]].concat());
    }
    let after_a = place(a.addr, &seen).await;
    let after_b = place(b.addr, &seen).await;
    assert_eq!(after_a, after_b, "both instances moved the same ids");
    let moved = through_a
        .iter()
        .filter(|(id, s)| after_a[*id] != **s)
        .count();
    let on_removed = through_a.values().filter(|s| **s == 1).count();
    eprintln!("{moved} of {IDS} ids moved; {on_removed} were on the removed server");
    assert!(after_a.values().all(|s| *s != 1));
    assert!(moved >= on_removed);
    assert!(
        moved - on_removed <= IDS / 100,
        "{} ids moved that did not have to",
        moved - on_removed
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
}
