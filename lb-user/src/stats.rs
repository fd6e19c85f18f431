//! The daemon's counters: atomics bumped on the connection path (never a log line per
//! packet), published to the pinned `daemon_stats` map for `mqttlb ctl stats`.

use std::sync::atomic::{AtomicU64, Ordering};

use lb_common::DaemonStat;
use prometheus_client::metrics::{counter::Counter, family::Family, histogram::Histogram};

/// Labels of a per-server histogram: cluster and server.
pub type ServerLabels = Vec<(&'static str, String)>;

/// Buckets in seconds for durations on the loopback or a LAN (100 us to 10 s).
const SECONDS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.0, 10.0,
];

fn seconds() -> Histogram {
    Histogram::new(SECONDS)
}

/// One atomic per [`DaemonStat`], and the durations `/metrics` shows as histograms.
#[derive(Debug)]
pub struct Stats {
    values: [AtomicU64; DaemonStat::COUNT as usize],
    /// Accept to the server's TCP connection established (connections that reached
    /// a server), in seconds: the CONNECT's reading and validation, the choice of
    /// server and the connect(s).
    pub server_reached: Histogram,
    /// Accept to the server's first bytes (its CONNACK) as the daemon forwards them, in
    /// seconds: not for a connection spliced before the CONNACK came back (its bytes
    /// are counted from the kernel later).
    pub connect_duration: Histogram,
    /// Active health checks that finished (passed or failed), by server, in seconds.
    pub health_checks: Family<ServerLabels, Histogram, fn() -> Histogram>,
    /// Connections that reached their end after the CONNECT, by listener, cluster,
    /// server and result (`closed`, `idle_timeout`, `evicted`, `aborted`, or
    /// `no_server` with an empty server).
    pub connections: Family<ServerLabels, Counter>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            values: std::array::from_fn(|_| AtomicU64::new(0)),
            server_reached: seconds(),
            connect_duration: seconds(),
            health_checks: Family::new_with_constructor(seconds),
            connections: Family::default(),
        }
    }
}

impl Stats {
    /// Counts one connection's end in [`Stats::connections`].
    pub fn connection_ended(&self, listener: &str, cluster: &str, server: &str, result: &str) {
        let labels = vec![
            ("listener", listener.to_owned()),
            ("cluster", cluster.to_owned()),
            ("server", server.to_owned()),
            ("result", result.to_owned()),
        ];
        self.connections.get_or_create(&labels).inc();
    }

    /// Adds one.
    pub fn inc(&self, s: DaemonStat) {
        self.add(s, 1);
    }
    /// Adds `n`.
    pub fn add(&self, s: DaemonStat, n: u64) {
        self.values[s as usize].fetch_add(n, Ordering::Relaxed);
    }
    /// Subtracts one (gauges).
    pub fn dec(&self, s: DaemonStat) {
        self.values[s as usize].fetch_sub(1, Ordering::Relaxed);
    }
    /// Sets a gauge.
    pub fn set(&self, s: DaemonStat, v: u64) {
        self.values[s as usize].store(v, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self, s: DaemonStat) -> u64 {
        self.values[s as usize].load(Ordering::Relaxed)
    }
}

/// Keeps [`DaemonStat::Active`] up while alive.
pub struct ActiveGuard<'a>(&'a Stats);

impl<'a> ActiveGuard<'a> {
    /// Counts one more open connection until dropped.
    pub fn new(stats: &'a Stats) -> Self {
        stats.inc(DaemonStat::Active);
        Self(stats)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.dec(DaemonStat::Active);
    }
}
