//! The daemon: chooses the data plane, binds the listeners, accepts under the
//! `max_connections` cap, reloads on SIGHUP and stops on SIGTERM/SIGINT.
//!
//! [`prepare`] runs before the async runtime exists: the instance lock, the data plane
//! (BPF loaded and pinned), every socket bound, then the switch to `[global] user`.
//! [`run`] then goes in three steps: [`start`] (shared state, control socket, health
//! checks, publisher, accept loops), the signal loop (SIGHUP: [`reload`]), and
//! [`Running::stop`] (no new connections, a grace period, unpin). [`plane`] picks the
//! data plane, [`publish`] feeds the pinned maps.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::DaemonStat;
use tokio::{
    net::TcpListener,
    signal::unix::{Signal, SignalKind, signal},
    sync::{Semaphore, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    bpf::{Bpf, BpfError, InstanceLock},
    config::{Config, DataPlaneKind},
    conn, control, health,
    limits::{self, LogOnce},
    runtime::{ListenerRt, Shared},
    stats::Stats,
    sticky::StickyTable,
    upgrade,
    workers::{Assigned, Seat},
};

mod plane;
mod publish;
mod reload;
pub(crate) mod systemd;
mod takeover;

pub use publish::backend_rows;

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
    /// `[guard]` could not be loaded or attached.
    #[error("[guard]: {0}")]
    Guard(#[from] crate::guard::GuardError),
    /// `[global] user` could not be switched to.
    #[error("{0}")]
    Privilege(#[from] crate::privilege::PrivilegeError),
    /// The new process of a hot upgrade cannot carry on what the old one carries.
    #[error("upgrade: {0}")]
    Upgrade(String),
    /// A worker could not start (`[global] workers`).
    #[error("{0}")]
    Worker(String),
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

/// A started daemon: what the signal loop and the stop need.
struct Running {
    /// Without workers; with workers the supervisor holds it.
    _lock: Option<InstanceLock>,
    _control: control::ControlSocket,
    shared: Arc<Shared>,
    listeners: Vec<Arc<ListenerRt>>,
    bpf: Option<Arc<Bpf>>,
    checks: Vec<JoinHandle<()>>,
    publisher: JoinHandle<()>,
    /// The admin HTTP listener, when configured.
    admin: Option<JoinHandle<()>>,
    accept_tasks: Vec<JoinHandle<()>>,
    permits: Arc<Semaphore>,
    limit: usize,
    stop: watch::Sender<bool>,
    /// The program's event loop (sockmap): a hot upgrade stops it, the new process
    /// reads the events from then on.
    events: Option<JoinHandle<()>>,
    /// What a hot upgrade hands to the new process (duplicates kept from the start).
    handed: Arc<upgrade::old::Handed>,
    /// The control socket's accept loop.
    control_task: JoinHandle<()>,
}

/// SIGHUP, SIGTERM, SIGINT and SIGUSR2 (hot upgrade).
struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
    usr2: Signal,
}

impl Signals {
    fn install() -> Result<Self, DaemonError> {
        let on = |kind| signal(kind).map_err(DaemonError::Signals);
        Ok(Self {
            hup: on(SignalKind::hangup())?,
            term: on(SignalKind::terminate())?,
            int: on(SignalKind::interrupt())?,
            usr2: on(SignalKind::user_defined2())?,
        })
    }
}

/// What needs privilege, done before the async runtime starts its threads: the
/// instance lock, the data plane (BPF loaded, attached and pinned), the XDP guard
/// attached, the listeners, the admin listener and the control socket bound. The TLS keys and tokens were read
/// with the configuration. Then, with `[global] user`, the switch to that account.
pub struct Prepared {
    /// Without workers; with workers the supervisor holds it.
    lock: Option<InstanceLock>,
    /// This worker's place, with `[global] workers`.
    seat: Option<Seat>,
    /// A worker's: where it says it accepts, and its link to the supervisor.
    ready: Option<WorkerEnds>,
    stats: Arc<Stats>,
    limit: usize,
    planes: plane::Planes,
    sockets: Vec<std::net::TcpListener>,
    admin_socket: Option<std::net::TcpListener>,
    control: (std::os::unix::net::UnixListener, control::ControlSocket),
    guard: Option<Arc<crate::guard::Guard>>,
    /// The old process's next connection id, when this one takes over from it.
    inherited_next_id: Option<u32>,
}

/// A worker's ends toward its supervisor: the pipe it says "ready" on, its link.
type WorkerEnds = (std::os::fd::OwnedFd, upgrade::channel::Channel);

/// Sets up what needs privilege (see [`Prepared`]) and drops it. Call with no other
/// thread running: capabilities are per thread.
/// `inherited`: what the old process of a hot upgrade handed over, when this is its
/// new process.
pub fn prepare(
    config: &Config,
    plane_override: Option<DataPlaneKind>,
    assigned: Option<Assigned>,
    mut inherited: Option<upgrade::new::Inherited>,
) -> Result<Prepared, DaemonError> {
    let name = &config.global.name;
    let (lock, seat, given, ready) = match (assigned, &mut inherited) {
        (None, Some(i)) => {
            let fd = i.lock.take().expect("the lock comes first");
            (Some(InstanceLock::inherited(fd, name)), None, None, None)
        }
        (None, None) => {
            let lock = InstanceLock::acquire(name).map_err(DaemonError::Instance)?;
            // An earlier run with workers, killed, left theirs: `ctl` would add them up.
            crate::workers::remove_left_behind(name);
            (Some(lock), None, None, None)
        }
        (Some(a), _) => (None, Some(a.seat), Some(a.sockets), Some((a.ready, a.link))),
    };
    let index = seat.map_or(0, |s| s.index);
    let control_plane = seat.is_none_or(Seat::control_plane);
    let stats = Arc::new(Stats::default());
    let limit = max_connections(config) as usize;
    let kind = plane_override.unwrap_or(config.global.data_plane);
    let planes = plane::data_plane(config, kind, &stats, (index, inherited.is_some()))?;
    if inherited.as_ref().is_some_and(|i| i.spliced) && planes.sockmap.is_none() {
        return Err(DaemonError::Upgrade(
            "the running daemon splices connections in the kernel and this one has no BPF to carry them on (see the data plane warning above)".to_owned(),
        ));
    }
    info!(instance = %config.global.name, worker = index, data_plane = planes.plane.name(), "data plane selected");
    let sticky = config
        .clusters
        .iter()
        .any(|c| c.sticky != crate::config::Sticky::None);
    if seat.is_some() && planes.bpf.is_none() && sticky && control_plane {
        warn!(
            "without BPF each worker keeps its own sticky table in memory: a client reaching another worker may be sent to another server"
        );
    }
    // The guard first: no listener accepts before it watches the ports.
    let guard = match &config.guard {
        Some(g) if control_plane => Some(Arc::new(crate::guard::Guard::load(
            g,
            &listener_ports(config),
            inherited.as_mut().and_then(|i| i.guard.take()),
        )?)),
        _ => None,
    };
    let sockets = match given {
        Some(s) => s,
        None => bind_all(config, inherited.as_mut())?,
    };
    let admin_socket = match &config.admin {
        Some(a) if control_plane => match inherited.as_mut().and_then(|i| i.take_admin(a.bind)) {
            Some(s) => Some(s),
            None => Some(bind_admin(a)?),
        },
        _ => None,
    };
    let path = crate::workers::socket_path(name, index);
    let inherited_control = inherited.as_mut().and_then(|i| i.control.take());
    let control = match inherited_control {
        Some(fd) => control::inherited(fd, &path),
        None => control::bind(&path),
    }
    .map_err(|source| DaemonError::Control {
        path: path.display().to_string(),
        source,
    })?;
    if let Some(account) = &config.global.run_as {
        if seat.is_some() {
            // Workers ask each other (health, changes) after the switch.
            std::os::unix::fs::lchown(&path, Some(account.uid), Some(account.gid)).map_err(
                |source| DaemonError::Control {
                    path: path.display().to_string(),
                    source,
                },
            )?;
        }
        plane::drop_privileges(account, planes.bpf.as_deref())?;
    }
    Ok(Prepared {
        lock,
        seat,
        ready,
        stats,
        limit,
        planes,
        sockets,
        admin_socket,
        control,
        guard,
        inherited_next_id: inherited.map(|i| i.next_id),
    })
}

/// The TCP ports of the listeners (what the guard watches).
pub(crate) fn listener_ports(config: &Config) -> Vec<u16> {
    let mut ports: Vec<u16> = config.listeners.iter().map(|l| l.bind.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Runs the daemon set up by [`prepare`] until SIGTERM/SIGINT. `config_path` is
/// re-read on SIGHUP.
/// `arrival`: this is the new process of a hot upgrade; once it accepts, it tells the
/// old one and adopts its connections.
pub async fn run(
    config_path: PathBuf,
    config: Config,
    prepared: Prepared,
    arrival: Option<upgrade::new::Arrival>,
) -> Result<(), DaemonError> {
    let (mut running, mut signals, ready) = start(&config, prepared)?;
    if let Some(arrival) = arrival {
        let r = &mut running;
        arrival
            .ready(r.shared.clone(), r.permits.clone())
            .map_err(|e| DaemonError::Upgrade(e.to_string()))?;
        // Taken over: the files are this process's to remove at its clean stop.
        if let Some(lock) = r._lock.as_mut() {
            lock.own();
        }
        r._control.own();
    }
    let (upgrades, mut upgrade_requests) = tokio::sync::mpsc::channel(1);
    let _ = running.shared.upgrades.set(upgrades.clone());
    let invocation = upgrade::old::Invocation::current();
    let stats = running.shared.stats.clone();
    // With workers, the supervisor speaks to the service manager.
    let alone = running.shared.seat.get().is_none();
    if alone {
        systemd::ready(running.listeners.len(), running.shared.plane.name());
    }
    if let Some((pipe, link)) = ready {
        crate::workers::link::follow(link, upgrades);
        crate::workers::say_ready(pipe);
    }
    let watchdog = alone.then(systemd::watchdog).flatten();
    let mut current = config;
    loop {
        tokio::select! {
            _ = signals.hup.recv() => {
                if alone {
                    systemd::reloading();
                }
                let r = &mut running;
                if reload::reload(&config_path, &mut current, &r.shared, &r.listeners, &stats) {
                    reload::restart_checks(&mut r.checks, &r.shared, &current.global.name, &stats);
                }
                if alone {
                    systemd::reloaded();
                }
            }
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
            _ = signals.usr2.recv() => {
                info!("SIGUSR2: hot upgrade to the binary this daemon was started from");
                let request = upgrade::Request::default();
                running = running.upgrade(&current, &invocation, request, &mut signals).await;
            }
            Some(request) = upgrade_requests.recv() => {
                running = running.upgrade(&current, &invocation, request, &mut signals).await;
            }
        }
    }
    if alone {
        systemd::stopping();
    }
    running.stop(&current.global).await;
    if let Some(w) = watchdog {
        w.abort();
    }
    Ok(())
}

/// Everything from the prepared sockets up to serving: the shared state, the control
/// socket, the health checks, the publisher and one accept loop per listener.
fn start(
    config: &Config,
    prepared: Prepared,
) -> Result<(Running, Signals, Option<WorkerEnds>), DaemonError> {
    let Prepared {
        lock,
        seat,
        ready,
        stats,
        limit,
        planes: plane::Planes {
            plane,
            bpf,
            sockmap,
        },
        sockets,
        admin_socket,
        control: (control_listener, control),
        guard,
        inherited_next_id,
    } = prepared;
    // Duplicates for a later hot upgrade (a worker's lock is its supervisor's).
    let handed = takeover::handed(
        lock.as_ref(),
        &control_listener,
        config
            .admin
            .as_ref()
            .map(|a| a.bind)
            .zip(admin_socket.as_ref()),
        config.listeners.iter().map(|l| l.bind).zip(&sockets),
    )
    .map_err(|source| DaemonError::Control {
        path: "(duplicating sockets for upgrades)".to_owned(),
        source,
    })?;
    let in_runtime = |name: &str, addr, socket| {
        runtime_listener(socket).map_err(|source| DaemonError::Bind {
            name: name.to_owned(),
            addr,
            source,
        })
    };
    let sockets = (config.listeners.iter().zip(sockets))
        .map(|(l, s)| in_runtime(&l.name, l.bind, s))
        .collect::<Result<Vec<_>, _>>()?;
    let admin_socket = match (&config.admin, admin_socket) {
        (Some(a), Some(s)) => Some(in_runtime("admin", a.bind, s)?),
        _ => None,
    };
    let signals = Signals::install()?;

    let sticky = match &bpf {
        Some(b) => StickyTable::Bpf(b.clone()),
        None => StickyTable::memory(plane::sticky_size(config) as usize),
    };
    let clusters = config.clusters.clone();
    let preconnect = config.global.max_preconnect_bytes;
    let shared = Shared::new(stats.clone(), plane, clusters, sticky, preconnect);
    let shared = Arc::new(shared);
    if let Some(next) = inherited_next_id {
        shared.conns.continue_after(next);
    }
    if let Some(g) = guard {
        let _ = shared.guard.set(g);
    }
    if let Some(seat) = seat {
        let _ = shared.seat.set((config.global.name.clone(), seat));
    }
    let index = seat.map_or(0, |s| s.index);
    let control_task = control::serve(control_listener, shared.clone()).map_err(|source| {
        DaemonError::Control {
            path: crate::workers::socket_path(&config.global.name, index)
                .display()
                .to_string(),
            source,
        }
    })?;
    let checks = health_tasks(&shared, &config.global.name, &stats);
    let admin = admin_socket.map(|socket| serve_admin(config, socket, &shared, bpf.is_some()));
    let events = sockmap.map(|p| {
        tokio::spawn(async move {
            if let Err(e) = p.run_events().await {
                error!(error = %e, "BPF event loop stopped; throttling now relies on polling only");
            }
        })
    });
    let publisher = tokio::spawn(publish::publish_stats(
        stats.clone(),
        bpf.clone(),
        shared.clone(),
    ));
    let permits = Arc::new(Semaphore::new(limit));
    let (stop, stop_rx) = watch::channel(false);
    let (listeners, accept_tasks) = accept_all(config, sockets, &shared, &permits, &stop_rx);
    let running = Running {
        _lock: lock,
        _control: control,
        shared,
        listeners,
        bpf,
        checks,
        publisher,
        admin,
        accept_tasks,
        permits,
        limit,
        stop,
        events,
        handed: Arc::new(handed),
        control_task,
    };
    Ok((running, signals, ready))
}

/// The health checks of the clusters, or with `[global] workers` on a worker other
/// than 0 the task that follows worker 0's verdicts (checks run once per host).
fn health_tasks(shared: &Arc<Shared>, instance: &str, stats: &Arc<Stats>) -> Vec<JoinHandle<()>> {
    match shared.seat.get() {
        Some((_, seat)) if !seat.control_plane() => {
            let follow = crate::workers::peers::follow_health(shared.clone(), instance.to_owned());
            vec![tokio::spawn(follow)]
        }
        _ => health::spawn(&shared.clusters(), instance, stats),
    }
}

/// One accept loop per listener; each listener's cluster is resolved here and at each
/// reload, not per connection.
fn accept_all(
    config: &Config,
    sockets: Vec<TcpListener>,
    shared: &Arc<Shared>,
    permits: &Arc<Semaphore>,
    stop: &watch::Receiver<bool>,
) -> (Vec<Arc<ListenerRt>>, Vec<JoinHandle<()>>) {
    let clusters = shared.clusters();
    let workers = shared.workers();
    let mut listeners = Vec::new();
    let mut tasks = Vec::new();
    for (l, socket) in config.listeners.iter().zip(sockets) {
        let cluster = clusters[l.cluster].clone();
        let listener = Arc::new(ListenerRt::new(l.clone(), cluster, workers));
        shared.attach(listener.clone(), &config.clusters[l.cluster].name);
        listeners.push(listener.clone());
        let (shared, permits, stop) = (shared.clone(), permits.clone(), stop.clone());
        tasks.push(tokio::spawn(accept_loop(
            shared, listener, socket, permits, stop,
        )));
    }
    (listeners, tasks)
}

/// Serves `[admin]` on `socket`.
fn serve_admin(
    config: &Config,
    socket: TcpListener,
    shared: &Arc<Shared>,
    bpf_loaded: bool,
) -> JoinHandle<()> {
    let admin = config.admin.as_ref();
    let token = admin.and_then(|a| a.token.clone()).map(|t| t.0);
    let tls = admin.and_then(|a| a.tls.as_ref());
    let instance = &config.global.name;
    crate::admin::serve(socket, shared.clone(), bpf_loaded, instance, (token, tls))
}

/// Binds the admin listener (`[admin]`, or `[stats]` from the first wave).
fn bind_admin(admin: &crate::config::Admin) -> Result<std::net::TcpListener, DaemonError> {
    if admin.from_stats_section {
        warn!("[stats] is now [admin] (stats page, metrics, API): rename the section");
    }
    listen(admin.bind).map_err(|source| DaemonError::Bind {
        name: "admin".to_owned(),
        addr: admin.bind,
        source,
    })
}

/// Binds every listener, in file order; a hot upgrade's new process takes the old
/// one's socket where it has one at the same address.
fn bind_all(
    config: &Config,
    mut inherited: Option<&mut upgrade::new::Inherited>,
) -> Result<Vec<std::net::TcpListener>, DaemonError> {
    let mut sockets = Vec::new();
    for l in &config.listeners {
        let taken = inherited.as_mut().and_then(|i| i.take_listener(l.bind));
        let socket = match taken {
            Some(s) => s,
            None => listen(l.bind).map_err(|source| DaemonError::Bind {
                name: l.name.clone(),
                addr: l.bind,
                source,
            })?,
        };
        info!(listener = %l.name, bind = %l.bind, kind = ?l.kind(), "listening");
        sockets.push(socket);
    }
    Ok(sockets)
}

impl Running {
    /// `/readyz` fails for `shutdown_delay` while connections are still accepted,
    /// then accepting stops and open connections are evacuated (each cluster's at its
    /// `evict_rate`, MQTT 5 clients told 0x9C) within `shutdown_grace`; what is left
    /// then is closed, the tasks stop and the pins go (the sticky table stays).
    async fn stop(self, global: &crate::config::Global) {
        self.shared.stopping();
        if !global.shutdown_delay.is_zero() {
            info!(shutdown_delay = ?global.shutdown_delay, "stopping: /readyz fails, still accepting");
            tokio::time::sleep(global.shutdown_delay).await;
        }
        info!("stopping: no new connections");
        let _ = self.stop.send(true);
        for t in self.accept_tasks {
            let _ = t.await;
        }
        let deadline = Instant::now() + global.shutdown_grace;
        let shared = self.shared.clone();
        let evacuation = tokio::spawn(async move { crate::evacuate::everything(&shared).await });
        let permits = &self.permits;
        while permits.available_permits() < self.limit && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.limit - permits.available_permits();
        if left > 0 {
            info!(
                open = left,
                "closing connections still open after the grace period"
            );
        }
        evacuation.abort();
        self.publisher.abort();
        if let Some(a) = &self.admin {
            a.abort();
        }
        for t in self.checks {
            t.abort();
        }
        if let Some(b) = &self.bpf {
            b.unpin();
        }
        if let Some(g) = self.shared.guard.get() {
            g.detach();
        }
        drop(self._control);
        drop(self._lock);
        info!(closed_at_stop = left, "stopped");
    }
}

/// Connections the kernel completes and queues for a listener while the daemon is not
/// accepting (at `max_connections`, out of descriptors, a burst of reconnects); capped
/// by `net.core.somaxconn`. The 128 of std's `bind` sent SYNs of a reconnect storm
/// into one-second retransmissions.
const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket handed to the async runtime, with TCP_NODELAY set: accepted
/// sockets inherit it, one system call per connection less than setting it on each.
/// Set here rather than at the bind, so that listeners taken over from an older
/// process get it too.
fn runtime_listener(socket: std::net::TcpListener) -> std::io::Result<TcpListener> {
    socket2::SockRef::from(&socket).set_tcp_nodelay(true)?;
    TcpListener::from_std(socket)
}

/// A non-blocking listening socket on `addr` with [`LISTEN_BACKLOG`], made without
/// the async runtime (it is bound before the privilege drop).
fn listen(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    listen_with(addr, false)
}

/// [`listen`], in an `SO_REUSEPORT` group (one socket per worker).
pub(crate) fn listen_shared(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    listen_with(addr, true)
}

fn listen_with(addr: std::net::SocketAddr, shared: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG as i32)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
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

/// A worker of `[global] workers` (forked by the supervisor, single-threaded until
/// here): prepares with the sockets it was given, then runs on a runtime of its
/// share of the cores.
pub fn serve_worker(
    config_path: PathBuf,
    config: Config,
    plane_override: Option<DataPlaneKind>,
    mut assigned: Assigned,
) -> Result<(), DaemonError> {
    let count = assigned.seat.count as usize;
    // In a hot upgrade: the old worker of this index hands over its sockets first.
    let (arrival, inherited) = match assigned.arrival.take() {
        Some(fd) => {
            let (arrival, inherited) = upgrade::new::arrive_as_worker(fd)
                .map_err(|e| DaemonError::Upgrade(e.to_string()))?;
            (Some(arrival), Some(inherited))
        }
        None => (None, None),
    };
    let prepared = prepare(&config, plane_override, Some(assigned), inherited)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads((cores / count).max(1))
        .enable_all()
        .build()
        .map_err(|e| DaemonError::Worker(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(run(config_path, config, prepared, arrival))
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_the_listener() -> std::io::Result<()> {
        let socket = super::listen(([127, 0, 0, 1], 0).into())?;
        let listener = super::runtime_listener(socket)?;
        let _client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
        let (accepted, _) = listener.accept().await?;
        assert!(accepted.nodelay()?, "accepted socket without TCP_NODELAY");
        Ok(())
    }
}
