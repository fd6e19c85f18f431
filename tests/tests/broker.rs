//! Real broker, real clients: mosquitto_pub/mosquitto_sub through mqttlb exchange 1,000
//! QoS 1 messages with none lost, on both data planes; a CONNECT refused when no server
//! is up gets CONNACK 3; garbage never reaches the broker.

mod common;

use std::{
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn pubsub_1000(lb: &Daemon, topic: &str) {
    let port = lb.addr.port().to_string();
    let sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            topic,
            "-q",
            "1",
            "-C",
            "1000",
            "-W",
            "60",
            "-i",
            &format!("{topic}-sub"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect(
            "mosquitto_sub not found: apt-get install -y mosquitto-clients (cargo xtask test does)",
        );
    // Wait until the subscription is in place: a retained probe comes back to a sub.
    std::thread::sleep(Duration::from_millis(500));
    let mut publisher = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            topic,
            "-q",
            "1",
            "-l",
            "-i",
            &format!("{topic}-pub"),
        ])
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
    let out = sub.wait_with_output().expect("sub");
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let want: Vec<String> = (0..1000).map(|i| format!("message-{i}")).collect();
    assert_eq!(
        lines.len(),
        1000,
        "{}: got {} messages; log:\n{}",
        lb.plane,
        lines.len(),
        lb.log()
    );
    assert_eq!(
        lines, want,
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
        pubsub_1000(&lb, &format!("t/{plane}"));
    }
}

#[tokio::test]
async fn no_server_gets_connack_3_and_invalid_first_packets_reach_no_server() {
    // Nothing listens on this port: every connect fails.
    let dead: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let lb = Daemon::start("copy", &[dead]);
    let mut c = TcpStream::connect(lb.addr).await.expect("connect");
    c.write_all(&connect_packet("nobody")).await.expect("write");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut reply))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(
        reply,
        [0x20, 0x02, 0x00, 0x03],
        "MQTT 3.1.1: CONNACK return code 3"
    );

    // MQTT 5: reason code 0x88.
    let v5 = [
        0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x00, 0x00, 0x00,
    ];
    let mut c = TcpStream::connect(lb.addr).await.expect("connect");
    c.write_all(&v5).await.expect("write");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut reply))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(
        reply,
        [0x20, 0x03, 0x00, 0x88, 0x00],
        "MQTT 5: CONNACK reason 0x88"
    );

    // A PINGREQ first: closed, and the echo server never sees a connection.
    let echo = Echo::start().await;
    let lb = Daemon::start("copy", &[echo.addr]);
    let mut c = TcpStream::connect(lb.addr).await.expect("connect");
    c.write_all(&[0xc0, 0x00]).await.expect("write");
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(r.is_err() || rest.is_empty(), "nothing is sent back");
    assert_eq!(
        echo.accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no server was contacted"
    );
}
