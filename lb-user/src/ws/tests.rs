//! The upgrade and the frames, case by case.

use std::net::IpAddr;

use super::*;

const REQ: &str = "GET /mqtt HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqttv3.1, mqtt\r\n\r\n";

#[test]
fn rfc6455_accept_key() {
    assert_eq!(
        accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

#[test]
fn upgrade_requests() {
    let Request::Upgrade(u) = parse_request(REQ.as_bytes(), "/mqtt") else {
        panic!("not an upgrade");
    };
    assert_eq!((u.len, u.protocol), (REQ.len(), "mqtt"));
    for cut in 0..REQ.len() {
        assert_eq!(
            parse_request(&REQ.as_bytes()[..cut], "/mqtt"),
            Request::Incomplete
        );
    }
    let v31 = REQ.replace("mqttv3.1, mqtt", "mqttv3.1");
    assert!(
        matches!(parse_request(v31.as_bytes(), "/mqtt"), Request::Upgrade(u) if u.protocol == "mqttv3.1")
    );
    let cases = [
        (REQ.replace("/mqtt ", "/other "), 404),
        (REQ.replace("GET", "POST"), 405),
        (REQ.replace("Upgrade: websocket\r\n", ""), 426),
        (REQ.replace("Version: 13", "Version: 8"), 426),
        (REQ.replace("mqttv3.1, mqtt", "chat"), 400),
        (REQ.replace("dGhlIHNhbXBsZSBub25jZQ==", "short"), 400),
        ("garbage\r\n\r\n".to_owned(), 400),
        ("GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(), 426),
    ];
    for (req, status) in cases {
        assert!(
            matches!(parse_request(req.as_bytes(), "/mqtt"), Request::Refuse(s, _) if s == status),
            "{req:?}"
        );
    }
    assert!(matches!(
        parse_request(&vec![b'a'; MAX_REQUEST + 1], "/mqtt"),
        Request::Refuse(400 | 431, _)
    ));
}

#[test]
fn forwarded_request_names_the_client() {
    let ip: IpAddr = "10.1.2.3".parse().expect("ip");
    let out = String::from_utf8(forward_request(REQ.as_bytes(), ip)).expect("utf8");
    assert!(out.starts_with("GET /mqtt HTTP/1.1\r\nHost: example\r\n"));
    assert!(out.ends_with("X-Forwarded-For: 10.1.2.3\r\nX-Real-IP: 10.1.2.3\r\n\r\n"));
    let behind = REQ.replace(
        "Host: example\r\n",
        "Host: example\r\nX-Forwarded-For: 192.0.2.9\r\nX-Real-IP: 1.1.1.1\r\n",
    );
    let out = String::from_utf8(forward_request(behind.as_bytes(), ip)).expect("utf8");
    assert!(
        out.contains("X-Forwarded-For: 192.0.2.9, 10.1.2.3\r\n"),
        "{out}"
    );
    assert_eq!(out.matches("X-Real-IP").count(), 1);
    assert!(matches!(
        parse_request(out.as_bytes(), "/mqtt"),
        Request::Upgrade(_)
    ));
}

fn masked(opcode_fin: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![opcode_fin];
    if payload.len() < 126 {
        f.push(0x80 | payload.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[test]
fn frames_are_unmasked_joined_and_checked() {
    let data: Vec<u8> = (0..300u16).map(|i| i as u8).collect();
    // A fragmented message (binary + continuation), a ping between, then another.
    let mut buf = masked(0x02, &data[..100]);
    buf.extend(masked(0x89, b"hi"));
    buf.extend(masked(0x80, &data[100..250]));
    buf.extend(masked(0x82, &data[250..]));
    assert_eq!(client_payload(&buf, 1024), Ok(data.clone()));
    // Every prefix yields a prefix of the data (whole frames only).
    for cut in 0..buf.len() {
        let got = client_payload(&buf[..cut], 1024).expect("prefix");
        assert!(data.starts_with(&got));
    }
    let mut unmasked = masked(0x82, b"x");
    unmasked[1] &= 0x7f;
    assert_eq!(client_payload(&unmasked, 1024), Err(FrameError::Unmasked));
    assert_eq!(
        client_payload(&masked(0x81, b"text"), 1024),
        Err(FrameError::NotBinary)
    );
    assert_eq!(
        client_payload(&masked(0x88, b""), 1024),
        Err(FrameError::NotBinary)
    );
    assert_eq!(
        client_payload(&masked(0xc2, b"x"), 1024),
        Err(FrameError::NotBinary)
    );
    assert_eq!(
        client_payload(&masked(0x82, &data), 100),
        Err(FrameError::TooLarge)
    );
}

#[test]
fn a_ping_flood_before_the_connect_is_cut_at_the_frame_cap() {
    let ping = [0x89, 0x80, 0, 0, 0, 0];
    let mut buf = Vec::new();
    let mut frames = PreConnectFrames::default();
    let mut result = Ok(());
    for _ in 0..=MAX_FRAMES_BEFORE_CONNECT {
        buf.extend_from_slice(&ping);
        result = frames.feed(&buf, 1024).map(drop);
        if result.is_err() {
            break;
        }
    }
    assert_eq!(result, Err(FrameError::TooMany));
    assert!(FrameError::TooMany.is_oversize());
    // Fed one byte at a time, the same frames give the same payload as one parse.
    let data: Vec<u8> = (0..200u16).map(|i| i as u8).collect();
    let mut all = masked(0x02, &data[..90]);
    all.extend(masked(0x89, b"p"));
    all.extend(masked(0x80, &data[90..]));
    let mut frames = PreConnectFrames::default();
    for cut in 1..=all.len() {
        let got = frames.feed(&all[..cut], 1024).expect("valid").to_vec();
        assert!(data.starts_with(&got));
    }
    assert_eq!(frames.feed(&all, 1024).expect("valid"), &data[..]);
}

/// Decodes `input` split at every `step` bytes; returns the data and the controls.
fn stream(input: &[u8], step: usize, max: u64) -> Result<(Vec<u8>, Vec<Control>), FrameError> {
    let mut dec = FrameStream::new(max);
    let (mut buf, mut out, mut controls) = (Vec::new(), Vec::new(), Vec::new());
    for chunk in input.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            let (used, control) = dec.decode(&buf, &mut out)?;
            buf.drain(..used);
            // What waits in the buffer is never more than a header or a control frame.
            assert!(buf.len() <= 14 + 125 + step, "{}", buf.len());
            match control {
                Some(c) => controls.push(c),
                None => break,
            }
        }
    }
    Ok((out, controls))
}

#[test]
fn frames_after_the_connect_stream_through() {
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    let mut input = masked(0x02, &data[..60_000]);
    input.extend(masked(0x89, b"ping!"));
    input.extend(masked(0x80, &data[60_000..]));
    input.extend(masked(0x88, &1000u16.to_be_bytes()));
    for step in [1, 3, 1000, input.len()] {
        let (out, controls) = stream(&input, step, 1 << 20).expect("valid");
        assert!(out == data, "step {step}");
        assert_eq!(
            controls,
            [
                Control {
                    opcode: Opcode::Ping,
                    payload: b"ping!".to_vec()
                },
                Control {
                    opcode: Opcode::Close,
                    payload: vec![3, 0xe8]
                }
            ]
        );
    }
    // A frame over the cap is refused at its header, before its payload.
    let big = masked(0x82, &data[..60_000]);
    assert_eq!(stream(&big[..8], 8, 50_000), Err(FrameError::TooLarge));
    let mut huge = vec![0x82, 0x80 | 127];
    huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
    huge.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(stream(&huge, 1, 1 << 20), Err(FrameError::TooLarge));
    assert_eq!(
        stream(&masked(0x81, b"text"), 2, 1 << 20),
        Err(FrameError::NotBinary)
    );
    let mut unmasked = masked(0x82, b"x");
    unmasked[1] &= 0x7f;
    assert_eq!(stream(&unmasked, 1, 1 << 20), Err(FrameError::Unmasked));
    // A fragmented ping is against RFC 6455 5.5.
    assert_eq!(
        stream(&masked(0x09, b"p"), 9, 1 << 20),
        Err(FrameError::NotBinary)
    );
}

#[test]
fn server_answers() {
    let Request::Upgrade(u) = parse_request(REQ.as_bytes(), "/mqtt") else {
        panic!("not an upgrade");
    };
    let ok = switching_protocols(&u);
    assert_eq!(parse_answer(&ok, &u), ServerAnswer::Switched(ok.len()));
    assert_eq!(
        parse_answer(&ok[..ok.len() - 1], &u),
        ServerAnswer::Incomplete
    );
    let other = String::from_utf8(ok.clone())
        .expect("utf8")
        .replace("Protocol: mqtt", "Protocol: mqttv3.1");
    assert!(matches!(
        parse_answer(other.as_bytes(), &u),
        ServerAnswer::Refused(_)
    ));
    assert!(matches!(
        parse_answer(&error_response(404, "Not Found"), &u),
        ServerAnswer::Refused(_)
    ));
    assert_eq!(binary_frame(&[1, 2]), [0x82, 2, 1, 2]);
    for len in [0usize, 5, 125, 126, 300, 70_000] {
        let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let f = masked_binary_frame(&data, [9, 8, 7, 6]);
        let frame = next_client_frame(&f, 1 << 20)
            .expect("valid")
            .expect("complete");
        assert_eq!(
            (frame.opcode, frame.payload, frame.len),
            (Opcode::Binary, data, f.len())
        );
    }
    assert_eq!(&binary_frame(&[0; 200])[..4], &[0x82, 126, 0, 200]);
}
