//! Server selection. A [`Pool`] is built from one cluster's configuration and replaced
//! whole on reload; the live state of a server (open connections, failures, health,
//! bytes) is in a [`ServerLive`] that a reload hands on to the new pool when the
//! server keeps its name and address.
//!
//! [`Pool::select`] considers only servers that can take a connection (configured
//! `up`, healthy, not passively failed, not full, not yet tried for this client) and
//! uses backup servers only while no primary can take one. Among those:
//!
//! - `round-robin`: smooth weighted round robin (as NGINX does it): every server gains
//!   its weight each round, the richest is picked and pays the total;
//! - `least-conn`: fewest open connections per unit of weight; ties by round robin;
//! - `random`: two weighted random choices, the one with fewer connections per weight;
//! - `client-id` and `source`: a Maglev lookup table ([`Maglev`]) over the hash of the
//!   client id or of the client address. When the server in a key's slot cannot take
//!   the connection, the table is walked forward to the next one that can, so only the
//!   keys of an unusable server move, and they move back when it returns.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Instant,
};

use rand::Rng;

use crate::{
    config::{Balance, Cluster, Server, ServerState},
    dataplane::Traffic,
};

/// Live state of one server; shared by the pools of successive reloads.
#[derive(Debug, Default)]
pub struct ServerLive {
    /// Connections open to it now.
    pub active: AtomicU32,
    /// Connections handed to it.
    pub connections: AtomicU64,
    /// Failed connects to it.
    pub connect_failures: AtomicU64,
    /// Health state changes.
    pub health_flips: AtomicU64,
    /// Bytes carried each way.
    pub traffic: Arc<Traffic>,
    /// The active health check has it down.
    health_down: AtomicBool,
    /// Consecutive results against the current health state.
    health_streak: AtomicU32,
    /// Passive health: failures in the current window, and when the server may be
    /// tried again after reaching `max_fails`.
    fails: Mutex<Fails>,
}

#[derive(Debug, Default)]
struct Fails {
    count: u32,
    window_start: Option<Instant>,
    down_until: Option<Instant>,
}

/// A health state change reported by [`ServerLive::health_result`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flip {
    /// The server went down.
    Down,
    /// The server came back.
    Up,
}

impl ServerLive {
    /// Whether the active health check has this server up.
    pub fn healthy(&self) -> bool {
        !self.health_down.load(Ordering::Relaxed)
    }

    /// Whether passive failures keep the server out at `now`.
    pub fn failed(&self, now: Instant) -> bool {
        let fails = self.fails.lock().expect("fails lock");
        fails.down_until.is_some_and(|t| now < t)
    }

    /// Records one active check result; returns the flip when the state changes:
    /// `fall` consecutive failures take an up server down, `rise` consecutive
    /// successes bring a down server back.
    pub fn health_result(&self, ok: bool, rise: u32, fall: u32) -> Option<Flip> {
        let down = self.health_down.load(Ordering::Relaxed);
        if ok != down {
            // Agrees with the current state.
            self.health_streak.store(0, Ordering::Relaxed);
            return None;
        }
        let streak = self.health_streak.fetch_add(1, Ordering::Relaxed) + 1;
        if streak < if down { rise } else { fall } {
            return None;
        }
        self.health_streak.store(0, Ordering::Relaxed);
        self.health_down.store(!down, Ordering::Relaxed);
        self.health_flips.fetch_add(1, Ordering::Relaxed);
        Some(if down { Flip::Up } else { Flip::Down })
    }

    /// Forgets the active check's verdict (checks turned off): the server counts as up.
    pub fn clear_health(&self) {
        self.health_down.store(false, Ordering::Relaxed);
        self.health_streak.store(0, Ordering::Relaxed);
    }

    /// Records a failed connect (passive health check); true when it marks the
    /// server down for `fail_timeout`.
    fn report_failure(&self, cfg: &Server, now: Instant) -> bool {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
        if cfg.max_fails == 0 {
            return false;
        }
        let mut f = self.fails.lock().expect("fails lock");
        if f.window_start
            .is_none_or(|s| now.duration_since(s) > cfg.fail_timeout)
        {
            f.window_start = Some(now);
            f.count = 0;
        }
        f.count += 1;
        if f.count >= cfg.max_fails {
            f.down_until = Some(now + cfg.fail_timeout);
            f.count = 0;
            f.window_start = None;
            self.health_flips.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Records a successful connect: the failure window starts over.
    fn report_success(&self) {
        let mut f = self.fails.lock().expect("fails lock");
        f.count = 0;
        f.window_start = None;
    }
}

/// One server of a pool: its configuration and live state.
#[derive(Debug)]
pub struct ServerRt {
    /// Its configuration (shared with the leases of its connections).
    pub config: Arc<Server>,
    /// Its live state.
    pub live: Arc<ServerLive>,
}

impl ServerRt {
    /// Whether a new connection may go to this server now.
    pub fn available(&self, now: Instant) -> bool {
        if self.config.state != ServerState::Up || !self.live.healthy() {
            return false;
        }
        if let Some(max) = self.config.max_connections
            && self.live.active.load(Ordering::Relaxed) >= max.get()
        {
            return false;
        }
        !self.live.failed(now)
    }

    /// Open connections per unit of weight, as a fraction `active / weight`
    /// compared by cross-multiplication.
    fn load(&self) -> (u64, u64) {
        (
            u64::from(self.live.active.load(Ordering::Relaxed)),
            u64::from(self.config.weight.get()),
        )
    }
}

/// `a` carries less load than `b`.
fn lighter(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 * b.1 < b.0 * a.1
}

/// Size of a Maglev lookup table: a prime well above 100 x the servers of a cluster,
/// so the slots of each server are within 1% of its weighted share.
pub const MAGLEV_SIZE: usize = 65_537;

/// A Maglev lookup table (Eisenbud et al., NSDI 2016) over some servers of a pool.
///
/// Each server has a permutation of the slots, derived from the hash of its name; the
/// servers take turns claiming the next free slot of their permutation, a server of
/// weight w taking w turns for every turn of the lightest. The result depends only on
/// the names and weights, so every mqttlb instance with the same server list builds
/// the same table, and removing a server leaves almost every slot of the others as it
/// was.
#[derive(Debug)]
pub struct Maglev {
    /// Server index (in the pool) per slot; empty when the tier has no server.
    table: Vec<u32>,
}

impl Maglev {
    /// Builds the table over `servers` (pool index, name, weight).
    pub fn new(servers: &[(usize, &str, u32)]) -> Self {
        if servers.is_empty() {
            return Self { table: Vec::new() };
        }
        let m = MAGLEV_SIZE as u64;
        let perm: Vec<(u64, u64)> = servers
            .iter()
            .map(|(_, name, _)| {
                let offset = hash_bytes(name.as_bytes(), 0x6d61_676c) % m;
                let skip = hash_bytes(name.as_bytes(), 0x736b_6970) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let max_weight = servers.iter().map(|s| u64::from(s.2)).max().unwrap_or(1);
        let mut next = vec![0u64; servers.len()];
        let mut credit = vec![0u64; servers.len()];
        let mut table = vec![u32::MAX; MAGLEV_SIZE];
        let mut filled = 0;
        while filled < MAGLEV_SIZE {
            for (i, &(index, _, weight)) in servers.iter().enumerate() {
                credit[i] += u64::from(weight);
                while credit[i] >= max_weight && filled < MAGLEV_SIZE {
                    credit[i] -= max_weight;
                    let (offset, skip) = perm[i];
                    loop {
                        let slot = ((offset + next[i] * skip) % m) as usize;
                        next[i] += 1;
                        if table[slot] == u32::MAX {
                            table[slot] = index as u32;
                            filled += 1;
                            break;
                        }
                    }
                }
            }
        }
        Self { table }
    }

    /// The server for `hash`: the one in its slot, or walking forward, the first for
    /// which `usable` holds.
    pub fn lookup(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let start = (hash % self.table.len() as u64) as usize;
        let mut last = u32::MAX;
        for step in 0..self.table.len() {
            let index = self.table[(start + step) % self.table.len()];
            // Runs of one server are common; test each server once per run.
            if index != last {
                if usable(index as usize) {
                    return Some(index as usize);
                }
                last = index;
            }
        }
        None
    }

    /// The server owning `hash`'s slot, usable or not.
    #[cfg(test)]
    fn owner(&self, hash: u64) -> Option<usize> {
        self.lookup(hash, |_| true)
    }
}

/// A stable 64-bit hash (FNV-1a, then the SplitMix64 finalizer for avalanche). Stable
/// across builds and machines, unlike `std`'s hasher: consistent hashing relies on it.
pub fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// What a balancing decision may depend on.
#[derive(Debug, Clone, Copy)]
pub struct Key<'a> {
    /// The MQTT client id of the CONNECT.
    pub client_id: &'a str,
    /// The client's address (the one a PROXY header named, when there was one).
    pub source: IpAddr,
}

impl Key<'_> {
    fn source_hash(&self) -> u64 {
        let bytes = match self.source {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        };
        hash_bytes(&bytes, 0)
    }
}

/// The servers of one cluster and the balancing state.
#[derive(Debug)]
pub struct Pool {
    /// Servers in configuration order (the index is the server id).
    pub servers: Vec<ServerRt>,
    balance: Balance,
    empty_client_id: Balance,
    /// Smooth WRR current weights, one per server.
    current: Mutex<Vec<i64>>,
    /// Lookup tables of the primary and the backup servers (`client-id`, `source`).
    maglev: [Maglev; 2],
}

/// A server chosen for a connection; counts it in the server's `active` until dropped.
#[derive(Debug)]
pub struct Lease {
    /// Index of the server in its cluster.
    pub index: usize,
    /// Its address.
    pub address: SocketAddr,
    config: Arc<Server>,
    live: Arc<ServerLive>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.live.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Lease {
    /// Passive health: the connect failed; true when that marked the server down.
    pub fn failed(&self) -> bool {
        self.live.report_failure(&self.config, Instant::now())
    }
    /// The connect succeeded.
    pub fn succeeded(&self) {
        self.live.report_success();
        self.live.connections.fetch_add(1, Ordering::Relaxed);
    }
    /// The server's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }
    /// Byte counters of the server.
    pub fn traffic(&self) -> Arc<Traffic> {
        self.live.traffic.clone()
    }
}

impl Pool {
    /// Builds the pool of `cluster`, taking over the live state of servers of
    /// `previous` with the same name and address.
    pub fn new(cluster: &Cluster, previous: Option<&Pool>) -> Self {
        let servers: Vec<ServerRt> = cluster
            .servers
            .iter()
            .map(|config| {
                let live = previous
                    .and_then(|p| {
                        p.servers.iter().find(|s| {
                            s.config.name == config.name && s.config.address == config.address
                        })
                    })
                    .map(|s| s.live.clone())
                    .unwrap_or_default();
                ServerRt {
                    config: Arc::new(config.clone()),
                    live,
                }
            })
            .collect();
        let tier = |backup: bool| {
            let members: Vec<(usize, &str, u32)> = servers
                .iter()
                .enumerate()
                .filter(|(_, s)| s.config.backup == backup)
                .map(|(i, s)| (i, s.config.name.as_str(), s.config.weight.get()))
                .collect();
            Maglev::new(&members)
        };
        let uses_table = matches!(cluster.balance, Balance::ClientId | Balance::Source);
        let maglev = if uses_table {
            [tier(false), tier(true)]
        } else {
            [Maglev::new(&[]), Maglev::new(&[])]
        };
        Self {
            current: Mutex::new(vec![0; servers.len()]),
            servers,
            balance: cluster.balance,
            empty_client_id: cluster.empty_client_id,
            maglev,
        }
    }

    /// The index of the server at `address`, if the pool has one.
    pub fn position(&self, address: SocketAddr) -> Option<usize> {
        self.servers
            .iter()
            .position(|s| s.config.address == address)
    }

    /// Leases server `index` if it can take a connection now and is not in `tried`
    /// (one flag per server). Backups only while no primary is usable.
    pub fn take(&self, index: usize, tried: &[bool]) -> Option<Lease> {
        let now = Instant::now();
        let server = self.servers.get(index)?;
        if tried[index] || !server.available(now) {
            return None;
        }
        if server.config.backup && self.any_primary(now) {
            return None;
        }
        Some(self.lease(index))
    }

    fn any_primary(&self, now: Instant) -> bool {
        self.servers
            .iter()
            .any(|s| !s.config.backup && s.available(now))
    }

    fn lease(&self, index: usize) -> Lease {
        let server = &self.servers[index];
        server.live.active.fetch_add(1, Ordering::Relaxed);
        Lease {
            index,
            address: server.config.address,
            config: server.config.clone(),
            live: server.live.clone(),
        }
    }

    /// Picks a server for `key` not yet in `tried` (one flag per server).
    pub fn select(&self, key: &Key<'_>, tried: &[bool]) -> Option<Lease> {
        let now = Instant::now();
        let usable_in = |backup: bool| {
            move |i: usize| {
                let s = &self.servers[i];
                s.config.backup == backup && !tried[i] && s.available(now)
            }
        };
        // Backups serve only while no primary is usable at all (tried ones included).
        let mut backup = false;
        if !(0..self.servers.len()).any(usable_in(false)) {
            if self.any_primary(now) {
                return None;
            }
            backup = true;
        }
        let usable = usable_in(backup);
        // An empty client id (a clean session letting the broker assign one) names no
        // device: hashing it would send every such client to one server.
        let balance = match self.balance {
            Balance::ClientId if key.client_id.is_empty() => self.empty_client_id,
            b => b,
        };
        let index = match balance {
            Balance::ClientId => self.maglev[usize::from(backup)]
                .lookup(hash_bytes(key.client_id.as_bytes(), 0), usable),
            Balance::Source => self.maglev[usize::from(backup)].lookup(key.source_hash(), usable),
            Balance::RoundRobin => self.smooth_wrr(&self.candidates(&usable)),
            Balance::LeastConn => {
                let candidates = self.candidates(&usable);
                let best = candidates
                    .iter()
                    .map(|&i| self.servers[i].load())
                    .reduce(|a, b| if lighter(b, a) { b } else { a })?;
                let ties: Vec<usize> = candidates
                    .into_iter()
                    .filter(|&i| !lighter(best, self.servers[i].load()))
                    .collect();
                self.smooth_wrr(&ties)
            }
            Balance::Random => self.two_choices(&self.candidates(&usable)),
        }?;
        Some(self.lease(index))
    }

    fn candidates(&self, usable: &impl Fn(usize) -> bool) -> Vec<usize> {
        (0..self.servers.len()).filter(|&i| usable(i)).collect()
    }

    /// The server of `key` in the lookup table, whatever its state.
    #[cfg(test)]
    fn table_owner(&self, key: &Key<'_>) -> Option<usize> {
        let hash = match self.balance {
            Balance::Source => key.source_hash(),
            _ => hash_bytes(key.client_id.as_bytes(), 0),
        };
        self.maglev[0].owner(hash)
    }

    fn smooth_wrr(&self, candidates: &[usize]) -> Option<usize> {
        let mut current = self.current.lock().expect("wrr lock");
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for &i in candidates {
            let w = i64::from(self.servers[i].config.weight.get());
            current[i] += w;
            total += w;
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        current[b] -= total;
        Some(b)
    }

    /// Power of two choices: two servers drawn in proportion to their weights, the
    /// one with fewer connections per weight wins.
    fn two_choices(&self, candidates: &[usize]) -> Option<usize> {
        let total: u64 = candidates
            .iter()
            .map(|&i| u64::from(self.servers[i].config.weight.get()))
            .sum();
        if total == 0 {
            return None;
        }
        let mut rng = rand::thread_rng();
        let mut draw = || {
            let mut r = rng.gen_range(0..total);
            for &i in candidates {
                let w = u64::from(self.servers[i].config.weight.get());
                if r < w {
                    return i;
                }
                r -= w;
            }
            candidates[candidates.len() - 1]
        };
        let (a, b) = (draw(), draw());
        Some(if lighter(self.servers[b].load(), self.servers[a].load()) {
            b
        } else {
            a
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::Ipv4Addr, num::NonZeroU32, time::Duration};

    use super::*;
    use crate::config::Config;

    fn cluster(balance: &str, servers: &[(u32, bool, &str)]) -> Cluster {
        let mut text = format!(
            "[[listeners]]\nname='l'\nbind='127.0.0.1:1'\ncluster='c'\n[[clusters]]\nname='c'\nbalance='{balance}'\n"
        );
        for (i, (w, backup, state)) in servers.iter().enumerate() {
            text += &format!(
                "[[clusters.servers]]\nname='s{i}'\naddress='127.0.0.1:{}'\nweight={w}\nbackup={backup}\nstate='{state}'\n",
                1000 + i
            );
        }
        Config::parse(&text).expect("valid").clusters.remove(0)
    }

    fn pool(servers: &[(u32, bool, &str)]) -> Pool {
        Pool::new(&cluster("round-robin", servers), None)
    }

    fn key(id: &str) -> Key<'_> {
        Key {
            client_id: id,
            source: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    fn pick(p: &Pool) -> Option<usize> {
        p.select(&key("x"), &vec![false; p.servers.len()])
            .map(|l| l.index)
    }

    fn counts(picks: impl Iterator<Item = usize>, n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for i in picks {
            c[i] += 1;
        }
        c
    }

    #[test]
    fn weighted_round_robin_is_smooth_and_exact() {
        let p = pool(&[(3, false, "up"), (2, false, "up"), (1, false, "up")]);
        let picks: Vec<usize> = (0..12).filter_map(|_| pick(&p)).collect();
        assert_eq!(counts(picks.iter().copied(), 3), [6, 4, 2]);
        // Smooth: the heaviest server is never picked three times in a row.
        assert!(
            !picks.windows(3).any(|w| w.iter().all(|&i| i == 0)),
            "{picks:?}"
        );
    }

    #[test]
    fn skips_drained_down_and_tried_servers_and_uses_backups_last() {
        for balance in ["round-robin", "least-conn", "random", "client-id", "source"] {
            let p = Pool::new(
                &cluster(
                    balance,
                    &[
                        (1, false, "drain"),
                        (1, false, "up"),
                        (1, false, "down"),
                        (1, true, "up"),
                    ],
                ),
                None,
            );
            for id in ["a", "b", "c", "d", "e"] {
                let l = p.select(&key(id), &[false; 4]).map(|l| l.index);
                assert_eq!(l, Some(1), "{balance}");
            }
            assert_eq!(
                p.select(&key("a"), &[false, true, false, false])
                    .map(|l| l.index),
                None,
                "{balance}: backup only when no primary is up"
            );
            let only_backup = Pool::new(
                &cluster(balance, &[(1, false, "down"), (1, true, "up")]),
                None,
            );
            assert_eq!(pick(&only_backup), Some(1), "{balance}");
        }
    }

    #[test]
    fn passive_failures_take_a_server_out_for_fail_timeout() {
        let p = pool(&[(1, false, "up"), (1, false, "up")]);
        let lease = p.select(&key("x"), &[false, true]).expect("server 0");
        assert!(lease.failed(), "max_fails = 1 marks it down");
        drop(lease);
        for _ in 0..4 {
            assert_eq!(pick(&p), Some(1));
        }
        assert!(p.servers[0].available(Instant::now() + Duration::from_secs(11)));
        assert_eq!(p.servers[0].live.health_flips.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn leases_count_active_connections_and_respect_max() {
        let mut c = cluster("round-robin", &[(1, false, "up")]);
        c.servers[0].max_connections = NonZeroU32::new(2);
        let p = Pool::new(&c, None);
        let a = p.select(&key("x"), &[false]).expect("1");
        let b = p.select(&key("x"), &[false]).expect("2");
        assert!(p.select(&key("x"), &[false]).is_none(), "full");
        assert_eq!(p.servers[0].live.active.load(Ordering::Relaxed), 2);
        drop((a, b));
        assert_eq!(p.servers[0].live.active.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn least_conn_weighs_open_connections() {
        let p = Pool::new(
            &cluster("least-conn", &[(2, false, "up"), (1, false, "up")]),
            None,
        );
        // Holding every lease: loads must stay at 2:1.
        let leases: Vec<Lease> = (0..30)
            .map(|_| p.select(&key("x"), &[false, false]).expect("lease"))
            .collect();
        assert_eq!(counts(leases.iter().map(|l| l.index), 2), [20, 10]);
    }

    #[test]
    fn least_conn_fills_the_emptied_server() {
        let p = Pool::new(
            &cluster("least-conn", &[(1, false, "up"), (1, false, "up")]),
            None,
        );
        let mut leases: Vec<Lease> = (0..10)
            .map(|_| p.select(&key("x"), &[false, false]).expect("lease"))
            .collect();
        leases.retain(|l| l.index == 0);
        let next: Vec<usize> = (0..5)
            .map(|_| p.select(&key("x"), &[false, false]).expect("lease").index)
            .collect();
        assert!(next.iter().all(|&i| i == 1), "{next:?}");
    }

    #[test]
    fn random_two_choices_balance_and_honour_weights() {
        let p = Pool::new(
            &cluster(
                "random",
                &[(3, false, "up"), (2, false, "up"), (1, false, "up")],
            ),
            None,
        );
        let leases: Vec<Lease> = (0..600)
            .map(|_| p.select(&key("x"), &[false; 3]).expect("lease"))
            .collect();
        let c = counts(leases.iter().map(|l| l.index), 3);
        for (got, want) in c.iter().zip([300.0, 200.0, 100.0]) {
            assert!((*got as f64 - want).abs() <= want * 0.2, "{c:?}");
        }
    }

    fn id_counts(p: &Pool, n: usize) -> Vec<usize> {
        let ids: Vec<String> = (0..n).map(|i| format!("device-{i}")).collect();
        counts(
            ids.iter().map(|id| {
                p.select(&key(id), &vec![false; p.servers.len()])
                    .expect("lease")
                    .index
            }),
            p.servers.len(),
        )
    }

    #[test]
    fn empty_client_ids_use_the_fallback_not_one_hash() {
        let p = Pool::new(&cluster("client-id", &[(1, false, "up"); 3]), None);
        // Held leases: least-conn (the default fallback) fills the servers in turn.
        let leases: Vec<Lease> = (0..300)
            .map(|_| p.select(&key(""), &[false; 3]).expect("lease"))
            .collect();
        let c = counts(leases.iter().map(|l| l.index), 3);
        assert_eq!(c, vec![100, 100, 100]);
    }

    #[test]
    fn client_id_spreads_by_weight() {
        let even = Pool::new(&cluster("client-id", &[(1, false, "up"); 3]), None);
        for got in id_counts(&even, 6000) {
            assert!((got as f64 - 2000.0).abs() <= 200.0, "{got}");
        }
        let weighted = Pool::new(
            &cluster(
                "client-id",
                &[(3, false, "up"), (2, false, "up"), (1, false, "up")],
            ),
            None,
        );
        let c = id_counts(&weighted, 6000);
        for (got, want) in c.iter().zip([3000.0, 2000.0, 1000.0]) {
            assert!((*got as f64 - want).abs() <= want * 0.1, "{c:?}");
        }
        // The table itself is exact to a fraction of a percent.
        let slots = counts(weighted.maglev[0].table.iter().map(|&i| i as usize), 3);
        for (got, want) in slots.iter().zip([3.0 / 6.0, 2.0 / 6.0, 1.0 / 6.0]) {
            let share = *got as f64 / MAGLEV_SIZE as f64;
            assert!((share - want).abs() < 0.005, "{slots:?}");
        }
    }

    #[test]
    fn client_id_is_deterministic_and_moves_only_an_unusable_servers_ids() {
        let servers = [(1, false, "up"); 3];
        let a = Pool::new(&cluster("client-id", &servers), None);
        let b = Pool::new(&cluster("client-id", &servers), None);
        let ids: Vec<String> = (0..3000).map(|i| format!("id-{i}")).collect();
        let place = |p: &Pool, tried: &[bool]| -> Vec<usize> {
            ids.iter()
                .map(|id| p.select(&key(id), tried).expect("lease").index)
                .collect()
        };
        let before = place(&a, &[false; 3]);
        assert_eq!(before, place(&b, &[false; 3]), "same list, same mapping");
        // Server 2 unusable (here: tried): only its ids move.
        let without = place(&a, &[false, false, true]);
        for (x, y) in before.iter().zip(&without) {
            if *x != 2 {
                assert_eq!(x, y);
            }
        }
        assert_eq!(before, place(&a, &[false; 3]), "and they come back");
    }

    #[test]
    fn removing_a_server_from_the_list_moves_under_one_percent_of_the_others() {
        let three = Pool::new(&cluster("client-id", &[(1, false, "up"); 3]), None);
        let mut c = cluster("client-id", &[(1, false, "up"); 3]);
        c.servers.remove(2);
        let two = Pool::new(&c, None);
        let mut kept = 0;
        let mut moved = 0;
        for i in 0..20_000 {
            let id = format!("sensor/{i}");
            let k = key(&id);
            let was = three.table_owner(&k).expect("owner");
            if was != 2 {
                kept += 1;
                if two.table_owner(&k) != Some(was) {
                    moved += 1;
                }
            }
        }
        assert!(moved * 100 < kept, "{moved} of {kept} moved");
    }

    #[test]
    fn source_hash_is_stable_per_address() {
        let p = Pool::new(&cluster("source", &[(1, false, "up"); 3]), None);
        let mut seen: HashMap<u8, usize> = HashMap::new();
        for round in 0..3 {
            for last in 0..=255u8 {
                let k = Key {
                    client_id: "ignored",
                    source: IpAddr::V4(Ipv4Addr::new(10, 0, round, last)),
                };
                let i = p.select(&k, &[false; 3]).expect("lease").index;
                if round == 0 {
                    seen.insert(last, i);
                }
                let again = p.select(&k, &[false; 3]).expect("lease").index;
                assert_eq!(i, again);
            }
        }
        let c = counts(seen.values().copied(), 3);
        assert!(c.iter().all(|&n| n > 50), "{c:?}");
    }

    #[test]
    fn health_flips_after_fall_failures_and_rise_successes() {
        let live = ServerLive::default();
        assert_eq!(live.health_result(false, 2, 3), None);
        assert_eq!(live.health_result(false, 2, 3), None);
        assert_eq!(live.health_result(true, 2, 3), None, "streak broken");
        assert_eq!(live.health_result(false, 2, 3), None);
        assert_eq!(live.health_result(false, 2, 3), None);
        assert_eq!(live.health_result(false, 2, 3), Some(Flip::Down));
        assert!(!live.healthy());
        assert_eq!(live.health_result(false, 2, 3), None);
        assert_eq!(live.health_result(true, 2, 3), None);
        assert_eq!(live.health_result(true, 2, 3), Some(Flip::Up));
        assert!(live.healthy());
        assert_eq!(live.health_flips.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn reload_keeps_live_state_of_unchanged_servers() {
        let c = cluster("round-robin", &[(1, false, "up"), (1, false, "up")]);
        let old = Pool::new(&c, None);
        let lease = old.select(&key("x"), &[false, true]).expect("s0");
        let mut changed = c.clone();
        changed.servers[1].address = "127.0.0.1:2000".parse().expect("addr");
        let new = Pool::new(&changed, Some(&old));
        assert_eq!(new.servers[0].live.active.load(Ordering::Relaxed), 1);
        assert!(Arc::ptr_eq(&new.servers[0].live, &old.servers[0].live));
        assert!(!Arc::ptr_eq(&new.servers[1].live, &old.servers[1].live));
        drop(lease);
        assert_eq!(new.servers[0].live.active.load(Ordering::Relaxed), 0);
    }
}
