//! What mqttlb sends as a client (the health check), and the field and packet
//! builders the test support library (`tests/src/packets.rs`) builds on.

use super::Version;

/// Appends a variable byte integer.
pub fn varint(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let mut b = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            b |= 0x80;
        }
        out.push(b);
        if v == 0 {
            break;
        }
    }
}

/// Appends a length-prefixed string or binary field.
pub fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).expect("MQTT fields are at most 65,535 bytes");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A packet: first byte, remaining length, body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(body.len() + 5);
    p.push(first);
    varint(&mut p, body.len());
    p.extend_from_slice(body);
    p
}

/// CONNECT with a client id, keep-alive and clean start (clean session in 3.x)
/// when `clean` (3.1, 3.1.1 or 5.0; no properties, no will, no credentials).
pub fn connect(version: Version, client_id: &str, keep_alive: u16, clean: bool) -> Vec<u8> {
    let level = match version {
        Version::V31 => 3,
        Version::V311 => 4,
        Version::V5 => 5,
    };
    let mut body = Vec::with_capacity(16 + client_id.len());
    field(
        &mut body,
        if version == Version::V31 {
            b"MQIsdp"
        } else {
            b"MQTT"
        },
    );
    body.push(level);
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if version == Version::V5 {
        body.push(0);
    }
    field(&mut body, client_id.as_bytes());
    packet(0x10, &body)
}

/// DISCONNECT (normal).
pub fn disconnect() -> Vec<u8> {
    vec![0xe0, 0x00]
}

/// MQTT 5 reason code "Use another server" (DISCONNECT, CONNACK).
pub const USE_ANOTHER_SERVER: u8 = 0x9c;

/// MQTT 5 DISCONNECT from the server side with `reason`, and a Server Reference
/// property (0x1C) when `server_reference` is given.
pub fn disconnect_v5(reason: u8, server_reference: Option<&str>) -> Vec<u8> {
    let mut props = Vec::new();
    if let Some(r) = server_reference {
        props.push(0x1c);
        field(&mut props, r.as_bytes());
    }
    let mut body = vec![reason];
    varint(&mut body, props.len());
    body.extend_from_slice(&props);
    packet(0xe0, &body)
}
