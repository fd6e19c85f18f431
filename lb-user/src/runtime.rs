//! The state connections share and a reload replaces: every cluster's configuration
//! and live server pool ([`ClusterRt`]), each listener's resolved cluster and TLS
//! state ([`ListenerRt`]), and what every connection handler holds ([`Shared`]).
//! The health checks, the control socket and the daemon read it; `conn` serves
//! connections from it.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::{
    balance::Pool,
    config::{Cluster, Listener, ServerState, WebSocket},
    dataplane::DataPlane,
    limits::PreConnectBudget,
    registry::Registry,
    stats::Stats,
    sticky::StickyTable,
};

/// A cluster's configuration and live server pool; replaced whole on reload.
#[derive(Debug)]
pub struct ClusterRt {
    /// Configuration.
    pub config: Cluster,
    /// Servers and their state.
    pub pool: Pool,
    /// Turn of the next entry of `source_addresses`.
    next_source: AtomicUsize,
}

impl ClusterRt {
    /// Builds the runtime of `config`, taking over the live state of the servers it
    /// shares with `previous`.
    pub fn new(config: Cluster, previous: Option<&ClusterRt>) -> Self {
        let pool = Pool::new(&config, previous.map(|p| &p.pool));
        Self {
            config,
            pool,
            next_source: AtomicUsize::new(0),
        }
    }

    /// The local address for the next connection to `server`, from
    /// `source_addresses` in turn (same family only).
    pub fn source_for(&self, server: SocketAddr) -> Option<IpAddr> {
        let family = || {
            self.config
                .source_addresses
                .iter()
                .copied()
                .filter(|a| a.is_ipv4() == server.is_ipv4())
        };
        let n = family().count();
        if n == 0 {
            return None;
        }
        let turn = self.next_source.fetch_add(1, Ordering::Relaxed);
        family().nth(turn % n)
    }
}

/// A runtime change to one server (admin API, `ctl drain|enable|weight`): it
/// overrides the file's `state` and `weight` and survives reloads until changed again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Override {
    /// `state` instead of the file's.
    pub state: Option<ServerState>,
    /// `weight` instead of the file's.
    pub weight: Option<NonZeroU32>,
}

/// A runtime change named a server the configuration does not have.
#[derive(Debug, thiserror::Error)]
#[error("no server {server:?} in cluster {cluster:?}")]
pub struct UnknownServer {
    cluster: String,
    server: String,
}

/// What the clusters are built from: the file, the runtime overrides, and the
/// listeners to point at the result.
#[derive(Default)]
struct Layout {
    /// The clusters as the file says.
    file: Vec<Cluster>,
    /// By (cluster, server).
    overrides: BTreeMap<(String, String), Override>,
    /// Each listener and the name of the cluster it feeds.
    listeners: Vec<(Arc<ListenerRt>, String)>,
}

/// What every connection handler shares.
pub struct Shared {
    /// Counters.
    pub stats: Arc<Stats>,
    /// The data plane in use.
    pub plane: Arc<dyn DataPlane>,
    /// Clusters by name, swapped on reload and on runtime changes.
    clusters: RwLock<Arc<Vec<Arc<ClusterRt>>>>,
    /// What `clusters` is built from.
    layout: Mutex<Layout>,
    /// The sticky table of every cluster.
    pub sticky: StickyTable,
    /// Memory of connections before their CONNECT, all together.
    pub preconnect: PreConnectBudget,
    /// Every connection held, whatever carries it (`ctl conns`).
    pub conns: Arc<Registry>,
    /// A shutdown is under way (`/readyz` fails).
    stopping: AtomicBool,
    /// The XDP front guard, with `[guard]`.
    pub guard: std::sync::OnceLock<Arc<crate::guard::Guard>>,
    /// With `[global] workers`: the instance name and this worker's seat.
    pub seat: std::sync::OnceLock<(String, crate::workers::Seat)>,
    /// During a hot upgrade: where departing connections go ([`crate::upgrade`]).
    pub departures:
        std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<crate::upgrade::old::Outgoing>>,
    /// Connections departed for a hot upgrade.
    pub departed: std::sync::atomic::AtomicU64,
    /// Where the control socket's `upgrade` requests go (the daemon's signal loop).
    pub upgrades: std::sync::OnceLock<tokio::sync::mpsc::Sender<crate::upgrade::Request>>,
}

impl Shared {
    /// Shared state over `clusters`.
    pub fn new(
        stats: Arc<Stats>,
        plane: Arc<dyn DataPlane>,
        clusters: Vec<Cluster>,
        sticky: StickyTable,
        max_preconnect_bytes: usize,
    ) -> Self {
        let shared = Self {
            stats,
            plane,
            clusters: RwLock::default(),
            layout: Mutex::default(),
            sticky,
            preconnect: PreConnectBudget::new(max_preconnect_bytes),
            conns: Arc::default(),
            stopping: AtomicBool::new(false),
            guard: std::sync::OnceLock::new(),
            seat: std::sync::OnceLock::new(),
            departures: std::sync::OnceLock::new(),
            departed: std::sync::atomic::AtomicU64::new(0),
            upgrades: std::sync::OnceLock::new(),
        };
        shared.replace_clusters(clusters);
        shared
    }

    /// How many workers the instance runs (1 without `[global] workers`).
    pub fn workers(&self) -> u32 {
        self.seat.get().map_or(1, |(_, seat)| seat.count)
    }

    /// Every cluster's current runtime.
    pub fn clusters(&self) -> Arc<Vec<Arc<ClusterRt>>> {
        self.clusters.read().expect("clusters lock").clone()
    }

    /// The current runtime of the cluster named `name`.
    pub fn cluster(&self, name: &str) -> Option<Arc<ClusterRt>> {
        self.clusters
            .read()
            .expect("clusters lock")
            .iter()
            .find(|c| c.config.name == name)
            .cloned()
    }

    /// The listener named `name`.
    pub fn listener(&self, name: &str) -> Option<Arc<ListenerRt>> {
        let layout = self.layout.lock().expect("layout lock");
        layout
            .listeners
            .iter()
            .find(|(l, _)| l.config.name == name)
            .map(|(l, _)| l.clone())
    }

    /// Points `listener` at the cluster named `cluster`, now and after every rebuild.
    pub fn attach(&self, listener: Arc<ListenerRt>, cluster: &str) {
        if let Some(c) = self.cluster(cluster) {
            listener.set_cluster(c);
        }
        let mut layout = self.layout.lock().expect("layout lock");
        layout.listeners.push((listener, cluster.to_owned()));
    }

    /// Replaces the clusters (reload). Connections keep the runtime they started with.
    /// Servers keeping their name and address keep their live state (connections,
    /// health, counters); runtime overrides stay.
    pub fn replace_clusters(&self, clusters: Vec<Cluster>) {
        self.reload(clusters, |_| None);
    }

    /// [`Shared::replace_clusters`], with the cluster each listener feeds now (by
    /// listener; None keeps its cluster).
    pub fn reload(&self, clusters: Vec<Cluster>, cluster_of: impl Fn(&Listener) -> Option<String>) {
        let mut layout = self.layout.lock().expect("layout lock");
        layout.file = clusters;
        for (l, name) in &mut layout.listeners {
            if let Some(new) = cluster_of(&l.config) {
                *name = new;
            }
        }
        self.rebuild(&layout);
    }

    /// Changes a server at runtime (merged with its earlier overrides).
    pub fn override_server(
        &self,
        cluster: &str,
        server: &str,
        change: Override,
    ) -> Result<(), UnknownServer> {
        let mut layout = self.layout.lock().expect("layout lock");
        let known = layout
            .file
            .iter()
            .filter(|c| c.name == cluster)
            .any(|c| c.servers.iter().any(|s| s.name == server));
        if !known {
            return Err(UnknownServer {
                cluster: cluster.to_owned(),
                server: server.to_owned(),
            });
        }
        let key = (cluster.to_owned(), server.to_owned());
        let o = layout.overrides.entry(key).or_default();
        o.state = change.state.or(o.state);
        o.weight = change.weight.or(o.weight);
        self.rebuild(&layout);
        Ok(())
    }

    /// The (cluster, server) pairs a runtime change overrides the file for.
    pub fn overridden(&self) -> std::collections::BTreeSet<(String, String)> {
        let layout = self.layout.lock().expect("layout lock");
        layout.overrides.keys().cloned().collect()
    }

    /// Rebuilds the clusters from `layout` and points the listeners at them.
    fn rebuild(&self, layout: &Layout) {
        let mut current = self.clusters.write().expect("clusters lock");
        let new: Vec<Arc<ClusterRt>> = layout
            .file
            .iter()
            .map(|c| {
                let mut c = c.clone();
                for s in &mut c.servers {
                    if let Some(o) = layout.overrides.get(&(c.name.clone(), s.name.clone())) {
                        s.state = o.state.unwrap_or(s.state);
                        s.weight = o.weight.unwrap_or(s.weight);
                    }
                }
                let previous = current.iter().find(|p| p.config.name == c.name);
                Arc::new(ClusterRt::new(c, previous.map(|p| &**p)))
            })
            .collect();
        for (l, name) in &layout.listeners {
            match new.iter().find(|c| &c.config.name == name) {
                Some(c) => l.set_cluster(c.clone()),
                None => {
                    tracing::warn!(listener = %l.config.name, cluster = %name, "the listener's cluster is gone: it keeps its cluster as it was until a restart")
                }
            }
        }
        *current = Arc::new(new);
    }

    /// Ready for new clients: no shutdown under way and some cluster has a server that
    /// can take a connection now.
    pub fn ready(&self) -> Result<(), &'static str> {
        if self.is_stopping() {
            return Err("shutting down");
        }
        let now = std::time::Instant::now();
        let usable = self
            .clusters()
            .iter()
            .any(|c| c.pool.servers.iter().any(|s| s.available(now)));
        if usable {
            Ok(())
        } else {
            Err("no cluster has a usable server")
        }
    }

    /// Marks a shutdown under way (`/readyz` fails from now on).
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Whether a shutdown is under way.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
}

/// A listener as the accept loop and the connections see it: its configuration, its
/// cluster (resolved at start and at each reload, never looked up per connection),
/// and for TLS the configuration a reload can replace and
/// the handshake limit.
pub struct ListenerRt {
    /// Its configuration.
    pub config: Listener,
    /// TLS state, for TLS listeners (`mqtts`, `wss`).
    pub tls: Option<TlsRt>,
    /// The cluster its connections go to.
    cluster: RwLock<Arc<ClusterRt>>,
    /// Its admission limits (set at start; a reload does not change them).
    pub admission: Arc<crate::admission::Admission>,
}

/// A TLS listener's live state.
pub struct TlsRt {
    /// The rustls configuration new handshakes use.
    server_config: RwLock<Arc<rustls::ServerConfig>>,
    /// At most `max_handshakes` handshakes at once.
    pub handshakes: tokio::sync::Semaphore,
    /// `handshake_timeout`.
    pub handshake_timeout: Duration,
}

impl TlsRt {
    /// The configuration for the next handshake.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config.read().expect("tls lock").clone()
    }
}

impl ListenerRt {
    /// The runtime of `config`, whose connections go to `cluster`, in one of
    /// `workers` processes (which share its `new_connection_rate`).
    pub fn new(config: Listener, cluster: Arc<ClusterRt>, workers: u32) -> Self {
        let tls = config.tls().map(|t| TlsRt {
            server_config: RwLock::new(t.config.clone()),
            handshakes: tokio::sync::Semaphore::new(t.max_handshakes.get() as usize),
            handshake_timeout: t.handshake_timeout,
        });
        let limits = config.limits.per_worker(workers);
        let admission = Arc::new(crate::admission::Admission::new(&config.name, limits));
        Self {
            config,
            tls,
            cluster: RwLock::new(cluster),
            admission,
        }
    }

    /// Its WebSocket settings, for `ws`/`wss` listeners.
    pub fn websocket(&self) -> Option<&WebSocket> {
        self.config.websocket()
    }

    /// The cluster a new connection goes to.
    pub fn cluster(&self) -> Arc<ClusterRt> {
        self.cluster.read().expect("listener cluster lock").clone()
    }

    /// Points new connections at `cluster` (reload); established ones keep theirs.
    pub fn set_cluster(&self, cluster: Arc<ClusterRt>) {
        *self.cluster.write().expect("listener cluster lock") = cluster;
    }

    /// Takes the certificates and TLS settings of `new` (reload); new handshakes use
    /// them, established connections keep theirs.
    pub fn replace_tls(&self, new: &Listener) {
        if let (Some(rt), Some(t)) = (&self.tls, new.tls()) {
            *rt.server_config.write().expect("tls lock") = t.config.clone();
        }
    }
}
