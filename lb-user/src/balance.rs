//! Server selection. A [`Pool`] is built from one cluster's configuration and replaced
//! whole on reload; [`Pool::select`] skips servers that cannot take a connection
//! (administratively down or draining, passively failed, full) and uses backup servers
//! only while no primary can be used.
//!
//! Round robin is smooth weighted round robin (as NGINX does it): every server gains
//! its weight each round, the richest is picked and pays the total.

use std::{
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Instant,
};

use crate::config::{Cluster, Server, ServerState};

/// Live state of one server.
#[derive(Debug)]
pub struct ServerRt {
    /// Its configuration.
    pub config: Server,
    /// Connections open to it now.
    pub active: AtomicU32,
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

impl ServerRt {
    fn new(config: Server) -> Self {
        Self {
            config,
            active: AtomicU32::new(0),
            fails: Mutex::new(Fails::default()),
        }
    }

    /// Whether a new connection may go to this server now.
    pub fn available(&self, now: Instant) -> bool {
        if self.config.state != ServerState::Up {
            return false;
        }
        if let Some(max) = self.config.max_connections
            && self.active.load(Ordering::Relaxed) >= max.get()
        {
            return false;
        }
        let fails = self.fails.lock().expect("fails lock");
        fails.down_until.is_none_or(|t| now >= t)
    }

    /// Records a failed connect (passive health check).
    pub fn report_failure(&self, now: Instant) -> bool {
        let cfg = &self.config;
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
            return true;
        }
        false
    }

    /// Records a successful connect: the failure window starts over.
    pub fn report_success(&self) {
        let mut f = self.fails.lock().expect("fails lock");
        f.count = 0;
        f.window_start = None;
    }
}

/// The servers of one cluster and the round-robin state.
#[derive(Debug)]
pub struct Pool {
    /// Servers in configuration order (the index is the server id).
    pub servers: Vec<ServerRt>,
    /// Smooth WRR current weights, one per server.
    current: Mutex<Vec<i64>>,
}

/// A server chosen for a connection; counts it in the server's `active` until dropped.
#[derive(Debug)]
pub struct Lease<'a> {
    /// Index of the server in its cluster.
    pub index: usize,
    /// Its address.
    pub address: SocketAddr,
    server: &'a ServerRt,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.server.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Lease<'_> {
    /// Passive health: the connect failed.
    pub fn failed(&self) -> bool {
        self.server.report_failure(Instant::now())
    }
    /// The connect succeeded.
    pub fn succeeded(&self) {
        self.server.report_success();
    }
    /// The server's name.
    pub fn name(&self) -> &str {
        &self.server.config.name
    }
}

impl Pool {
    /// Builds the pool of `cluster`.
    pub fn new(cluster: &Cluster) -> Self {
        Self {
            servers: cluster.servers.iter().cloned().map(ServerRt::new).collect(),
            current: Mutex::new(vec![0; cluster.servers.len()]),
        }
    }

    /// Picks a server not yet in `tried` (one flag per server), primaries first.
    pub fn select(&self, tried: &[bool]) -> Option<Lease<'_>> {
        let now = Instant::now();
        let usable = |backup: bool| {
            self.servers
                .iter()
                .enumerate()
                .filter(move |(i, s)| s.config.backup == backup && !tried[*i] && s.available(now))
                .map(|(i, _)| i)
                .collect::<Vec<_>>()
        };
        let mut candidates = usable(false);
        if candidates.is_empty() {
            // Backups serve only while no primary is usable at all (tried ones included).
            let any_primary = self
                .servers
                .iter()
                .any(|s| !s.config.backup && s.available(now));
            if !any_primary {
                candidates = usable(true);
            }
        }
        let index = self.smooth_wrr(&candidates)?;
        let server = &self.servers[index];
        server.active.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            index,
            address: server.config.address,
            server,
        })
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
}

#[cfg(test)]
mod tests {
    use std::{num::NonZeroU32, time::Duration};

    use super::*;
    use crate::config::Config;

    fn pool(servers: &[(u32, bool, &str)]) -> Pool {
        let mut text = String::from(
            "[[listeners]]\nname='l'\nbind='127.0.0.1:1'\ncluster='c'\n[[clusters]]\nname='c'\n",
        );
        for (i, (w, backup, state)) in servers.iter().enumerate() {
            text += &format!(
                "[[clusters.servers]]\nname='s{i}'\naddress='127.0.0.1:{}'\nweight={w}\nbackup={backup}\nstate='{state}'\n",
                1000 + i
            );
        }
        Pool::new(&Config::parse(&text).expect("valid").clusters[0])
    }

    fn pick(p: &Pool) -> Option<usize> {
        p.select(&vec![false; p.servers.len()]).map(|l| l.index)
    }

    #[test]
    fn weighted_round_robin_is_smooth_and_exact() {
        let p = pool(&[(3, false, "up"), (2, false, "up"), (1, false, "up")]);
        let picks: Vec<usize> = (0..12).filter_map(|_| pick(&p)).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 6);
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 4);
        assert_eq!(picks.iter().filter(|&&i| i == 2).count(), 2);
        // Smooth: the heaviest server is never picked three times in a row.
        assert!(
            !picks.windows(3).any(|w| w.iter().all(|&i| i == 0)),
            "{picks:?}"
        );
    }

    #[test]
    fn skips_drained_down_and_tried_servers_and_uses_backups_last() {
        let p = pool(&[
            (1, false, "drain"),
            (1, false, "up"),
            (1, false, "down"),
            (1, true, "up"),
        ]);
        for _ in 0..5 {
            assert_eq!(pick(&p), Some(1));
        }
        assert_eq!(
            p.select(&[false, true, false, false]).map(|l| l.index),
            None,
            "backup only when no primary is up"
        );
        let only_backup = pool(&[(1, false, "down"), (1, true, "up")]);
        assert_eq!(pick(&only_backup), Some(1));
    }

    #[test]
    fn passive_failures_take_a_server_out_for_fail_timeout() {
        let p = pool(&[(1, false, "up"), (1, false, "up")]);
        let lease = p.select(&[false, true]).expect("server 0");
        assert!(lease.failed(), "max_fails = 1 marks it down");
        drop(lease);
        for _ in 0..4 {
            assert_eq!(pick(&p), Some(1));
        }
        assert!(p.servers[0].available(Instant::now() + Duration::from_secs(11)));
    }

    #[test]
    fn leases_count_active_connections_and_respect_max() {
        let mut p = pool(&[(1, false, "up")]);
        p.servers[0].config.max_connections = NonZeroU32::new(2);
        let a = p.select(&[false]).expect("1");
        let b = p.select(&[false]).expect("2");
        assert!(p.select(&[false]).is_none(), "full");
        assert_eq!(p.servers[0].active.load(Ordering::Relaxed), 2);
        drop((a, b));
        assert_eq!(p.servers[0].active.load(Ordering::Relaxed), 0);
    }
}
