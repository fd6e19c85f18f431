//! The TLS 1.3 record layer of a connection a hot upgrade moved in: rustls
//! negotiated it in the old process and gave up its traffic keys and sequence numbers
//! ([`Keys::extract`]); from there this process protects and opens the records itself
//! (RFC 8446 section 5.2: AEAD over the inner plaintext and its content type, the
//! nonce the IV XOR the sequence number, the record header as additional data), with
//! `ring`. What it cannot do without the traffic secrets is follow a key update: a
//! client that sends one is disconnected (it reconnects as after any close).
//!
//! Also [`Tap`]: what a rustls connection was fed of a record it has not completed
//! yet (rustls keeps those bytes, and gives them up with nothing else), so that they
//! can go along.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use ring::aead::{
    AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey,
};
use rustls::ConnectionTrafficSecrets;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, ReadBuf};

/// Record header length.
pub const HEADER: usize = 5;
/// Largest plaintext in one record.
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// Largest ciphertext a record may carry (plaintext, content type, padding, tag).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// AEAD tag length (all three suites).
const TAG: usize = 16;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const CHANGE_CIPHER_SPEC: u8 = 20;

/// One direction's key, IV and next sequence number, as they travel.
#[derive(Clone, Serialize, Deserialize)]
pub struct DirectionKeys {
    suite: Suite,
    key: Vec<u8>,
    iv: [u8; 12],
    seq: u64,
}

impl std::fmt::Debug for DirectionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        f.debug_struct("DirectionKeys")
            .field("suite", &self.suite)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// The AEAD of a TLS 1.3 suite.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

/// Both directions' keys of a connection: `tx` protects what goes to the client,
/// `rx` opens what comes from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Keys {
    /// To the client.
    pub tx: DirectionKeys,
    /// From the client.
    pub rx: DirectionKeys,
}

impl Keys {
    /// The keys of a TLS 1.3 connection rustls negotiated (configured with
    /// `enable_secret_extraction`); consumes it.
    pub fn extract(conn: rustls::ServerConnection) -> Result<Self, rustls::Error> {
        let secrets = conn.dangerous_extract_secrets()?;
        Ok(Self {
            tx: DirectionKeys::from_secrets(secrets.tx),
            rx: DirectionKeys::from_secrets(secrets.rx),
        })
    }
}

impl DirectionKeys {
    fn from_secrets((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Self {
        let (suite, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Suite::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Suite::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Suite::Chacha20Poly1305, key, iv)
            }
            // `ConnectionTrafficSecrets` is non-exhaustive; rustls's own providers
            // offer only these three for TLS 1.3.
            _ => unreachable!("a TLS 1.3 suite outside the three rustls offers"),
        };
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(iv.as_ref());
        Self {
            suite,
            key: key.as_ref().to_vec(),
            iv: nonce,
            seq,
        }
    }

    fn aead(&self) -> io::Result<LessSafeKey> {
        let alg = match self.suite {
            Suite::Aes128Gcm => &AES_128_GCM,
            Suite::Aes256Gcm => &AES_256_GCM,
            Suite::Chacha20Poly1305 => &CHACHA20_POLY1305,
        };
        let key =
            UnboundKey::new(alg, &self.key).map_err(|_| invalid("key of the wrong length"))?;
        Ok(LessSafeKey::new(key))
    }

    /// The next record's nonce (the IV XOR the sequence number), and the number
    /// moved on.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| invalid("sequence number exhausted"))?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

fn invalid(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {why}"))
}

/// Protects records to the client.
pub struct Sealer {
    keys: DirectionKeys,
    aead: LessSafeKey,
}

impl Sealer {
    /// From the transmit keys.
    pub fn new(keys: DirectionKeys) -> io::Result<Self> {
        let aead = keys.aead()?;
        Ok(Self { keys, aead })
    }

    /// The keys as they stand (for the next upgrade).
    pub fn keys(&self) -> &DirectionKeys {
        &self.keys
    }

    /// Appends to `out` the records carrying `plaintext` (application data).
    pub fn seal_data(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        for chunk in plaintext.chunks(MAX_PLAINTEXT) {
            self.seal(APPLICATION_DATA, chunk, out)?;
        }
        Ok(())
    }

    /// Appends the `close_notify` alert.
    pub fn seal_close_notify(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        self.seal(ALERT, &[1, 0], out)
    }

    fn seal(&mut self, kind: u8, content: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let len = content.len() + 1 + TAG;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        let start = out.len();
        out.extend_from_slice(&header);
        out.extend_from_slice(content);
        out.push(kind);
        let nonce = self.keys.next_nonce()?;
        let tag = self
            .aead
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[start + HEADER..])
            .map_err(|_| invalid("seal failed"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// What one inbound record held.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data (possibly empty).
    Data(std::ops::Range<usize>),
    /// The client's `close_notify`.
    CloseNotify,
    /// Nothing to deliver (a compatibility `change_cipher_spec`).
    Nothing,
}

/// Opens records from the client.
pub struct Opener {
    keys: DirectionKeys,
    aead: LessSafeKey,
}

impl Opener {
    /// From the receive keys.
    pub fn new(keys: DirectionKeys) -> io::Result<Self> {
        let aead = keys.aead()?;
        Ok(Self { keys, aead })
    }

    /// The keys as they stand (for the next upgrade).
    pub fn keys(&self) -> &DirectionKeys {
        &self.keys
    }

    /// The length of the first whole record in `buf`, if there is one.
    pub fn complete(buf: &[u8]) -> io::Result<Option<usize>> {
        let Some(h) = buf.get(..HEADER) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        if len > MAX_CIPHERTEXT {
            return Err(invalid("record too long"));
        }
        Ok((buf.len() >= HEADER + len).then_some(HEADER + len))
    }

    /// Opens the whole record `record` in place; what it held.
    pub fn open(&mut self, record: &mut [u8]) -> io::Result<Opened> {
        let (header, body) = record.split_at_mut(HEADER);
        match header[0] {
            APPLICATION_DATA => {}
            CHANGE_CIPHER_SPEC => return Ok(Opened::Nothing),
            _ => return Err(invalid("unprotected record after the handshake")),
        }
        let header: [u8; HEADER] = header.try_into().expect("header length");
        let nonce = self.keys.next_nonce()?;
        let plain = self
            .aead
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| invalid("record failed to decrypt"))?;
        // The content type is the last non-zero byte; zeros after it are padding.
        let end = plain
            .iter()
            .rposition(|&b| b != 0)
            .ok_or_else(|| invalid("record without a content type"))?;
        match plain[end] {
            APPLICATION_DATA => Ok(Opened::Data(HEADER..HEADER + end)),
            ALERT if plain[..end] == [1, 0] => Ok(Opened::CloseNotify),
            ALERT => Err(invalid("alert from the client")),
            HANDSHAKE => Err(invalid(
                "handshake message (a key update) after a hot upgrade: reconnect",
            )),
            _ => Err(invalid("unknown content type")),
        }
    }
}

/// Passes reads through and keeps a copy of the record the bytes read so far end
/// inside of (header included), until its last byte is read: at any moment, what a
/// TLS library fed from it holds of an incomplete record.
#[derive(Debug)]
pub struct Tap<S> {
    inner: S,
    /// The incomplete record so far.
    partial: Vec<u8>,
    /// Body bytes still to come of the record in `partial` (once its header is
    /// whole).
    need: usize,
}

impl<S> Tap<S> {
    /// Taps `inner` from a record boundary.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            partial: Vec::new(),
            need: 0,
        }
    }

    /// The stream under it.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The bytes read of the record not yet complete; the tap is done with.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        (self.inner, self.partial)
    }

    /// Follows the record boundaries over `bytes`, the next ones read.
    fn follow(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.partial.len() < HEADER {
                let take = (HEADER - self.partial.len()).min(bytes.len());
                self.partial.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.partial.len() == HEADER {
                    self.need = usize::from(u16::from_be_bytes([self.partial[3], self.partial[4]]));
                }
                if self.partial.len() < HEADER || self.need > 0 {
                    continue;
                }
            }
            let take = self.need.min(bytes.len());
            self.need -= take;
            if self.need == 0 {
                // Complete: nothing of it is left to hand over.
                self.partial.clear();
                if self.partial.capacity() > 2 * HEADER {
                    self.partial = Vec::new();
                }
            } else {
                self.partial.extend_from_slice(&bytes[..take]);
            }
            bytes = &bytes[take..];
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tap<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let this = &mut *self;
            this.follow(&buf.filled()[before..]);
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tap<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(suite: Suite, key_len: usize) -> DirectionKeys {
        DirectionKeys {
            suite,
            key: (0..key_len as u8).collect(),
            iv: [7; 12],
            seq: 5,
        }
    }

    #[test]
    fn sealed_records_open_to_the_same_bytes_for_every_suite() {
        for (suite, len) in [
            (Suite::Aes128Gcm, 16),
            (Suite::Aes256Gcm, 32),
            (Suite::Chacha20Poly1305, 32),
        ] {
            let mut sealer = Sealer::new(keys(suite, len)).expect("sealer");
            let mut opener = Opener::new(keys(suite, len)).expect("opener");
            let data: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
            let mut wire = Vec::new();
            sealer.seal_data(&data, &mut wire).expect("seal");
            sealer.seal_close_notify(&mut wire).expect("seal");
            let mut got = Vec::new();
            let mut closed = false;
            while let Some(n) = Opener::complete(&wire).expect("complete") {
                let mut record: Vec<u8> = wire.drain(..n).collect();
                match opener.open(&mut record).expect("open") {
                    Opened::Data(r) => got.extend_from_slice(&record[r]),
                    Opened::CloseNotify => closed = true,
                    Opened::Nothing => {}
                }
            }
            assert!(wire.is_empty() && closed, "{suite:?}");
            assert_eq!(got, data, "{suite:?}");
            // 40,000 bytes: three records, then the alert; both sides moved on alike.
            assert_eq!((sealer.keys().seq, opener.keys().seq), (9, 9));
        }
    }

    #[test]
    fn a_record_out_of_sequence_or_altered_fails() {
        let mut sealer = Sealer::new(keys(Suite::Aes128Gcm, 16)).expect("sealer");
        let mut wire = Vec::new();
        sealer.seal_data(b"one", &mut wire).expect("seal");
        let mut skipped = keys(Suite::Aes128Gcm, 16);
        skipped.seq += 1;
        let mut opener = Opener::new(skipped).expect("opener");
        assert!(opener.open(&mut wire.clone()).is_err());
        let mut opener = Opener::new(keys(Suite::Aes128Gcm, 16)).expect("opener");
        let last = wire.len() - 1;
        wire[last] ^= 1;
        assert!(opener.open(&mut wire).is_err());
    }

    #[test]
    fn the_tap_keeps_exactly_the_incomplete_record() {
        let mut tap = Tap::new(());
        let record = |len: usize, fill: u8| {
            let mut r = vec![23, 3, 3, (len >> 8) as u8, len as u8];
            r.extend(std::iter::repeat_n(fill, len));
            r
        };
        let mut stream = record(10, 1);
        stream.extend(record(300, 2));
        stream.extend(record(7, 3));
        // Fed in pieces cutting headers and bodies: after each piece, the tap holds
        // the bytes of the record the piece ended inside of.
        let cuts = [3, 9, 15, 16, 200, 320, 321, 323, 330];
        let mut at = 0;
        for cut in cuts {
            tap.follow(&stream[at..cut]);
            at = cut;
            let (start, end) = [(0, 15), (15, 320), (320, 332)]
                .into_iter()
                .find(|&(s, e)| cut >= s && cut < e)
                .expect("inside a record");
            let want = if cut == start {
                &[][..]
            } else {
                &stream[start..cut]
            };
            assert_eq!(tap.partial, want, "after {cut} bytes");
            let _ = end;
        }
        tap.follow(&stream[at..]);
        assert!(tap.partial.is_empty());
    }
}
