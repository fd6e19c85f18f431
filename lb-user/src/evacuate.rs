//! Evacuation: a server's connections closed at a bounded rate (its cluster's
//! `evict_rate`) so that its clients reconnect through mqttlb to the other servers
//! (and their sticky entries move) without a reconnect storm. The planes end each
//! evicted connection ([`crate::registry::Entry::evict`]): an MQTT 5 client first gets
//! DISCONNECT 0x9C (Use another server) at a packet boundary, with the cluster's
//! `server_reference` when set; a 3.1.x client a clean close.

use std::{
    collections::BTreeMap,
    num::NonZeroU32,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    config::ServerState,
    registry::Entry,
    runtime::{Override, Shared, UnknownServer},
};

/// Drains `server` of `cluster` (no new connection goes there; the change survives
/// reloads like any runtime override) and closes its connections at the cluster's
/// `evict_rate` in a task of its own. Returns how many connections will be closed.
pub fn server(shared: &Arc<Shared>, cluster: &str, server: &str) -> Result<usize, UnknownServer> {
    let drain = Override {
        state: Some(ServerState::Drain),
        weight: None,
    };
    shared.override_server(cluster, server, drain)?;
    let config = shared.cluster(cluster).map(|c| c.config.clone());
    let rate = config.as_ref().map_or(NonZeroU32::MIN, |c| c.evict_rate);
    let connecting = config.map_or(Duration::ZERO, |c| c.connect_timeout);
    let entries = on_server(shared, cluster, server);
    let n = entries.len();
    tracing::info!(
        cluster,
        server,
        connections = n,
        rate = rate.get(),
        "evacuating"
    );
    let (shared, cluster, server) = (shared.clone(), cluster.to_owned(), server.to_owned());
    let per_second = share(&shared, rate);
    tokio::spawn(async move {
        at_rate(entries, per_second).await;
        // Connections that were connecting to it when the drain came in.
        tokio::time::sleep(connecting).await;
        let late = on_server(&shared, &cluster, &server);
        at_rate(late, per_second).await;
    });
    Ok(n)
}

/// The connections on `server` of `cluster` not asked to close yet.
fn on_server(shared: &Shared, cluster: &str, server: &str) -> Vec<Arc<Entry>> {
    let conns = shared.conns.entries().into_iter();
    conns
        .filter(|e| e.is_on(cluster, server) && !e.is_evicting())
        .collect()
}

/// Every connection that reached a server, each cluster's at its own `evict_rate`
/// (SIGTERM); resolves once all are asked to close.
pub async fn everything(shared: &Shared) {
    let mut by_cluster: BTreeMap<String, Vec<Arc<Entry>>> = BTreeMap::new();
    for e in shared.conns.entries() {
        if let Some(c) = e.cluster() {
            by_cluster.entry(c.to_owned()).or_default().push(e);
        }
    }
    let mut runs = tokio::task::JoinSet::new();
    for (name, entries) in by_cluster {
        let rate = shared
            .cluster(&name)
            .map_or(NonZeroU32::MIN, |c| c.config.evict_rate);
        runs.spawn(at_rate(entries, share(shared, rate)));
    }
    runs.join_all().await;
}

/// This process's part of a cluster's `evict_rate`: with workers, each evicts its own
/// connections at an equal share, so the instance evicts at the rate configured.
fn share(shared: &Shared, rate: NonZeroU32) -> f64 {
    let workers = shared.workers();
    f64::from(rate.get()) / f64::from(workers)
}

/// Asks each connection to close, `per_second` a second, oldest first.
async fn at_rate(mut entries: Vec<Arc<Entry>>, per_second: f64) {
    entries.sort_by_key(|e| std::cmp::Reverse(e.age()));
    let start = Instant::now();
    let step = 1.0 / per_second;
    for (i, e) in entries.iter().enumerate() {
        let at = start + Duration::from_secs_f64(step * i as f64);
        tokio::time::sleep_until(at.into()).await;
        e.evict();
    }
}
