//! PROXY protocol (v1 text, v2 binary): headers sent to servers, so that brokers see
//! the real client address, and headers received from a load balancer in front
//! (`accept_proxy_protocol`), which name that address to mqttlb.

use std::net::{IpAddr, SocketAddr};

use crate::config::ProxyProtocol;

/// v2 signature (12 bytes).
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Encodes the header for a connection from `client` to `local` (the address the client
/// connected to). Returns an empty vector for [`ProxyProtocol::None`].
pub fn encode(kind: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    // An IPv4 client of a dual-stack listener arrives IPv4-mapped: it is an IPv4
    // client (TCP4 / AF_INET), or brokers' IPv4 ACLs would not match it.
    let (client, local) = (crate::addr::unmapped(client), crate::addr::unmapped(local));
    // Mixed families cannot be expressed; present both as IPv6 then.
    let (src, dst) = match (client.ip(), local.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
            (client.ip(), local.ip())
        }
        _ => (
            IpAddr::V6(to_v6(client.ip())),
            IpAddr::V6(to_v6(local.ip())),
        ),
    };
    match kind {
        ProxyProtocol::None => Vec::new(),
        ProxyProtocol::V1 => {
            let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {fam} {src} {dst} {} {}\r\n",
                client.port(),
                local.port()
            )
            .into_bytes()
        }
        ProxyProtocol::V2 => {
            let mut h = Vec::with_capacity(16 + 36);
            h.extend_from_slice(&V2_SIGNATURE);
            h.push(0x21); // version 2, PROXY command
            match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    h.push(0x11); // AF_INET, STREAM
                    h.extend_from_slice(&12u16.to_be_bytes());
                    h.extend_from_slice(&s.octets());
                    h.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    h.push(0x21); // AF_INET6, STREAM
                    h.extend_from_slice(&36u16.to_be_bytes());
                    h.extend_from_slice(&to_v6(s).octets());
                    h.extend_from_slice(&to_v6(d).octets());
                }
            }
            h.extend_from_slice(&client.port().to_be_bytes());
            h.extend_from_slice(&local.port().to_be_bytes());
            h
        }
    }
}

/// `PP2_TYPE_SSL` and its sub-types (PROXY protocol v2, section 2.2.5).
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
const PP2_CLIENT_CERT_SESS: u8 = 0x04;

/// [`encode`], plus for v2 behind a TLS listener a `PP2_TYPE_SSL` TLV: the client
/// used TLS (version sub-TLV) and, when it presented a verified certificate, its CN
/// (sub-TLV) with `verify` = 0. v1 has no room for it.
pub fn encode_with_tls(
    kind: ProxyProtocol,
    client: SocketAddr,
    local: SocketAddr,
    tls: Option<&crate::tls::TlsInfo>,
) -> Vec<u8> {
    let mut h = encode(kind, client, local);
    let (ProxyProtocol::V2, Some(tls)) = (kind, tls) else {
        return h;
    };
    let mut value = Vec::with_capacity(64);
    let mut client_bits = PP2_CLIENT_SSL;
    if tls.client_cert {
        client_bits |= PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS;
    }
    value.push(client_bits);
    // verify: 0 when a presented certificate was verified (or none was presented).
    value.extend_from_slice(&0u32.to_be_bytes());
    let mut sub = |t: u8, v: &[u8]| {
        value.push(t);
        value.extend_from_slice(&(v.len().min(0xffff) as u16).to_be_bytes());
        value.extend_from_slice(&v[..v.len().min(0xffff)]);
    };
    sub(PP2_SUBTYPE_SSL_VERSION, tls.version.as_bytes());
    if let Some(cn) = &tls.client_cn {
        sub(PP2_SUBTYPE_SSL_CN, cn.as_bytes());
    }
    h.push(PP2_TYPE_SSL);
    h.extend_from_slice(&(value.len() as u16).to_be_bytes());
    h.extend_from_slice(&value);
    // The address block length (bytes 14-15) covers the TLVs.
    let len = (h.len() - 16) as u16;
    h[14..16].copy_from_slice(&len.to_be_bytes());
    h
}

/// Longest v1 header, CRLF included (the specification's limit).
const V1_MAX: usize = 107;

/// What the start of a stream holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// More bytes are needed.
    Incomplete,
    /// A header of `len` bytes; `source` is the original client (`None` for a v2
    /// LOCAL command or an unknown/unsupported family: use the connection's peer).
    Header {
        len: usize,
        source: Option<SocketAddr>,
    },
    /// Not a valid PROXY header.
    Invalid(&'static str),
}

/// Decodes a PROXY v1 or v2 header at the start of `buf`.
pub fn decode(buf: &[u8]) -> Decoded {
    let sig_len = buf.len().min(V2_SIGNATURE.len());
    if buf[..sig_len] == V2_SIGNATURE[..sig_len] {
        return decode_v2(buf);
    }
    let text_len = buf.len().min(6);
    if buf[..text_len] == b"PROXY "[..text_len] {
        return decode_v1(buf);
    }
    Decoded::Invalid("the connection does not start with a PROXY header")
}

fn decode_v1(buf: &[u8]) -> Decoded {
    let Some(end) = buf.windows(2).take(V1_MAX - 1).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Decoded::Invalid("PROXY v1 header longer than 107 bytes")
        } else {
            Decoded::Incomplete
        };
    };
    let Ok(line) = std::str::from_utf8(&buf[..end]) else {
        return Decoded::Invalid("PROXY v1 header is not text");
    };
    let f: Vec<&str> = line.split(' ').collect();
    let source = match f.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", fam @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let (Ok(src), Ok(_), Ok(sport), Ok(_)) = (
                src.parse::<IpAddr>(),
                dst.parse::<IpAddr>(),
                sport.parse::<u16>(),
                dport.parse::<u16>(),
            ) else {
                return Decoded::Invalid("PROXY v1 header has a bad address or port");
            };
            if src.is_ipv4() != (*fam == "TCP4") {
                return Decoded::Invalid("PROXY v1 address does not match its family");
            }
            Some(SocketAddr::new(src, sport))
        }
        _ => return Decoded::Invalid("malformed PROXY v1 header"),
    };
    Decoded::Header {
        len: end + 2,
        source,
    }
}

fn decode_v2(buf: &[u8]) -> Decoded {
    let Some(h) = buf.get(..16) else {
        return Decoded::Incomplete;
    };
    if h[12] >> 4 != 2 {
        return Decoded::Invalid("unsupported PROXY v2 version");
    }
    let len = 16 + usize::from(u16::from_be_bytes([h[14], h[15]]));
    let Some(body) = buf.get(16..len) else {
        return Decoded::Incomplete;
    };
    let source = match (h[12] & 0x0f, h[13]) {
        (0, _) => None,
        (1, 0x11) if body.len() >= 12 => Some(SocketAddr::new(
            IpAddr::from([body[0], body[1], body[2], body[3]]),
            u16::from_be_bytes([body[8], body[9]]),
        )),
        (1, 0x21) if body.len() >= 36 => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&body[..16]);
            Some(SocketAddr::new(
                IpAddr::from(ip),
                u16::from_be_bytes([body[32], body[33]]),
            ))
        }
        (1, 0x11 | 0x21) => return Decoded::Invalid("PROXY v2 address block too short"),
        (1, _) => None,
        _ => return Decoded::Invalid("unsupported PROXY v2 command"),
    };
    Decoded::Header { len, source }
}

fn to_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;

    #[test]
    fn v2_carries_the_tls_version_and_client_cn() {
        let client: SocketAddr = "10.1.2.3:40000".parse().expect("addr");
        let local: SocketAddr = "10.9.9.9:8883".parse().expect("addr");
        let info = crate::tls::TlsInfo {
            version: "TLSv1.3".into(),
            client_cn: Some("device-7".into()),
            client_cert: true,
        };
        let h = encode_with_tls(ProxyProtocol::V2, client, local, Some(&info));
        let plain = encode(ProxyProtocol::V2, client, local);
        assert_eq!(&h[..14], &plain[..14]);
        assert_eq!(
            usize::from(u16::from_be_bytes([h[14], h[15]])),
            h.len() - 16
        );
        assert_eq!(&h[16..28], &plain[16..28], "addresses and ports unchanged");
        let tlv = &h[28..];
        assert_eq!(tlv[0], 0x20);
        assert_eq!(
            usize::from(u16::from_be_bytes([tlv[1], tlv[2]])),
            tlv.len() - 3
        );
        assert_eq!(tlv[3], 0x07, "SSL, cert on this connection and session");
        assert_eq!(&tlv[4..8], &[0, 0, 0, 0], "verified");
        assert_eq!(&tlv[8..11], &[0x21, 0, 7]);
        assert_eq!(&tlv[11..18], b"TLSv1.3");
        assert_eq!(&tlv[18..21], &[0x22, 0, 8]);
        assert_eq!(&tlv[21..], b"device-7");
        // The decoder skips TLVs and still finds the source.
        assert_eq!(
            decode(&h),
            Decoded::Header {
                len: h.len(),
                source: Some(client)
            }
        );
        // v1 and no TLS: unchanged.
        assert_eq!(
            encode_with_tls(ProxyProtocol::V1, client, local, Some(&info)),
            encode(ProxyProtocol::V1, client, local)
        );
        assert_eq!(
            encode_with_tls(ProxyProtocol::V2, client, local, None),
            plain
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn decode_reads_what_encode_writes() {
        for kind in [ProxyProtocol::V1, ProxyProtocol::V2] {
            for (client, local) in [
                ("192.0.2.1:5000", "198.51.100.2:1883"),
                ("[2001:db8::7]:61000", "[2001:db8::1]:8883"),
            ] {
                let mut h = encode(kind, a(client), a(local));
                let len = h.len();
                h.extend_from_slice(b"\x10\x0c"); // the CONNECT that follows
                assert_eq!(
                    decode(&h),
                    Decoded::Header {
                        len,
                        source: Some(a(client))
                    },
                    "{kind:?} {client}"
                );
                // Every strict prefix asks for more.
                for cut in 0..len {
                    assert_eq!(decode(&h[..cut]), Decoded::Incomplete, "{kind:?} cut {cut}");
                }
            }
        }
    }

    #[test]
    fn decode_local_unknown_and_garbage() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(
            decode(&local),
            Decoded::Header {
                len: 16,
                source: None
            }
        );
        assert_eq!(
            decode(b"PROXY UNKNOWN\r\n"),
            Decoded::Header {
                len: 15,
                source: None
            }
        );
        for bad in [
            &b"\x10\x0c\x00\x04MQTT"[..],
            b"PROXY TCP4 192.0.2.1 198.51.100.2 70000 1883\r\n",
            b"PROXY TCP6 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 a b c d\r\n",
            &[&b"PROXY "[..], &[b'x'; 120]].concat()[..],
        ] {
            assert!(
                matches!(decode(bad), Decoded::Invalid(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut v3 = V2_SIGNATURE.to_vec();
        v3.extend_from_slice(&[0x31, 0x11, 0, 12]);
        assert!(matches!(decode(&v3), Decoded::Invalid(_)));
    }

    #[test]
    fn v1_text() {
        let h = encode(
            ProxyProtocol::V1,
            a("192.0.2.1:5000"),
            a("198.51.100.2:1883"),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 1883\r\n");
    }

    #[test]
    fn v2_binary_ipv4() {
        let h = encode(
            ProxyProtocol::V2,
            a("192.0.2.1:5000"),
            a("198.51.100.2:1883"),
        );
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[
            0x21, 0x11, 0, 12, 192, 0, 2, 1, 198, 51, 100, 2, 0x13, 0x88, 0x07, 0x5b,
        ]);
        assert_eq!(h, want);
    }

    #[test]
    fn ipv4_clients_of_a_dual_stack_listener_are_tcp4() {
        let client: SocketAddr = "[::ffff:192.0.2.7]:50000".parse().expect("addr");
        let local: SocketAddr = "[::ffff:10.0.0.1]:1883".parse().expect("addr");
        assert_eq!(
            encode(ProxyProtocol::V1, client, local),
            b"PROXY TCP4 192.0.2.7 10.0.0.1 50000 1883\r\n"
        );
        let v2 = encode(ProxyProtocol::V2, client, local);
        assert_eq!(&v2[12..16], &[0x21, 0x11, 0x00, 0x0c]);
        assert_eq!(&v2[16..24], &[192, 0, 2, 7, 10, 0, 0, 1]);
    }

    #[test]
    fn v2_mixed_families_become_ipv6() {
        let h = encode(
            ProxyProtocol::V2,
            a("192.0.2.1:5000"),
            a("[2001:db8::1]:1883"),
        );
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(
            &h[16..32],
            &std::net::Ipv4Addr::new(192, 0, 2, 1)
                .to_ipv6_mapped()
                .octets()
        );
        assert!(encode(ProxyProtocol::None, a("192.0.2.1:1"), a("192.0.2.2:2")).is_empty());
    }
}
