//! The counters and the servers published to the pinned maps four times a second
//! (what `mqttlb ctl` reads without asking the daemon).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::{
    BACKEND_BACKUP, BACKEND_DOWN, BACKEND_DRAIN, BACKEND_FAILED, BACKEND_FULL, BACKEND_HEALTH_DOWN,
    BACKEND_OVERRIDDEN, BACKEND_UP, BackendInfo, DaemonStat,
};

use crate::{bpf::Bpf, config::ServerState, dataplane::Direction, runtime::Shared, stats::Stats};

/// Refreshes the gauges and publishes the counters and the servers to the pinned
/// maps, four times a second.
pub(super) async fn publish_stats(stats: Arc<Stats>, bpf: Option<Arc<Bpf>>, shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        stats.set(
            DaemonStat::TasksAlive,
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks() as u64,
        );
        if let Some(b) = &bpf {
            b.publish(&stats);
            b.publish_backends(&backend_rows(&shared));
        }
    }
}

/// Every server as the `backends` map stores it.
pub fn backend_rows(shared: &Shared) -> Vec<BackendInfo> {
    use std::sync::atomic::Ordering::Relaxed;
    let now = Instant::now();
    let name = |s: &str| {
        let mut out = [0u8; 32];
        let n = s.len().min(32);
        out[..n].copy_from_slice(&s.as_bytes()[..n]);
        out
    };
    let overridden = shared.overridden();
    let mut rows = Vec::new();
    for c in shared.clusters().iter() {
        for s in &c.pool.servers {
            let cfg = &s.config;
            let live = &s.live;
            let active = live.active.load(Relaxed);
            let mut flags = 0;
            if cfg.backup {
                flags |= BACKEND_BACKUP;
            }
            if !live.healthy() {
                flags |= BACKEND_HEALTH_DOWN;
            }
            if live.failed(now) {
                flags |= BACKEND_FAILED;
            }
            if cfg.max_connections.is_some_and(|m| active >= m.get()) {
                flags |= BACKEND_FULL;
            }
            let key = || (c.config.name.clone(), cfg.name.clone());
            if !overridden.is_empty() && overridden.contains(&key()) {
                flags |= BACKEND_OVERRIDDEN;
            }
            rows.push(BackendInfo {
                cluster: name(&c.config.name),
                name: name(&cfg.name),
                addr: crate::bpf::addr_bytes(cfg.address),
                port: cfg.address.port(),
                state: match cfg.state {
                    ServerState::Up => BACKEND_UP,
                    ServerState::Drain => BACKEND_DRAIN,
                    ServerState::Down => BACKEND_DOWN,
                },
                flags,
                weight: cfg.weight.get(),
                active,
                max_connections: cfg.max_connections.map_or(0, |m| m.get()),
                connections: live.connections.load(Relaxed),
                bytes_c2s: live.traffic.get(Direction::ClientToServer),
                bytes_s2c: live.traffic.get(Direction::ServerToClient),
                connect_failures: live.connect_failures.load(Relaxed),
                health_flips: live.health_flips.load(Relaxed),
            });
        }
    }
    rows
}
