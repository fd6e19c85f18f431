//! SIGHUP: the configuration read again and what it changes applied, clusters and
//! servers at once, listeners' clusters and certificates for new connections.

use std::sync::Arc;

use lb_common::DaemonStat;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::plane::sticky_size;
use crate::{
    config::{Cluster, Config, Listener, ServerState},
    runtime::{ListenerRt, Shared},
    stats::Stats,
};

/// Applies a changed configuration: clusters and servers change at once (connections
/// keep their server; servers keeping their name and address keep their live state);
/// listener changes need a restart. False when the new file is refused.
pub(super) fn reload(
    path: &std::path::Path,
    current: &mut Config,
    shared: &Shared,
    listeners: &[Arc<ListenerRt>],
    stats: &Stats,
) -> bool {
    let mut new = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            stats.inc(DaemonStat::ReloadFailures);
            for e in errors.0 {
                error!(file = %path.display(), problem = %e, "reload refused; the running configuration stays");
            }
            return false;
        }
    };
    let listeners_same = new.listeners.len() == current.listeners.len()
        && new
            .listeners
            .iter()
            .zip(&current.listeners)
            .all(|(a, b)| a.name == b.name && a.bind == b.bind);
    if !listeners_same {
        warn!("listener names or addresses changed: that part of the reload needs a restart");
    }
    if sticky_size(&new) != sticky_size(current) {
        warn!("sticky_table_size changed: the table keeps its size until a restart");
    }
    for key in restart_only_changes(current, &new) {
        warn!(
            key,
            "changed in the file, but takes effect only at a restart; the running value stays"
        );
    }
    let changes = cluster_changes(current, &new);
    for change in &changes {
        info!(%change, "reload");
    }
    // What only a restart applies stays as it runs; the shutdown timings apply at the
    // next stop.
    let shutdown = (new.global.shutdown_delay, new.global.shutdown_grace);
    new.global = current.global.clone();
    (new.global.shutdown_delay, new.global.shutdown_grace) = shutdown;
    new.admin = current.admin.clone();
    reload_guard(current, &mut new, shared);
    // New connections go to the cluster the file names for each listener now.
    let found = |l: &Listener| {
        new.listeners
            .iter()
            .find(|n| n.name == l.name && n.bind == l.bind)
    };
    shared.reload(new.clusters.clone(), |l| {
        found(l).map(|n| new.clusters[n.cluster].name.clone())
    });
    // Certificates and TLS settings: new handshakes use the new ones.
    for l in listeners {
        if let Some(n) = found(&l.config) {
            if n.tls().is_some() {
                info!(listener = %n.name, "reload: certificates and TLS settings read again (new handshakes use them)");
            }
            l.replace_tls(n);
        }
    }
    stats.inc(DaemonStat::Reloads);
    info!(
        clusters = new.clusters.len(),
        changes = changes.len(),
        "configuration reloaded"
    );
    *current = new;
    true
}

/// `[guard]`: lists and SYN rate applied at once (runtime changes laid over them);
/// adding or removing the section, or its interfaces, needs a restart.
fn reload_guard(current: &Config, new: &mut Config, shared: &Shared) {
    match (shared.guard.get(), new.guard.as_mut()) {
        (Some(guard), Some(g)) => {
            let attached = current.guard.as_ref().map(|c| c.interfaces.clone());
            if let Some(attached) = attached
                && attached != g.interfaces
            {
                warn!("guard.interfaces changed: attached where they were until a restart");
                g.interfaces = attached;
            }
            match guard.configure(g, &super::listener_ports(current)) {
                Ok(()) => info!(
                    deny = g.deny.len(),
                    allow = g.allow.len(),
                    syn_rate = g.syn_rate,
                    "reload: guard lists and rate applied"
                ),
                Err(e) => error!(error = %e, "reload: the guard kept its previous lists"),
            }
        }
        (None, None) => {}
        _ => {
            warn!(
                "[guard] added or removed: that takes a restart; the running guard stays as it is"
            );
            new.guard = current.guard.clone();
        }
    }
}

/// What a reload changes in clusters and servers, one line each, against the running
/// configuration (an edit reverted before the reload is no change).
fn cluster_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for c in &old.clusters {
        if !new.clusters.iter().any(|n| n.name == c.name) {
            out.push(format!("cluster {:?} removed", c.name));
        }
    }
    for n in &new.clusters {
        let Some(c) = old.clusters.iter().find(|c| c.name == n.name) else {
            out.push(format!(
                "cluster {:?} added ({} servers)",
                n.name,
                n.servers.len()
            ));
            continue;
        };
        for s in &c.servers {
            if !n.servers.iter().any(|t| t.name == s.name) {
                out.push(format!("cluster {:?}: server {:?} removed", n.name, s.name));
            }
        }
        for t in &n.servers {
            let Some(s) = c.servers.iter().find(|s| s.name == t.name) else {
                out.push(format!(
                    "cluster {:?}: server {:?} added ({})",
                    n.name, t.name, t.address
                ));
                continue;
            };
            if s.state != t.state {
                let state = |s: ServerState| format!("{s:?}").to_lowercase();
                out.push(format!(
                    "cluster {:?}: server {:?} {} -> {}",
                    n.name,
                    t.name,
                    state(s.state),
                    state(t.state)
                ));
            }
            if s.address != t.address {
                out.push(format!(
                    "cluster {:?}: server {:?} address {} -> {}",
                    n.name, t.name, s.address, t.address
                ));
            }
            if s != t && s.state == t.state && s.address == t.address {
                out.push(format!(
                    "cluster {:?}: server {:?} settings changed (weight, backup, limits)",
                    n.name, t.name
                ));
            }
        }
        let settings = |c: &Cluster| Cluster {
            servers: Vec::new(),
            ..c.clone()
        };
        if settings(c) != settings(n) {
            out.push(format!(
                "cluster {:?}: settings changed (balance, sticky, timeouts, health...)",
                n.name
            ));
        }
    }
    out
}

/// The keys a reload cannot apply that differ between `old` and `new`.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (&old.global, &new.global);
    let mut keys = Vec::new();
    if a.name != b.name {
        keys.push("global.name");
    }
    if a.data_plane != b.data_plane {
        keys.push("global.data_plane");
    }
    if a.max_connections != b.max_connections {
        keys.push("global.max_connections");
    }
    if a.max_preconnect_bytes != b.max_preconnect_bytes {
        keys.push("global.max_preconnect_bytes");
    }
    if old.admin != new.admin {
        keys.push("admin");
    }
    if a.run_as != b.run_as {
        keys.push("global.user");
    }
    keys
}

/// Replaces the health check tasks with those of the current clusters.
pub(super) fn restart_checks(
    checks: &mut Vec<JoinHandle<()>>,
    shared: &Arc<Shared>,
    instance: &str,
    stats: &Arc<Stats>,
) {
    for t in checks.drain(..) {
        t.abort();
    }
    *checks = super::health_tasks(shared, instance, stats);
}
