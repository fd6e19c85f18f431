//! The CONNECT decoder on arbitrary bytes: never panics, and what it accepts holds
//! together. A decoded CONNECT decodes the same from its own bytes, every strict
//! prefix of it asks for more data (never "invalid", never another CONNECT),
//! re-encoding its version, client id and keep-alive decodes back to them, and the
//! byte-exact rewriter reproduces the packet, changes only the client id and username,
//! and rewriting back restores every byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqttlb::mqtt::{Decode, decode_connect, encode, rewrite_connect};

const MAX: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Decode::Connect(c) = decode_connect(data, MAX) else {
        return;
    };
    assert!(c.len <= data.len() && c.len <= MAX);
    assert_eq!(
        decode_connect(&data[..c.len], MAX),
        Decode::Connect(c.clone())
    );
    for cut in [0, 1, c.len / 2, c.len - 1] {
        assert_eq!(
            decode_connect(&data[..cut], MAX),
            Decode::Incomplete,
            "prefix {cut}"
        );
    }
    let again = encode::connect(c.version, c.client_id, c.keep_alive);
    let Decode::Connect(r) = decode_connect(&again, MAX) else {
        panic!("re-encoded CONNECT does not decode: {again:02x?}");
    };
    assert_eq!(
        (r.version, r.client_id, r.keep_alive, r.len),
        (c.version, c.client_id, c.keep_alive, again.len())
    );

    let original = &data[..c.len];
    assert_eq!(
        rewrite_connect(data, MAX, c.client_id, c.username).as_deref(),
        Ok(original)
    );
    let Ok(q) = rewrite_connect(data, MAX, "rewritten-client", Some("rewritten-user")) else {
        return; // only a packet near MAX can grow past it
    };
    let Decode::Connect(d) = decode_connect(&q, MAX) else {
        panic!("rewritten CONNECT does not decode: {q:02x?}");
    };
    assert_eq!(d.client_id, "rewritten-client");
    assert_eq!(d.username, c.username.map(|_| "rewritten-user"));
    assert_eq!(
        (d.version, d.clean_start, d.keep_alive, d.has_password),
        (c.version, c.clean_start, c.keep_alive, c.has_password)
    );
    assert_eq!(
        rewrite_connect(&q, MAX, c.client_id, c.username).as_deref(),
        Ok(original)
    );
});
