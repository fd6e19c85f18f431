//! The CONNECT decoder on arbitrary bytes: never panics, and what it accepts holds
//! together. A decoded CONNECT decodes the same from its own bytes, every strict
//! prefix of it asks for more data (never "invalid", never another CONNECT), and
//! re-encoding its version, client id and keep-alive decodes back to them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqttlb::mqtt::{Decode, decode_connect, encode};

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
});
