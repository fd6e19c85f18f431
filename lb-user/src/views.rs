//! The views of a running daemon that `ctl` (through the control socket) and the admin
//! API show: servers, counters, sticky entries. Built from the daemon's own state, so
//! they are the same with or without BPF.

use lb_common::{
    BACKEND_BACKUP, BACKEND_DOWN, BACKEND_DRAIN, BACKEND_FAILED, BACKEND_FULL, BACKEND_HEALTH_DOWN,
    BACKEND_OVERRIDDEN, BackendInfo,
};
use serde::{Deserialize, Serialize};

use crate::{bpf::addr_string, runtime::Shared};

/// Every server, as `ctl backends` shows it.
pub fn servers(shared: &Shared) -> Vec<BackendView> {
    (0..)
        .zip(crate::daemon::backend_rows(shared))
        .map(|(slot, b)| backend_view(slot, &b))
        .collect()
}

/// Every daemon counter by name, in index order.
pub fn stats(shared: &Shared) -> Vec<(&'static str, u64)> {
    lb_common::DaemonStat::ALL
        .iter()
        .map(|&s| (s.name(), shared.stats.get(s)))
        .collect()
}

/// Every sticky entry, named by server.
pub fn sticky(shared: &Shared) -> Vec<StickyView> {
    let rows: Vec<(u32, lb_common::BackendInfo)> =
        (0..).zip(crate::daemon::backend_rows(shared)).collect();
    sticky_views(&shared.sticky.entries(), &rows)
}

/// The counters and servers of the whole instance, for the admin listener: this
/// daemon's, plus every other worker's with `[global] workers`
/// ([`crate::workers::peers::totals`]).
pub struct Totals {
    /// By [`lb_common::DaemonStat`] index.
    pub counters: Vec<u64>,
    /// Every server, with every worker's connections and bytes.
    pub servers: Vec<BackendView>,
}

impl Totals {
    /// This daemon's own.
    pub fn local(shared: &Shared) -> Self {
        Self {
            counters: stats(shared).into_iter().map(|(_, v)| v).collect(),
            servers: servers(shared),
        }
    }

    /// A counter.
    pub fn get(&self, d: lb_common::DaemonStat) -> u64 {
        self.counters.get(d as usize).copied().unwrap_or(0)
    }

    /// Adds another worker's counters (by name) and servers.
    pub fn add(&mut self, counters: &[(String, u64)], servers: &[BackendView]) {
        for (name, v) in counters {
            if let Some(d) = lb_common::DaemonStat::ALL.iter().find(|d| d.name() == name) {
                self.counters[*d as usize] += v;
            }
        }
        add_traffic(&mut self.servers, servers);
    }

    /// The counters as a JSON object by name.
    pub fn counters_map(&self) -> serde_json::Map<String, serde_json::Value> {
        lb_common::DaemonStat::ALL
            .iter()
            .map(|&d| (d.name().to_owned(), self.get(d).into()))
            .collect()
    }
}

/// Adds the connections, bytes and failures `other` (another worker's view) counts
/// to the same servers in `total`.
pub fn add_traffic(total: &mut [BackendView], other: &[BackendView]) {
    for t in total.iter_mut() {
        if let Some(o) = other
            .iter()
            .find(|o| o.cluster == t.cluster && o.name == t.name)
        {
            t.active += o.active;
            t.connections += o.connections;
            t.bytes_c2s += o.bytes_c2s;
            t.bytes_s2c += o.bytes_s2c;
            t.connect_failures += o.connect_failures;
        }
    }
}

/// One server as `ctl backends`, the control socket and the admin API show it.
#[derive(Debug, Serialize, Deserialize)]
pub struct BackendView {
    /// Position in the `backends` map.
    pub slot: u32,
    /// Its cluster.
    pub cluster: String,
    /// Its name.
    pub name: String,
    /// Its address.
    pub address: String,
    /// Configured state (runtime changes included): up, drain or down.
    pub state: String,
    /// Whether new connections may go to it now.
    pub usable: bool,
    /// Why not, or what else holds: backup, health-down, failed, full, runtime (state
    /// or weight changed at runtime, overriding the file).
    pub flags: Vec<String>,
    /// State or weight changed at runtime.
    #[serde(default)]
    pub overridden: bool,
    /// Weight (runtime changes included).
    pub weight: u32,
    /// Connections open now.
    pub active: u32,
    /// `max_connections`.
    pub max_connections: Option<u32>,
    /// Connections made.
    pub connections: u64,
    /// Bytes carried client to server (both planes).
    pub bytes_c2s: u64,
    /// Bytes carried server to client (both planes).
    pub bytes_s2c: u64,
    /// Failed connects.
    pub connect_failures: u64,
    /// Health state changes.
    pub health_flips: u64,
}

fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// A `backends` map row as `ctl backends` shows it.
pub fn backend_view(slot: u32, b: &BackendInfo) -> BackendView {
    let mut flags = Vec::new();
    for (bit, name) in [
        (BACKEND_BACKUP, "backup"),
        (BACKEND_HEALTH_DOWN, "health-down"),
        (BACKEND_FAILED, "failed"),
        (BACKEND_FULL, "full"),
        (BACKEND_OVERRIDDEN, "runtime"),
    ] {
        if b.flags & bit != 0 {
            flags.push(name.to_owned());
        }
    }
    let state = match b.state {
        BACKEND_DRAIN => "drain",
        BACKEND_DOWN => "down",
        _ => "up",
    };
    BackendView {
        slot,
        cluster: text(&b.cluster),
        name: text(&b.name),
        address: addr_string(b.addr, b.port),
        state: state.to_owned(),
        usable: state == "up"
            && b.flags & (BACKEND_HEALTH_DOWN | BACKEND_FAILED | BACKEND_FULL) == 0,
        flags,
        overridden: b.flags & BACKEND_OVERRIDDEN != 0,
        weight: b.weight,
        active: b.active,
        max_connections: (b.max_connections != 0).then_some(b.max_connections),
        connections: b.connections,
        bytes_c2s: b.bytes_c2s,
        bytes_s2c: b.bytes_s2c,
        connect_failures: b.connect_failures,
        health_flips: b.health_flips,
    }
}

impl BackendView {
    /// The text view's one word: `up` only when new connections may go to the server;
    /// otherwise its configured state, or for an `up` server what keeps it from use.
    pub fn status(&self) -> &str {
        if self.usable || self.state != "up" {
            return &self.state;
        }
        self.flags
            .iter()
            .map(String::as_str)
            .find(|f| *f != "backup" && *f != "runtime")
            .unwrap_or("unusable")
    }
}

/// One sticky entry as `ctl sticky` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct StickyView {
    /// The entry's cluster.
    pub cluster: String,
    /// `client-id`, `username` or `source`.
    pub kind: String,
    /// The key as stored.
    pub key: String,
    /// Whether `key` is a prefix followed by the SHA-256 of the whole key.
    pub hashed: bool,
    /// The server it names (empty when the server is gone).
    pub server: String,
    /// That server's address.
    pub server_address: String,
    /// Since the entry was last written.
    pub age_ms: u64,
    /// Until it expires.
    pub expires_in_ms: u64,
}

/// Sticky entries as `ctl sticky` shows them, each named by its server in `backends`
/// (slot, row) when the server is still there.
pub fn sticky_views(
    entries: &[(lb_common::StickyKey, lb_common::StickyValue)],
    backends: &[(u32, BackendInfo)],
) -> Vec<StickyView> {
    let now = crate::sticky::now_ms();
    entries
        .iter()
        .map(|(k, v)| {
            let address = crate::sticky::server_of(v);
            let owner = backends.iter().find(|(_, b)| {
                crate::sticky::cluster_tag(&text(&b.cluster)) == k.cluster
                    && addr_string(b.addr, b.port) == address.to_string()
            });
            StickyView {
                cluster: owner
                    .map_or_else(|| format!("#{:08x}", k.cluster), |(_, b)| text(&b.cluster)),
                kind: crate::sticky::kind_name(k.kind).to_owned(),
                key: crate::sticky::key_text(k),
                hashed: k.hashed == 1,
                server: owner.map_or_else(|| "(removed)".to_owned(), |(_, b)| text(&b.name)),
                server_address: address.to_string(),
                age_ms: now.saturating_sub(v.last_used_ms),
                expires_in_ms: v.expires_ms.saturating_sub(now),
            }
        })
        .collect()
}
