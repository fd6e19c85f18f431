//! The sticky table: which server a client id, username or client address went to, so
//! that a reconnecting device returns to the node holding its session.
//!
//! With BPF, the table is the pinned LRU hash map `sticky`
//! (`/sys/fs/bpf/mqttlb/<instance>/sticky`): it outlives the daemon, so a restarted
//! mqttlb sends every device back where it was, and `mqttlb ctl sticky` lists it.
//! Without BPF (copy data plane, no privileges) the same table lives in the daemon's
//! memory and is lost on restart.
//!
//! Keys ([`StickyKey`]): the cluster (FNV-1a of its name), the kind, the length, and the
//! key bytes when they fit in 64; a longer key is stored as its first 32 bytes and its
//! SHA-256, so distinct keys never share an entry in practice. Values
//! ([`StickyValue`]): the server's address (stable across reloads that re-order or
//! rename servers), last use and expiry. An expired entry, or one whose server is gone
//! or cannot take the connection, is replaced by the balancer's new choice.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use lb_common::{
    STICKY_CLIENT_ID, STICKY_KEY_LEN, STICKY_PREFIX_LEN, STICKY_SOURCE, STICKY_USERNAME, StickyKey,
    StickyValue,
};
use sha2::{Digest, Sha256};

use crate::{bpf::Bpf, config::Sticky};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// FNV-1a (32 bit) of a cluster name: the cluster part of a key.
pub fn cluster_tag(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The sticky key of a connection, or `None` when the cluster has no sticky table or
/// the connection lacks the field: no username, or an empty one or an empty client id
/// (it names no device; every such client would share one entry).
pub fn key(
    cluster: &str,
    kind: Sticky,
    client_id: &str,
    username: Option<&str>,
    source: IpAddr,
) -> Option<StickyKey> {
    let source_bytes;
    let (tag, bytes): (u8, &[u8]) = match kind {
        Sticky::None => return None,
        Sticky::ClientId if client_id.is_empty() => return None,
        Sticky::ClientId => (STICKY_CLIENT_ID, client_id.as_bytes()),
        Sticky::Username => match username {
            Some(u) if !u.is_empty() => (STICKY_USERNAME, u.as_bytes()),
            _ => return None,
        },
        Sticky::Source => {
            source_bytes = match source {
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                IpAddr::V6(a) => a.octets(),
            };
            (STICKY_SOURCE, &source_bytes)
        }
    };
    let mut k = StickyKey {
        cluster: cluster_tag(cluster),
        kind: tag,
        hashed: 0,
        len: u16::try_from(bytes.len()).unwrap_or(u16::MAX),
        key: [0; STICKY_KEY_LEN],
    };
    if bytes.len() <= STICKY_KEY_LEN {
        k.key[..bytes.len()].copy_from_slice(bytes);
    } else {
        k.hashed = 1;
        k.key[..STICKY_PREFIX_LEN].copy_from_slice(&bytes[..STICKY_PREFIX_LEN]);
        k.key[STICKY_PREFIX_LEN..].copy_from_slice(&Sha256::digest(bytes));
    }
    Some(k)
}

/// The key as text for `mqttlb ctl sticky`: the id or username (with `...#sha256` when
/// only a prefix is stored), or the client address.
pub fn key_text(k: &StickyKey) -> String {
    match k.kind {
        STICKY_SOURCE => crate::bpf::addr_string(k.key[..16].try_into().unwrap_or([0; 16]), 0)
            .trim_end_matches(":0")
            .to_owned(),
        _ if k.hashed == 1 => format!(
            "{}...#{}",
            String::from_utf8_lossy(&k.key[..STICKY_PREFIX_LEN]),
            k.key[STICKY_PREFIX_LEN..]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ),
        _ => String::from_utf8_lossy(&k.key[..usize::from(k.len).min(STICKY_KEY_LEN)]).into_owned(),
    }
}

/// Name of a key kind.
pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        STICKY_CLIENT_ID => "client-id",
        STICKY_USERNAME => "username",
        STICKY_SOURCE => "source",
        _ => "unknown",
    }
}

/// A new value: `server` used now, expiring `expire` after.
pub fn value(server: SocketAddr, index: usize, expire: Duration) -> StickyValue {
    let now = now_ms();
    StickyValue {
        server_addr: crate::bpf::addr_bytes(server),
        server_port: server.port(),
        _pad: 0,
        server_index: index as u32,
        last_used_ms: now,
        expires_ms: now.saturating_add(expire.as_millis() as u64),
    }
}

/// The server address a value names.
pub fn server_of(v: &StickyValue) -> SocketAddr {
    crate::addr::from_bytes(v.server_addr, v.server_port)
}

/// The table, in a BPF map or in memory.
pub enum StickyTable {
    /// The pinned LRU map.
    Bpf(Arc<Bpf>),
    /// In-process fallback with the same capacity.
    Memory(Mutex<MemTable>),
}

/// The in-memory table: a map bounded at `capacity`; when full, expired entries go
/// first, then the least recently used eighth.
pub struct MemTable {
    entries: HashMap<[u8; 72], StickyValue>,
    capacity: usize,
}

fn key_bytes(k: &StickyKey) -> [u8; 72] {
    let mut out = [0; 72];
    out.copy_from_slice(bytemuck::bytes_of(k));
    out
}

impl StickyTable {
    /// An in-memory table of `capacity` entries.
    pub fn memory(capacity: usize) -> Self {
        Self::Memory(Mutex::new(MemTable {
            entries: HashMap::new(),
            capacity: capacity.max(1),
        }))
    }

    /// The live entry of `k` (an expired one is removed and not returned).
    pub fn get(&self, k: &StickyKey) -> Option<StickyValue> {
        let v = match self {
            Self::Bpf(b) => b.sticky_get(k)?,
            Self::Memory(m) => *m.lock().expect("sticky lock").entries.get(&key_bytes(k))?,
        };
        if v.expires_ms <= now_ms() {
            self.remove(k);
            return None;
        }
        Some(v)
    }

    /// Writes an entry.
    pub fn put(&self, k: &StickyKey, v: StickyValue) -> Result<(), String> {
        match self {
            Self::Bpf(b) => b.sticky_put(k, v).map_err(|e| e.to_string()),
            Self::Memory(m) => {
                let mut t = m.lock().expect("sticky lock");
                if t.entries.len() >= t.capacity && !t.entries.contains_key(&key_bytes(k)) {
                    t.evict();
                }
                t.entries.insert(key_bytes(k), v);
                Ok(())
            }
        }
    }

    /// Every entry (for `ctl sticky` through the control socket).
    pub fn entries(&self) -> Vec<(StickyKey, StickyValue)> {
        match self {
            Self::Bpf(b) => b.sticky_entries(),
            Self::Memory(m) => m
                .lock()
                .expect("sticky lock")
                .entries
                .iter()
                .map(|(k, v)| (bytemuck::pod_read_unaligned::<StickyKey>(k), *v))
                .collect(),
        }
    }

    /// Removes an entry (absent is fine).
    pub fn remove(&self, k: &StickyKey) {
        match self {
            Self::Bpf(b) => b.sticky_remove(k),
            Self::Memory(m) => {
                m.lock().expect("sticky lock").entries.remove(&key_bytes(k));
            }
        }
    }
}

impl MemTable {
    fn evict(&mut self) {
        let now = now_ms();
        self.entries.retain(|_, v| v.expires_ms > now);
        if self.entries.len() < self.capacity {
            return;
        }
        let mut ages: Vec<u64> = self.entries.values().map(|v| v.last_used_ms).collect();
        let cut = (ages.len() / 8).max(1);
        let (_, &mut threshold, _) = ages.select_nth_unstable(cut - 1);
        self.entries.retain(|_, v| v.last_used_ms > threshold);
    }

    /// Entries.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn empty_ids_and_usernames_have_no_key() {
        assert_eq!(key("c", Sticky::ClientId, "", None, LOCAL), None);
        assert_eq!(key("c", Sticky::Username, "dev-1", Some(""), LOCAL), None);
        assert_eq!(key("c", Sticky::Username, "dev-1", None, LOCAL), None);
        assert!(key("c", Sticky::Username, "", Some("u"), LOCAL).is_some());
    }

    #[test]
    fn short_keys_are_exact_and_long_keys_are_prefix_plus_hash() {
        let k = key("c", Sticky::ClientId, "dev-1", None, LOCAL).expect("key");
        assert_eq!((k.hashed, k.len), (0, 5));
        assert_eq!(&k.key[..5], b"dev-1");
        assert!(k.key[5..].iter().all(|&b| b == 0));
        assert_eq!(key_text(&k), "dev-1");

        let long_a = "x".repeat(100);
        let mut long_b = long_a.clone();
        long_b.replace_range(99.., "y");
        let a = key("c", Sticky::ClientId, &long_a, None, LOCAL).expect("a");
        let b = key("c", Sticky::ClientId, &long_b, None, LOCAL).expect("b");
        assert_eq!((a.hashed, a.len), (1, 100));
        assert_eq!(a.key[..32], b.key[..32], "same prefix");
        assert_ne!(a, b, "different hash");
        assert!(key_text(&a).starts_with(&"x".repeat(32)));

        // Clusters and kinds do not share entries.
        assert_ne!(key("d", Sticky::ClientId, "dev-1", None, LOCAL), Some(k));
        assert_ne!(
            key("c", Sticky::Username, "", Some("dev-1"), LOCAL),
            Some(k)
        );
        assert_eq!(key("c", Sticky::Username, "dev-1", None, LOCAL), None);
        assert_eq!(key("c", Sticky::None, "dev-1", None, LOCAL), None);
        let s = key("c", Sticky::Source, "ignored", None, LOCAL).expect("source");
        assert_eq!(key_text(&s), "127.0.0.1");
    }

    #[test]
    fn values_round_trip_and_expire() {
        let t = StickyTable::memory(10);
        let k = key("c", Sticky::ClientId, "dev-1", None, LOCAL).expect("key");
        let server: SocketAddr = "10.0.0.7:1883".parse().expect("addr");
        t.put(&k, value(server, 2, Duration::from_secs(60)))
            .expect("put");
        let v = t.get(&k).expect("entry");
        assert_eq!((server_of(&v), v.server_index), (server, 2));
        t.put(&k, value(server, 2, Duration::ZERO)).expect("put");
        assert_eq!(t.get(&k), None, "expired");
        let StickyTable::Memory(m) = &t else {
            unreachable!()
        };
        assert!(m.lock().expect("lock").is_empty(), "expired entry removed");
    }

    #[test]
    fn a_full_memory_table_forgets_the_least_recently_used() {
        let t = StickyTable::memory(16);
        let server: SocketAddr = "10.0.0.7:1883".parse().expect("addr");
        for i in 0..16 {
            let k = key("c", Sticky::ClientId, &format!("d{i}"), None, LOCAL).expect("key");
            let mut v = value(server, 0, Duration::from_secs(60));
            v.last_used_ms = 1000 + i;
            t.put(&k, v).expect("put");
        }
        let newest = key("c", Sticky::ClientId, "new", None, LOCAL).expect("key");
        t.put(&newest, value(server, 0, Duration::from_secs(60)))
            .expect("put");
        let StickyTable::Memory(m) = &t else {
            unreachable!()
        };
        assert!(m.lock().expect("lock").len() <= 16);
        let oldest = key("c", Sticky::ClientId, "d0", None, LOCAL).expect("key");
        let recent = key("c", Sticky::ClientId, "d15", None, LOCAL).expect("key");
        assert!(t.get(&oldest).is_none() && t.get(&recent).is_some());
        assert!(t.get(&newest).is_some());
    }
}
