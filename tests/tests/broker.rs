//! Real broker, real clients: mosquitto_pub/mosquitto_sub (MQTT 3.1.1) and paho-mqtt
//! (MQTT 5) through mqttlb exchange 1,000 QoS 1 messages with none lost, on both data
//! planes. Also the paths where no broker
//! is involved: CONNACK refusals when no server is up, invalid or late first packets
//! (no server contacted), a dead server skipped for a live one, and `mqttlb check`.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    sync::atomic::Ordering,
    time::Duration,
};

use tests::*;
use tokio::{io::AsyncWriteExt, net::TcpStream};

/// `mosquitto_pub`/`mosquitto_sub` arguments common to both: broker, topic, QoS 1, id,
/// protocol version (`mqttv31`, `mqttv311`, `mqttv5`).
fn client_args(lb: &Daemon, topic: &str, role: &str, version: &str) -> Vec<String> {
    let port = lb.addr.port().to_string();
    [
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-t",
        topic,
        "-q",
        "1",
        "-i",
        &format!("{topic}-{role}"),
        "-V",
        version,
    ]
    .map(str::to_owned)
    .to_vec()
}

fn pubsub_1000(lb: &Daemon, topic: &str, version: &str) {
    // `-d` prints the protocol exchange, so the test knows when the SUBACK arrived;
    // `stdbuf -oL` because piped stdout is block-buffered (the line would come at exit).
    let mut sub = Command::new("stdbuf")
        .args(["-oL", "mosquitto_sub"])
        .args(client_args(lb, topic, "sub", version))
        .args(["-C", "1000", "-W", "60", "-d"])
        .stdout(Stdio::piped())
        .spawn()
        .expect(
            "mosquitto_sub not found: apt-get install -y mosquitto-clients (cargo xtask test does)",
        );
    let mut lines = BufReader::new(sub.stdout.take().expect("stdout")).lines();
    loop {
        let line = lines
            .next()
            .expect("mosquitto_sub ended before its SUBACK")
            .expect("read");
        if line.contains("received SUBACK") {
            break;
        }
    }
    // Drain the rest while publishing: `-d` output would fill the pipe and stall it.
    let collector = std::thread::spawn(move || {
        // Debug lines start with "Client " or "Subscribed"; the rest are payloads.
        lines
            .map(|l| l.expect("read"))
            .filter(|l| !l.starts_with("Client ") && !l.starts_with("Subscribed"))
            .collect::<Vec<String>>()
    });
    let mut publisher = Command::new("mosquitto_pub")
        .args(client_args(lb, topic, "pub", version))
        .arg("-l")
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub");
    {
        let mut stdin = publisher.stdin.take().expect("stdin");
        for i in 0..1000 {
            writeln!(stdin, "message-{i}").expect("write to mosquitto_pub");
        }
    }
    assert!(
        publisher.wait().expect("pub").success(),
        "mosquitto_pub failed; log:\n{}",
        lb.log()
    );
    let got = collector.join().expect("collector");
    assert!(sub.wait().expect("sub").success(), "mosquitto_sub failed");
    let want: Vec<String> = (0..1000).map(|i| format!("message-{i}")).collect();
    assert_eq!(
        got.len(),
        1000,
        "{}: got {} messages; log:\n{}",
        lb.plane,
        got.len(),
        lb.log()
    );
    assert_eq!(
        got, want,
        "{}: messages lost, duplicated or reordered",
        lb.plane
    );
}

#[test]
fn mosquitto_clients_exchange_1000_qos1_messages_through_both_planes() {
    let broker = Mosquitto::start();
    for plane in PLANES {
        if plane == "sockmap" && !privileged("broker sockmap") {
            continue;
        }
        let lb = Daemon::start(plane, &[broker.addr]);
        pubsub_1000(&lb, &format!("t/{plane}"), "mqttv311");
    }
}

/// mosquitto_pub/mosquitto_sub speaking MQTT 3.1 (`MQIsdp`) and MQTT 5 through mqttlb
/// (the default plane) exchange 1,000 QoS 1 messages each, none lost or reordered.
#[test]
fn mosquitto_clients_31_and_5_exchange_messages() {
    let broker = Mosquitto::start();
    let lb = Daemon::start("auto", &[broker.addr]);
    for version in ["mqttv31", "mqttv5"] {
        pubsub_1000(&lb, &format!("v/{version}"), version);
    }
}

/// paho-mqtt, MQTT 5: CONNACK success for both clients, SUBACK granting QoS 1, 1,000
/// PUBACKs, and 1,000 messages delivered in order with their MQTT 5 properties.
#[test]
fn paho_mqtt5_clients_exchange_1000_qos1_messages_through_both_planes() {
    const COUNT: usize = 1000;
    let broker = Mosquitto::start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/paho_mqtt5_pubsub.py");
    for plane in PLANES {
        if plane == "sockmap" && !privileged("broker sockmap") {
            continue;
        }
        let lb = Daemon::start(plane, &[broker.addr]);
        let topic = format!("t5/{plane}");
        // Debian's python3 (not one earlier on PATH) has python3-paho-mqtt.
        let out = Command::new("/usr/bin/python3")
            .args([script, "127.0.0.1", &lb.addr.port().to_string(), &topic])
            .arg(COUNT.to_string())
            .output()
            .expect("/usr/bin/python3 not found: apt-get install -y python3-paho-mqtt (cargo xtask test does)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{plane}: paho script failed: {stdout}{}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            lb.log()
        );
        let report: serde_json::Value = serde_json::from_str(&stdout).expect("script JSON");
        assert_eq!(
            report["connack"],
            serde_json::json!([["sub", 0], ["pub", 0]]),
            "{plane}: CONNACK reason codes"
        );
        assert_eq!(
            report["subscribed"], true,
            "{plane}: SUBACK did not grant QoS 1"
        );
        assert_eq!(report["puback"], COUNT, "{plane}: PUBACKs");
        let want: Vec<serde_json::Value> = (0..COUNT)
            .map(|i| serde_json::json!([format!("m5-{i}"), 1, i.to_string(), "text/plain"]))
            .collect();
        let got = report["received"].as_array().expect("received");
        assert_eq!(got.len(), COUNT, "{plane}: messages received");
        assert!(
            *got == want,
            "{plane}: messages lost, reordered or their properties changed"
        );
    }
}

#[tokio::test]
async fn no_server_gets_connack_3_and_invalid_first_packets_reach_no_server() {
    // Nothing listens on this port: every connect fails.
    let dead: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let lb = Daemon::start("copy", &[dead]);
    let limit = Duration::from_secs(5);
    let reply = reply_until_close(lb.addr, &connect_packet("nobody"), limit).await;
    assert_eq!(
        reply,
        [0x20, 0x02, 0x00, 0x03],
        "MQTT 3.1.1: CONNACK return code 3"
    );
    let v5 = [
        0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x00, 0x00, 0x00,
    ];
    let reply = reply_until_close(lb.addr, &v5, limit).await;
    assert_eq!(
        reply,
        [0x20, 0x03, 0x00, 0x88, 0x00],
        "MQTT 5: CONNACK reason 0x88"
    );

    // A PINGREQ first: closed with nothing sent back, and no server sees a connection.
    let echo = Echo::start().await;
    let lb = Daemon::start("copy", &[echo.addr]);
    assert!(
        reply_until_close(lb.addr, &[0xc0, 0x00], limit)
            .await
            .is_empty()
    );
    assert_eq!(
        echo.accepted.load(Ordering::SeqCst),
        0,
        "no server was contacted"
    );
}

/// Half a CONNECT is cut at `inspect_timeout`; no server is contacted.
#[tokio::test]
async fn a_slow_first_packet_is_cut_at_inspect_timeout() {
    let echo = Echo::start().await;
    let lb = Daemon::start_edited("copy", &[echo.addr], |t| {
        t.replace("inspect_timeout = \"10s\"", "inspect_timeout = \"300ms\"")
    });
    let mut c = TcpStream::connect(lb.addr).await.expect("connect");
    let p = connect_packet("slow");
    c.write_all(&p[..p.len() / 2]).await.expect("write");
    let t0 = std::time::Instant::now();
    assert!(
        closed_within(&mut c, Duration::from_secs(3)).await,
        "still open 3 s after a 300 ms inspect_timeout"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "closed before inspect_timeout: {:?}",
        t0.elapsed()
    );
    assert_eq!(
        echo.accepted.load(Ordering::SeqCst),
        0,
        "no server was contacted"
    );
}

/// A server that refuses connections is skipped: every client reaches the live one.
#[tokio::test]
async fn a_dead_server_is_skipped_for_the_next_one() {
    let echo = Echo::start().await;
    let dead: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let lb = Daemon::start("copy", &[dead, echo.addr]);
    for i in 0..6 {
        let p = connect_packet(&format!("skip-{i}"));
        assert_eq!(
            roundtrip(lb.addr, p.clone()).await.expect("roundtrip"),
            p,
            "client {i}"
        );
    }
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 6);
}

/// `mqttlb check`: OK and exit 0, or one line per problem naming key and line, exit 1.
#[test]
fn check_reports_problems_by_key_and_line() {
    let dir = TempDir::new("check");
    let good = config_text(
        "chk",
        "copy",
        1883,
        &["127.0.0.1:18831".parse().expect("addr")],
    );
    let path = dir.0.join("good.toml");
    // `mqttlb check` on `text`: exit code, stdout, stderr.
    let check = |text: &str| {
        std::fs::write(&path, text).expect("write");
        let out = Command::new(bin())
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .expect("run check");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, _) = check(&good);
    assert_eq!(code, Some(0));
    assert_eq!(stdout.trim(), "configuration OK");

    let (code, _, err) = check(
        &good
            .replace("cluster = \"c\"", "cluster = \"nope\"")
            .replace("connect_timeout = \"1s\"", "connect_timeout = \"soon\""),
    );
    assert_eq!(code, Some(1));
    assert!(
        err.contains("line 13: connect_timeout: invalid duration \"soon\""),
        "{err}"
    );

    // Three independent problems: all three, in file order, each saying what to write.
    let (code, _, err) = check(
        &good
            .replace("bind = \"127.0.0.1:1883\"", "bind = \"localhost:1883\"")
            .replace("connect_timeout = \"1s\"", "connect_timeout = \"0s\"")
            .replace("address = \"127.0.0.1:18831\"", "address = \"127.0.0.1\""),
    );
    assert_eq!(code, Some(1));
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(
        lines[0].contains("listeners[0].bind: expected IP:port, e.g. 0.0.0.0:1883"),
        "{err}"
    );
    assert!(
        lines[1].contains("clusters[0].connect_timeout: must be more than 0s"),
        "{err}"
    );
    assert!(
        lines[2].contains("clusters[0].servers[0].address: expected IP:port or host:port"),
        "{err}"
    );

    // A missing file is named once.
    let out = Command::new(bin())
        .args(["check", "-c", "/nonexistent/mqttlb.toml"])
        .output()
        .expect("run check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("/nonexistent/mqttlb.toml").count(), 1, "{err}");
}

/// A server given by host name (as compose files and Kubernetes services name them)
/// is resolved at start and reached.
#[tokio::test]
async fn a_server_given_by_host_name_is_reached() {
    let echo = Echo::start().await;
    let lb = Daemon::start_edited("copy", &[echo.addr], |t| {
        t.replace(
            &format!("address = \"{}\"", echo.addr),
            &format!("address = \"localhost:{}\"", echo.addr.port()),
        )
    });
    assert!(
        std::fs::read_to_string(&lb.config)
            .expect("config")
            .contains("address = \"localhost:")
    );
    let connect = connect_packet("by-name");
    assert_eq!(
        roundtrip(lb.addr, connect.clone()).await.expect("echo"),
        connect
    );
}

/// Behind a load balancer that sends PROXY headers (`accept_proxy_protocol`), the
/// client is who the header names: the server gets that address in its own PROXY v2
/// header, then exactly the client's bytes (v1 and v2 in front); a connection without
/// a valid header is closed and counted, and no server sees it.
#[tokio::test]
async fn proxy_headers_from_a_load_balancer_in_front() {
    if !privileged("PROXY header counters") {
        return;
    }
    let server = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let server_addr = server.local_addr().expect("addr");
    let lb = Daemon::start_edited("sockmap", &[server_addr], |t| {
        t.replace(
            "cluster = \"c\"\n",
            "cluster = \"c\"\naccept_proxy_protocol = true\n",
        )
        .replace(
            "connect_timeout = \"1s\"\n",
            "connect_timeout = \"1s\"\nproxy_protocol = \"v2\"\n",
        )
    });
    let connect = connect_packet("behind-nlb");
    let mut v2_in_front = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2_in_front.extend_from_slice(&[198, 51, 100, 9, 10, 0, 0, 1, 0xc3, 0x50, 0x07, 0x5b]);
    for (header, client) in [
        (
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 1883\r\n".to_vec(),
            ([203, 0, 113, 7], 51000),
        ),
        (v2_in_front, ([198, 51, 100, 9], 50000)),
    ] {
        let mut c = TcpStream::connect(lb.addr).await.expect("connect");
        // Header and CONNECT in separate writes, then bytes after the CONNECT.
        c.write_all(&header).await.expect("write");
        c.write_all(&connect).await.expect("write");
        c.write_all(b"after").await.expect("write");
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(5), server.accept())
            .await
            .expect("the server was contacted")
            .expect("accept");
        let mut got = vec![0u8; 28 + connect.len() + 5];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut got)
            .await
            .expect("read");
        // PROXY v2 to the server: TCP over IPv4, source = the client the header named.
        assert_eq!(&got[12..16], &[0x21, 0x11, 0x00, 0x0c]);
        let (ip, port) = client;
        assert_eq!(&got[16..20], &ip, "source address forwarded");
        assert_eq!(
            &got[24..26],
            &u16::to_be_bytes(port),
            "source port forwarded"
        );
        assert_eq!(&got[28..28 + connect.len()], &connect[..]);
        assert_eq!(&got[28 + connect.len()..], b"after");
    }
    // No header: closed without a reply, no server contacted, counted.
    let reply = reply_until_close(lb.addr, &connect, Duration::from_secs(2)).await;
    assert!(reply.is_empty(), "reply {reply:02x?}");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), server.accept())
            .await
            .is_err(),
        "a server saw a connection that had no PROXY header"
    );
    wait_for("the rejection counted", Duration::from_secs(2), || {
        lb.stat("rejected_proxy_header") == 1
    })
    .await;
}

/// A dual-stack listener (`[::]:port`) sees IPv4 clients as IPv4-mapped IPv6; the
/// PROXY header to the server must still say TCP4 / AF_INET with the IPv4 address, or
/// brokers' IPv4 ACLs would not match them (v1 and v2).
#[tokio::test]
async fn a_dual_stack_listener_sends_ipv4_clients_as_tcp4() {
    for kind in ["v1", "v2"] {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let server_addr = server.local_addr().expect("addr");
        let lb = Daemon::start_edited("copy", &[server_addr], |t| {
            t.replace("bind = \"127.0.0.1:", "bind = \"[::]:").replace(
                "connect_timeout = \"1s\"\n",
                &format!("connect_timeout = \"1s\"\nproxy_protocol = \"{kind}\"\n"),
            )
        });
        let connect = connect_packet("dual-stack");
        let mut c = TcpStream::connect(lb.addr).await.expect("connect");
        let client_port = c.local_addr().expect("local").port();
        c.write_all(&connect).await.expect("write");
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(5), server.accept())
            .await
            .expect("the server was contacted")
            .expect("accept");
        let header = if kind == "v1" {
            format!(
                "PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {}\r\n",
                lb.addr.port()
            )
            .into_bytes()
        } else {
            let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
            h.extend_from_slice(&[127, 0, 0, 1, 127, 0, 0, 1]);
            h.extend_from_slice(&client_port.to_be_bytes());
            h.extend_from_slice(&lb.addr.port().to_be_bytes());
            h
        };
        let mut got = vec![0u8; header.len() + connect.len()];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut got)
            .await
            .expect("read");
        assert_eq!(
            String::from_utf8_lossy(&got[..header.len()]),
            String::from_utf8_lossy(&header),
            "{kind}"
        );
        assert_eq!(&got[header.len()..], &connect[..]);
    }
}

/// Each kind of invalid first packet is refused without a server, and counted under
/// its own reason (and in the total).
#[tokio::test]
async fn invalid_first_packets_are_counted_by_reason() {
    if !privileged("rejection counters") {
        return;
    }
    let echo = Echo::start().await;
    let lb = Daemon::start("sockmap", &[echo.addr]);
    let body = |name: &[u8], level: u8, flags: u8, id: &[u8], extra: &[u8]| {
        let mut b = vec![0, name.len() as u8];
        b.extend_from_slice(name);
        b.extend_from_slice(&[level, flags, 0, 60, 0, id.len() as u8]);
        b.extend_from_slice(id);
        b.extend_from_slice(extra);
        let mut p = vec![0x10, b.len() as u8];
        p.extend_from_slice(&b);
        p
    };
    let cases: [(&str, Vec<u8>); 6] = [
        ("invalid_not_connect", vec![0xc0, 0x00]),
        (
            "invalid_remaining_length",
            vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
        ("invalid_protocol", body(b"MQTX", 4, 0x02, b"a", b"")),
        ("invalid_flags", body(b"MQTT", 4, 0x03, b"a", b"")),
        ("invalid_utf8", body(b"MQTT", 4, 0x02, b"a\0b", b"")),
        ("invalid_length", body(b"MQTT", 4, 0x02, b"a", b"x")),
    ];
    for (_, packet) in &cases {
        let reply = reply_until_close(lb.addr, packet, Duration::from_secs(2)).await;
        assert!(reply.is_empty(), "{packet:02x?}: reply {reply:02x?}");
    }
    wait_for("every rejection counted", Duration::from_secs(2), || {
        lb.stat("rejected_invalid_connect") == cases.len() as u64
    })
    .await;
    for (counter, packet) in &cases {
        assert_eq!(lb.stat(counter), 1, "{counter} after {packet:02x?}");
    }
    assert_eq!(
        echo.accepted.load(Ordering::SeqCst),
        0,
        "a server was contacted"
    );
}
