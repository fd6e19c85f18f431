//! Which data plane carries connections, and the BPF maps `mqttlb ctl` reads whatever
//! the plane.

use std::sync::Arc;

use tracing::{info, warn};

use super::DaemonError;
use crate::{
    bpf::{Bpf, BpfError},
    config::{Config, DataPlaneKind, Sticky},
    dataplane::{
        DataPlane,
        auto::AutoPlane,
        copy::CopyPlane,
        sockmap::{LAG_STEP, SockmapPlane},
    },
    stats::Stats,
};

/// The data plane for connections; the loaded BPF maps, whichever plane carries the
/// bytes (the counters, servers and sticky table `mqttlb ctl` reads); the sockmap
/// plane when it is the one in use.
pub(super) struct Planes {
    pub plane: Arc<dyn DataPlane>,
    pub bpf: Option<Arc<Bpf>>,
    pub sockmap: Option<Arc<SockmapPlane>>,
}

/// Chooses and builds the data plane. A pin directory that is not safely ours stops
/// the start whatever the plane asked for: falling back would hide an attack.
pub(super) fn data_plane(
    config: &Config,
    kind: DataPlaneKind,
    stats: &Arc<Stats>,
    (worker, adopt): (u32, bool),
) -> Result<Planes, DaemonError> {
    // A pin directory handed to `[global] user` by an earlier run is still ours.
    let trusted = config.global.run_as.as_ref().map(|a| a.uid);
    let name = &config.global.name;
    let load = || {
        let size = sticky_size(config);
        Bpf::load(name, worker, LAG_STEP, size, (trusted, adopt)).map(Arc::new)
    };
    let copy = |bpf: Option<Arc<Bpf>>| Planes {
        plane: Arc::new(CopyPlane::new(stats.clone())),
        bpf,
        sockmap: None,
    };
    let sockmap = |bpf: Arc<Bpf>| {
        let p = SockmapPlane::new(bpf.clone(), stats.clone());
        Planes {
            plane: p.clone(),
            bpf: Some(bpf),
            sockmap: Some(p),
        }
    };
    let loaded = load();
    if matches!(&loaded, Err(e) if !matches!(e, BpfError::Unsafe { .. })) {
        // A pin directory made before the load failed, if empty, goes (one that is
        // not safely ours is left for the operator to look at).
        let _ = std::fs::remove_dir(crate::workers::pin_dir(name, worker));
    }
    Ok(match (kind, loaded) {
        (_, Err(e @ BpfError::Unsafe { .. })) => return Err(DaemonError::Instance(e)),
        (DataPlaneKind::Sockmap, loaded) => sockmap(loaded?),
        // The maps serve `ctl` and keep the sticky table across restarts; no socket
        // ever enters the socket maps.
        (DataPlaneKind::Copy, Ok(bpf)) => copy(Some(bpf)),
        (DataPlaneKind::Copy, Err(e)) => {
            warn!(reason = %e, missing = %missing_privilege(), "BPF maps unavailable: `mqttlb ctl` asks the daemon itself; the sticky table lives in memory (lost at restart)");
            copy(None)
        }
        // `auto`: copy first, the in-kernel splice for connections that cross their
        // cluster's promotion threshold, where BPF loads; copy otherwise.
        (DataPlaneKind::Auto, Ok(bpf)) => {
            info!("auto: copy plane, long-lived connections promoted to the sockmap splice");
            let splice = SockmapPlane::new(bpf.clone(), stats.clone());
            Planes {
                plane: Arc::new(AutoPlane::new(splice.clone(), stats.clone())),
                bpf: Some(bpf),
                sockmap: Some(splice),
            }
        }
        (DataPlaneKind::Auto, Err(e)) => {
            warn!(reason = %e, missing = %missing_privilege(), "auto: no in-kernel splice, every connection stays on the copy plane; `mqttlb ctl` asks the daemon itself; the sticky table lives in memory (lost at restart)");
            copy(None)
        }
    })
}

/// Capabilities the daemon keeps after switching to `[global] user`: none. Measured on
/// 6.18: updating the maps, inserting sockets into the socket maps and reading the
/// ring buffer go through descriptors the daemon already holds, and the kernel checks
/// no capability for them (the listeners are bound, nothing is pinned or loaded later).
const KEPT_CAPABILITIES: &[caps::Capability] = &[];

/// Hands the pin directory to `account` (so the clean stop can still unpin) and
/// switches to it.
pub(super) fn drop_privileges(
    account: &crate::privilege::Account,
    bpf: Option<&Bpf>,
) -> Result<(), DaemonError> {
    if let Some(bpf) = bpf {
        bpf.hand_over(account.uid, account.gid)
            .map_err(DaemonError::Instance)?;
    }
    crate::privilege::become_account(account, KEPT_CAPABILITIES)?;
    info!(
        user = %account.user,
        uid = account.uid,
        gid = account.gid,
        capabilities = %crate::privilege::names(KEPT_CAPABILITIES),
        "switched to [global] user"
    );
    Ok(())
}

/// The capabilities BPF needs that this process lacks (from its effective set), for
/// the warning when BPF does not load.
fn missing_privilege() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let missing = missing_capabilities();
    if missing.is_empty() && field("Seccomp:") == Some("2") {
        // Podman's and older Docker's default profiles allow bpf() only with
        // CAP_SYS_ADMIN, whatever else the container was given.
        "none, but a seccomp filter is active: a container's default profile refuses bpf() without CAP_SYS_ADMIN; run it with the profile `cargo xtask dist` writes (seccomp.json: bpf() allowed with CAP_BPF) or --security-opt seccomp=unconfined".to_owned()
    } else if missing.is_empty() {
        "none (the kernel refused for another reason, see reason)".to_owned()
    } else {
        missing.join(" and ")
    }
}

/// The capabilities loading the programs needs that this process lacks (none: it
/// may load them).
fn missing_capabilities() -> Vec<&'static str> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    // CAP_NET_ADMIN 12, CAP_SYS_ADMIN 21, CAP_PERFMON 38, CAP_BPF 39.
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| effective & (1 << bit) != 0;
    // CAP_PERFMON: the verifier lets the program read kernel memory (the skb's
    // control block, the socket's copied_seq) only with it (measured: without it the
    // load is refused).
    [(39, "CAP_BPF"), (12, "CAP_NET_ADMIN"), (38, "CAP_PERFMON")]
        .into_iter()
        // CAP_SYS_ADMIN also grants what CAP_BPF and CAP_PERFMON do.
        .filter(|&(bit, _)| !(has(bit) || (bit == 39 || bit == 38) && has(21)))
        .map(|(_, name)| name)
        .collect()
}

/// Capacity of the sticky table: every sticky cluster's `sticky_table_size`.
pub(super) fn sticky_size(config: &Config) -> u32 {
    let total: u64 = config
        .clusters
        .iter()
        .filter(|c| c.sticky != Sticky::None)
        .map(|c| u64::from(c.sticky_table_size.get()))
        .sum();
    total.clamp(1024, u64::from(u32::MAX)) as u32
}
