//! `ws` and `wss` listeners: paho-mqtt over WebSocket (MQTT 3.1.1 and 5, plain and
//! TLS) through mqttlb to a real mosquitto, client-id stickiness with a CONNECT split
//! across WebSocket frames, and bad input (not an upgrade, wrong path, unmasked frame,
//! a first frame that is not a CONNECT), each refused, counted, no server contacted.
//!
//! Debian's mosquitto is built without WebSocket support, so each broker gets a small
//! in-test WebSocket terminator in front of its TCP listener ([`WsBridge`]).

use std::{net::SocketAddr, process::Command, time::Duration};

use tests::{wsc::*, *};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A config with a `ws` listener and a `wss` listener in front of `servers` (TCP
/// address, WebSocket address: `None` makes mqttlb terminate the WebSocket).
fn ws_text(
    instance: &str,
    ports: (u16, u16),
    pki: &Pki,
    cluster_keys: &str,
    servers: &[(SocketAddr, Option<SocketAddr>)],
) -> String {
    let mut t = format!(
        "[global]\nname = \"{instance}\"\n\n[[listeners]]\nname = \"ws\"\nbind = \"127.0.0.1:{}\"\nkind = \"ws\"\ncluster = \"c\"\ninspect_timeout = \"3s\"\n\n[[listeners]]\nname = \"wss\"\nbind = \"127.0.0.1:{}\"\nkind = \"wss\"\ncluster = \"c\"\npath = \"/mqtt\"\n\n[listeners.tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[[clusters]]\nname = \"c\"\nconnect_timeout = \"1s\"\n{cluster_keys}\n[clusters.health]\nkind = \"none\"\n",
        ports.0,
        ports.1,
        pki.path("server.pem"),
        pki.path("server.key"),
    );
    for (i, (tcp, ws)) in servers.iter().enumerate() {
        t += &format!(
            "\n[[clusters.servers]]\nname = \"node{}\"\naddress = \"{tcp}\"\n",
            i + 1
        );
        if let Some(ws) = ws {
            t += &format!("ws_address = \"{ws}\"\n");
        }
    }
    t
}

/// Starts mqttlb; returns it and the wss address (its `addr` is the ws listener).
fn start(
    pki: &Pki,
    cluster_keys: &str,
    servers: &[(SocketAddr, Option<SocketAddr>)],
) -> (Daemon, SocketAddr) {
    let instance = format!("ws{}x{}", std::process::id(), free_port());
    let ports = (free_port(), free_port());
    let text = ws_text(&instance, ports, pki, cluster_keys, servers);
    let lb = Daemon::start_text("auto", ports.0, &instance, &text);
    (lb, SocketAddr::from(([127, 0, 0, 1], ports.1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_over_ws_and_wss_with_mqtt_311_and_5_to_a_websocket_server() {
    if !privileged("websocket") {
        return;
    }
    let pki = Pki::new();
    let broker = Mosquitto::start();
    let bridge = WsBridge::start(broker.addr).await;
    // Promoted to the splice at their first bytes after the CONNECT.
    let (lb, wss) = start(
        &pki,
        "promote_after_bytes = 1",
        &[(broker.addr, Some(bridge.addr))],
    );
    paho_both_ways(&pki, &lb, wss).await;
    let forwarded = bridge.forwarded.lock().expect("lock").clone();
    assert_eq!(forwarded.len(), 4);
    for (xff, real) in forwarded {
        assert_eq!((xff.as_str(), real.as_str()), ("127.0.0.1", "127.0.0.1"));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        lb.stat("spliced") >= 2,
        "ws connections spliced: {}",
        lb.ctl("stats")
    );
}

/// Servers without `ws_address`: mqttlb terminates the WebSocket and speaks plain
/// MQTT to mosquitto's TCP listener (no WebSocket terminator in between).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_over_ws_and_wss_with_mqtt_311_and_5_terminated_by_mqttlb() {
    if !privileged("websocket") {
        return;
    }
    let pki = Pki::new();
    let broker = Mosquitto::start();
    let (lb, wss) = start(&pki, "", &[(broker.addr, None)]);
    paho_both_ways(&pki, &lb, wss).await;
    // paho may reset its socket right after its DISCONNECT (unread bytes in its
    // queue): that is its business. The close handshake below must end cleanly.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let aborted = lb.stat("aborted");
    // WebSocket control frames are answered by mqttlb; MQTT goes through.
    let mut s = ws_session(lb.addr, "raw-terminated", true).await;
    s.write_all(&masked(0x89, b"are you there"))
        .await
        .expect("ping");
    let (b0, p) = read_frame(&mut s).await.expect("pong");
    assert_eq!((b0, p.as_slice()), (0x8a, &b"are you there"[..]));
    s.write_all(&masked(0x82, &[0xc0, 0]))
        .await
        .expect("PINGREQ");
    let (b0, p) = read_frame(&mut s).await.expect("PINGRESP");
    assert_eq!((b0, p.as_slice()), (0x82, &[0xd0, 0][..]));
    s.write_all(&masked(0x88, &[0x03, 0xe8]))
        .await
        .expect("close");
    let (b0, _) = read_frame(&mut s).await.expect("close reply");
    assert_eq!(b0 & 0x0f, 0x8);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(lb.stat("aborted"), aborted, "{}", lb.log());
}

/// paho-mqtt over ws and wss, MQTT 3.1.1 and 5: 100 QoS 1 messages published and
/// received back by the same client.
async fn paho_both_ways(pki: &Pki, lb: &Daemon, wss: SocketAddr) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/paho_ws_pubsub.py");
    for (name, port, cafile) in [
        ("ws", lb.addr.port(), None),
        ("wss", wss.port(), Some(pki.path("ca.pem"))),
    ] {
        for protocol in ["4", "5"] {
            let topic = format!("paho-{name}-{protocol}");
            let mut cmd = Command::new("/usr/bin/python3");
            cmd.arg(script)
                .args(["localhost", &port.to_string(), &topic, "100", protocol]);
            if let Some(ca) = &cafile {
                cmd.arg(ca);
            }
            let out = cmd
                .output()
                .expect("python3 (apt-get install -y python3-paho-mqtt)");
            let report: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
                    panic!(
                        "{topic}: no report: {}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    )
                });
            assert!(out.status.success(), "{topic}: {report}");
            let received = report["received"].as_array().expect("received");
            let want: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
            let mut got: Vec<String> = received
                .iter()
                .map(|v| v.as_str().expect("str").to_owned())
                .collect();
            got.sort_by_key(|m| m[1..].parse::<u32>().unwrap_or(0));
            assert_eq!(got, want, "{topic}");
        }
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(lb.stat("ws_upgrades"), 4);
}

/// Upgrades, sends the CONNECT of `id` split over two frames (a fragmented message, or
/// two messages), expects the CONNACK; returns the open session.
async fn ws_session(addr: SocketAddr, id: &str, fragmented: bool) -> TcpStream {
    let (mut s, head) = upgrade(addr, &request("/mqtt")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{head}"
    );
    assert!(head.contains("Sec-WebSocket-Protocol: mqtt\r\n"), "{head}");
    let connect = mqttc::connect(id, true);
    let (a, b) = connect.split_at(5);
    let frames = if fragmented {
        [masked(0x02, a), masked(0x80, b)].concat()
    } else {
        [masked(0x82, a), masked(0x82, b)].concat()
    };
    s.write_all(&frames).await.expect("frames");
    let (b0, payload) = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut s))
        .await
        .expect("CONNACK in time")
        .expect("frame");
    assert_eq!(
        (b0, payload.as_slice()),
        (0x82, &[0x20, 2, 0, 0][..]),
        "{id}"
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_split_across_frames_is_balanced_by_client_id_and_sticks() {
    if !privileged("websocket") {
        return;
    }
    let pki = Pki::new();
    let brokers: Vec<Mosquitto> = (0..3).map(|_| Mosquitto::start()).collect();
    let mut bridges = Vec::new();
    for b in &brokers {
        bridges.push(WsBridge::start(b.addr).await);
    }
    let servers: Vec<(SocketAddr, Option<SocketAddr>)> = brokers
        .iter()
        .zip(&bridges)
        .map(|(b, w)| (b.addr, Some(w.addr)))
        .collect();
    let (lb, _) = start(&pki, "balance = \"client-id\"", &servers);
    let counts = || {
        bridges
            .iter()
            .map(|b| b.forwarded.lock().expect("lock").len())
            .collect::<Vec<_>>()
    };
    let mut placed = Vec::new();
    for i in 0..30 {
        let before = counts();
        let mut s = ws_session(lb.addr, &format!("ws-{i}"), i % 2 == 0).await;
        let after = counts();
        let node = (0..3)
            .find(|&n| after[n] > before[n])
            .expect("a bridge got it");
        placed.push(node);
        // PINGREQ / PINGRESP through the spliced WebSocket.
        s.write_all(&masked(0x82, &[0xc0, 0])).await.expect("ping");
        let (_, pong) = read_frame(&mut s).await.expect("pong");
        assert_eq!(pong, [0xd0, 0]);
    }
    let used: std::collections::HashSet<usize> = placed.iter().copied().collect();
    assert_eq!(used.len(), 3, "{placed:?}");
    for (i, node) in placed.iter().enumerate() {
        let before = counts();
        let _s = ws_session(lb.addr, &format!("ws-{i}"), i % 2 == 1).await;
        let after = counts();
        assert!(after[*node] > before[*node], "ws-{i} moved");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_websocket_input_is_refused_counted_and_reaches_no_server() {
    if !privileged("websocket") {
        return;
    }
    let pki = Pki::new();
    let broker = Mosquitto::start();
    let bridge = WsBridge::start(broker.addr).await;
    let (lb, _) = start(&pki, "", &[(broker.addr, Some(bridge.addr))]);
    // Not an upgrade; the wrong path.
    let (_, head) = upgrade(lb.addr, "GET /mqtt HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    let (_, head) = upgrade(lb.addr, &request("/elsewhere")).await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    // An unmasked frame, and a first packet that is not a CONNECT: a close frame (1002).
    let mut unmasked = masked(0x82, &mqttc::connect("x", true));
    unmasked[1] &= 0x7f;
    for frames in [unmasked, masked(0x82, &[0xc0, 0])] {
        let (mut s, head) = upgrade(lb.addr, &request("/mqtt")).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        s.write_all(&frames).await.expect("frames");
        let (b0, payload) = read_frame(&mut s).await.expect("close frame");
        assert_eq!((b0, payload.as_slice()), (0x88, &[0x03, 0xea][..]));
        assert!(closed_within(&mut s, Duration::from_secs(3)).await);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(lb.stat("ws_rejected_http"), 2);
    assert_eq!(lb.stat("ws_bad_frames"), 1);
    assert_eq!(lb.stat("invalid_not_connect"), 1);
    assert!(
        bridge.forwarded.lock().expect("lock").is_empty(),
        "a server was contacted"
    );
    // A good client still gets through.
    let _s = ws_session(lb.addr, "good", false).await;
    assert_eq!(bridge.forwarded.lock().expect("lock").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_rewrites_the_client_id_from_the_certificate() {
    if !privileged("websocket") {
        return;
    }
    let pki = Pki::new();
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let instance = format!("wsrw{}x{}", std::process::id(), free_port());
    let ports = (free_port(), free_port());
    let text = ws_text(&instance, ports, &pki, "", &[(receiver.local_addr().expect("addr"), None)])
        .replace(
            "\n\n[[clusters]]",
            &format!(
                "\nclient_ca = \"{}\"\n\n[listeners.rewrite]\nclient_id = \"cert.serial\"\n\n[[clusters]]",
                pki.path("ca.pem")
            ),
        );
    let _lb = Daemon::start_text("auto", ports.0, &instance, &text);
    let wss = SocketAddr::from(([127, 0, 0, 1], ports.1));
    let mut s = pki.connect(wss, Some("client")).await.expect("TLS");
    s.write_all(request("/mqtt").as_bytes())
        .await
        .expect("upgrade");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.expect("101"));
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    // The CONNECT split over two frames, a PINGREQ after it.
    let mut connect = mqttc::connect("chosen-by-device", true);
    connect.extend_from_slice(&[0xc0, 0]);
    let (a, b) = connect.split_at(7);
    s.write_all(&[masked(0x02, a), masked(0x80, b)].concat())
        .await
        .expect("frames");
    let (mut server, _) = tokio::time::timeout(Duration::from_secs(5), receiver.accept())
        .await
        .expect("server connection")
        .expect("accept");
    let mut want =
        mqttlb::mqtt::rewrite_connect(&connect, 1 << 16, "0A1B2C3D", None).expect("rewrite");
    want.extend_from_slice(&[0xc0, 0]);
    let mut got = vec![0u8; want.len()];
    server.read_exact(&mut got).await.expect("plain MQTT");
    assert_eq!(
        got, want,
        "the server gets the rewritten CONNECT, unwrapped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_server_and_a_refused_upgrade_end_in_websocket_terms() {
    if !privileged("websocket") {
        return;
    }
    let pki = Pki::new();
    // No server listening: CONNACK 3 in a binary frame, then close 1013.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let (lb, _) = start(&pki, "", &[(dead, None)]);
    let (mut s, head) = upgrade(lb.addr, &request("/mqtt")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(&masked(0x82, &mqttc::connect("nobody-home", true)))
        .await
        .expect("CONNECT");
    let (b0, p) = read_frame(&mut s).await.expect("CONNACK frame");
    assert_eq!((b0, p.as_slice()), (0x82, &[0x20, 2, 0, 3][..]));
    let (b0, p) = read_frame(&mut s).await.expect("close frame");
    assert_eq!((b0, p.as_slice()), (0x88, &1013u16.to_be_bytes()[..]));
    drop(lb);

    // A WebSocket server that answers the forwarded upgrade with 404: close 1011.
    let refuser = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let ws_addr = refuser.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut c, _)) = refuser.accept().await {
            let mut buf = [0u8; 2048];
            let _ = c.read(&mut buf).await;
            let _ = c
                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    });
    let (lb, _) = start(&pki, "", &[(dead, Some(ws_addr))]);
    let (mut s, head) = upgrade(lb.addr, &request("/mqtt")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(&masked(0x82, &mqttc::connect("refused", true)))
        .await
        .expect("CONNECT");
    let (b0, p) = read_frame(&mut s).await.expect("close frame");
    assert_eq!((b0, p.as_slice()), (0x88, &1011u16.to_be_bytes()[..]));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(lb.stat("ws_server_refused"), 1);
}
