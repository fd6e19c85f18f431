//! `mqtts` listeners with real clients and brokers: mosquitto_pub/sub over TLS 1.2 and
//! 1.3, mutual TLS (refused without a valid certificate), resumed sessions seen by
//! `openssl s_client`, the client id and username rewritten from the certificate (seen
//! in the broker's log, MQTT 5 properties byte-exact at an in-test receiver), PROXY v2
//! TLS TLVs, client-id stickiness and CONNECT validation over TLS, and bad input.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use tests::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A config with one `mqtts` listener (`tls_keys` go into `[listeners.tls]`, `extra`
/// after it) in front of `servers`.
fn tls_text(
    instance: &str,
    port: u16,
    pki: &Pki,
    tls_keys: &str,
    extra: &str,
    cluster_keys: &str,
    servers: &[SocketAddr],
) -> String {
    let mut t = format!(
        "[global]\nname = \"{instance}\"\n\n[[listeners]]\nname = \"mqtts\"\nbind = \"127.0.0.1:{port}\"\nkind = \"mqtts\"\ncluster = \"c\"\ninspect_timeout = \"3s\"\n\n[listeners.tls]\ncert = \"{}\"\nkey = \"{}\"\n{tls_keys}\n{extra}\n\n[[clusters]]\nname = \"c\"\nconnect_timeout = \"1s\"\n{cluster_keys}\n[clusters.health]\nkind = \"none\"\n",
        pki.path("server.pem"),
        pki.path("server.key"),
    );
    for (i, s) in servers.iter().enumerate() {
        t += &format!(
            "\n[[clusters.servers]]\nname = \"node{}\"\naddress = \"{s}\"\n",
            i + 1
        );
    }
    t
}

fn start(
    pki: &Pki,
    tls_keys: &str,
    extra: &str,
    cluster_keys: &str,
    servers: &[SocketAddr],
) -> Daemon {
    let instance = format!("tls{}x{}", std::process::id(), free_port());
    let port = free_port();
    let text = tls_text(&instance, port, pki, tls_keys, extra, cluster_keys, servers);
    Daemon::start_text("auto", port, &instance, &text)
}

/// mosquitto_pub/sub TLS arguments (`--cafile`, and a client certificate).
fn tls_args(pki: &Pki, lb: &Daemon, cert: Option<&str>) -> Vec<String> {
    let mut a = vec![
        "-h".into(),
        "localhost".into(),
        "-p".into(),
        lb.addr.port().to_string(),
        "--cafile".into(),
        pki.path("ca.pem"),
    ];
    if let Some(c) = cert {
        a.extend([
            "--cert".into(),
            pki.path(&format!("{c}.pem")),
            "--key".into(),
            pki.path(&format!("{c}.key")),
        ]);
    }
    a
}

/// One QoS 1 message through mosquitto_pub; exit success.
fn publish(args: &[String], id: &str, extra: &[&str]) -> bool {
    Command::new("mosquitto_pub")
        .args(args)
        .args(["-t", "tls/test", "-m", "hello", "-q", "1", "-i", id])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("mosquitto_pub")
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_exchange_messages_over_tls_1_2_and_1_3() {
    if !privileged("tls") {
        return;
    }
    let pki = Pki::new();
    let broker = Mosquitto::start();
    let lb = start(&pki, "", "", "", &[broker.addr]);
    for version in ["tlsv1.2", "tlsv1.3"] {
        let args = tls_args(&pki, &lb, None);
        let topic = format!("tls/{version}");
        let sub = Command::new("mosquitto_sub")
            .args(&args)
            .args(["-t", &topic, "-q", "1", "-C", "200", "-W", "20", "-i"])
            .arg(format!("sub-{version}"))
            .args(["--tls-version", version])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let messages: String = (0..200).map(|i| format!("m{i}\n")).collect();
        let mut publisher = Command::new("mosquitto_pub")
            .args(&args)
            .args(["-t", &topic, "-q", "1", "-l", "-i"])
            .arg(format!("pub-{version}"))
            .args(["--tls-version", version])
            .stdin(Stdio::piped())
            .spawn()
            .expect("mosquitto_pub");
        publisher
            .stdin
            .take()
            .expect("stdin")
            .write_all_sync(messages.as_bytes());
        assert!(
            publisher.wait().expect("pub").success(),
            "{version}: publisher failed"
        );
        let out = sub.wait_with_output().expect("sub");
        let got = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            got,
            messages,
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // (mosquitto's --tls-version is a minimum: pin each version with rustls too.)
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let s = pki.connect_version(lb.addr, version).await.expect("TLS");
        assert_eq!(s.get_ref().1.protocol_version(), Some(version.version));
        let mut s = mqttc::session_on(s, "pinned", true).await.expect("session");
        mqttc::ping(&mut s).await.expect("PINGRESP");
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(lb.stat("tls_handshakes") >= 6);
    // Only the harness's readiness probe.
    assert_eq!(lb.stat("tls_handshake_failures"), 1);
}

trait WriteAllSync {
    fn write_all_sync(self, bytes: &[u8]);
}

impl WriteAllSync for std::process::ChildStdin {
    fn write_all_sync(mut self, bytes: &[u8]) {
        use std::io::Write;
        self.write_all(bytes).expect("write stdin");
    }
}

fn connections(lb: &Daemon) -> u64 {
    lb.ctl("backends")["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["connections"].as_u64().expect("connections"))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_valid_certificate_and_bad_input() {
    if !privileged("tls") {
        return;
    }
    let pki = Pki::new();
    let broker = Mosquitto::start();
    let ca = format!(
        "client_ca = \"{}\"\nverify = \"required\"",
        pki.path("ca.pem")
    );
    let lb = start(&pki, &ca, "", "", &[broker.addr]);
    // The harness's readiness probe (connect, close) is one failed handshake.
    wait_for("the probe counted", Duration::from_secs(3), || {
        lb.stat("tls_handshake_failures") == 1
    })
    .await;
    assert!(publish(&tls_args(&pki, &lb, Some("client")), "good", &[]));
    assert!(!publish(&tls_args(&pki, &lb, None), "no-cert", &[]));
    assert!(!publish(
        &tls_args(&pki, &lb, Some("stranger")),
        "stranger",
        &[]
    ));
    // One refusal a second is logged at INFO with its reason: past the last one
    // logged, the expired client's refusal is, and says why. (Two seconds: the last
    // refusal may be logged a moment after its client gave up.)
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(!publish(
        &tls_args(&pki, &lb, Some("expired")),
        "expired",
        &[]
    ));
    // (The client may exit before the daemon has written the line.)
    let refusals = || -> Vec<String> {
        lb.log()
            .lines()
            .filter(|l| l.contains("TLS handshake refused") && l.contains("INFO"))
            .map(str::to_owned)
            .collect()
    };
    let expired = |r: &[String]| {
        r.last()
            .is_some_and(|l| l.to_lowercase().contains("expired") && l.contains("127.0.0.1"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !expired(&refusals()) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(expired(&refusals()), "{:?}", refusals());
    // Plaintext MQTT and random bytes on the TLS port: closed.
    for bytes in [connect_packet("plain"), vec![0x5a; 300]] {
        let mut s = TcpStream::connect(lb.addr).await.expect("connect");
        s.write_all(&bytes).await.expect("write");
        assert!(closed_within(&mut s, Duration::from_secs(3)).await);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(lb.stat("tls_handshakes"), 1);
    assert_eq!(lb.stat("tls_handshake_failures"), 1 + 5);
    assert_eq!(
        connections(&lb),
        1,
        "only the good client reached the broker"
    );
    // The good client still works afterwards.
    assert!(publish(
        &tls_args(&pki, &lb, Some("client")),
        "good-again",
        &[]
    ));
}

/// `openssl s_client` output lines starting with New/Reused.
fn s_client(lb: &Daemon, pki: &Pki, args: &[&str]) -> Vec<String> {
    pki.s_client(lb.addr, args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_with_the_tls_1_2_cache_and_tls_1_3_tickets() {
    if !privileged("tls") {
        return;
    }
    let pki = Pki::new();
    let broker = Mosquitto::start();
    let lb = start(&pki, "", "", "", &[broker.addr]);
    let lines = s_client(&lb, &pki, &["-tls1_2", "-reconnect"]);
    assert!(
        lines.first().is_some_and(|l| l.starts_with("New, TLSv1.2")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .skip(1)
            .all(|l| l.starts_with("Reused, TLSv1.2"))
            && lines.len() > 1,
        "{lines:?}"
    );
    let session = pki.dir.0.join("tls13.session").display().to_string();
    let first = s_client(&lb, &pki, &["-tls1_3", "-sess_out", &session]);
    assert!(
        first.iter().any(|l| l.starts_with("New, TLSv1.3")),
        "{first:?}"
    );
    let again = s_client(&lb, &pki, &["-tls1_3", "-sess_in", &session]);
    assert!(
        again.iter().any(|l| l.starts_with("Reused, TLSv1.3")),
        "{again:?}"
    );
    // A reload builds the TLS configuration again; the ticket still opens (rustls's
    // own ticketer drew new keys at each build: every ticket was lost).
    lb.reload(&lb.config_text());
    let after = s_client(&lb, &pki, &["-tls1_3", "-sess_in", &session]);
    assert!(
        after.iter().any(|l| l.starts_with("Reused, TLSv1.3")),
        "after a reload: {after:?}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        lb.stat("tls_resumed") >= lines.len() as u64,
        "{}",
        lb.ctl("stats")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_sees_the_certificate_serial_as_client_id_and_cn_as_username() {
    if !privileged("tls") {
        return;
    }
    let pki = Pki::new();
    let log = pki.dir.0.join("mosquitto.log");
    let broker = Mosquitto::start_with(
        free_port(),
        &format!("log_dest file {}\nlog_type all", log.display()),
    );
    let ca = format!("client_ca = \"{}\"", pki.path("ca.pem"));
    let rewrite = "[listeners.rewrite]\nclient_id = \"cert.serial\"\nusername = \"cert.cn\"";
    let lb = start(&pki, &ca, rewrite, "", &[broker.addr]);
    assert!(publish(
        &tls_args(&pki, &lb, Some("client")),
        "chosen-by-device",
        &[]
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = std::fs::read_to_string(&log).expect("broker log");
    let line = text
        .lines()
        .find(|l| l.contains("New client connected"))
        .unwrap_or_else(|| panic!("no connection in the broker log:\n{text}"));
    assert!(line.contains(" as 0A1B2C3D "), "{line}");
    assert!(line.contains("u'device-7'"), "{line}");
    assert!(
        !text.contains("chosen-by-device"),
        "the original id reached the broker"
    );
}

/// A v5 CONNECT with properties (session expiry, receive maximum, user property),
/// credentials-free, and a PINGREQ pipelined after it.
fn v5_connect_with_properties(client_id: &str) -> Vec<u8> {
    let props: Vec<u8> = [
        &[0x11, 0, 0, 0x0e, 0x10][..], // session expiry 3600
        &[0x21, 0, 20][..],            // receive maximum 20
        &[0x26, 0, 4][..],
        b"site",
        &[0, 3][..],
        b"lab", // user property
    ]
    .concat();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30];
    body.push(props.len() as u8);
    body.extend_from_slice(&props);
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut p = mqttc::packet(0x10, &body);
    p.extend_from_slice(&[0xc0, 0]);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewriting_keeps_mqtt5_properties_and_proxy_v2_carries_tls_tlvs() {
    if !privileged("tls") {
        return;
    }
    let pki = Pki::new();
    let receiver = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = receiver.local_addr().expect("addr");
    let ca = format!("client_ca = \"{}\"", pki.path("ca.pem"));
    let rewrite = "[listeners.rewrite]\nclient_id = \"cert.serial\"\nusername = \"cert.san_email\"";
    let lb = start(&pki, &ca, rewrite, "proxy_protocol = \"v2\"", &[addr]);
    let mut client = pki.connect(lb.addr, Some("client")).await.expect("TLS");
    let sent = v5_connect_with_properties("original-id");
    client.write_all(&sent).await.expect("CONNECT");
    let (mut server, _) = tokio::time::timeout(Duration::from_secs(5), receiver.accept())
        .await
        .expect("a server connection")
        .expect("accept");
    // PROXY v2 header: 16 bytes + address block with the TLS TLV.
    let mut head = [0u8; 16];
    server.read_exact(&mut head).await.expect("header");
    assert_eq!(&head[..12], b"\r\n\r\n\0\r\nQUIT\n");
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    let mut block = vec![0u8; len];
    server.read_exact(&mut block).await.expect("address block");
    let tlv = &block[12..];
    assert_eq!(tlv[0], 0x20, "PP2_TYPE_SSL");
    assert_eq!(tlv[3], 0x07, "TLS, with a verified client certificate");
    let text = String::from_utf8_lossy(tlv);
    assert!(text.contains("TLSv1.3"), "{tlv:02x?}");
    assert!(text.contains("device-7"), "client CN: {tlv:02x?}");
    // The CONNECT: new client id and username, every other byte as sent.
    let want = {
        let original = &sent[..sent.len() - 2];
        let p =
            mqttlb::mqtt::rewrite_connect(original, 1 << 16, "0A1B2C3D", None).expect("rewrite");
        let mut p =
            mqttlb::mqtt::add_username(&p, 1 << 16, "device7@example.com").expect("username");
        p.extend_from_slice(&[0xc0, 0]);
        p
    };
    let mut got = vec![0u8; want.len()];
    server.read_exact(&mut got).await.expect("CONNECT bytes");
    assert_eq!(got, want);
    let mqttlb::mqtt::Decode::Connect(c) = mqttlb::mqtt::decode_connect(&got, 1 << 16) else {
        panic!("the rewritten CONNECT does not decode");
    };
    assert_eq!(
        (c.client_id, c.username),
        ("0A1B2C3D", Some("device7@example.com"))
    );
    // The properties are the bytes sent (they follow the keep-alive).
    assert_eq!(
        &got[12..12 + 1 + sent[12] as usize],
        &sent[12..12 + 1 + sent[12] as usize]
    );
    // Both ways after the hand-off.
    server
        .write_all(&[0x20, 3, 0, 0, 0])
        .await
        .expect("CONNACK");
    let mut connack = [0u8; 5];
    client.read_exact(&mut connack).await.expect("CONNACK");
    assert_eq!(connack, [0x20, 3, 0, 0, 0]);
    // `ctl conns` lists the TLS connection with the client id the server got.
    let conns = lb.ctl("conns");
    let row = conns["conns"]
        .as_array()
        .expect("conns")
        .iter()
        .find(|r| r["plane"] == "tls")
        .unwrap_or_else(|| panic!("no TLS row: {conns}"))
        .clone();
    assert_eq!(row["client_id"], "0A1B2C3D", "{row}");
    assert_eq!(row["bytes_s2c"], 5, "{row}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stickiness_and_connect_validation_hold_over_tls() {
    if !privileged("tls") {
        return;
    }
    let pki = Pki::new();
    let nodes: Vec<Mosquitto> = (1..=3)
        .map(|i| {
            let m = Mosquitto::start();
            m.set_whoami(&format!("node{i}"));
            m
        })
        .collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let lb = start(&pki, "", "", "balance = \"client-id\"", &addrs);
    let mut first = Vec::new();
    for i in 0..30 {
        let s = pki.connect(lb.addr, None).await.expect("TLS");
        first.push(
            mqttc::which_node_on(s, &format!("tls-{i}"))
                .await
                .expect("session"),
        );
    }
    let used: std::collections::HashSet<&String> = first.iter().collect();
    assert_eq!(used.len(), 3, "{first:?}");
    for (i, node) in first.iter().enumerate() {
        let s = pki.connect(lb.addr, None).await.expect("TLS");
        let again = mqttc::which_node_on(s, &format!("tls-{i}"))
            .await
            .expect("session");
        assert_eq!(&again, node, "tls-{i}");
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = connections(&lb);
    // Invalid first packets over TLS: closed, counted, no server contacted.
    for bad in [vec![0xc0, 0], vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x01]] {
        let mut s = pki.connect(lb.addr, None).await.expect("TLS");
        s.write_all(&bad).await.expect("write");
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0, "no reply to an invalid first packet");
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(lb.stat("rejected_invalid_connect"), 2);
    assert_eq!(connections(&lb), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_new_tls_settings_to_new_handshakes_only() {
    if !privileged("tls") {
        return;
    }
    let pki = Pki::new();
    let broker = Mosquitto::start();
    let lb = start(&pki, "", "", "", &[broker.addr]);
    let s = pki
        .connect_version(lb.addr, &rustls::version::TLS12)
        .await
        .expect("TLS 1.2 before the reload");
    mqttc::session_on(s, "before", true).await.expect("session");
    let held = pki.connect(lb.addr, None).await.expect("TLS");
    let mut held = mqttc::session_on(held, "held", true)
        .await
        .expect("session");
    let text = tls_text(
        &lb.instance,
        lb.addr.port(),
        &pki,
        "min_version = \"1.3\"",
        "",
        "",
        &[broker.addr],
    );
    lb.reload(&text);
    assert!(
        pki.connect_version(lb.addr, &rustls::version::TLS12)
            .await
            .is_err(),
        "TLS 1.2 still accepted after the reload"
    );
    let s = pki
        .connect_version(lb.addr, &rustls::version::TLS13)
        .await
        .expect("TLS 1.3");
    mqttc::session_on(s, "after-1.3", true)
        .await
        .expect("session");
    mqttc::ping(&mut held)
        .await
        .expect("the established session keeps working");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_cut_at_handshake_timeout_without_blocking_others() {
    if !privileged("tls") {
        return;
    }
    let pki = Pki::new();
    let broker = Mosquitto::start();
    // One handshake at a time: the silent clients must not hold up the good one
    // beyond their own timeout.
    let lb = start(
        &pki,
        "handshake_timeout = \"300ms\"\nmax_handshakes = 1",
        "",
        "",
        &[broker.addr],
    );
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(lb.addr).await.expect("connect"));
    }
    let started = std::time::Instant::now();
    let s = pki
        .connect(lb.addr, None)
        .await
        .unwrap_or_else(|e| panic!("TLS after the silent ones: {e}: {}", lb.log()));
    mqttc::session_on(s, "patient", true)
        .await
        .unwrap_or_else(|e| panic!("session: {e}: {}", lb.log()));
    eprintln!(
        "a handshake queued behind 3 silent clients took {:?}",
        started.elapsed()
    );
    for mut s in silent {
        assert!(closed_within(&mut s, Duration::from_secs(3)).await);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(lb.stat("tls_handshake_timeouts"), 3);
}
