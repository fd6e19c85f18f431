//! The daemon's counters: atomics bumped on the connection path (never a log line per
//! packet), published to the pinned `daemon_stats` map for `mqttlb ctl stats`.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use lb_common::DaemonStat;
use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, family::Family, histogram::Histogram},
};
use serde::{Deserialize, Serialize};

/// Labels of a per-server histogram: cluster and server.
pub type ServerLabels = Vec<(&'static str, String)>;

/// Buckets in seconds for durations on the loopback or a LAN (100 us to 10 s).
const SECONDS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.0, 10.0,
];

fn seconds() -> Histogram {
    Histogram::new(SECONDS)
}

/// A histogram of durations over [`SECONDS`] (and +Inf) whose counts can be read and
/// added up: every worker observes into its own, and `/metrics` shows their sum.
/// Clones observe into the same counts.
#[derive(Clone, Debug, Default)]
pub struct Seconds(Arc<SecondsCells>);

#[derive(Debug, Default)]
struct SecondsCells {
    /// Observations per bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; SECONDS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Seconds {
    /// Counts one duration of `secs` seconds.
    pub fn observe(&self, secs: f64) {
        let bucket = SECONDS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(SECONDS.len());
        self.0.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        // `as` saturates: a negative or NaN duration adds nothing to the sum.
        let nanos = (secs * 1e9) as u64;
        self.0.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn counts(&self) -> SecondsCounts {
        SecondsCounts {
            buckets: self
                .0
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_nanos: self.0.sum_nanos.load(Ordering::Relaxed),
        }
    }
}

/// A [`Seconds`] histogram's counts, as workers send them to each other and
/// `/metrics` encodes them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecondsCounts {
    /// Per bucket of [`SECONDS`], then +Inf (not cumulative).
    pub buckets: Vec<u64>,
    pub sum_nanos: u64,
}

impl SecondsCounts {
    /// Adds another worker's counts.
    pub fn add(&mut self, other: &SecondsCounts) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine += theirs;
        }
        self.sum_nanos += other.sum_nanos;
    }
}

impl EncodeMetric for SecondsCounts {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let bounds = SECONDS.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds.zip(self.buckets.iter().copied()).collect();
        let count = self.buckets.iter().sum();
        let sum = self.sum_nanos as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// What a worker observed that `/metrics` shows summed over workers: the duration
/// histograms and the connections' ends by listener, cluster, server and result.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    pub server_reached: SecondsCounts,
    pub connect_duration: SecondsCounts,
    /// `[listener, cluster, server, result]` and how many.
    pub ends: Vec<([String; 4], u64)>,
}

impl Observed {
    /// Adds another worker's.
    pub fn add(&mut self, other: &Observed) {
        self.server_reached.add(&other.server_reached);
        self.connect_duration.add(&other.connect_duration);
        for (labels, n) in &other.ends {
            match self.ends.iter_mut().find(|(l, _)| l == labels) {
                Some((_, sum)) => *sum += n,
                None => self.ends.push((labels.clone(), *n)),
            }
        }
    }
}

/// One atomic per [`DaemonStat`], and the durations `/metrics` shows as histograms.
#[derive(Debug)]
pub struct Stats {
    values: [AtomicU64; DaemonStat::COUNT as usize],
    /// Accept to the server's TCP connection established (connections that reached
    /// a server), in seconds: the CONNECT's reading and validation, the choice of
    /// server and the connect(s).
    pub server_reached: Seconds,
    /// Accept to the server's first bytes (its CONNACK) as the daemon forwards them, in
    /// seconds: not for a connection spliced before the CONNACK came back (its bytes
    /// are counted from the kernel later).
    pub connect_duration: Seconds,
    /// Active health checks that finished (passed or failed), by server, in seconds.
    pub health_checks: Family<ServerLabels, Histogram, fn() -> Histogram>,
    /// Connections that reached their end after the CONNECT, by `[listener, cluster,
    /// server, result]` (`closed`, `idle_timeout`, `evicted`, `aborted`, or
    /// `no_server` with an empty server).
    connections: Mutex<BTreeMap<[String; 4], u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            values: std::array::from_fn(|_| AtomicU64::new(0)),
            server_reached: Seconds::default(),
            connect_duration: Seconds::default(),
            health_checks: Family::new_with_constructor(seconds),
            connections: Mutex::default(),
        }
    }
}

impl Stats {
    /// Counts one connection's end in [`Stats::connections`].
    pub fn connection_ended(&self, listener: &str, cluster: &str, server: &str, result: &str) {
        let labels = [listener, cluster, server, result].map(str::to_owned);
        *self
            .connections
            .lock()
            .expect("connections lock")
            .entry(labels)
            .or_insert(0) += 1;
    }

    /// This daemon's histograms and connection ends, for `/metrics` (summed over
    /// workers).
    pub fn observed(&self) -> Observed {
        let ends = self.connections.lock().expect("connections lock");
        Observed {
            server_reached: self.server_reached.counts(),
            connect_duration: self.connect_duration.counts(),
            ends: ends.iter().map(|(l, n)| (l.clone(), *n)).collect(),
        }
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

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::text::encode, registry::Registry};

    use super::*;

    #[test]
    fn two_workers_histograms_add_up_bucket_by_bucket() {
        let (one, two) = (Stats::default(), Stats::default());
        for secs in [0.00005, 0.003, 0.003, 20.0] {
            one.server_reached.observe(secs);
        }
        two.server_reached.observe(0.003);
        two.connect_duration.observe(0.2);
        one.connection_ended("plain", "brokers", "b1", "closed");
        two.connection_ended("plain", "brokers", "b1", "closed");
        two.connection_ended("plain", "brokers", "", "no_server");

        let mut sum = one.observed();
        // Through JSON, as a worker's answer comes.
        let theirs: Observed =
            serde_json::from_value(serde_json::to_value(two.observed()).expect("json"))
                .expect("back");
        sum.add(&theirs);

        let mut want = vec![0; SECONDS.len() + 1];
        want[0] = 1; // 50 us
        want[5] = 3; // 3 ms three times, le 0.005
        want[SECONDS.len()] = 1; // 20 s: +Inf
        assert_eq!(sum.server_reached.buckets, want);
        assert_eq!(sum.server_reached.sum_nanos, 20_009_050_000);
        assert_eq!(sum.connect_duration.buckets.iter().sum::<u64>(), 1);
        let ends = |server: &str, result: &str| {
            let key = ["plain", "brokers", server, result].map(str::to_owned);
            sum.ends.iter().find(|(l, _)| *l == key).map(|(_, n)| *n)
        };
        assert_eq!(ends("b1", "closed"), Some(2));
        assert_eq!(ends("", "no_server"), Some(1));

        let mut registry = Registry::default();
        registry.register("reached", "test", sum.server_reached.clone());
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        for line in [
            "reached_sum 20.00905",
            "reached_count 5",
            "reached_bucket{le=\"0.0001\"} 1",
            "reached_bucket{le=\"0.0025\"} 1",
            "reached_bucket{le=\"0.005\"} 4",
            "reached_bucket{le=\"10.0\"} 4",
            "reached_bucket{le=\"+Inf\"} 5",
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
    }
}
