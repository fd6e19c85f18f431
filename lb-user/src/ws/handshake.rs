//! The HTTP/1.1 upgrade: the client's request, mqttlb's answer, the request forwarded to
//! a server that speaks WebSocket itself and that server's answer.

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
