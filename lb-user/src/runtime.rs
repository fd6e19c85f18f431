//! The state connections share and a reload replaces: every cluster's configuration
//! and live server pool ([`ClusterRt`]), each listener's resolved cluster and TLS
//! state ([`ListenerRt`]), and what every connection handler holds ([`Shared`]).
//! The health checks, the control socket and the daemon read it; `conn` serves
//! connections from it.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::{
    balance::Pool,
    config::{Cluster, Listener, WebSocket},
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

/// What every connection handler shares.
pub struct Shared {
    /// Counters.
    pub stats: Arc<Stats>,
    /// The data plane in use.
    pub plane: Arc<dyn DataPlane>,
    /// Clusters by name, swapped on reload.
    clusters: RwLock<Arc<Vec<Arc<ClusterRt>>>>,
    /// The sticky table of every cluster.
    pub sticky: StickyTable,
    /// Memory of connections before their CONNECT, all together.
    pub preconnect: PreConnectBudget,
    /// Every connection held, whatever carries it (`ctl conns`).
    pub conns: Arc<Registry>,
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
        Self {
            stats,
            plane,
            clusters: RwLock::new(Arc::new(
                clusters
                    .into_iter()
                    .map(|c| Arc::new(ClusterRt::new(c, None)))
                    .collect(),
            )),
            sticky,
            preconnect: PreConnectBudget::new(max_preconnect_bytes),
            conns: Arc::default(),
        }
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

    /// Replaces the clusters (reload). Connections keep the runtime they started with.
    /// Servers keeping their name and address keep their live state (connections,
    /// health, counters).
    pub fn replace_clusters(&self, clusters: Vec<Cluster>) {
        let mut current = self.clusters.write().expect("clusters lock");
        let new = clusters
            .into_iter()
            .map(|c| {
                let previous = current.iter().find(|p| p.config.name == c.name);
                Arc::new(ClusterRt::new(c, previous.map(|p| &**p)))
            })
            .collect();
        *current = Arc::new(new);
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
    /// The runtime of `config`, whose connections go to `cluster`.
    pub fn new(config: Listener, cluster: Arc<ClusterRt>) -> Self {
        let tls = config.tls().map(|t| TlsRt {
            server_config: RwLock::new(t.config.clone()),
            handshakes: tokio::sync::Semaphore::new(t.max_handshakes.get() as usize),
            handshake_timeout: t.handshake_timeout,
        });
        Self {
            config,
            tls,
            cluster: RwLock::new(cluster),
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
