//! Where MQTT packets end in a byte stream, tracked cheaply as the bytes go by: what
//! evacuation needs to write a DISCONNECT between two of the server's packets rather
//! than inside one. Only fixed headers are read; a body is skipped by its length.
//!
//! The state is one `u64` with the layout the splice program uses for the same job
//! (`lb_sock.mqtt` in `lb-ebpf/src/lb_structs.h`), so a connection promoted to the
//! splice carries its position into the kernel: bits 0-31 the bytes left of the
//! current packet's body, bits 32-35 the fixed-header bytes seen of a header in
//! progress (0: none), bits 36-63 the remaining length decoded so far.

/// Fixed header of at most 5 bytes: the type byte and up to 4 length bytes.
const MAX_HEADER: u64 = 5;

/// A position in an MQTT byte stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Boundary(u64);

impl Boundary {
    /// At the start of a stream (a boundary).
    pub fn new() -> Self {
        Self(0)
    }

    /// The packed state (see the module doc).
    pub fn raw(self) -> u64 {
        self.0
    }

    /// The position whose packed state is `raw`.
    pub fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    fn left(self) -> u64 {
        self.0 & 0xffff_ffff
    }
    fn header(self) -> u64 {
        (self.0 >> 32) & 0xf
    }
    fn length(self) -> u64 {
        self.0 >> 36
    }
    fn set(&mut self, left: u64, header: u64, length: u64) {
        self.0 = left | (header << 32) | (length << 36);
    }

    /// Whether the stream is between two packets.
    pub fn at_boundary(self) -> bool {
        self.0 == 0
    }

    /// Whether the stream broke the MQTT framing (a remaining length over 4 bytes):
    /// no boundary can be found in it any more.
    pub fn broken(self) -> bool {
        self.header() > MAX_HEADER
    }

    /// Follows `bytes` through the stream; returns how many of them lead to the first
    /// boundary reached on the way (`Some(0)` when already at one), `None` when the
    /// chunk ends inside a packet. Either way the position is moved past the whole
    /// chunk.
    pub fn advance(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut first = self.at_boundary().then_some(0);
        let mut pos = 0usize;
        while pos < bytes.len() && !self.broken() {
            let left = self.left();
            if left > 0 {
                let take = left.min((bytes.len() - pos) as u64);
                pos += take as usize;
                self.set(left - take, 0, 0);
            } else {
                self.step_header(bytes[pos]);
                pos += 1;
            }
            if first.is_none() && self.at_boundary() {
                first = Some(pos);
            }
        }
        first
    }

    /// One fixed-header byte.
    fn step_header(&mut self, byte: u8) {
        let (header, length) = (self.header(), self.length());
        if header == 0 {
            // The type byte.
            self.set(0, 1, 0);
            return;
        }
        let length = length | (u64::from(byte & 0x7f) << (7 * (header - 1)));
        if byte & 0x80 == 0 {
            // Last length byte: the body follows (none for a 0-length packet).
            self.set(length, 0, 0);
        } else if header + 1 == MAX_HEADER {
            // A fifth length byte: not MQTT.
            self.set(0, MAX_HEADER + 1, 0);
        } else {
            self.set(0, header + 1, length);
        }
    }
}
