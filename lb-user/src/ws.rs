//! MQTT over WebSocket (`ws` and `wss` listeners): the HTTP/1.1 upgrade and the client
//! frames that carry the CONNECT. No I/O here.
//!
//! A client sends its CONNECT only after the `101 Switching Protocols`, and the server
//! is chosen by that CONNECT, so mqttlb answers the upgrade itself (the same
//! `Sec-WebSocket-Accept` and subprotocol the server will answer), reads the frames
//! until they hold a complete CONNECT (masked binary frames, possibly fragmented, the
//! packet possibly split across frames: MQTT-6.0.0-2), validates it, connects to the
//! server's WebSocket address, forwards the client's request (with `X-Forwarded-For`
//! and `X-Real-IP`), checks the server's `101` against its own, and forwards the frames
//! unchanged. For a server without a WebSocket address, mqttlb terminates the
//! WebSocket itself and speaks plain MQTT to the server
//! (`dataplane::stream::ws_terminate`).

use std::net::IpAddr;

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// Largest upgrade request accepted.
pub const MAX_REQUEST: usize = 8 * 1024;

/// The upgrade request of a client, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// Length of the request head (through the blank line).
    pub len: usize,
    /// `Sec-WebSocket-Key`.
    pub key: String,
    /// The subprotocol chosen: `mqtt` when offered, else `mqttv3.1`.
    pub protocol: &'static str,
}

/// What the start of a client stream holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// More bytes are needed.
    Incomplete,
    /// A proper upgrade.
    Upgrade(Upgrade),
    /// Not one: answer with this status and reason, then close.
    Refuse(u16, &'static str),
}

fn header<'a>(headers: &'a [httparse::Header<'_>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
}

fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Parses the upgrade request at the start of `buf` for `path`.
pub fn parse_request(buf: &[u8], path: &str) -> Request {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => return Request::Incomplete,
        Ok(httparse::Status::Partial) => {
            return Request::Refuse(431, "Request Header Fields Too Large");
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Request::Refuse(431, "Request Header Fields Too Large");
        }
        Err(_) => return Request::Refuse(400, "Bad Request"),
    };
    if req.method != Some("GET") {
        return Request::Refuse(405, "Method Not Allowed");
    }
    if req.version != Some(1) {
        return Request::Refuse(505, "HTTP Version Not Supported");
    }
    let target = req.path.unwrap_or("");
    if target.split('?').next() != Some(path) {
        return Request::Refuse(404, "Not Found");
    }
    let h = req.headers;
    if !has_token(header(h, "upgrade"), "websocket")
        || !has_token(header(h, "connection"), "upgrade")
    {
        return Request::Refuse(426, "Upgrade Required");
    }
    if header(h, "sec-websocket-version").map(str::trim) != Some("13") {
        return Request::Refuse(426, "Upgrade Required");
    }
    let Some(key) = header(h, "sec-websocket-key").map(str::trim) else {
        return Request::Refuse(400, "Bad Request");
    };
    if base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_or(true, |k| k.len() != 16)
    {
        return Request::Refuse(400, "Bad Request");
    }
    let offered = header(h, "sec-websocket-protocol");
    let protocol = if has_token(offered, "mqtt") {
        "mqtt"
    } else if has_token(offered, "mqttv3.1") {
        "mqttv3.1"
    } else {
        return Request::Refuse(400, "Bad Request");
    };
    Request::Upgrade(Upgrade {
        len,
        key: key.to_owned(),
        protocol,
    })
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 section 4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// The `101` mqttlb answers a proper upgrade with.
pub fn switching_protocols(u: &Upgrade) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
        accept_key(&u.key),
        u.protocol
    )
    .into_bytes()
}

/// An error response that closes the connection.
pub fn error_response(status: u16, reason: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reason}\n",
        reason.len() + 1
    )
    .into_bytes()
}

/// The client's request head as sent to the server: every header kept, the client's
/// address appended to `X-Forwarded-For` (or added) and `X-Real-IP` set.
pub fn forward_request(head: &[u8], client: IpAddr) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::with_capacity(head.len() + 64);
    let mut forwarded = None;
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded = Some(line.split_once(':').map_or("", |x| x.1).trim().to_owned());
        } else if !name.eq_ignore_ascii_case("x-real-ip") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    let chain = match forwarded {
        Some(f) if !f.is_empty() => format!("{f}, {client}"),
        _ => client.to_string(),
    };
    out.push_str(&format!(
        "X-Forwarded-For: {chain}\r\nX-Real-IP: {client}\r\n\r\n"
    ));
    out.into_bytes()
}

/// What the start of a server's answer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerAnswer {
    /// More bytes are needed.
    Incomplete,
    /// A `101` matching the client's key and subprotocol; its head length.
    Switched(usize),
    /// Anything else.
    Refused(String),
}

/// Checks the server's answer to the forwarded upgrade.
pub fn parse_answer(buf: &[u8], u: &Upgrade) -> ServerAnswer {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => {
            return ServerAnswer::Incomplete;
        }
        _ => return ServerAnswer::Refused("not an HTTP response".into()),
    };
    if resp.code != Some(101) {
        return ServerAnswer::Refused(format!("status {}", resp.code.unwrap_or(0)));
    }
    if header(resp.headers, "sec-websocket-accept").map(str::trim) != Some(&accept_key(&u.key)) {
        return ServerAnswer::Refused("wrong Sec-WebSocket-Accept".into());
    }
    if header(resp.headers, "sec-websocket-protocol").map(str::trim) != Some(u.protocol) {
        return ServerAnswer::Refused("another subprotocol".into());
    }
    ServerAnswer::Switched(len)
}

/// Why client frames are refused before the CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// RFC 6455 5.1: a client must mask every frame.
    #[error("unmasked client frame")]
    Unmasked,
    /// Text frames, close frames, reserved bits or opcodes, or a frame too large.
    #[error("not a binary MQTT frame")]
    NotBinary,
}

/// One complete client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Opcode (0 continuation, 1 text, 2 binary, 8 close, 9 ping, 10 pong).
    pub opcode: u8,
    /// Unmasked payload.
    pub payload: Vec<u8>,
    /// Bytes the frame took in the buffer.
    pub len: usize,
}

/// The complete client frame at the start of `buf`, if there is one. Frames must be
/// masked (RFC 6455 5.1), without reserved bits, with at most `max` payload bytes.
pub fn next_client_frame(buf: &[u8], max: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(FrameError::NotBinary);
    }
    if b1 & 0x80 == 0 {
        return Err(FrameError::Unmasked);
    }
    let (len, header) = match b1 & 0x7f {
        126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n), 10)
        }
        126 | 127 => return Ok(None),
        n => (u64::from(n), 2),
    };
    if len > max as u64 {
        return Err(FrameError::NotBinary);
    }
    let total = header + 4 + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let mask = &buf[header..header + 4];
    let payload = buf[header + 4..total]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    Ok(Some(Frame {
        opcode: b0 & 0x0f,
        payload,
        len: total,
    }))
}

/// The unmasked payload of the complete client frames at the start of `buf` (binary
/// and continuation frames; pings and pongs are skipped), at most `max` bytes of it,
/// and how many bytes those frames took.
pub fn client_frames(buf: &[u8], max: usize) -> Result<(Vec<u8>, usize), FrameError> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(f) = next_client_frame(&buf[at..], max + 16)? {
        match f.opcode {
            0x0 | 0x2 => {
                out.extend_from_slice(&f.payload);
                if out.len() > max + 16 {
                    return Err(FrameError::NotBinary);
                }
            }
            0x9 | 0xa => {}
            _ => return Err(FrameError::NotBinary),
        }
        at += f.len;
    }
    Ok((out, at))
}

/// [`client_frames`] without the length.
pub fn client_payload(buf: &[u8], max: usize) -> Result<Vec<u8>, FrameError> {
    client_frames(buf, max).map(|(p, _)| p)
}

/// A server-to-client control frame (close 8, pong 10) with `payload`.
pub fn control_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode, payload.len().min(125) as u8];
    f.extend_from_slice(&payload[..payload.len().min(125)]);
    f
}

/// A server-to-client (unmasked) binary frame.
pub fn binary_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x82];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= 0xffff => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// A client-to-server binary frame masked with `mask` (what mqttlb sends in a client's
/// name after rewriting its CONNECT).
pub fn masked_binary_frame(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = binary_frame(payload);
    let at = f.len() - payload.len();
    f[1] |= 0x80;
    let mut out = f[..at].to_vec();
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A close frame with a status code (1002: protocol error, 1011: server error).
pub fn close_frame(code: u16) -> Vec<u8> {
    control_frame(0x8, &code.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &str = "GET /mqtt HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqttv3.1, mqtt\r\n\r\n";

    #[test]
    fn rfc6455_accept_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn upgrade_requests() {
        let Request::Upgrade(u) = parse_request(REQ.as_bytes(), "/mqtt") else {
            panic!("not an upgrade");
        };
        assert_eq!((u.len, u.protocol), (REQ.len(), "mqtt"));
        for cut in 0..REQ.len() {
            assert_eq!(
                parse_request(&REQ.as_bytes()[..cut], "/mqtt"),
                Request::Incomplete
            );
        }
        let v31 = REQ.replace("mqttv3.1, mqtt", "mqttv3.1");
        assert!(
            matches!(parse_request(v31.as_bytes(), "/mqtt"), Request::Upgrade(u) if u.protocol == "mqttv3.1")
        );
        let cases = [
            (REQ.replace("/mqtt ", "/other "), 404),
            (REQ.replace("GET", "POST"), 405),
            (REQ.replace("Upgrade: websocket\r\n", ""), 426),
            (REQ.replace("Version: 13", "Version: 8"), 426),
            (REQ.replace("mqttv3.1, mqtt", "chat"), 400),
            (REQ.replace("dGhlIHNhbXBsZSBub25jZQ==", "short"), 400),
            ("garbage\r\n\r\n".to_owned(), 400),
            ("GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(), 426),
        ];
        for (req, status) in cases {
            assert!(
                matches!(parse_request(req.as_bytes(), "/mqtt"), Request::Refuse(s, _) if s == status),
                "{req:?}"
            );
        }
        assert!(matches!(
            parse_request(&vec![b'a'; MAX_REQUEST + 1], "/mqtt"),
            Request::Refuse(400 | 431, _)
        ));
    }

    #[test]
    fn forwarded_request_names_the_client() {
        let ip: IpAddr = "10.1.2.3".parse().expect("ip");
        let out = String::from_utf8(forward_request(REQ.as_bytes(), ip)).expect("utf8");
        assert!(out.starts_with("GET /mqtt HTTP/1.1\r\nHost: example\r\n"));
        assert!(out.ends_with("X-Forwarded-For: 10.1.2.3\r\nX-Real-IP: 10.1.2.3\r\n\r\n"));
        let behind = REQ.replace(
            "Host: example\r\n",
            "Host: example\r\nX-Forwarded-For: 192.0.2.9\r\nX-Real-IP: 1.1.1.1\r\n",
        );
        let out = String::from_utf8(forward_request(behind.as_bytes(), ip)).expect("utf8");
        assert!(
            out.contains("X-Forwarded-For: 192.0.2.9, 10.1.2.3\r\n"),
            "{out}"
        );
        assert_eq!(out.matches("X-Real-IP").count(), 1);
        assert!(matches!(
            parse_request(out.as_bytes(), "/mqtt"),
            Request::Upgrade(_)
        ));
    }

    fn masked(opcode_fin: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![opcode_fin];
        if payload.len() < 126 {
            f.push(0x80 | payload.len() as u8);
        } else {
            f.push(0x80 | 126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    #[test]
    fn frames_are_unmasked_joined_and_checked() {
        let data: Vec<u8> = (0..300u16).map(|i| i as u8).collect();
        // A fragmented message (binary + continuation), a ping between, then another.
        let mut buf = masked(0x02, &data[..100]);
        buf.extend(masked(0x89, b"hi"));
        buf.extend(masked(0x80, &data[100..250]));
        buf.extend(masked(0x82, &data[250..]));
        assert_eq!(client_payload(&buf, 1024), Ok(data.clone()));
        // Every prefix yields a prefix of the data (whole frames only).
        for cut in 0..buf.len() {
            let got = client_payload(&buf[..cut], 1024).expect("prefix");
            assert!(data.starts_with(&got));
        }
        let mut unmasked = masked(0x82, b"x");
        unmasked[1] &= 0x7f;
        assert_eq!(client_payload(&unmasked, 1024), Err(FrameError::Unmasked));
        assert_eq!(
            client_payload(&masked(0x81, b"text"), 1024),
            Err(FrameError::NotBinary)
        );
        assert_eq!(
            client_payload(&masked(0x88, b""), 1024),
            Err(FrameError::NotBinary)
        );
        assert_eq!(
            client_payload(&masked(0xc2, b"x"), 1024),
            Err(FrameError::NotBinary)
        );
        assert_eq!(
            client_payload(&masked(0x82, &data), 100),
            Err(FrameError::NotBinary)
        );
    }

    #[test]
    fn server_answers() {
        let Request::Upgrade(u) = parse_request(REQ.as_bytes(), "/mqtt") else {
            panic!("not an upgrade");
        };
        let ok = switching_protocols(&u);
        assert_eq!(parse_answer(&ok, &u), ServerAnswer::Switched(ok.len()));
        assert_eq!(
            parse_answer(&ok[..ok.len() - 1], &u),
            ServerAnswer::Incomplete
        );
        let other = String::from_utf8(ok.clone())
            .expect("utf8")
            .replace("Protocol: mqtt", "Protocol: mqttv3.1");
        assert!(matches!(
            parse_answer(other.as_bytes(), &u),
            ServerAnswer::Refused(_)
        ));
        assert!(matches!(
            parse_answer(&error_response(404, "Not Found"), &u),
            ServerAnswer::Refused(_)
        ));
        assert_eq!(binary_frame(&[1, 2]), [0x82, 2, 1, 2]);
        for len in [0usize, 5, 125, 126, 300, 70_000] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let f = masked_binary_frame(&data, [9, 8, 7, 6]);
            let frame = next_client_frame(&f, 1 << 20)
                .expect("valid")
                .expect("complete");
            assert_eq!((frame.opcode, frame.payload, frame.len), (2, data, f.len()));
        }
        assert_eq!(&binary_frame(&[0; 200])[..4], &[0x82, 126, 0, 200]);
    }
}
