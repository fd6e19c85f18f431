//! The daemon's counters: atomics bumped on the connection path (never a log line per
//! packet), published to the pinned `daemon_stats` map for `mqttlb ctl stats`.

use std::sync::atomic::{AtomicU64, Ordering};

use lb_common::DaemonStat;

/// One atomic per [`DaemonStat`].
#[derive(Debug)]
pub struct Stats {
    values: [AtomicU64; DaemonStat::COUNT as usize],
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            values: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Stats {
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
