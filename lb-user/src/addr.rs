//! Socket addresses as mqttlb stores and shows them: IPv4 as IPv4-mapped IPv6 in BPF
//! maps, and IPv4-mapped IPv6 (a dual-stack listener's IPv4 clients) shown as plain
//! IPv4 everywhere an operator reads one.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// `addr` with an IPv4-mapped IPv6 address turned into the IPv4 one.
pub fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// `addr` as an operator reads it (IPv4-mapped shown as IPv4).
pub fn show(addr: SocketAddr) -> String {
    unmapped(addr).to_string()
}

/// The 16 bytes BPF maps hold for `ip` (IPv4 as IPv4-mapped IPv6).
pub fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address [`ip_bytes`] stored, with `port`.
pub fn from_bytes(bytes: [u8; 16], port: u16) -> SocketAddr {
    unmapped(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(bytes)), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_read_as_ipv4_and_round_trip() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:1883".parse().expect("addr");
        assert_eq!(show(mapped), "10.1.2.3:1883");
        let v6: SocketAddr = "[2001:db8::1]:1883".parse().expect("addr");
        assert_eq!(show(v6), "[2001:db8::1]:1883");
        let v4: SocketAddr = "10.1.2.3:1883".parse().expect("addr");
        assert_eq!(from_bytes(ip_bytes(v4.ip()), 1883), v4);
        assert_eq!(from_bytes(ip_bytes(v6.ip()), 1883), v6);
    }
}
