//! WebSocket frames (RFC 6455 5): client frames parsed before the CONNECT (bounded,
//! parsed once each) and decoded as a stream after it, and the frames mqttlb writes.

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
