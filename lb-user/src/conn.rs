//! A client connection's life, top to bottom: the TLS handshake on `mqtts`/`wss`
//! listeners; the WebSocket upgrade on `ws`/`wss`; the first packet within
//! `inspect_timeout` (it must be a valid CONNECT; optionally rewritten from the client
//! certificate); a server (sticky entry first, then the balancer) connected within
//! `connect_timeout` (next server on failure); the PROXY header and every byte read so
//! far; then the data plane (plain TCP) or the userspace relay (TLS). When no server can
//! take it, the client gets a CONNACK "server unavailable" in its own protocol version.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use lb_common::DaemonStat;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    time::timeout,
};
use tracing::{debug, info, warn};

use crate::{
    balance::{self, Lease, Pool},
    config::{Cluster, Listener, ListenerKind, Rewrite},
    dataplane::{DataPlane, Outcome, Pair},
    limits::{Charge, LOCAL_RESOURCE_LOG, LogOnce, PreConnectBudget, is_local_resource},
    mqtt::{self, Decode},
    proxy_protocol,
    registry::{Entry, Plane, Registry},
    stats::{ActiveGuard, Stats},
    sticky::{self, StickyTable},
    sys,
    tls::{CertField, Identity, TlsInfo},
    ws,
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
    #[error("not a WebSocket upgrade: HTTP {0}")]
    Http(u16),
    #[error("WebSocket: {0}")]
    Frame(ws::FrameError),
    #[error("pre-CONNECT memory budget (max_preconnect_bytes) exhausted")]
    Budget,
}

/// A WebSocket client's upgrade, answered by mqttlb.
struct WsHandshake {
    upgrade: ws::Upgrade,
    /// The request head as received.
    head: Vec<u8>,
    /// Bytes of the `101` sent to the client.
    answered: usize,
}

/// The first packet, read and validated.
struct First {
    /// Every byte read from the client so far from the CONNECT on (a PROXY header
    /// before it is not forwarded).
    bytes: Vec<u8>,
    version: mqtt::Version,
    /// Length of the CONNECT at the start of `bytes`.
    connect_len: usize,
    client_id: String,
    username: Option<String>,
    /// The client's address as a PROXY header in front named it.
    proxied_source: Option<SocketAddr>,
}

impl First {
    /// The fields of `c`, with no bytes yet.
    fn of(c: &mqtt::Connect<'_>, proxied_source: Option<SocketAddr>) -> Self {
        Self {
            bytes: Vec::new(),
            version: c.version,
            connect_len: c.len,
            client_id: c.client_id.to_owned(),
            username: c.username.map(str::to_owned),
            proxied_source,
        }
    }
}

/// A listener as the accept loop and the connections see it: its configuration and,
/// for TLS, the configuration a reload can replace and the handshake limit.
pub struct ListenerRt {
    /// Its configuration.
    pub config: Listener,
    /// TLS state, for TLS listeners.
    pub tls: Option<TlsRt>,
}

/// A TLS listener's live state.
pub struct TlsRt {
    server_config: RwLock<Arc<rustls::ServerConfig>>,
    handshakes: tokio::sync::Semaphore,
    handshake_timeout: Duration,
}

impl ListenerRt {
    /// The runtime of `config`.
    pub fn new(config: Listener) -> Self {
        let tls = config.tls.as_ref().map(|t| TlsRt {
            server_config: RwLock::new(t.config.clone()),
            handshakes: tokio::sync::Semaphore::new(t.max_handshakes.get() as usize),
            handshake_timeout: t.handshake_timeout,
        });
        Self { config, tls }
    }

    /// Takes the certificates and TLS settings of `new` (reload); new handshakes use
    /// them, established connections keep theirs.
    pub fn replace_tls(&self, new: &Listener) {
        if let (Some(rt), Some(t)) = (&self.tls, &new.tls) {
            *rt.server_config.write().expect("tls lock") = t.config.clone();
        }
    }
}

/// The client side of a connection: plain TCP (carried by the data plane) or TLS
/// (relayed in userspace).
enum Client {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Client {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(s) => s.get_ref().0,
        }
    }
}

impl tokio::io::AsyncRead for Client {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Client {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Self::Tls(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// What the TLS handshake established.
struct TlsSession {
    info: TlsInfo,
    identity: Option<Identity>,
}

/// Serves one accepted client connection on `listener` (whose cluster is `cluster`).
pub async fn handle(
    shared: Arc<Shared>,
    listener: Arc<ListenerRt>,
    cluster: String,
    client: TcpStream,
    peer: SocketAddr,
) {
    let stats = &shared.stats;
    // A dual-stack listener's IPv4 clients are IPv4 everywhere (logs, PROXY headers).
    let peer = crate::addr::unmapped(peer);
    let _active = ActiveGuard::new(stats);
    let registered = shared.conns.open(&listener.config.name, peer);
    let entry = &registered.entry;
    stats.inc(DaemonStat::Accepted);
    let _ = client.set_nodelay(true);
    let config = &listener.config;
    match &listener.tls {
        None => {
            let proxy = config.accept_proxy_protocol;
            serve(
                &shared,
                config,
                &cluster,
                Client::Plain(client),
                (peer, entry),
                None,
                proxy,
            )
            .await;
        }
        Some(tls) => {
            let Some((stream, peer, session)) =
                tls_accept(&shared, config, tls, client, peer).await
            else {
                return;
            };
            let client = Client::Tls(Box::new(stream));
            serve(
                &shared,
                config,
                &cluster,
                client,
                (peer, entry),
                Some(session),
                false,
            )
            .await;
        }
    }
}

/// A PROXY header in front of a TLS handshake, read without consuming a byte of the
/// handshake: peeked, then exactly its length read.
async fn proxy_header_before_tls(client: &TcpStream) -> Result<Option<SocketAddr>, Reject> {
    let mut buf = [0u8; 536];
    loop {
        client.readable().await.map_err(Reject::Io)?;
        let n = match client.try_io(tokio::io::Interest::READABLE, || {
            sys::peek(client.as_raw_fd(), &mut buf)
        }) {
            Ok(0) => return Err(Reject::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(Reject::Io(e)),
        };
        match proxy_protocol::decode(&buf[..n]) {
            proxy_protocol::Decoded::Header { len, source } => {
                let mut skip = vec![0u8; len];
                let mut got = 0;
                while got < len {
                    client.readable().await.map_err(Reject::Io)?;
                    match client.try_read(&mut skip[got..]) {
                        Ok(0) => return Err(Reject::Eof),
                        Ok(k) => got += k,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(Reject::Io(e)),
                    }
                }
                return Ok(source);
            }
            proxy_protocol::Decoded::Invalid(why) => return Err(Reject::Proxy(why)),
            // Peeking again returns the same bytes until more arrive.
            proxy_protocol::Decoded::Incomplete => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// Waits until the client has sent something (or closed). `readable()` alone can
/// report a fresh socket ready: a peek that would block clears that.
async fn wait_for_bytes(client: &TcpStream) -> io::Result<()> {
    let mut byte = [0u8; 1];
    loop {
        client.readable().await?;
        match client.try_io(tokio::io::Interest::READABLE, || {
            sys::peek(client.as_raw_fd(), &mut byte)
        }) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// One TLS refusal logged per second, process-wide.
static TLS_FAILURE_LOG: std::sync::LazyLock<LogOnce> =
    std::sync::LazyLock::new(|| LogOnce::new(Duration::from_secs(1)));

/// The TLS handshake (after a PROXY header when the listener expects one), within
/// `handshake_timeout` and under the listener's `max_handshakes`.
async fn tls_accept(
    shared: &Shared,
    config: &Listener,
    tls: &TlsRt,
    client: TcpStream,
    peer: SocketAddr,
) -> Option<(
    tokio_rustls::server::TlsStream<TcpStream>,
    SocketAddr,
    TlsSession,
)> {
    let stats = &shared.stats;
    let mut peer = peer;
    if config.accept_proxy_protocol {
        match timeout(config.inspect_timeout, proxy_header_before_tls(&client)).await {
            Ok(Ok(source)) => peer = source.unwrap_or(peer),
            Ok(Err(reject)) => {
                stats.inc(match reject {
                    Reject::Proxy(_) => DaemonStat::RejectedProxy,
                    _ => DaemonStat::RejectedEof,
                });
                debug!(%peer, listener = %config.name, %reject, "client rejected");
                return None;
            }
            Err(_) => {
                stats.inc(DaemonStat::RejectedTimeout);
                return None;
            }
        }
    }
    let acceptor =
        tokio_rustls::TlsAcceptor::from(tls.server_config.read().expect("tls lock").clone());
    let handshake = async {
        // A client that sends nothing takes no handshake slot: silent connections
        // cannot starve the others; they are cut at the same timeout.
        wait_for_bytes(&client).await?;
        let _permit = tls.handshakes.acquire().await.map_err(io::Error::other)?;
        acceptor.accept(client).await
    };
    let stream = match timeout(tls.handshake_timeout, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            stats.inc(DaemonStat::TlsHandshakeFailures);
            // Why a device is refused (an expired or untrusted certificate, a refused
            // version) is what an operator needs to see; a flood stays readable.
            if TLS_FAILURE_LOG.allow() {
                info!(%peer, listener = %config.name, reason = %e, "TLS handshake refused (at most one such line a second)");
            } else {
                debug!(%peer, listener = %config.name, reason = %e, "TLS handshake refused");
            }
            return None;
        }
        Err(_) => {
            stats.inc(DaemonStat::TlsHandshakeTimeouts);
            debug!(%peer, listener = %config.name, "TLS handshake timed out");
            return None;
        }
    };
    stats.inc(DaemonStat::TlsHandshakes);
    let conn = stream.get_ref().1;
    if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        stats.inc(DaemonStat::TlsResumed);
    }
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "TLS",
    };
    let identity = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|der| Identity::from_der(der));
    let info = TlsInfo {
        version: version.to_owned(),
        client_cn: identity.as_ref().and_then(|i| i.cn.clone()),
        client_cert: identity.is_some(),
    };
    Some((stream, peer, TlsSession { info, identity }))
}

/// Replaces the client id and/or username of the CONNECT with client certificate
/// fields (`[listeners.rewrite]`); bytes after the CONNECT are kept.
fn apply_rewrite(
    first: &mut First,
    rewrite: Rewrite,
    identity: Option<&Identity>,
    max: usize,
) -> Result<(), String> {
    let Some(identity) = identity else {
        return Err("no client certificate".into());
    };
    let field = |f: Option<CertField>| -> Result<Option<String>, String> {
        f.map(|f| {
            identity
                .get(f)
                .map(str::to_owned)
                .ok_or_else(|| format!("the certificate has no {f:?}"))
        })
        .transpose()
    };
    let client_id = field(rewrite.client_id)?.unwrap_or_else(|| first.client_id.clone());
    let username = field(rewrite.username)?;
    let packet = &first.bytes[..first.connect_len];
    let mut new = match (&first.username, &username) {
        (None, Some(u)) => mqtt::rewrite_connect(packet, max, &client_id, None)
            .and_then(|p| mqtt::add_username(&p, max, u)),
        _ => mqtt::rewrite_connect(packet, max, &client_id, username.as_deref()),
    }
    .map_err(|e| format!("the CONNECT cannot take the certificate fields: {e}"))?;
    new.extend_from_slice(&first.bytes[first.connect_len..]);
    first.connect_len = new.len() - (first.bytes.len() - first.connect_len);
    first.bytes = new;
    first.client_id = client_id;
    if username.is_some() {
        first.username = username;
    }
    Ok(())
}

/// [`apply_rewrite`] for a CONNECT inside WebSocket frames: the complete frames are
/// replaced by one masked binary frame carrying the rewritten CONNECT and whatever
/// followed it (MQTT over WebSocket does not depend on frame boundaries,
/// MQTT-6.0.0-2); bytes of an incomplete frame after them are kept as they were.
fn rewrite_in_frames(
    first: &mut First,
    rewrite: Rewrite,
    identity: Option<&Identity>,
    max: usize,
) -> Result<(), String> {
    let (payload, used) = ws::client_frames(&first.bytes, max).map_err(|e| e.to_string())?;
    let rest = first.bytes.split_off(used);
    first.bytes = payload;
    apply_rewrite(first, rewrite, identity, max)?;
    let mut frames = ws::masked_binary_frame(&first.bytes, rand::random());
    frames.extend_from_slice(&rest);
    first.bytes = frames;
    Ok(())
}

/// Everything after the handshake: the CONNECT, a server, the hand-off.
async fn serve(
    shared: &Shared,
    listener: &Listener,
    cluster: &str,
    mut client: Client,
    (peer, entry): (SocketAddr, &Arc<Entry>),
    tls: Option<TlsSession>,
    proxy_header: bool,
) {
    let stats = &shared.stats;
    let websocket = matches!(listener.kind, ListenerKind::Ws | ListenerKind::Wss);
    let max = listener.max_connect_size as usize;
    // 1. The first packet must be a complete, valid CONNECT (inside WebSocket frames
    //    after the upgrade on ws/wss listeners).
    let mut charge = shared.preconnect.charge();
    let read = async {
        if websocket {
            read_ws_connect(
                &mut client,
                &listener.path,
                max,
                proxy_header,
                stats,
                &mut charge,
            )
            .await
            .map(|(f, h)| (f, Some(h)))
        } else {
            read_connect(&mut client, max, proxy_header, &mut charge)
                .await
                .map(|f| (f, None))
        }
    };
    let (mut first, ws_handshake) = match timeout(listener.inspect_timeout, read).await {
        Ok(Ok(first)) => first,
        Ok(Err(reject)) => {
            if let Reject::Invalid(why) = &reject {
                stats.inc(invalid_stat(*why));
            }
            stats.inc(match reject {
                Reject::Invalid(_) => DaemonStat::RejectedInvalid,
                Reject::Eof | Reject::Io(_) => DaemonStat::RejectedEof,
                Reject::Proxy(_) => DaemonStat::RejectedProxy,
                Reject::Http(_) => DaemonStat::WsRejectedHttp,
                Reject::Frame(e) if e.is_oversize() => DaemonStat::RejectedOversize,
                Reject::Frame(_) => DaemonStat::WsBadFrames,
                Reject::Budget => DaemonStat::RejectedBudget,
            });
            if websocket && matches!(reject, Reject::Invalid(_) | Reject::Frame(_)) {
                // After the 101: say why in WebSocket terms (1002: protocol error).
                let _ = client.write_all(&ws::close_frame(1002)).await;
            }
            let _ = client.shutdown().await;
            debug!(%peer, listener = %listener.name, %reject, "client rejected");
            return;
        }
        Err(_) => {
            stats.inc(DaemonStat::RejectedTimeout);
            debug!(%peer, listener = %listener.name, "no CONNECT within inspect_timeout");
            return;
        }
    };
    drop(charge);
    // Behind a load balancer that sends PROXY headers, the client is who it names.
    let peer = first.proxied_source.unwrap_or(peer);
    if listener.rewrite != Rewrite::default() {
        let identity = tls.as_ref().and_then(|t| t.identity.as_ref());
        let rewritten = if websocket {
            rewrite_in_frames(&mut first, listener.rewrite, identity, max)
        } else {
            apply_rewrite(&mut first, listener.rewrite, identity, max)
        };
        if let Err(why) = rewritten {
            stats.inc(DaemonStat::RewriteFailed);
            debug!(%peer, listener = %listener.name, %why, "CONNECT rewrite failed; closing");
            if websocket {
                let _ = client.write_all(&ws::close_frame(1008)).await;
            }
            return;
        }
    }

    // The client id the server gets (after a rewrite).
    entry.identified(peer, &first.client_id);

    // 2. A server.
    let Some(cluster) = shared.cluster(cluster) else {
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
    let (server, lease) = match connect_server(
        &cluster,
        shared,
        &key,
        sticky_key.as_ref(),
        websocket,
    )
    .await
    {
        Ok(connected) => connected,
        Err(why) => {
            stats.inc(match why {
                NoServer::Unavailable => DaemonStat::NoServer,
                NoServer::LocalResource => DaemonStat::RejectedLocalResource,
            });
            debug!(%peer, client_id = %first.client_id, cluster = %cluster.config.name, ?why, "no server available");
            refuse(client, first.version, websocket).await;
            return;
        }
    };
    let _ = server.set_nodelay(true);

    // 3. PROXY header, then everything read from the client.
    let local = client.tcp().local_addr().unwrap_or(listener.bind);
    let mut head = proxy_protocol::encode_with_tls(
        cluster.config.proxy_protocol,
        peer,
        local,
        tls.as_ref().map(|t| &t.info),
    );
    let mut server = server;
    let mut written_to_client = 0;
    // Bytes already written to the server (the upgrade request).
    let mut traffic_head = 0;
    // WebSocket terminated here: the client bytes after the frames already unwrapped.
    let mut terminated: Option<Vec<u8>> = None;
    let terminate = ws_handshake.is_some()
        && cluster.pool.servers[lease.index]
            .config
            .ws_address
            .is_none();
    match &ws_handshake {
        None if head.is_empty() => head = std::mem::take(&mut first.bytes),
        None => head.extend_from_slice(&first.bytes),
        Some(h) if terminate => {
            // The server speaks plain MQTT: the CONNECT and what followed, unwrapped.
            let (payload, used) = match ws::client_frames(&first.bytes, max) {
                Ok(p) => p,
                Err(e) => {
                    stats.inc(DaemonStat::WsBadFrames);
                    debug!(%peer, error = %e, "client frames");
                    return;
                }
            };
            head.extend_from_slice(&payload);
            terminated = Some(first.bytes.split_off(used));
            written_to_client = h.answered as u64;
        }
        Some(h) => {
            // The client's upgrade, then (once the server agreed) its frames.
            head.extend_from_slice(&ws::forward_request(&h.head, peer.ip()));
            if let Err(e) = server.write_all(&head).await {
                debug!(%peer, server = lease.name(), error = %e, "server write failed");
                stats.inc(DaemonStat::Aborted);
                return;
            }
            match timeout(
                cluster.config.connect_timeout,
                read_ws_answer(&mut server, &h.upgrade),
            )
            .await
            {
                Ok(Ok(early)) => {
                    if !early.is_empty() && client.write_all(&early).await.is_err() {
                        stats.inc(DaemonStat::Aborted);
                        return;
                    }
                    written_to_client = (h.answered + early.len()) as u64;
                }
                Ok(Err(why)) => {
                    stats.inc(DaemonStat::WsServerRefused);
                    warn!(%peer, server = lease.name(), %why, "server refused the WebSocket upgrade");
                    let _ = client.write_all(&ws::close_frame(1011)).await;
                    return;
                }
                Err(_) => {
                    stats.inc(DaemonStat::WsServerRefused);
                    warn!(%peer, server = lease.name(), "server did not answer the WebSocket upgrade");
                    let _ = client.write_all(&ws::close_frame(1011)).await;
                    return;
                }
            }
            // Only the frames are left to write.
            traffic_head = head.len();
            head = std::mem::take(&mut first.bytes);
        }
    }
    let traffic = entry.reached(lease.name(), lease.address, lease.traffic());
    traffic.add(0, (traffic_head + head.len()) as u64);
    if let Err(e) = server.write_all(&head).await {
        debug!(%peer, server = lease.name(), error = %e, "server write failed");
        stats.inc(DaemonStat::Aborted);
        return;
    }

    // 4. Hand-off.
    let idle = cluster.config.idle_timeout;
    if let Some(pending) = terminated {
        drop(head);
        let fd = client.tcp().as_raw_fd();
        entry.set_plane(Plane::WebSocket);
        let limits = crate::dataplane::stream::WsLimits {
            idle,
            max_frame: u64::from(listener.max_frame_size),
        };
        let outcome = crate::dataplane::stream::ws_terminate(
            client, fd, pending, server, limits, traffic, stats,
        )
        .await;
        count_outcome(stats, outcome, peer, lease.name());
        return;
    }
    let outcome = match client {
        Client::Plain(client) => {
            let pair = Pair {
                client,
                server,
                id: entry.id,
                client_addr: peer,
                server_addr: lease.address,
                server_index: lease.index as u32,
                written_to_client,
                written_to_server: (traffic_head + head.len()) as u64,
                idle_timeout: idle,
                promote: cluster.config.promote,
                traffic,
                entry: entry.clone(),
            };
            drop(head);
            shared.plane.carry(pair).await
        }
        Client::Tls(stream) => {
            drop(head);
            entry.set_plane(Plane::Tls);
            let fd = stream.get_ref().0.as_raw_fd();
            crate::dataplane::stream::relay(stream, fd, server, idle, traffic, stats).await
        }
    };
    count_outcome(stats, outcome, peer, lease.name());
}

/// Counts how a carried connection ended.
fn count_outcome(stats: &Stats, outcome: Outcome, peer: SocketAddr, server: &str) {
    match outcome {
        Outcome::Closed => stats.inc(DaemonStat::Closed),
        Outcome::IdleTimeout => stats.inc(DaemonStat::IdleTimeout),
        Outcome::Aborted(e) => {
            stats.inc(DaemonStat::Aborted);
            debug!(%peer, server, error = %e, "connection aborted");
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
    client: &mut Client,
    max: usize,
    proxy_header: bool,
    charge: &mut Charge<'_>,
) -> Result<First, Reject> {
    let mut bytes = Vec::with_capacity(256);
    let mut proxy = ProxyPrefix::expected(proxy_header);
    loop {
        if proxy.strip(&mut bytes)? {
            match mqtt::decode_connect(&bytes, max) {
                Decode::Connect(c) => {
                    let mut first = First::of(&c, proxy.source);
                    first.bytes = bytes;
                    return Ok(first);
                }
                Decode::Invalid(e) => return Err(Reject::Invalid(e)),
                Decode::Incomplete => {}
            }
        }
        read_more(client, &mut bytes, charge).await?;
    }
}

/// A PROXY header a listener expects in front of the client's first bytes.
struct ProxyPrefix {
    expected: bool,
    /// The client the header named.
    source: Option<SocketAddr>,
}

impl ProxyPrefix {
    fn expected(expected: bool) -> Self {
        Self {
            expected,
            source: None,
        }
    }

    /// Removes the header from the front of `buf` once it is complete; true when what
    /// follows may be parsed (no header expected, or it has been removed).
    fn strip(&mut self, buf: &mut Vec<u8>) -> Result<bool, Reject> {
        if self.expected {
            match proxy_protocol::decode(buf) {
                proxy_protocol::Decoded::Header { len, source } => {
                    buf.drain(..len);
                    self.source = source;
                    self.expected = false;
                }
                proxy_protocol::Decoded::Invalid(why) => return Err(Reject::Proxy(why)),
                proxy_protocol::Decoded::Incomplete => {}
            }
        }
        Ok(!self.expected)
    }
}

/// Appends what the client sends next to `buf`, whose memory is charged to the
/// pre-CONNECT budget.
async fn read_more(
    client: &mut Client,
    buf: &mut Vec<u8>,
    charge: &mut Charge<'_>,
) -> Result<(), Reject> {
    buf.reserve(4096);
    if !charge.hold(buf.capacity()) {
        return Err(Reject::Budget);
    }
    match client.read_buf(buf).await {
        Ok(0) => Err(Reject::Eof),
        Ok(_) => Ok(()),
        Err(e) => Err(Reject::Io(e)),
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

/// Why no server took a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoServer {
    /// Every usable server was tried, or none is usable.
    Unavailable,
    /// This host ran out of something (descriptors, buffers, ports): no server is
    /// blamed and none is tried further, since the next would fail the same way.
    LocalResource,
}

/// Tries servers until one accepts a TCP connection within `connect_timeout`: the
/// sticky entry's server first, then the balancer's choices. Records the server in
/// the sticky table. Only a server's own answer (refused, timed out, reset) counts
/// against it.
async fn connect_server(
    cluster: &ClusterRt,
    shared: &Shared,
    key: &balance::Key<'_>,
    sticky_key: Option<&lb_common::StickyKey>,
    websocket: bool,
) -> Result<(TcpStream, Lease), NoServer> {
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
            None => pool.select(key, &tried).ok_or(NoServer::Unavailable)?,
        };
        tried[lease.index] = true;
        let target = if websocket {
            pool.servers[lease.index]
                .config
                .ws_address
                .unwrap_or(lease.address)
        } else {
            lease.address
        };
        let source = cluster.source_for(target);
        match timeout(cluster.config.connect_timeout, connect(target, source)).await {
            Ok(Ok(s)) => {
                lease.succeeded();
                if let Some(k) = sticky_key {
                    remember(shared, cluster, k, &lease, lookup);
                }
                return Ok((s, lease));
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

/// Sends the "server unavailable" CONNACK (in a WebSocket frame, then a close frame,
/// on ws/wss listeners), then closes without resetting it away: the write side is shut
/// and whatever the client still sends is read and dropped briefly.
async fn refuse(mut client: Client, version: mqtt::Version, websocket: bool) {
    let connack = mqtt::connack_server_unavailable(version);
    let bytes = if websocket {
        // 1013: try again later.
        [ws::binary_frame(connack), ws::close_frame(1013)].concat()
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

/// The upgrade request (answered with `101`, or with an HTTP error and closed), then
/// client frames until their payload starts with a complete CONNECT. The returned
/// `First` holds the frames as received (masked), to be forwarded unchanged.
async fn read_ws_connect(
    client: &mut Client,
    path: &str,
    max: usize,
    proxy_header: bool,
    stats: &Stats,
    charge: &mut Charge<'_>,
) -> Result<(First, WsHandshake), Reject> {
    let mut buf = Vec::with_capacity(1024);
    let mut proxy = ProxyPrefix::expected(proxy_header);
    let upgrade = loop {
        if proxy.strip(&mut buf)? {
            match ws::parse_request(&buf, path) {
                ws::Request::Upgrade(u) => break u,
                ws::Request::Refuse(status, reason) => {
                    let _ = client.write_all(&ws::error_response(status, reason)).await;
                    return Err(Reject::Http(status));
                }
                ws::Request::Incomplete => {}
            }
        }
        read_more(client, &mut buf, charge).await?;
    };
    let answer = ws::switching_protocols(&upgrade);
    client.write_all(&answer).await.map_err(Reject::Io)?;
    stats.inc(DaemonStat::WsUpgrades);
    let mut frames = buf.split_off(upgrade.len);
    let head = buf;
    let mut parsed = ws::PreConnectFrames::default();
    loop {
        let payload = parsed.feed(&frames, max).map_err(Reject::Frame)?;
        match mqtt::decode_connect(payload, max) {
            Decode::Connect(c) => {
                let mut first = First::of(&c, proxy.source);
                first.bytes = frames;
                let handshake = WsHandshake {
                    upgrade,
                    head,
                    answered: answer.len(),
                };
                return Ok((first, handshake));
            }
            Decode::Invalid(e) => return Err(Reject::Invalid(e)),
            Decode::Incomplete => {}
        }
        read_more(client, &mut frames, charge).await?;
    }
}

/// Reads the server's answer to the forwarded upgrade; returns the bytes after its
/// `101` (frames the server sent at once), or why it is refused.
async fn read_ws_answer(server: &mut TcpStream, upgrade: &ws::Upgrade) -> Result<Vec<u8>, String> {
    let mut buf = Vec::with_capacity(512);
    loop {
        match ws::parse_answer(&buf, upgrade) {
            ws::ServerAnswer::Switched(len) => return Ok(buf.split_off(len)),
            ws::ServerAnswer::Refused(why) => return Err(why),
            ws::ServerAnswer::Incomplete => {}
        }
        buf.reserve(1024);
        match server.read_buf(&mut buf).await {
            Ok(0) => return Err("closed".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}
