//! The MQTT packets test clients and the load generator send and a test server
//! answers, built on the project's own codec (`mqttlb::mqtt::encode`): the daemon
//! library keeps only what it sends itself (the health check's CONNECT and
//! DISCONNECT).

use mqttlb::mqtt::{
    Version,
    encode::{field, packet},
};

pub use mqttlb::mqtt::encode::{connect, disconnect};

/// A valid MQTT 3.1.1 CONNECT with this client id (clean session, keep-alive 60 s).
pub fn connect_packet(client_id: &str) -> Vec<u8> {
    connect(Version::V311, client_id, 60, true)
}

/// PUBLISH at QoS 0 (`packet_id` ignored) or QoS 1/2.
pub fn publish(version: Version, topic: &str, payload: &[u8], qos: u8, packet_id: u16) -> Vec<u8> {
    let mut body = Vec::with_capacity(topic.len() + payload.len() + 5);
    field(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&packet_id.to_be_bytes());
    }
    if version == Version::V5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

/// SUBSCRIBE to one topic filter.
pub fn subscribe(version: Version, packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    if version == Version::V5 {
        body.push(0);
    }
    field(&mut body, filter.as_bytes());
    body.push(qos);
    packet(0x82, &body)
}

/// PUBACK for a QoS 1 PUBLISH.
pub fn puback(packet_id: u16) -> Vec<u8> {
    packet(0x40, &packet_id.to_be_bytes())
}

/// CONNACK accepting a session (what a test server answers).
pub fn connack_accepted(version: Version) -> &'static [u8] {
    match version {
        Version::V31 | Version::V311 => &[0x20, 0x02, 0x00, 0x00],
        Version::V5 => &[0x20, 0x03, 0x00, 0x00, 0x00],
    }
}
