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

/// Most client frames accepted before the CONNECT is complete: a client sends its
/// CONNECT in one frame, or a few; anything past this (a flood of empty pings, say) is
/// closed rather than parsed on.
pub const MAX_FRAMES_BEFORE_CONNECT: u32 = 64;

/// Why client frames are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// RFC 6455 5.1: a client must mask every frame.
    #[error("unmasked client frame")]
    Unmasked,
    /// Text frames, close frames before the CONNECT, reserved bits or opcodes, control
    /// frames that are fragmented or longer than 125 bytes.
    #[error("not a binary MQTT frame")]
    NotBinary,
    /// A frame (or the CONNECT's frames together) longer than the listener allows.
    #[error("frame too large")]
    TooLarge,
    /// More than [`MAX_FRAMES_BEFORE_CONNECT`] frames without a complete CONNECT.
    #[error("too many frames before the CONNECT")]
    TooMany,
}

impl FrameError {
    /// Whether the client passed a size or count cap (rather than broke the protocol).
    pub fn is_oversize(self) -> bool {
        matches!(self, Self::TooLarge | Self::TooMany)
    }
}

/// A frame's opcode (RFC 6455 5.2); the reserved ones are refused at the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xa,
}

impl Opcode {
    /// The opcode of the low four bits of a frame's first byte.
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xa => Self::Pong,
            _ => return None,
        })
    }

    /// Whether it carries data (MQTT bytes): binary frames and their continuations.
    fn is_data(self) -> bool {
        matches!(self, Self::Continuation | Self::Binary)
    }
}

/// A close frame's status code (RFC 6455 7.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum CloseCode {
    /// 1000: the server closed.
    Normal = 1000,
    /// 1002: the client broke the protocol (an invalid CONNECT or frame).
    ProtocolError = 1002,
    /// 1008: the connection cannot be accepted as it is (a CONNECT rewrite failed).
    PolicyViolation = 1008,
    /// 1011: the server failed (refused the forwarded upgrade).
    InternalError = 1011,
    /// 1013: try again later (no server available).
    TryAgainLater = 1013,
}

/// One complete client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Opcode.
    pub opcode: Opcode,
    /// Unmasked payload.
    pub payload: Vec<u8>,
    /// Bytes the frame took in the buffer.
    pub len: usize,
}

/// The complete client frame at the start of `buf`, if there is one. Frames must be
/// masked (RFC 6455 5.1), without reserved bits, with at most `max` payload bytes.
pub fn next_client_frame(buf: &[u8], max: usize) -> Result<Option<Frame>, FrameError> {
    // The length is checked at the header: a frame announcing more than `max` is
    // refused before its bytes are waited for.
    let Some((opcode, len, header)) = frame_header(buf)? else {
        return Ok(None);
    };
    if len > max as u64 {
        return Err(FrameError::TooLarge);
    }
    let total = header + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let mask = &buf[header - 4..header];
    let payload = buf[header..total]
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    Ok(Some(Frame {
        opcode,
        payload,
        len: total,
    }))
}

/// The client frames before the CONNECT, parsed as they arrive: each complete frame is
/// parsed once (a reader that re-parsed the whole buffer on every read spent a core on
/// a ping flood), binary and continuation payloads are joined, pings and pongs are
/// skipped, and both the payload (`max` bytes, plus slack for what follows the CONNECT
/// in the same frame) and the number of frames are capped. The raw bytes stay with the
/// caller, to be forwarded unchanged.
#[derive(Debug, Default)]
pub struct PreConnectFrames {
    /// Bytes of the caller's buffer taken by complete frames.
    parsed: usize,
    /// Their unmasked data payload.
    payload: Vec<u8>,
    /// How many complete frames.
    frames: u32,
}

impl PreConnectFrames {
    /// Parses the complete frames of `buf` past those already parsed (`buf` only ever
    /// grows at its end) and returns the payload of every complete frame so far.
    pub fn feed(&mut self, buf: &[u8], max: usize) -> Result<&[u8], FrameError> {
        let cap = max + 16;
        while let Some(f) = next_client_frame(&buf[self.parsed..], cap)? {
            self.frames += 1;
            if self.frames > MAX_FRAMES_BEFORE_CONNECT {
                return Err(FrameError::TooMany);
            }
            match f.opcode {
                o if o.is_data() => {
                    self.payload.extend_from_slice(&f.payload);
                    if self.payload.len() > cap {
                        return Err(FrameError::TooLarge);
                    }
                }
                Opcode::Ping | Opcode::Pong => {}
                _ => return Err(FrameError::NotBinary),
            }
            self.parsed += f.len;
        }
        Ok(&self.payload)
    }
}

/// The unmasked payload of the complete client frames at the start of `buf` (binary
/// and continuation frames; pings and pongs are skipped), at most `max` bytes of it,
/// and how many bytes those frames took.
pub fn client_frames(buf: &[u8], max: usize) -> Result<(Vec<u8>, usize), FrameError> {
    let mut frames = PreConnectFrames::default();
    frames.feed(buf, max)?;
    Ok((frames.payload, frames.parsed))
}

/// [`client_frames`] without the length.
pub fn client_payload(buf: &[u8], max: usize) -> Result<Vec<u8>, FrameError> {
    client_frames(buf, max).map(|(p, _)| p)
}

/// A control frame from the client (close 8, ping 9, pong 10), whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    /// Opcode.
    pub opcode: Opcode,
    /// Unmasked payload (at most 125 bytes).
    pub payload: Vec<u8>,
}

/// Client frames after the CONNECT on a WebSocket that mqttlb terminates, decoded as
/// bytes arrive: data payloads are unmasked and handed on at once, so however long a
/// frame is, no more of it than one read sits in memory; control frames (at most 125
/// bytes and never fragmented, RFC 6455 5.5) are returned whole. A data frame longer
/// than `max` is refused at its header.
#[derive(Debug)]
pub struct FrameStream {
    max: u64,
    /// Payload bytes left in the current data frame, its mask, and bytes of it done.
    data: Option<(u64, [u8; 4], u64)>,
}

impl FrameStream {
    /// A decoder refusing data frames longer than `max` bytes.
    pub fn new(max: u64) -> Self {
        Self { max, data: None }
    }

    /// Decodes from the start of `buf`: data payload is appended to `out`; stops after
    /// one control frame (returned) or where a header is incomplete. Returns the bytes
    /// of `buf` consumed.
    pub fn decode(
        &mut self,
        buf: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(usize, Option<Control>), FrameError> {
        let mut at = 0;
        loop {
            if let Some((left, mask, done)) = &mut self.data {
                let n = (*left).min((buf.len() - at) as u64) as usize;
                out.extend(
                    buf[at..at + n]
                        .iter()
                        .enumerate()
                        .map(|(i, b)| b ^ mask[((*done as usize) + i) % 4]),
                );
                at += n;
                *left -= n as u64;
                *done += n as u64;
                if *left > 0 {
                    return Ok((at, None));
                }
                self.data = None;
            }
            let Some((opcode, len, header)) = frame_header(&buf[at..])? else {
                return Ok((at, None));
            };
            match opcode {
                o if o.is_data() => {
                    if len > self.max {
                        return Err(FrameError::TooLarge);
                    }
                    let mut mask = [0u8; 4];
                    mask.copy_from_slice(&buf[at + header - 4..at + header]);
                    at += header;
                    self.data = Some((len, mask, 0));
                }
                Opcode::Close | Opcode::Ping | Opcode::Pong => {
                    // Control frames: FIN set, at most 125 bytes.
                    if buf[at] & 0x80 == 0 || len > 125 {
                        return Err(FrameError::NotBinary);
                    }
                    let Some(f) = next_client_frame(&buf[at..], 125)? else {
                        return Ok((at, None));
                    };
                    at += f.len;
                    let control = Control {
                        opcode: f.opcode,
                        payload: f.payload,
                    };
                    return Ok((at, Some(control)));
                }
                _ => return Err(FrameError::NotBinary),
            }
        }
    }
}

/// The opcode, payload length and header length (with the mask) of the client frame
/// at the start of `buf`, once its header is complete. Checks reserved bits and mask.
fn frame_header(buf: &[u8]) -> Result<Option<(Opcode, u64, usize)>, FrameError> {
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
    let (len, ext) = match b1 & 0x7f {
        126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 2),
        127 if buf.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n), 8)
        }
        126 | 127 => return Ok(None),
        n => (u64::from(n), 0),
    };
    let header = 2 + ext + 4;
    if buf.len() < header {
        return Ok(None);
    }
    let opcode = Opcode::from_bits(b0 & 0x0f).ok_or(FrameError::NotBinary)?;
    Ok(Some((opcode, len, header)))
}

/// A server-to-client control frame (close 8, pong 10) with `payload`.
pub fn control_frame(opcode: Opcode, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode as u8, payload.len().min(125) as u8];
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

/// A close frame with a status code.
pub fn close_frame(code: CloseCode) -> Vec<u8> {
    control_frame(Opcode::Close, &(code as u16).to_be_bytes())
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
            Err(FrameError::TooLarge)
        );
    }

    #[test]
    fn a_ping_flood_before_the_connect_is_cut_at_the_frame_cap() {
        let ping = [0x89, 0x80, 0, 0, 0, 0];
        let mut buf = Vec::new();
        let mut frames = PreConnectFrames::default();
        let mut result = Ok(());
        for _ in 0..=MAX_FRAMES_BEFORE_CONNECT {
            buf.extend_from_slice(&ping);
            result = frames.feed(&buf, 1024).map(drop);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(FrameError::TooMany));
        assert!(FrameError::TooMany.is_oversize());
        // Fed one byte at a time, the same frames give the same payload as one parse.
        let data: Vec<u8> = (0..200u16).map(|i| i as u8).collect();
        let mut all = masked(0x02, &data[..90]);
        all.extend(masked(0x89, b"p"));
        all.extend(masked(0x80, &data[90..]));
        let mut frames = PreConnectFrames::default();
        for cut in 1..=all.len() {
            let got = frames.feed(&all[..cut], 1024).expect("valid").to_vec();
            assert!(data.starts_with(&got));
        }
        assert_eq!(frames.feed(&all, 1024).expect("valid"), &data[..]);
    }

    /// Decodes `input` split at every `step` bytes; returns the data and the controls.
    fn stream(input: &[u8], step: usize, max: u64) -> Result<(Vec<u8>, Vec<Control>), FrameError> {
        let mut dec = FrameStream::new(max);
        let (mut buf, mut out, mut controls) = (Vec::new(), Vec::new(), Vec::new());
        for chunk in input.chunks(step) {
            buf.extend_from_slice(chunk);
            loop {
                let (used, control) = dec.decode(&buf, &mut out)?;
                buf.drain(..used);
                // What waits in the buffer is never more than a header or a control frame.
                assert!(buf.len() <= 14 + 125 + step, "{}", buf.len());
                match control {
                    Some(c) => controls.push(c),
                    None => break,
                }
            }
        }
        Ok((out, controls))
    }

    #[test]
    fn frames_after_the_connect_stream_through() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let mut input = masked(0x02, &data[..60_000]);
        input.extend(masked(0x89, b"ping!"));
        input.extend(masked(0x80, &data[60_000..]));
        input.extend(masked(0x88, &1000u16.to_be_bytes()));
        for step in [1, 3, 1000, input.len()] {
            let (out, controls) = stream(&input, step, 1 << 20).expect("valid");
            assert!(out == data, "step {step}");
            assert_eq!(
                controls,
                [
                    Control {
                        opcode: Opcode::Ping,
                        payload: b"ping!".to_vec()
                    },
                    Control {
                        opcode: Opcode::Close,
                        payload: vec![3, 0xe8]
                    }
                ]
            );
        }
        // A frame over the cap is refused at its header, before its payload.
        let big = masked(0x82, &data[..60_000]);
        assert_eq!(stream(&big[..8], 8, 50_000), Err(FrameError::TooLarge));
        let mut huge = vec![0x82, 0x80 | 127];
        huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
        huge.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(stream(&huge, 1, 1 << 20), Err(FrameError::TooLarge));
        assert_eq!(
            stream(&masked(0x81, b"text"), 2, 1 << 20),
            Err(FrameError::NotBinary)
        );
        let mut unmasked = masked(0x82, b"x");
        unmasked[1] &= 0x7f;
        assert_eq!(stream(&unmasked, 1, 1 << 20), Err(FrameError::Unmasked));
        // A fragmented ping is against RFC 6455 5.5.
        assert_eq!(
            stream(&masked(0x09, b"p"), 9, 1 << 20),
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
            assert_eq!(
                (frame.opcode, frame.payload, frame.len),
                (Opcode::Binary, data, f.len())
            );
        }
        assert_eq!(&binary_frame(&[0; 200])[..4], &[0x82, 126, 0, 200]);
    }
}
