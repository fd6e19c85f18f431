//! The PROXY v1/v2 parser on arbitrary bytes: never panics; a header it accepts
//! decodes the same from its own bytes, and its source address survives an encode
//! and decode in both versions.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqttlb::{
    config::ProxyProtocol,
    proxy_protocol::{Decoded, decode, encode},
};

fuzz_target!(|data: &[u8]| {
    let Decoded::Header { len, source } = decode(data) else {
        return;
    };
    assert!(len <= data.len());
    assert_eq!(decode(&data[..len]), Decoded::Header { len, source });
    let Some(src) = source else { return };
    let dst = if src.is_ipv4() {
        "192.0.2.1:1883".parse().expect("addr")
    } else {
        "[2001:db8::1]:1883".parse().expect("addr")
    };
    for kind in [ProxyProtocol::V1, ProxyProtocol::V2] {
        let h = encode(kind, src, dst);
        assert_eq!(
            decode(&h),
            Decoded::Header {
                len: h.len(),
                source: Some(src)
            },
            "{kind:?}"
        );
    }
});
