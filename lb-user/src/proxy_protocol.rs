//! PROXY protocol headers sent to servers (v1 text, v2 binary), so that brokers see the
//! real client address.

use std::net::{IpAddr, SocketAddr};

use crate::config::ProxyProtocol;

/// v2 signature (12 bytes).
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Encodes the header for a connection from `client` to `local` (the address the client
/// connected to). Returns an empty vector for [`ProxyProtocol::None`].
pub fn encode(kind: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
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

fn to_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("addr")
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
