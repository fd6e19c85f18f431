//! MQTT codec for the first packet: a strict CONNECT decoder for MQTT 3.1, 3.1.1 and 5.0
//! (no I/O; borrows from the caller's buffer) and the CONNACK refusals.
//!
//! Decoding first *checks* that the fixed header is a CONNECT and that the whole packet
//! is buffered (cheap, answers [`Decode::Incomplete`]), then *parses* the body, which
//! must consume exactly the remaining length.

pub mod boundary;
pub mod encode;
#[cfg(test)]
mod tests;

/// Protocol versions, by CONNECT protocol level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1 (`MQIsdp`, level 3).
    V31,
    /// MQTT 3.1.1 (`MQTT`, level 4).
    V311,
    /// MQTT 5.0 (`MQTT`, level 5).
    V5,
}

/// Why a first packet was refused. Each reason is counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// The first packet is not a CONNECT (or its fixed-header flags are not 0).
    #[error("first packet is not a CONNECT")]
    NotConnect,
    /// The remaining length is longer than 4 bytes.
    #[error("malformed remaining length")]
    RemainingLength,
    /// The packet is larger than the listener's `max_connect_size`.
    #[error("CONNECT larger than max_connect_size")]
    TooLarge,
    /// Unknown protocol name or level.
    #[error("unsupported protocol name or level")]
    Protocol,
    /// Connect flags break a rule of the specification.
    #[error("invalid connect flags")]
    Flags,
    /// A string is not well-formed UTF-8 or contains U+0000.
    #[error("invalid UTF-8 string")]
    Utf8,
    /// An MQTT 5 property is unknown, misplaced, duplicated or out of range.
    #[error("invalid property")]
    Property,
    /// A field runs past the packet, or the packet has bytes after its last field.
    #[error("field lengths do not match the remaining length")]
    Length,
}

/// Result of decoding the start of a client's byte stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Decode<'a> {
    /// More bytes are needed to decide.
    Incomplete,
    /// A valid CONNECT; `Connect::len` bytes of the buffer belong to it.
    Connect(Connect<'a>),
    /// Not a valid CONNECT.
    Invalid(Invalid),
}

/// The fields of a CONNECT that balancing and logging use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect<'a> {
    /// Protocol version.
    pub version: Version,
    /// Clean session (3.x) / clean start (5.0).
    pub clean_start: bool,
    /// Keep alive, seconds.
    pub keep_alive: u16,
    /// Client identifier (may be empty).
    pub client_id: &'a str,
    /// Username, when the flag is set.
    pub username: Option<&'a str>,
    /// Whether a password is present (its value is never exposed or logged).
    pub has_password: bool,
    /// Total length of the packet (fixed header included).
    pub len: usize,
}

/// Decodes a CONNECT at the start of `buf`, refusing packets over `max_size` bytes.
pub fn decode_connect(buf: &[u8], max_size: usize) -> Decode<'_> {
    let Some(&first) = buf.first() else {
        return Decode::Incomplete;
    };
    if first != 0x10 {
        return Decode::Invalid(Invalid::NotConnect);
    }
    let (remaining, header_len) = match remaining_length(&buf[1..]) {
        Ok(Some(v)) => v,
        Ok(None) => return Decode::Incomplete,
        Err(e) => return Decode::Invalid(e),
    };
    let total = 1 + header_len + remaining;
    if total > max_size {
        return Decode::Invalid(Invalid::TooLarge);
    }
    if buf.len() < total {
        return Decode::Incomplete;
    }
    match parse_body(&buf[1 + header_len..total]) {
        Ok(mut c) => {
            c.len = total;
            Decode::Connect(c)
        }
        Err(e) => Decode::Invalid(e),
    }
}

/// Reads a variable byte integer: `Ok(None)` if more bytes are needed. It must use
/// the fewest bytes (MQTT-1.5.5-1): a last byte of 0 after others is refused, since
/// `[0x8f, 0x00]` and `[0x0f]` would otherwise be the same 15.
fn remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, Invalid> {
    let mut value = 0usize;
    for (i, &b) in buf.iter().enumerate().take(4) {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if b == 0 && i > 0 {
                return Err(Invalid::RemainingLength);
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= 4 {
        Err(Invalid::RemainingLength)
    } else {
        Ok(None)
    }
}

/// A cursor over a packet body; every read fails with [`Invalid::Length`] past the end.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Invalid> {
        if self.buf.len() < n {
            return Err(Invalid::Length);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Invalid> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Invalid> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, Invalid> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn binary(&mut self) -> Result<&'a [u8], Invalid> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
    fn string(&mut self) -> Result<&'a str, Invalid> {
        let b = self.binary()?;
        let s = std::str::from_utf8(b).map_err(|_| Invalid::Utf8)?;
        // MQTT-1.5.3-2: U+0000 must not appear in a UTF-8 string.
        if s.contains('\0') {
            return Err(Invalid::Utf8);
        }
        Ok(s)
    }
    fn varint(&mut self) -> Result<usize, Invalid> {
        match remaining_length(self.buf)? {
            Some((v, n)) => {
                self.buf = &self.buf[n..];
                Ok(v)
            }
            None => Err(Invalid::Length),
        }
    }
}

fn parse_body(body: &[u8]) -> Result<Connect<'_>, Invalid> {
    let mut r = Reader { buf: body };
    let name = r.binary()?;
    let level = r.u8()?;
    let version = match (name, level) {
        (b"MQIsdp", 3) => Version::V31,
        (b"MQTT", 4) => Version::V311,
        (b"MQTT", 5) => Version::V5,
        _ => return Err(Invalid::Protocol),
    };
    let flags = r.u8()?;
    let will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if flags & 0x01 != 0
        || will_qos == 3
        || (!will && (will_qos != 0 || will_retain))
        || (version != Version::V5 && has_password && !has_username)
    {
        return Err(Invalid::Flags);
    }
    let keep_alive = r.u16()?;
    if version == Version::V5 {
        properties(&mut r, &CONNECT_PROPERTIES)?;
    }
    let client_id = r.string()?;
    if will {
        if version == Version::V5 {
            properties(&mut r, &WILL_PROPERTIES)?;
        }
        r.string()?; // will topic
        r.binary()?; // will payload
    }
    let username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    if has_password {
        r.binary()?;
    }
    if !r.buf.is_empty() {
        return Err(Invalid::Length);
    }
    Ok(Connect {
        version,
        clean_start: flags & 0x02 != 0,
        keep_alive,
        client_id,
        username,
        has_password,
        len: 0,
    })
}

/// Value types of MQTT 5 properties.
#[derive(Clone, Copy)]
enum PropType {
    Byte01,
    U16NonZero,
    U16,
    U32,
    U32NonZero,
    Utf8,
    Binary,
    Pair,
}

/// Properties allowed in the CONNECT variable header: (id, type).
const CONNECT_PROPERTIES: [(u8, PropType); 9] = [
    (0x11, PropType::U32),        // session expiry interval
    (0x21, PropType::U16NonZero), // receive maximum
    (0x27, PropType::U32NonZero), // maximum packet size
    (0x22, PropType::U16),        // topic alias maximum
    (0x19, PropType::Byte01),     // request response information
    (0x17, PropType::Byte01),     // request problem information
    (0x26, PropType::Pair),       // user property
    (0x15, PropType::Utf8),       // authentication method
    (0x16, PropType::Binary),     // authentication data
];

/// Properties allowed among the will properties.
const WILL_PROPERTIES: [(u8, PropType); 7] = [
    (0x18, PropType::U32),    // will delay interval
    (0x01, PropType::Byte01), // payload format indicator
    (0x02, PropType::U32),    // message expiry interval
    (0x03, PropType::Utf8),   // content type
    (0x08, PropType::Utf8),   // response topic
    (0x09, PropType::Binary), // correlation data
    (0x26, PropType::Pair),   // user property
];

const USER_PROPERTY: u8 = 0x26;

fn properties(r: &mut Reader<'_>, allowed: &[(u8, PropType)]) -> Result<(), Invalid> {
    let len = r.varint()?;
    let mut p = Reader { buf: r.take(len)? };
    let mut seen = 0u64; // bit per property id (all ids are below 64)
    while !p.buf.is_empty() {
        let id = p.varint()?;
        let &(id, ty) = allowed
            .iter()
            .find(|(a, _)| usize::from(*a) == id)
            .ok_or(Invalid::Property)?;
        if id != USER_PROPERTY && seen & (1 << id) != 0 {
            return Err(Invalid::Property);
        }
        seen |= 1 << id;
        match ty {
            PropType::Byte01 if p.u8()? > 1 => return Err(Invalid::Property),
            PropType::U16NonZero if p.u16()? == 0 => return Err(Invalid::Property),
            PropType::U32NonZero if p.u32()? == 0 => return Err(Invalid::Property),
            PropType::Byte01 | PropType::U16NonZero | PropType::U32NonZero => {}
            PropType::U16 => {
                p.u16()?;
            }
            PropType::U32 => {
                p.u32()?;
            }
            PropType::Utf8 => {
                p.string()?;
            }
            PropType::Binary => {
                p.binary()?;
            }
            PropType::Pair => {
                p.string()?;
                p.string()?;
            }
        }
    }
    Ok(())
}

/// CONNACK return code of MQTT 3.x: server unavailable.
const V3_SERVER_UNAVAILABLE: u8 = 0x03;
/// CONNACK reason code of MQTT 5.0: Server unavailable.
const V5_SERVER_UNAVAILABLE: u8 = 0x88;

/// CONNACK refusing the connection because no server can take it: return code 3
/// (server unavailable) for MQTT 3.x, reason code 0x88 (Server unavailable) for 5.0.
pub fn connack_server_unavailable(version: Version) -> Vec<u8> {
    connack_refused(version, V5_SERVER_UNAVAILABLE)
}

/// MQTT 5 CONNACK reason: Quota exceeded.
pub const V5_QUOTA_EXCEEDED: u8 = 0x97;
/// MQTT 5 CONNACK reason: Connection rate exceeded.
pub const V5_CONNECTION_RATE_EXCEEDED: u8 = 0x9F;

/// A CONNACK refusing the session: MQTT 5 with reason code `v5_reason` (no
/// properties), 3.x with return code 3 (Server unavailable), which has no finer code.
pub fn connack_refused(version: Version, v5_reason: u8) -> Vec<u8> {
    match version {
        Version::V31 | Version::V311 => vec![0x20, 0x02, 0x00, V3_SERVER_UNAVAILABLE],
        Version::V5 => vec![0x20, 0x03, 0x00, v5_reason, 0x00],
    }
}

/// A server's answer to an MQTT 3.1.1 CONNECT (what the health check reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connack {
    /// Return code 0: the session is accepted.
    Accepted,
    /// Another return code (1 to 5: version, identifier, unavailable, credentials,
    /// not authorised).
    Refused(u8),
}

/// The MQTT 3.1.1 CONNACK that `packet` (its four bytes) is, or None when it is not
/// one.
pub fn decode_connack_v311(packet: [u8; 4]) -> Option<Connack> {
    match packet {
        [0x20, 0x02, _, 0] => Some(Connack::Accepted),
        [0x20, 0x02, _, code] => Some(Connack::Refused(code)),
        _ => None,
    }
}

/// Total length (fixed header included) of the packet at the start of `buf`, once its
/// fixed header is complete: `Ok(None)` if more bytes are needed to know.
pub fn packet_len(buf: &[u8]) -> Result<Option<usize>, Invalid> {
    let Some(rest) = buf.get(1..) else {
        return Ok(None);
    };
    Ok(remaining_length(rest)?.map(|(len, n)| 1 + n + len))
}

/// The CONNECT at the start of `packet`, which must be complete and valid.
fn complete_connect(packet: &[u8], max_size: usize) -> Result<Connect<'_>, Invalid> {
    match decode_connect(packet, max_size) {
        Decode::Connect(c) => Ok(c),
        Decode::Invalid(e) => Err(e),
        Decode::Incomplete => Err(Invalid::Length),
    }
}

/// A packet from its first byte and body, refused when over `max_size` bytes.
fn with_fixed_header(first: u8, body: &[u8], max_size: usize) -> Result<Vec<u8>, Invalid> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    encode::varint(&mut out, body.len());
    out.extend_from_slice(body);
    if out.len() > max_size {
        return Err(Invalid::TooLarge);
    }
    Ok(out)
}

/// Rewrites the client id of the CONNECT at the start of `packet`, and its username
/// when it has one and `username` is given, keeping every other byte (flags, will,
/// password, every MQTT 5 property) exactly as it was. For identities taken from TLS
/// certificates. Adding or removing a username is not supported (the username is left
/// as it is when the packet has none).
pub fn rewrite_connect(
    packet: &[u8],
    max_size: usize,
    client_id: &str,
    username: Option<&str>,
) -> Result<Vec<u8>, Invalid> {
    let c = complete_connect(packet, max_size)?;
    if [Some(client_id), username]
        .iter()
        .flatten()
        .any(|v| v.contains('\0'))
    {
        return Err(Invalid::Utf8);
    }
    // The decoded strings borrow from `packet`: their positions are the fields'.
    let field = |s: &str| {
        let start = s.as_ptr() as usize - packet.as_ptr() as usize;
        (start - 2, start + s.len())
    };
    let mut edits = vec![(field(c.client_id), client_id)];
    if let (Some(old), Some(new)) = (c.username, username) {
        edits.push((field(old), new));
    }
    let (body_len, _) = remaining_length(&packet[1..])?.ok_or(Invalid::Length)?;
    let body_start = c.len - body_len;
    let mut body = Vec::with_capacity(c.len + client_id.len() + username.map_or(0, str::len));
    let mut pos = body_start;
    for ((start, end), value) in edits {
        body.extend_from_slice(&packet[pos..start]);
        let len = u16::try_from(value.len()).map_err(|_| Invalid::Length)?;
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(value.as_bytes());
        pos = end;
    }
    body.extend_from_slice(&packet[pos..c.len]);
    with_fixed_header(packet[0], &body, max_size)
}

/// Adds a username to the CONNECT at the start of `packet`, which has none: sets the
/// username flag and appends the field (the username is the last field when there is
/// no password). Every other byte stays as it was. A CONNECT with a password but no
/// username (MQTT 5 only) is refused, as is one that already has a username.
pub fn add_username(packet: &[u8], max_size: usize, username: &str) -> Result<Vec<u8>, Invalid> {
    let c = complete_connect(packet, max_size)?;
    if c.username.is_some() || c.has_password {
        return Err(Invalid::Flags);
    }
    if username.contains('\0') {
        return Err(Invalid::Utf8);
    }
    let (body_len, _) = remaining_length(&packet[1..])?.ok_or(Invalid::Length)?;
    let body_start = c.len - body_len;
    // Protocol name (2-byte length + name), then the level, then the flags.
    let name_len = usize::from(u16::from_be_bytes([
        packet[body_start],
        packet[body_start + 1],
    ]));
    let flags_at = body_start + 2 + name_len + 1 - body_start;
    let mut body = packet[body_start..c.len].to_vec();
    body[flags_at] |= 0x80;
    let len = u16::try_from(username.len()).map_err(|_| Invalid::Length)?;
    body.extend_from_slice(&len.to_be_bytes());
    body.extend_from_slice(username.as_bytes());
    with_fixed_header(packet[0], &body, max_size)
}
