//! Session tickets that every process of an instance opens, before and after a
//! reload. rustls's own ticketer draws its keys at random when a configuration is
//! built, so each reload (which builds the listeners' TLS configuration again) made
//! every earlier ticket useless, and each worker sealed tickets the others could not
//! open (a client reconnects from a new source port, so usually to another worker).
//!
//! Here the keys come from one secret drawn once per process tree: the supervisor
//! draws it before it forks its workers (`draw`), a lone daemon when it first seals or
//! opens a ticket. Time is cut into windows of six hours; the secret of each window
//! is derived from the one before (HKDF-SHA256) and the one before is then erased, so
//! every process, whenever it was forked, holds the same key for the same window and
//! a key once past stays past (a process's memory read later cannot open older
//! tickets: forward secrecy per window, as rustls's rotation gives). A ticket is
//! `window (8 bytes, big-endian) | nonce (12) | AES-256-GCM(state) | tag (16)`, the
//! window authenticated as associated data; a ticket of the current window or the one
//! before opens.

use std::{
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    hkdf,
    rand::{SecureRandom, SystemRandom},
};

/// Seconds one key seals tickets for (what clients are told a ticket lives).
const WINDOW_SECS: u64 = 6 * 3600;

/// Bytes before the sealed state: the window and the nonce.
const HEADER: usize = 8 + NONCE_LEN;

/// The keys of the current window and the one before.
struct Keys {
    window: u64,
    /// The current window's secret (the next one is derived from it).
    secret: [u8; 32],
    current: LessSafeKey,
    previous: Option<LessSafeKey>,
}

impl Keys {
    fn drawn(window: u64) -> Self {
        let mut secret = [0u8; 32];
        SystemRandom::new()
            .fill(&mut secret)
            .expect("the system's random source");
        Self {
            window,
            current: key_of(&secret),
            secret,
            previous: None,
        }
    }

    /// Moves on to `window`, one window at a time, erasing each secret left behind.
    fn advance(&mut self, window: u64) {
        while self.window < window {
            self.secret = derive(&self.secret, b"mqttlb ticket secret, next window");
            let next = key_of(&self.secret);
            self.previous = Some(std::mem::replace(&mut self.current, next));
            self.window += 1;
        }
    }
}

/// 32 bytes from `secret` for `purpose`.
fn derive(secret: &[u8; 32], purpose: &[u8]) -> [u8; 32] {
    struct Len32;
    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"mqttlb session tickets").extract(secret);
    let mut out = [0u8; 32];
    prk.expand(&[purpose], Len32)
        .and_then(|okm| okm.fill(&mut out))
        .expect("32 bytes is a valid HKDF-SHA256 length");
    out
}

fn key_of(secret: &[u8; 32]) -> LessSafeKey {
    let bytes = derive(secret, b"mqttlb ticket key");
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes).expect("a 32-byte AES-256 key"))
}

static KEYS: Mutex<Option<Keys>> = Mutex::new(None);

fn window_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        / WINDOW_SECS
}

/// Runs `f` with the keys of the current window (drawn the first time).
fn with_keys<T>(f: impl FnOnce(&Keys) -> T) -> T {
    let now = window_now();
    let mut keys = KEYS.lock().unwrap_or_else(|e| e.into_inner());
    let keys = keys.get_or_insert_with(|| Keys::drawn(now));
    keys.advance(now);
    f(keys)
}

/// Draws the instance's ticket secret now, if not yet drawn: the supervisor calls
/// it before forking, so that its workers share it.
pub fn draw() {
    with_keys(|_| ());
}

/// The ticketer of every TLS configuration the process builds.
#[derive(Debug)]
pub struct SharedTickets;

impl rustls::server::ProducesTickets for SharedTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        WINDOW_SECS as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        with_keys(|keys| {
            let window = keys.window.to_be_bytes();
            let mut ticket = Vec::with_capacity(HEADER + plain.len() + AES_256_GCM.tag_len());
            ticket.extend_from_slice(&window);
            ticket.extend_from_slice(&nonce);
            let mut sealed = plain.to_vec();
            keys.current
                .seal_in_place_append_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(window),
                    &mut sealed,
                )
                .ok()?;
            ticket.extend_from_slice(&sealed);
            Some(ticket)
        })
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < HEADER + AES_256_GCM.tag_len() {
            return None;
        }
        let (window, rest) = ticket.split_at(8);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let window: [u8; 8] = window.try_into().ok()?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut sealed = sealed.to_vec();
        with_keys(|keys| {
            let key = match u64::from_be_bytes(window) {
                w if w == keys.window => &keys.current,
                w if w + 1 == keys.window => keys.previous.as_ref()?,
                _ => return None,
            };
            let plain = key
                .open_in_place(nonce, Aad::from(window), &mut sealed)
                .ok()?;
            Some(plain.to_vec())
        })
    }
}

#[cfg(test)]
mod tests {
    use rustls::server::ProducesTickets;

    use super::*;

    #[test]
    fn a_ticket_opens_in_its_window_and_the_next_only() {
        let t = SharedTickets;
        let ticket = t.encrypt(b"session state").expect("sealed");
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"session state"[..]));
        // A flipped byte anywhere (window, nonce, body, tag) does not open.
        for i in [0, 7, 8, HEADER, ticket.len() - 1] {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert_eq!(t.decrypt(&bad), None, "byte {i}");
        }
        assert_eq!(t.decrypt(&ticket[..HEADER + 15]), None);
        // One window on, the ticket opens with the previous key only; two processes
        // with the same secret derive the same keys.
        let (secret, start) = with_keys(|k| (k.secret, k.window));
        let copy = || Keys {
            window: start,
            secret,
            current: key_of(&secret),
            previous: None,
        };
        let mut later = copy();
        later.advance(start + 1);
        let (window, rest) = ticket.split_at(8);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let opens = |key: &LessSafeKey| {
            let nonce = Nonce::try_assume_unique_for_key(nonce).expect("nonce");
            let window = <[u8; 8]>::try_from(window).expect("window");
            key.open_in_place(nonce, Aad::from(window), &mut sealed.to_vec())
                .is_ok()
        };
        assert!(opens(later.previous.as_ref().expect("previous")));
        assert!(!opens(&later.current));
        let mut other = copy();
        other.advance(start + 2);
        later.advance(start + 2);
        assert_eq!(other.secret, later.secret);
        assert_ne!(other.secret, secret);
    }
}
