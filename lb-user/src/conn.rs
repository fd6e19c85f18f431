//! A client connection's life, top to bottom: read the first packet within
//! `inspect_timeout` (it must be a valid CONNECT), choose a server and connect within
//! `connect_timeout` (next server on failure), send the PROXY header and every byte read
//! so far, then hand the pair to the data plane. When no server can take it, the client
//! gets a CONNACK "server unavailable" in its own protocol version.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use lb_common::DaemonStat;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    time::timeout,
};
use tracing::{debug, warn};

use crate::{
    balance::{self, Lease, Pool},
    config::{Cluster, Listener},
    dataplane::{DataPlane, Outcome, Pair},
    mqtt::{self, Decode},
    proxy_protocol,
    stats::{ActiveGuard, Stats},
    sticky::{self, StickyTable},
    sys,
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
    fn source_for(&self, server: SocketAddr) -> Option<IpAddr> {
        let family: Vec<IpAddr> = self
            .config
            .source_addresses
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == server.is_ipv4())
            .collect();
        if family.is_empty() {
            return None;
        }
        let turn = self.next_source.fetch_add(1, Ordering::Relaxed);
        Some(family[turn % family.len()])
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
    next_id: AtomicU32,
}

impl Shared {
    /// Shared state over `clusters`.
    pub fn new(
        stats: Arc<Stats>,
        plane: Arc<dyn DataPlane>,
        clusters: Vec<Cluster>,
        sticky: StickyTable,
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
            next_id: AtomicU32::new(1),
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

/// Why a client was turned away before a server was involved.
#[derive(Debug, thiserror::Error)]
enum Reject {
    #[error("invalid first packet: {0}")]
    Invalid(mqtt::Invalid),
    #[error("client closed before a complete CONNECT")]
    Eof,
    #[error("client read failed: {0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Proxy(&'static str),
}

/// The first packet, read and validated.
struct First {
    /// Every byte read from the client so far from the CONNECT on (a PROXY header
    /// before it is not forwarded).
    bytes: Vec<u8>,
    version: mqtt::Version,
    client_id: String,
    username: Option<String>,
    /// The client's address as a PROXY header in front named it.
    proxied_source: Option<SocketAddr>,
}

/// Serves one accepted client connection on `listener` (whose cluster is `cluster`).
pub async fn handle(
    shared: Arc<Shared>,
    listener: Arc<Listener>,
    cluster: String,
    client: TcpStream,
    peer: SocketAddr,
) {
    let stats = &shared.stats;
    let _active = ActiveGuard::new(stats);
    stats.inc(DaemonStat::Accepted);
    let _ = client.set_nodelay(true);
    let mut client = client;

    // 1. The first packet must be a complete, valid CONNECT.
    let first = match timeout(
        listener.inspect_timeout,
        read_connect(
            &mut client,
            listener.max_connect_size as usize,
            listener.accept_proxy_protocol,
        ),
    )
    .await
    {
        Ok(Ok(first)) => first,
        Ok(Err(reject)) => {
            if let Reject::Invalid(why) = &reject {
                stats.inc(invalid_stat(*why));
            }
            stats.inc(match reject {
                Reject::Invalid(_) => DaemonStat::RejectedInvalid,
                Reject::Eof | Reject::Io(_) => DaemonStat::RejectedEof,
                Reject::Proxy(_) => DaemonStat::RejectedProxy,
            });
            debug!(%peer, listener = %listener.name, %reject, "client rejected");
            return;
        }
        Err(_) => {
            stats.inc(DaemonStat::RejectedTimeout);
            debug!(%peer, listener = %listener.name, "no CONNECT within inspect_timeout");
            return;
        }
    };
    // Behind a load balancer that sends PROXY headers, the client is who it names.
    let peer = first.proxied_source.unwrap_or(peer);

    // 2. A server.
    let Some(cluster) = shared.cluster(&cluster) else {
        warn!(%cluster, "cluster vanished in a reload; closing client");
        return;
    };
    let key = balance::Key {
        client_id: &first.client_id,
        source: peer.ip(),
    };
    let sticky_key = sticky::key(
        &cluster.config.name,
        cluster.config.sticky,
        &first.client_id,
        first.username.as_deref(),
        peer.ip(),
    );
    let Some((server, lease)) = connect_server(&cluster, &shared, &key, sticky_key.as_ref()).await
    else {
        stats.inc(DaemonStat::NoServer);
        debug!(%peer, client_id = %first.client_id, cluster = %cluster.config.name, "no server available");
        refuse(client, first.version).await;
        return;
    };
    let _ = server.set_nodelay(true);

    // 3. PROXY header, then everything read from the client.
    let local = client.local_addr().unwrap_or(listener.bind);
    let mut head = proxy_protocol::encode(cluster.config.proxy_protocol, peer, local);
    if head.is_empty() {
        head = first.bytes;
    } else {
        head.extend_from_slice(&first.bytes);
    }
    let mut server = server;
    let traffic = lease.traffic();
    traffic.add(0, head.len() as u64);
    if let Err(e) = server.write_all(&head).await {
        debug!(%peer, server = lease.name(), error = %e, "server write failed");
        stats.inc(DaemonStat::Aborted);
        return;
    }

    // 4. Hand-off.
    let pair = Pair {
        client,
        server,
        id: shared.next_id.fetch_add(1, Ordering::Relaxed),
        client_addr: peer,
        server_addr: lease.address,
        server_index: lease.index as u32,
        written_to_client: 0,
        written_to_server: head.len() as u64,
        idle_timeout: cluster.config.idle_timeout,
        traffic,
    };
    drop(head);
    match shared.plane.carry(pair).await {
        Outcome::Closed => stats.inc(DaemonStat::Closed),
        Outcome::IdleTimeout => stats.inc(DaemonStat::IdleTimeout),
        Outcome::Aborted(e) => {
            stats.inc(DaemonStat::Aborted);
            debug!(%peer, server = lease.name(), error = %e, "connection aborted");
        }
    }
}

/// The counter of one reason for refusing a first packet.
fn invalid_stat(why: mqtt::Invalid) -> DaemonStat {
    use mqtt::Invalid as I;
    match why {
        I::NotConnect => DaemonStat::InvalidNotConnect,
        I::RemainingLength => DaemonStat::InvalidRemainingLength,
        I::TooLarge => DaemonStat::InvalidTooLarge,
        I::Protocol => DaemonStat::InvalidProtocol,
        I::Flags => DaemonStat::InvalidFlags,
        I::Utf8 => DaemonStat::InvalidUtf8,
        I::Property => DaemonStat::InvalidProperty,
        I::Length => DaemonStat::InvalidLength,
    }
}

/// Reads until the buffer starts with a complete CONNECT (bytes after it are kept),
/// after a PROXY v1/v2 header when `proxy_header` is set.
async fn read_connect(
    client: &mut TcpStream,
    max: usize,
    proxy_header: bool,
) -> Result<First, Reject> {
    let mut bytes = Vec::with_capacity(256);
    let mut proxied_source = None;
    let mut expect_header = proxy_header;
    loop {
        if expect_header {
            match proxy_protocol::decode(&bytes) {
                proxy_protocol::Decoded::Header { len, source } => {
                    bytes.drain(..len);
                    proxied_source = source;
                    expect_header = false;
                }
                proxy_protocol::Decoded::Invalid(why) => return Err(Reject::Proxy(why)),
                proxy_protocol::Decoded::Incomplete => {}
            }
        }
        if !expect_header {
            match mqtt::decode_connect(&bytes, max) {
                Decode::Connect(c) => {
                    let (version, client_id) = (c.version, c.client_id.to_owned());
                    let username = c.username.map(str::to_owned);
                    return Ok(First {
                        bytes,
                        version,
                        client_id,
                        username,
                        proxied_source,
                    });
                }
                Decode::Invalid(e) => return Err(Reject::Invalid(e)),
                Decode::Incomplete => {}
            }
        }
        bytes.reserve(4096);
        match client.read_buf(&mut bytes).await {
            Ok(0) => return Err(Reject::Eof),
            Ok(_) => {}
            Err(e) => return Err(Reject::Io(e)),
        }
    }
}

/// What the sticky table said about a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StickyLookup {
    /// No sticky table for this cluster, or no key (no username).
    Off,
    /// No live entry.
    New,
    /// The entry's server, usable, at this index.
    Hit(usize),
    /// The entry's server is gone or cannot take the connection.
    Replaced,
}

/// Tries servers until one accepts a TCP connection within `connect_timeout`: the
/// sticky entry's server first, then the balancer's choices. Records the server in
/// the sticky table.
async fn connect_server(
    cluster: &ClusterRt,
    shared: &Shared,
    key: &balance::Key<'_>,
    sticky_key: Option<&lb_common::StickyKey>,
) -> Option<(TcpStream, Lease)> {
    let pool = &cluster.pool;
    let stats = &shared.stats;
    let mut tried = vec![false; pool.servers.len()];
    let mut lookup = StickyLookup::Off;
    let mut next = None;
    if let Some(k) = sticky_key {
        lookup = StickyLookup::New;
        if let Some(v) = shared.sticky.get(k) {
            next = pool
                .position(sticky::server_of(&v))
                .and_then(|i| pool.take(i, &tried));
            lookup = match &next {
                Some(lease) => StickyLookup::Hit(lease.index),
                None => StickyLookup::Replaced,
            };
        }
    }
    loop {
        let lease = match next.take() {
            Some(l) => l,
            None => pool.select(key, &tried)?,
        };
        tried[lease.index] = true;
        let source = cluster.source_for(lease.address);
        match timeout(
            cluster.config.connect_timeout,
            connect(lease.address, source),
        )
        .await
        {
            Ok(Ok(s)) => {
                lease.succeeded();
                if let Some(k) = sticky_key {
                    remember(shared, cluster, k, &lease, lookup);
                }
                return Some((s, lease));
            }
            Ok(Err(e)) => {
                debug!(server = lease.name(), ?source, error = %e, "server connect failed")
            }
            Err(_) => debug!(server = lease.name(), "server connect timed out"),
        }
        stats.inc(DaemonStat::ServerConnectFailed);
        if lease.failed() {
            stats.inc(DaemonStat::HealthFlips);
            warn!(cluster = %cluster.config.name, server = lease.name(), "server marked down after max_fails failed connects");
        }
    }
}

/// Writes the sticky entry of a connection that reached `lease`'s server.
fn remember(
    shared: &Shared,
    cluster: &ClusterRt,
    k: &lb_common::StickyKey,
    lease: &Lease,
    lookup: StickyLookup,
) {
    let stats = &shared.stats;
    stats.inc(match lookup {
        StickyLookup::Hit(i) if i == lease.index => DaemonStat::StickyHits,
        StickyLookup::New => DaemonStat::StickyNew,
        _ => DaemonStat::StickyReplaced,
    });
    let v = sticky::value(lease.address, lease.index, cluster.config.sticky_expire);
    if let Err(e) = shared.sticky.put(k, v) {
        stats.inc(DaemonStat::StickyErrors);
        debug!(error = %e, "sticky table write failed");
    }
}

/// Connects to `server`, from `source` when given (any port, chosen at connect).
async fn connect(server: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(ip) = source else {
        return TcpStream::connect(server).await;
    };
    let socket = if server.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if server.is_ipv4() {
        sys::set_bind_address_no_port(socket.as_raw_fd())?;
    }
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(server).await
}

/// Sends the "server unavailable" CONNACK, then closes without resetting it away: the
/// write side is shut and whatever the client still sends is read and dropped briefly.
async fn refuse(mut client: TcpStream, version: mqtt::Version) {
    if client
        .write_all(mqtt::connack_server_unavailable(version))
        .await
        .is_err()
    {
        return;
    }
    let _ = client.shutdown().await;
    let mut sink = [0u8; 512];
    let _ = timeout(Duration::from_secs(1), async {
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}
