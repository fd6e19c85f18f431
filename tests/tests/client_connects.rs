//! CONNECT packets produced by real client libraries (rumqttc for MQTT 3.1.1 and 5,
//! paho-mqtt for MQTT 3.1, 3.1.1 and 5) decode to the fields they were given. Each client
//! connects to an in-test listener that captures its first packet.

use std::{process::Command, time::Duration};

use mqttlb::mqtt::{Decode, Version, decode_connect};
use tokio::{io::AsyncReadExt, net::TcpListener};

/// What a captured CONNECT must decode to.
struct Want {
    version: Version,
    client_id: &'static str,
    username: Option<&'static str>,
    keep_alive: u16,
}

/// Accepts one connection on `l` and returns its first packet's bytes once complete.
async fn capture(l: &TcpListener) -> Vec<u8> {
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(10), l.accept())
        .await
        .expect("the client connected")
        .expect("accept");
    let mut buf = Vec::new();
    loop {
        match decode_connect(&buf, 1 << 16) {
            Decode::Connect(c) => {
                buf.truncate(c.len);
                return buf;
            }
            Decode::Invalid(e) => panic!("client sent an invalid CONNECT ({e}): {buf:02x?}"),
            Decode::Incomplete => {}
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read_buf(&mut buf))
            .await
            .expect("CONNECT arrives")
            .expect("read");
        assert!(n > 0, "closed before a complete CONNECT: {buf:02x?}");
    }
}

fn check(name: &str, packet: &[u8], want: &Want) {
    let Decode::Connect(c) = decode_connect(packet, 1 << 16) else {
        panic!("{name}: does not decode: {packet:02x?}");
    };
    assert_eq!(c.version, want.version, "{name}: version");
    assert_eq!(c.client_id, want.client_id, "{name}: client id");
    assert_eq!(c.username, want.username, "{name}: username");
    assert_eq!(c.has_password, want.username.is_some(), "{name}: password");
    assert_eq!(c.keep_alive, want.keep_alive, "{name}: keep alive");
    assert!(c.clean_start, "{name}: clean start");
    assert_eq!(c.len, packet.len(), "{name}: length");
}

#[tokio::test]
async fn rumqttc_v4_and_v5_connects_decode() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();

    let mut o = rumqttc::MqttOptions::new("rumqttc-v4", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_credentials("device-user", "s3cret");
    o.set_last_will(rumqttc::LastWill::new(
        "devices/rumqttc-v4/status",
        "offline",
        rumqttc::QoS::AtLeastOnce,
        true,
    ));
    let (_client, mut events) = rumqttc::AsyncClient::new(o, 10);
    let poller = tokio::spawn(async move { events.poll().await.map(drop) });
    let p = capture(&l).await;
    poller.abort();
    check(
        "rumqttc v4",
        &p,
        &Want {
            version: Version::V311,
            client_id: "rumqttc-v4",
            username: Some("device-user"),
            keep_alive: 30,
        },
    );

    let mut o = rumqttc::v5::MqttOptions::new("rumqttc-v5", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(45));
    o.set_credentials("device-user", "s3cret");
    let (_client, mut events) = rumqttc::v5::AsyncClient::new(o, 10);
    let poller = tokio::spawn(async move { events.poll().await.map(drop) });
    let p = capture(&l).await;
    poller.abort();
    check(
        "rumqttc v5",
        &p,
        &Want {
            version: Version::V5,
            client_id: "rumqttc-v5",
            username: Some("device-user"),
            keep_alive: 45,
        },
    );
}

#[tokio::test]
async fn paho_mqtt_31_311_and_5_connects_decode() {
    for (protocol, version, client_id) in [
        ("MQTTv31", Version::V31, "paho-31"),
        ("MQTTv311", Version::V311, "paho-311"),
        ("MQTTv5", Version::V5, "paho-5"),
    ] {
        // A listener of its own: a client may reconnect while the next one runs.
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        // A will with MQTT 5 properties, credentials, keep alive 20.
        let script = format!(
            r#"
import time, paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
c = mqtt.Client(client_id="{client_id}", protocol=mqtt.{protocol})
c.username_pw_set("paho-user", "pw")
if mqtt.{protocol} == mqtt.MQTTv5:
    wp = Properties(PacketTypes.WILLMESSAGE)
    wp.ContentType = "text/plain"
    c.will_set("devices/{client_id}/status", "offline", qos=1, retain=True, properties=wp)
    cp = Properties(PacketTypes.CONNECT)
    cp.SessionExpiryInterval = 0
    c.connect("127.0.0.1", {port}, keepalive=20, clean_start=True, properties=cp)
else:
    c.will_set("devices/{client_id}/status", "offline", qos=1, retain=True)
    c.connect("127.0.0.1", {port}, keepalive=20)
c.loop_start()
time.sleep(1)
c.loop_stop()
"#
        );
        let child = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(&script)
            .spawn()
            .expect(
                "/usr/bin/python3 (apt-get install -y python3-paho-mqtt; cargo xtask test does)",
            );
        let p = capture(&l).await;
        let out = child.wait_with_output().expect("python");
        assert!(out.status.success(), "{protocol}: paho script failed");
        check(
            protocol,
            &p,
            &Want {
                version,
                client_id,
                username: Some("paho-user"),
                keep_alive: 20,
            },
        );
    }
}
