//! The codec against the test vectors and case by case.

use super::*;

#[test]
fn encoded_connects_decode_back() {
    for version in [Version::V31, Version::V311, Version::V5] {
        let p = encode::connect(version, "device-42", 30, true);
        let Decode::Connect(c) = decode_connect(&p, 4096) else {
            panic!("{version:?}: {p:02x?} does not decode");
        };
        assert_eq!(
            (c.version, c.client_id, c.keep_alive, c.clean_start, c.len),
            (version, "device-42", 30, true, p.len())
        );
    }
}
/// The valid CONNECTs of the shared vectors: (name, bytes).
fn valid_vectors() -> Vec<(String, Vec<u8>)> {
    include_str!("../../../tests/data/mqtt-connect-vectors.tsv")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .filter(|f| f.get(1) == Some(&"valid"))
        .map(|f| (f[0].to_owned(), hex(f[2])))
        .collect()
}

#[test]
fn a_username_is_added_where_there_was_none() {
    fn body(p: &[u8]) -> &[u8] {
        let n = p[1..].iter().position(|b| b & 0x80 == 0).expect("varint") + 2;
        &p[n..]
    }
    let mut added = 0;
    for (name, p) in valid_vectors() {
        let Decode::Connect(c) = decode_connect(&p, 1 << 16) else {
            panic!("{}: does not decode", name);
        };
        let r = add_username(&p, 1 << 16, "CN=device-7");
        if c.username.is_some() || c.has_password {
            assert_eq!(r, Err(Invalid::Flags), "{}", name);
            continue;
        }
        let q = r.expect("added");
        let Decode::Connect(d) = decode_connect(&q, 1 << 16) else {
            panic!("{}: does not decode with a username", name);
        };
        assert_eq!(d.username, Some("CN=device-7"), "{}", name);
        assert_eq!(
            (
                d.version,
                d.clean_start,
                d.keep_alive,
                d.client_id,
                d.has_password
            ),
            (
                c.version,
                c.clean_start,
                c.keep_alive,
                c.client_id,
                c.has_password
            ),
            "{}",
            name
        );
        // The body is the old one with the username flag set, then the field.
        let (old, new) = (body(&p[..c.len]), body(&q));
        let mut want = old.to_vec();
        let flags_at = 2 + usize::from(old[1]) + 1;
        want[flags_at] |= 0x80;
        want.extend_from_slice(b"\x00\x0bCN=device-7");
        assert_eq!(new, &want[..], "{}", name);
        added += 1;
    }
    assert!(added >= 3, "only {added} vectors without credentials");
}

/// Every valid shared vector: rewriting with its own values gives the same bytes;
/// with new values, only the client id (and username) change, and rewriting back
/// restores the original byte for byte.
#[test]
fn rewrite_keeps_every_other_byte() {
    let mut rewritten = 0;
    for (name, p) in valid_vectors() {
        let Decode::Connect(c) = decode_connect(&p, 1 << 16) else {
            panic!("{}: does not decode", name);
        };
        assert_eq!(
            rewrite_connect(&p, 1 << 16, c.client_id, c.username).as_deref(),
            Ok(&p[..c.len]),
            "{}: identity rewrite",
            name
        );
        let new_id = "a-much-longer-client-id-from-a-certificate-0123456789-abcdefghij";
        let q = rewrite_connect(&p, 1 << 16, new_id, Some("cn=device")).expect("rewrite");
        let Decode::Connect(d) = decode_connect(&q, 1 << 16) else {
            panic!("{}: rewritten packet does not decode", name);
        };
        assert_eq!(d.client_id, new_id, "{}", name);
        assert_eq!(d.username, c.username.map(|_| "cn=device"), "{}", name);
        assert_eq!(
            (d.version, d.clean_start, d.keep_alive, d.has_password),
            (c.version, c.clean_start, c.keep_alive, c.has_password),
            "{}",
            name
        );
        assert_eq!(
            rewrite_connect(&q, 1 << 16, c.client_id, c.username).as_deref(),
            Ok(&p[..c.len]),
            "{}: rewriting back",
            name
        );
        rewritten += 1;
    }
    assert!(rewritten >= 9, "only {rewritten} valid vectors");
    let p = encode::connect(Version::V311, "x", 10, true);
    assert_eq!(
        rewrite_connect(&p, 1 << 16, "a\0b", None),
        Err(Invalid::Utf8)
    );
    assert_eq!(
        rewrite_connect(&p, 20, &"y".repeat(40), None),
        Err(Invalid::TooLarge)
    );
    assert_eq!(
        rewrite_connect(&[0xc0, 0x00], 1 << 16, "x", None),
        Err(Invalid::NotConnect)
    );
}

#[test]
fn packet_lengths_follow_the_fixed_header() {
    let big = encode::packet(0x32, &[7u8; 305]);
    assert_eq!(packet_len(&big), Ok(Some(big.len())));
    assert_eq!(big[..3], [0x32, 0xb1, 0x02]); // 2 + 1 + 2 + 300 = 305 = 0xb1 0x02
    assert_eq!(packet_len(&big[..2]), Ok(None));
    assert_eq!(packet_len(&[0x30]), Ok(None));
    assert_eq!(packet_len(&[0x30, 0x00]), Ok(Some(2)));
    assert_eq!(
        packet_len(&[0x30, 0xff, 0xff, 0xff, 0xff]),
        Err(Invalid::RemainingLength)
    );
    // Found by the fuzzer: a non-minimal length (15 as 0x8f 0x00) is refused, so
    // that a packet has one encoding and the rewriter can reproduce it.
    assert_eq!(
        packet_len(&[0x10, 0x8f, 0x00]),
        Err(Invalid::RemainingLength)
    );
    assert_eq!(
        decode_connect(&hex("108f0000044d515454050000000000025b02"), 1 << 16),
        Decode::Invalid(Invalid::RemainingLength)
    );
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The shared first-packet vectors (checked against a real mosquitto).
#[test]
fn shared_vectors() {
    let text = include_str!("../../../tests/data/mqtt-connect-vectors.tsv");
    let mut n = 0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let cols: Vec<&str> = line.split('\t').collect();
        let (name, verdict, bytes) = (cols[0], cols[1], hex(cols[2]));
        let got = decode_connect(&bytes, 65536);
        match verdict {
            "valid" => match got {
                Decode::Connect(c) => {
                    assert_eq!(c.len, bytes.len(), "{name}: whole vector is the CONNECT")
                }
                other => panic!("{name}: expected valid, got {other:?}"),
            },
            "invalid" => assert!(
                matches!(got, Decode::Invalid(_)),
                "{name}: expected invalid, got {got:?}"
            ),
            v => panic!("unknown verdict {v}"),
        }
        n += 1;
    }
    assert_eq!(n, 15);
}

#[test]
fn fields_of_known_packets() {
    let decode = |h: &str| match decode_connect(&hex(h), 1024) {
        Decode::Connect(c) => (
            c.version,
            c.client_id.to_owned(),
            c.username.map(str::to_owned),
            c.has_password,
            c.keep_alive,
        ),
        other => panic!("{h}: {other:?}"),
    };
    assert_eq!(
        decode("101a00044d51545404c2003c00000004746573740006706173737764"),
        (Version::V311, String::new(), Some("test".into()), true, 60)
    );
    assert_eq!(
        decode("101800044d5154540502003c032100140008746573745f737562"),
        (Version::V5, "test_sub".into(), None, false, 60)
    );
    assert_eq!(
        decode("102400064d514973647003c200000008746573745f7375620004746573740006706173737764"),
        (
            Version::V31,
            "test_sub".into(),
            Some("test".into()),
            true,
            0
        )
    );
}

#[test]
fn every_prefix_is_incomplete_and_trailing_bytes_are_left() {
    let p = hex("101400044d5154540402003c0008746573745f737562");
    for n in 0..p.len() {
        assert_eq!(
            decode_connect(&p[..n], 1024),
            Decode::Incomplete,
            "prefix {n}"
        );
    }
    let mut pipelined = p.clone();
    pipelined.extend_from_slice(&[0xc0, 0x00]); // PINGREQ right behind
    let Decode::Connect(c) = decode_connect(&pipelined, 1024) else {
        panic!("valid")
    };
    assert_eq!(c.len, p.len());
}

#[test]
fn size_limit_is_checked_before_buffering() {
    // Remaining length 2,097,151 announced in 4 bytes: refused without the body.
    assert_eq!(
        decode_connect(&[0x10, 0xff, 0xff, 0x7f], 65536),
        Decode::Invalid(Invalid::TooLarge)
    );
}

#[test]
fn flag_and_property_rules() {
    // Password without username in 3.1.1.
    let mut p = hex("101400044d5154540402003c0008746573745f737562");
    p[9] = 0x42;
    assert_eq!(decode_connect(&p, 1024), Decode::Invalid(Invalid::Flags));
    // Reserved flag bit.
    p[9] = 0x03;
    assert_eq!(decode_connect(&p, 1024), Decode::Invalid(Invalid::Flags));
    // MQTT 5: Receive Maximum 0 and duplicate properties.
    let zero = hex("101800044d5154540502003c032100000008746573745f737562");
    assert_eq!(
        decode_connect(&zero, 1024),
        Decode::Invalid(Invalid::Property)
    );
    let dup = hex(
        "101b00044d5154540502003c06210014210014", /* two Receive Maximum */
    );
    let mut dup = dup;
    dup.extend_from_slice(&hex("0008746573745f737562"));
    dup[1] = (dup.len() - 2) as u8;
    assert_eq!(
        decode_connect(&dup, 1024),
        Decode::Invalid(Invalid::Property)
    );
}

#[test]
fn connack_refusals() {
    assert_eq!(connack_server_unavailable(Version::V311), &[0x20, 2, 0, 3]);
    assert_eq!(
        connack_server_unavailable(Version::V5),
        &[0x20, 3, 0, 0x88, 0]
    );
}

/// A stream of packets of every length encoding (0, 1, 2 and 3 length bytes).
fn packet_stream() -> (Vec<u8>, Vec<usize>) {
    let mut stream = Vec::new();
    let mut ends = Vec::new();
    for len in [0usize, 2, 127, 128, 300, 16_383, 16_384, 70_000, 0, 5] {
        stream.extend_from_slice(&encode::packet(0x30, &vec![0xab; len]));
        ends.push(stream.len());
    }
    (stream, ends)
}

#[test]
fn boundaries_are_found_however_the_stream_is_cut() {
    use boundary::Boundary;
    let (stream, ends) = packet_stream();
    let is_boundary = |at: usize| at == 0 || ends.contains(&at);
    for chunk in [1usize, 2, 3, 7, 100, 4096, 65_536, stream.len()] {
        let mut b = Boundary::new();
        let mut start = 0;
        for piece in stream.chunks(chunk) {
            let end = start + piece.len();
            let expected = if is_boundary(start) {
                Some(0)
            } else {
                ends.iter()
                    .find(|&&e| e > start && e <= end)
                    .map(|e| e - start)
            };
            assert_eq!(b.advance(piece), expected, "chunks of {chunk} at {start}");
            assert_eq!(b.at_boundary(), is_boundary(end));
            start = end;
        }
        assert!(b.at_boundary() && !b.broken());
        // The packed state survives a round trip (it crosses into the kernel).
        assert_eq!(Boundary::from_raw(b.raw()), b);
    }
    // Five length bytes: not MQTT, and no boundary is claimed after them.
    let mut b = Boundary::new();
    assert_eq!(
        b.advance(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01, 0, 0]),
        Some(0)
    );
    assert!(b.broken() && !b.at_boundary());
    assert_eq!(b.advance(&[0xe0, 0]), None);
}

#[test]
fn disconnect_v5_with_and_without_server_reference() {
    assert_eq!(encode::disconnect_v5(0x9c, None), [0xe0, 2, 0x9c, 0]);
    assert_eq!(
        encode::disconnect_v5(0x9c, Some("b:1883")),
        [
            0xe0, 11, 0x9c, 9, 0x1c, 0, 6, b'b', b':', b'1', b'8', b'8', b'3'
        ]
    );
}
