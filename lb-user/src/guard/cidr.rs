//! CIDR blocks of the guard's lists: IPv4 or IPv6, kept as written (normalized to
//! their network address), keyed in the tries as IPv6 with IPv4 mapped into
//! `::ffff:0:0/96`.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    str::FromStr,
};

/// `203.0.113.0/24`, `2001:db8::/32`, or one address (`/32`, `/128` implied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// The network address (host bits cleared).
    pub addr: IpAddr,
    /// Prefix length in the address's own family.
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a CIDR block (e.g. 203.0.113.0/24, 2001:db8::/32)");
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Self::new(addr, prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// The block of `prefix` bits around `addr` (host bits cleared).
    pub fn new(addr: IpAddr, prefix: u8) -> Self {
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Self { addr, prefix }
    }

    /// The trie key: prefix length and address in the IPv6 space.
    pub fn key(&self) -> (u32, [u8; 16]) {
        match self.addr {
            IpAddr::V4(a) => (u32::from(self.prefix) + 96, a.to_ipv6_mapped().octets()),
            IpAddr::V6(a) => (u32::from(self.prefix), a.octets()),
        }
    }

    /// Back from a trie key.
    pub fn from_key(prefix: u32, addr: [u8; 16]) -> Self {
        let v6 = Ipv6Addr::from(addr);
        match v6.to_ipv4_mapped() {
            Some(v4) if prefix >= 96 => Self::new(IpAddr::V4(v4), (prefix - 96) as u8),
            _ => Self::new(IpAddr::V6(v6), prefix.min(128) as u8),
        }
    }
}

/// A source address from the guard's maps, IPv4 shown as IPv4.
pub fn source(addr: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(addr);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_normalizes_and_round_trips_through_trie_keys() {
        let c: Cidr = "203.0.113.77/24".parse().expect("v4");
        assert_eq!(c.to_string(), "203.0.113.0/24");
        let (prefix, key) = c.key();
        assert_eq!(prefix, 120);
        assert_eq!(&key[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(Cidr::from_key(prefix, key), c);
        let one: Cidr = "10.1.2.3".parse().expect("host");
        assert_eq!(one.to_string(), "10.1.2.3/32");
        let v6: Cidr = "2001:db8:1::5/48".parse().expect("v6");
        assert_eq!(v6.to_string(), "2001:db8:1::/48");
        assert_eq!(Cidr::from_key(v6.key().0, v6.key().1), v6);
        let all: Cidr = "0.0.0.0/0".parse().expect("all v4");
        assert_eq!(all.key().0, 96);
        for bad in ["10.0.0.0/33", "::/129", "example.com/8", "10.0.0/8", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(
            source(one.key().1),
            "10.1.2.3".parse::<IpAddr>().expect("ip")
        );
    }
}
