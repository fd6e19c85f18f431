//! The daemon: chooses the data plane, binds the listeners, accepts under the
//! `max_connections` cap, reloads on SIGHUP and stops on SIGTERM/SIGINT.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::{
    BACKEND_BACKUP, BACKEND_DOWN, BACKEND_DRAIN, BACKEND_FAILED, BACKEND_FULL, BACKEND_HEALTH_DOWN,
    BACKEND_UP, BackendInfo, DaemonStat,
};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::{Semaphore, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    bpf::{Bpf, BpfError, InstanceLock},
    config::{Cluster, Config, DataPlaneKind, ServerState, Sticky},
    conn, control,
    dataplane::Direction,
    dataplane::{
        DataPlane,
        auto::AutoPlane,
        copy::CopyPlane,
        sockmap::{LAG_STEP, SockmapPlane},
    },
    health,
    limits::{self, LogOnce},
    runtime::{ClusterRt, ListenerRt, Shared},
    stats::Stats,
    sticky::StickyTable,
};

/// How long SIGTERM waits for open connections to finish before exiting.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A listener address could not be bound.
    #[error(
        "cannot listen on {addr} (listener {name:?}): {source}{}",
        bind_hint(source)
    )]
    Bind {
        /// Listener name.
        name: String,
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// `data_plane = "sockmap"` was required and BPF is not usable.
    #[error("data_plane = \"sockmap\" needs BPF: {0}")]
    Bpf(#[from] BpfError),
    /// Another daemon runs this instance, or its lock cannot be taken.
    #[error("{0}")]
    Instance(BpfError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The control socket (`mqttlb ctl`) could not be bound.
    #[error("cannot bind the control socket {path}: {source}")]
    Control {
        /// Socket path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// What to do about a listener that cannot bind.
fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => "; is another process using the port?",
        std::io::ErrorKind::PermissionDenied => {
            "; ports below 1024 need root or CAP_NET_BIND_SERVICE"
        }
        std::io::ErrorKind::AddrNotAvailable => "; no interface of this host has that address",
        _ => "",
    }
}

/// The data plane for connections; the loaded BPF maps, whichever plane carries the
/// bytes (the counters, servers and sticky table `mqttlb ctl` reads); the sockmap
/// plane when it is the one in use.
struct Planes {
    plane: Arc<dyn DataPlane>,
    bpf: Option<Arc<Bpf>>,
    sockmap: Option<Arc<SockmapPlane>>,
}

/// Chooses and builds the data plane. A pin directory that is not safely ours stops
/// the start whatever the plane asked for: falling back would hide an attack.
fn data_plane(
    config: &Config,
    kind: DataPlaneKind,
    stats: &Arc<Stats>,
) -> Result<Planes, DaemonError> {
    let load = || Bpf::load(&config.global.name, LAG_STEP, sticky_size(config)).map(Arc::new);
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
        let _ = std::fs::remove_dir(crate::bpf::pin_dir(&config.global.name));
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

/// The capabilities BPF needs that this process lacks (from its effective set), for
/// the warning when BPF does not load.
fn missing_privilege() -> String {
    // CAP_NET_ADMIN 12, CAP_SYS_ADMIN 21, CAP_BPF 39.
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    let has = |bit: u32| effective & (1 << bit) != 0;
    let missing: Vec<&str> = [(39, "CAP_BPF"), (12, "CAP_NET_ADMIN")]
        .into_iter()
        // CAP_SYS_ADMIN also grants what CAP_BPF does.
        .filter(|&(bit, _)| !(has(bit) || bit == 39 && has(21)))
        .map(|(_, name)| name)
        .collect();
    if missing.is_empty() {
        "none (the kernel refused for another reason, see reason)".to_owned()
    } else {
        missing.join(" and ")
    }
}

/// Capacity of the sticky table: every sticky cluster's `sticky_table_size`.
fn sticky_size(config: &Config) -> u32 {
    let total: u64 = config
        .clusters
        .iter()
        .filter(|c| c.sticky != Sticky::None)
        .map(|c| u64::from(c.sticky_table_size.get()))
        .sum();
    total.clamp(1024, u64::from(u32::MAX)) as u32
}

/// Runs the daemon until SIGTERM/SIGINT. `config_path` is re-read on SIGHUP.
pub async fn run(
    config_path: PathBuf,
    config: Config,
    plane_override: Option<DataPlaneKind>,
) -> Result<(), DaemonError> {
    let lock = InstanceLock::acquire(&config.global.name).map_err(DaemonError::Instance)?;
    let stats = Arc::new(Stats::default());
    let limit = max_connections(&config) as usize;
    let kind = plane_override.unwrap_or(config.global.data_plane);
    let Planes {
        plane,
        bpf,
        sockmap,
    } = data_plane(&config, kind, &stats)?;
    info!(instance = %config.global.name, data_plane = plane.name(), "data plane selected");
    if let Some(s) = &config.stats {
        warn!(bind = %s.bind, "[stats] is accepted but not served in this version");
    }

    let mut bound = Vec::new();
    for l in &config.listeners {
        let listener = listen(l.bind).map_err(|source| DaemonError::Bind {
            name: l.name.clone(),
            addr: l.bind,
            source,
        })?;
        info!(listener = %l.name, bind = %l.bind, kind = ?l.kind(), "listening");
        bound.push((l, listener));
    }
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;

    let sticky = match &bpf {
        Some(b) => StickyTable::Bpf(b.clone()),
        None => StickyTable::memory(sticky_size(&config) as usize),
    };
    let shared = Arc::new(Shared::new(
        stats.clone(),
        plane,
        config.clusters.clone(),
        sticky,
        config.global.max_preconnect_bytes,
    ));
    // Each listener's cluster is resolved here and at each reload, not per connection.
    let clusters = shared.clusters();
    let bound: Vec<_> = bound
        .into_iter()
        .map(|(l, socket)| {
            let rt = ListenerRt::new(l.clone(), clusters[l.cluster].clone());
            (Arc::new(rt), socket)
        })
        .collect();
    let _control = control::serve(&config.global.name, shared.clone()).map_err(|source| {
        DaemonError::Control {
            path: control::socket_path(&config.global.name)
                .display()
                .to_string(),
            source,
        }
    })?;
    let mut checks = health::spawn(&shared.clusters(), &config.global.name, &stats);
    let permits = Arc::new(Semaphore::new(limit));
    let (stop_tx, stop_rx) = watch::channel(false);

    if let Some(p) = &sockmap {
        let p = p.clone();
        tokio::spawn(async move {
            if let Err(e) = p.run_events().await {
                error!(error = %e, "BPF event loop stopped; throttling now relies on polling only");
            }
        });
    }
    let publisher = tokio::spawn(publish_stats(stats.clone(), bpf.clone(), shared.clone()));
    let mut accept_tasks = Vec::new();
    let listeners: Vec<Arc<ListenerRt>> = bound.iter().map(|b| b.0.clone()).collect();
    for (listener, socket) in bound {
        accept_tasks.push(tokio::spawn(accept_loop(
            shared.clone(),
            listener,
            socket,
            permits.clone(),
            stop_rx.clone(),
        )));
    }

    let mut current = config;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                if reload(&config_path, &mut current, &shared, &listeners, &stats) {
                    restart_checks(&mut checks, &shared, &current.global.name, &stats);
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("stopping: no new connections");
    let _ = stop_tx.send(true);
    for t in accept_tasks {
        let _ = t.await;
    }
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while permits.available_permits() < limit && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = limit - permits.available_permits();
    if left > 0 {
        info!(
            open = left,
            "closing connections still open after the grace period"
        );
    }
    publisher.abort();
    for t in checks {
        t.abort();
    }
    if let Some(b) = &bpf {
        b.unpin();
    }
    drop(lock);
    info!(closed_at_stop = left, "stopped");
    Ok(())
}

/// Connections the kernel completes and queues for a listener while the daemon is not
/// accepting (at `max_connections`, out of descriptors, a burst of reconnects); capped
/// by `net.core.somaxconn`. The 128 of std's `bind` sent SYNs of a reconnect storm
/// into one-second retransmissions.
const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket on `addr` with [`LISTEN_BACKLOG`].
fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// `max_connections`, or what the descriptor limit allows (two per connection plus a
/// reserve), after raising the soft open-files limit to the hard one. Says at start
/// which it is, and warns when a configured value cannot be reached.
fn max_connections(config: &Config) -> u32 {
    let nofile = limits::raise_nofile();
    let fits = nofile.map(limits::connections_for);
    match (config.global.max_connections, fits) {
        (Some(set), Some(fits)) if set.get() > fits => {
            warn!(
                max_connections = set.get(),
                open_files_limit = nofile,
                fits,
                "max_connections is above what the open-files limit allows (two descriptors per connection); past {fits} connections new ones are refused as local resource errors: raise the limit (LimitNOFILE=, ulimit -n) or lower max_connections"
            );
            set.get()
        }
        (Some(set), _) => {
            info!(max_connections = set.get(), "max_connections (configured)");
            set.get()
        }
        (None, Some(fits)) => {
            info!(
                max_connections = fits,
                open_files_limit = nofile,
                reserve = limits::FD_RESERVE,
                "max_connections from the open-files limit (two descriptors per connection plus a reserve)"
            );
            fits
        }
        (None, None) => {
            warn!("cannot read the open-files limit; max_connections = 10000");
            10_000
        }
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: Arc<ListenerRt>,
    socket: TcpListener,
    permits: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let stats = shared.stats.clone();
    let full_log = LogOnce::new(Duration::from_secs(10));
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                stats.inc(DaemonStat::MaxConnectionsReached);
                if full_log.allow() {
                    warn!(listener = %listener.config.name, "max_connections reached: new connections wait in the kernel's accept queue");
                }
                tokio::select! {
                    p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                    _ = stop.changed() => return,
                }
            }
        };
        let accepted = tokio::select! {
            r = socket.accept() => r,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((client, peer)) => {
                let (shared, listener) = (shared.clone(), listener.clone());
                tokio::spawn(async move {
                    conn::handle(shared, listener, client, peer).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, and warn once a
                // second at most (the count is in local_resource_errors).
                if limits::is_local_resource(&e) {
                    stats.inc(DaemonStat::LocalResourceErrors);
                }
                if limits::LOCAL_RESOURCE_LOG.allow() {
                    warn!(listener = %listener.config.name, error = %e, "accept failed; backing off");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Applies a changed configuration: clusters and servers change at once (connections
/// keep their server; servers keeping their name and address keep their live state);
/// listener changes need a restart. False when the new file is refused.
fn reload(
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
                error!(problem = %e, "reload refused; the running configuration stays");
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
    new.global = current.global.clone();
    shared.replace_clusters(new.clusters.clone());
    let clusters = shared.clusters();
    for l in listeners {
        let found = new
            .listeners
            .iter()
            .find(|n| n.name == l.config.name && n.bind == l.config.bind);
        // New connections go to the cluster the file names for the listener now.
        let cluster = match found {
            Some(n) => Some(clusters[n.cluster].clone()),
            None => shared.cluster(&l.cluster().config.name),
        };
        match cluster {
            Some(c) => l.set_cluster(c),
            None => {
                warn!(listener = %l.config.name, "its cluster is gone from the file and the listener too: it keeps its cluster as it was until a restart")
            }
        }
        // Certificates and TLS settings: new handshakes use the new ones.
        if let Some(n) = found {
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
    keys
}

/// Replaces the health check tasks with those of the current clusters.
fn restart_checks(
    checks: &mut Vec<JoinHandle<()>>,
    shared: &Shared,
    instance: &str,
    stats: &Arc<Stats>,
) {
    for t in checks.drain(..) {
        t.abort();
    }
    *checks = health::spawn(&shared.clusters(), instance, stats);
}

/// Refreshes the gauges and publishes the counters and the servers to the pinned
/// maps, four times a second.
async fn publish_stats(stats: Arc<Stats>, bpf: Option<Arc<Bpf>>, shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut published = 0;
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
            let rows = backend_rows(&shared.clusters());
            b.publish_backends(&rows, published);
            published = rows.len();
        }
    }
}

/// Every server of `clusters` as the `backends` map stores it.
pub fn backend_rows(clusters: &[Arc<ClusterRt>]) -> Vec<BackendInfo> {
    use std::sync::atomic::Ordering::Relaxed;
    let now = Instant::now();
    let name = |s: &str| {
        let mut out = [0u8; 32];
        let n = s.len().min(32);
        out[..n].copy_from_slice(&s.as_bytes()[..n]);
        out
    };
    let mut rows = Vec::new();
    for c in clusters {
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
