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

mod maglev;
#[cfg(test)]
mod tests;

pub use maglev::{MAGLEV_SIZE, Maglev, hash_bytes};

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

    /// Takes the verdict another worker's checks reached (`[global] workers`): true
    /// when that changed this server's state.
    pub fn follow_health(&self, down: bool) -> bool {
        let changed = self.health_down.swap(down, Ordering::Relaxed) != down;
        if changed {
            self.health_flips.fetch_add(1, Ordering::Relaxed);
        }
        changed
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

    /// The server named `name`, counted in its `active` as a selection is: for a
    /// connection a hot upgrade handed over.
    pub fn lease_named(&self, name: &str) -> Option<Lease> {
        let index = self.servers.iter().position(|s| s.config.name == name)?;
        Some(self.lease(index))
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
                // One reading of each server's load: other threads lease and release
                // all the time, and comparing a second reading against the best of
                // the first could leave no server at all (a client refused with
                // CONNACK 3 while every server was up).
                let loads: Vec<(usize, (u64, u64))> = self
                    .candidates(&usable)
                    .into_iter()
                    .map(|i| (i, self.servers[i].load()))
                    .collect();
                let best = loads
                    .iter()
                    .map(|&(_, load)| load)
                    .reduce(|a, b| if lighter(b, a) { b } else { a })?;
                let ties: Vec<usize> = loads
                    .into_iter()
                    .filter(|&(_, load)| !lighter(best, load))
                    .map(|(i, _)| i)
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
