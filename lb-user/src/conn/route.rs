//! Choosing and reaching a server: the sticky entry's server first, then the
//! balancer's choices, each connected within `connect_timeout` (next server on
//! failure, a server's own failures counted against it); the sticky entry written; and
//! when no server can take the client, the CONNACK "server unavailable" in its own
//! protocol version.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    time::Duration,
};

use lb_common::{DaemonStat, StickyKey};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    time::timeout,
};
use tracing::{debug, warn};

use super::{Client, first::First};
use crate::{
    balance::{self, Lease},
    limits::{LOCAL_RESOURCE_LOG, is_local_resource},
    runtime::{ClusterRt, Shared},
    sticky, sys,
    ws::{self, CloseCode},
};

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

/// Why no server took a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NoServer {
    /// Every usable server was tried, or none is usable.
    Unavailable,
    /// This host ran out of something (descriptors, buffers, ports): no server is
    /// blamed and none is tried further, since the next would fail the same way.
    LocalResource,
}

impl NoServer {
    /// Its counter.
    pub fn stat(self) -> DaemonStat {
        match self {
            Self::Unavailable => DaemonStat::NoServer,
            Self::LocalResource => DaemonStat::RejectedLocalResource,
        }
    }
}

/// Tries servers for the client `first` (from `peer`) until one accepts a TCP
/// connection within `connect_timeout`: the sticky entry's server first, then the
/// balancer's choices. Records the server in the sticky table. Only a server's own
/// answer (refused, timed out, reset) counts against it.
pub(super) async fn connect_server(
    shared: &Shared,
    cluster: &ClusterRt,
    first: &First,
    peer: SocketAddr,
    websocket: bool,
) -> Result<(TcpStream, Lease), NoServer> {
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
    let pool = &cluster.pool;
    let mut tried = vec![false; pool.servers.len()];
    let (mut next, lookup) = sticky_server(shared, cluster, sticky_key.as_ref(), &tried);
    loop {
        let lease = match next.take() {
            Some(l) => l,
            None => pool.select(&key, &tried).ok_or(NoServer::Unavailable)?,
        };
        tried[lease.index] = true;
        let server = &pool.servers[lease.index].config;
        let target = match server.ws_address {
            Some(ws) if websocket => ws,
            _ => lease.address,
        };
        if let Some(s) = try_server(shared, cluster, &lease, target).await? {
            if let Some(k) = &sticky_key {
                remember(shared, cluster, k, &lease, lookup);
            }
            return Ok((s, lease));
        }
    }
}

/// The sticky entry's server, when the entry names a server that can take the client.
fn sticky_server(
    shared: &Shared,
    cluster: &ClusterRt,
    key: Option<&StickyKey>,
    tried: &[bool],
) -> (Option<Lease>, StickyLookup) {
    let Some(k) = key else {
        return (None, StickyLookup::Off);
    };
    let Some(v) = shared.sticky.get(k) else {
        return (None, StickyLookup::New);
    };
    let pool = &cluster.pool;
    match pool
        .position(sticky::server_of(&v))
        .and_then(|i| pool.take(i, tried))
    {
        Some(lease) => {
            let hit = StickyLookup::Hit(lease.index);
            (Some(lease), hit)
        }
        None => (None, StickyLookup::Replaced),
    }
}

/// One connect to `lease`'s server at `target`: the stream, None when the server
/// failed (counted against it), or an error when this host is out of a resource.
async fn try_server(
    shared: &Shared,
    cluster: &ClusterRt,
    lease: &Lease,
    target: SocketAddr,
) -> Result<Option<TcpStream>, NoServer> {
    let stats = &shared.stats;
    let source = cluster.source_for(target);
    match timeout(cluster.config.connect_timeout, connect(target, source)).await {
        Ok(Ok(s)) => {
            lease.succeeded();
            return Ok(Some(s));
        }
        Ok(Err(e)) if is_local_resource(&e) => {
            stats.inc(DaemonStat::LocalResourceErrors);
            if LOCAL_RESOURCE_LOG.allow() {
                warn!(server = lease.name(), error = %e, "cannot open a server connection: this host is out of a resource (not the server's fault); refusing clients until it recovers");
            }
            return Err(NoServer::LocalResource);
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
    Ok(None)
}

/// Writes the sticky entry of a connection that reached `lease`'s server.
fn remember(
    shared: &Shared,
    cluster: &ClusterRt,
    k: &StickyKey,
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

/// Sends the "server unavailable" CONNACK (in a WebSocket frame, then a close frame,
/// on ws/wss listeners), then closes without resetting it away: the write side is shut
/// and whatever the client still sends is read and dropped briefly.
pub(super) async fn refuse(mut client: Client, connack: &[u8], websocket: bool) {
    let bytes = if websocket {
        let close = ws::close_frame(CloseCode::TryAgainLater);
        [ws::binary_frame(connack), close].concat()
    } else {
        connack.to_vec()
    };
    if client.write_all(&bytes).await.is_err() {
        return;
    }
    let _ = client.shutdown().await;
    let mut sink = [0u8; 512];
    let _ = timeout(Duration::from_secs(1), async {
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}
