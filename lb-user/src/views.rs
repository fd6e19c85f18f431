//! The views of a running daemon that `ctl` (through the control socket) and the admin
//! API show: servers, counters, sticky entries. Built from the daemon's own state, so
//! they are the same with or without BPF.

use crate::{
    ctl::{BackendView, StickyView, backend_view, sticky_views},
    runtime::Shared,
};

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

/// [`stats`] as a JSON object.
pub fn stats_map(shared: &Shared) -> serde_json::Map<String, serde_json::Value> {
    stats(shared)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into()))
        .collect()
}

/// Every sticky entry, named by server.
pub fn sticky(shared: &Shared) -> Vec<StickyView> {
    let rows: Vec<(u32, lb_common::BackendInfo)> =
        (0..).zip(crate::daemon::backend_rows(shared)).collect();
    sticky_views(&shared.sticky.entries(), &rows)
}
