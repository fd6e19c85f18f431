//! A client connection's life, top to bottom, one named step each:
//!
//! 0. [`tls`]: the TLS handshake on `mqtts`/`wss` listeners (after a PROXY header
//!    when the listener expects one).
//! 1. [`first`]: the first packet within `inspect_timeout`: a valid CONNECT (inside
//!    WebSocket frames after the upgrade on `ws`/`wss`, [`websocket`]); optionally
//!    rewritten from the client certificate.
//! 2. [`route`]: a server (sticky entry first, then the balancer) connected within
//!    `connect_timeout` (next server on failure). When none can take the client, it
//!    gets a CONNACK "server unavailable" in its own protocol version.
//! 3. The PROXY header and every byte read so far, written to the server.
//! 4. The hand-off: the data plane (plain TCP), the userspace relay (TLS), or the
//!    WebSocket terminator (a server without `ws_address`).
//!
//! A hot upgrade ([`crate::upgrade`]) moves a carried connection to the new process,
//! where [`adopt`] takes it up at step 4.

use std::{net::SocketAddr, os::fd::AsRawFd, sync::Arc};

use lb_common::DaemonStat;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::debug;

use crate::{
    balance::Lease,
    config::ProxyProtocol,
    dataplane::{Direction, Outcome, Pair, Traffic, stream},
    mqtt::boundary::Boundary,
    proxy_protocol,
    registry::{Entry, Plane},
    runtime::{ClusterRt, ListenerRt, Shared},
    stats::{ActiveGuard, Stats},
};

mod client;
mod first;
mod route;
mod tls;
mod websocket;

use client::Client;
use first::First;

/// Serves one accepted client connection on `listener`.
pub async fn handle(
    shared: Arc<Shared>,
    listener: Arc<ListenerRt>,
    client: TcpStream,
    peer: SocketAddr,
) {
    let stats = &shared.stats;
    // A dual-stack listener's IPv4 clients are IPv4 everywhere (logs, PROXY headers).
    let peer = crate::addr::unmapped(peer);
    let _active = ActiveGuard::new(stats);
    let registered = shared.conns.open(&listener.config.name, peer);
    stats.inc(DaemonStat::Accepted);
    // TCP_NODELAY: inherited from the listener (`daemon::runtime_listener`).
    let (client, peer, tls, proxy_header) = match &listener.tls {
        None => {
            let proxy_header = listener.config.accept_proxy_protocol;
            (Client::Plain(client), peer, None, proxy_header)
        }
        Some(rt) => {
            // Each step's future is boxed while it runs (here and in `serve`), so
            // that the connection's own future, which lives as long as it does, is
            // small (measured: 8.5 KB inline, most of an idle connection's memory).
            let accept = tls::accept(stats, &listener.config, rt, client, peer);
            let Some((stream, peer, session)) = Box::pin(accept).await else {
                return;
            };
            // The PROXY header, if any, came before the handshake.
            (Client::Tls(Box::new(stream)), peer, Some(session), false)
        }
    };
    let conn = Conn {
        shared: &shared,
        listener: &listener,
        entry: &registered.entry,
        peer,
        tls,
    };
    Box::pin(conn.serve(client, proxy_header)).await;
}

/// One connection through its steps.
struct Conn<'a> {
    shared: &'a Shared,
    listener: &'a ListenerRt,
    /// Its row in the registry.
    entry: &'a Arc<Entry>,
    /// The client (as a PROXY header in front named it, once read).
    peer: SocketAddr,
    /// What the TLS handshake established, on TLS listeners.
    tls: Option<tls::TlsSession>,
}

/// A connection that reached its server, ready for the hand-off.
struct Reached {
    client: Client,
    server: TcpStream,
    cluster: Arc<ClusterRt>,
    lease: Lease,
    sent: Sent,
    /// Its place among its source's open connections, held to the end.
    admitted: Option<crate::admission::Admitted>,
}

/// What was written before the hand-off.
struct Sent {
    /// Bytes written to the client (the `101` and early server frames, WebSocket).
    to_client: u64,
    /// Bytes written to the server.
    to_server: u64,
    /// WebSocket terminated here: the client bytes after the frames already unwrapped.
    terminated: Option<Vec<u8>>,
    /// The connection's byte counters.
    traffic: Arc<Traffic>,
    /// The client's MQTT version (what an evacuation sends it depends on it).
    version: crate::mqtt::Version,
}

impl Conn<'_> {
    /// Everything after the handshake: the CONNECT, a server, the hand-off.
    ///
    /// Its future lives as long as the connection: an `async move` block rather than
    /// an `async fn`, which would store `self` twice (1,080 bytes before, measured with
    /// `-Zprint-type-sizes`).
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would store its arguments twice"
    )]
    fn serve(mut self, client: Client, proxy_header: bool) -> impl Future<Output = ()> {
        async move {
            // Boxed, so that what the steps before the hand-off kept (the CONNECT,
            // the handshake) is freed rather than held in this future for the
            // connection's life.
            let Some(r) = Box::pin(self.reach(client, proxy_header)).await else {
                return;
            };
            let target = (&*r.cluster, &r.lease);
            self.hand_off(r.client, r.server, target, r.sent).await;
            drop(r.admitted);
        }
    }

    /// The CONNECT, a server, the head written to it; None when the connection ended
    /// on the way.
    async fn reach(&mut self, mut client: Client, proxy_header: bool) -> Option<Reached> {
        let read = self.read_first(&mut client, proxy_header);
        let (mut first, handshake) = Box::pin(read).await?;
        // Behind a load balancer that sends PROXY headers, the client is who it names.
        self.peer = first.proxied_source.unwrap_or(self.peer);
        if !Box::pin(self.rewrite(&mut client, &mut first)).await {
            return None;
        }
        // The client id the server gets (after a rewrite).
        self.entry.identified(self.peer, &first.client_id);

        let cluster = self.listener.cluster();
        let websocket = self.listener.websocket().is_some();
        // Held to the end: the connection's place among its source's open ones.
        let admitted = match Box::pin(self.admit(&first, &cluster.config.name)).await {
            Ok(a) => a,
            Err(connack) => {
                Box::pin(route::refuse(client, &connack, websocket)).await;
                return None;
            }
        };
        let connected = route::connect_server(self.shared, &cluster, &first, self.peer, websocket);
        let connected = Box::pin(connected).await;
        let (mut server, lease) = match connected {
            Ok(connected) => connected,
            Err(why) => {
                self.shared.stats.inc(why.stat());
                let listener = &self.listener.config.name;
                let cluster_name = &cluster.config.name;
                let stats = &self.shared.stats;
                stats.connection_ended(listener, cluster_name, "", "no_server");
                debug!(peer = %self.peer, client_id = %first.client_id, cluster = %cluster.config.name, ?why, "no server available");
                let connack = crate::mqtt::connack_server_unavailable(first.version);
                Box::pin(route::refuse(client, &connack, websocket)).await;
                return None;
            }
        };
        let _ = server.set_nodelay(true);
        let reached = self.entry.age().as_secs_f64();
        self.shared.stats.server_reached.observe(reached);
        let target = (&*cluster, &lease);
        let head = self.send_head(&mut client, &mut server, target, first, handshake);
        let sent = Box::pin(head).await?;
        Some(Reached {
            client,
            server,
            cluster,
            lease,
            sent,
            admitted,
        })
    }

    /// The listener's admission limits; a refusal is counted and logged (debug) and
    /// comes back as the CONNACK to send.
    async fn admit(
        &self,
        first: &First,
        cluster: &str,
    ) -> Result<Option<crate::admission::Admitted>, Vec<u8>> {
        let admission = &self.listener.admission;
        if !admission.any() {
            return Ok(None);
        }
        match admission.admit(self.peer.ip(), &first.client_id).await {
            Ok(a) => {
                if a.delayed {
                    self.shared.stats.inc(DaemonStat::LimitDelayed);
                }
                Ok(Some(a))
            }
            Err(refusal) => {
                let stats = &self.shared.stats;
                stats.inc(refusal.stat());
                stats.connection_ended(&self.listener.config.name, cluster, "", "refused");
                debug!(peer = %self.peer, client_id = %first.client_id, limit = refusal.key(), "connection refused by a limit");
                Err(crate::mqtt::connack_refused(
                    first.version,
                    refusal.v5_reason(),
                ))
            }
        }
    }

    /// Step 3: the PROXY header, then everything read from the client (for WebSocket:
    /// unwrapped for a plain MQTT server, or after the forwarded upgrade for a server
    /// that speaks WebSocket). None when the connection ended here.
    async fn send_head(
        &self,
        client: &mut Client,
        server: &mut TcpStream,
        (cluster, lease): (&ClusterRt, &Lease),
        mut first: First,
        handshake: Option<websocket::Handshake>,
    ) -> Option<Sent> {
        let stats = &self.shared.stats;
        let tls = self.tls.as_ref().map(|t| &t.info);
        let proxy = cluster.config.proxy_protocol;
        let mut head = match proxy {
            // No header, no getsockname: one system call less per session.
            ProxyProtocol::None => Vec::new(),
            _ => {
                let local = client
                    .tcp()
                    .local_addr()
                    .unwrap_or(self.listener.config.bind);
                proxy_protocol::encode_with_tls(proxy, self.peer, local, tls)
            }
        };
        let mut to_client = 0;
        // Bytes already written to the server (the upgrade request).
        let mut upgrade = 0;
        let mut terminated = None;
        let version = first.version;
        match handshake {
            None if head.is_empty() => head = first.bytes,
            None => head.extend_from_slice(&first.bytes),
            Some(h)
                if cluster.pool.servers[lease.index]
                    .config
                    .ws_address
                    .is_none() =>
            {
                let max = self.listener.config.max_connect_size as usize;
                head.extend_from_slice(&websocket::unwrap(&mut first, max, stats)?);
                terminated = Some(first.bytes);
                to_client = h.answered as u64;
            }
            Some(h) => {
                let target = (cluster, lease);
                (upgrade, to_client) = self
                    .forward_upgrade(client, server, target, head, &h)
                    .await?;
                // Only the frames are left to write.
                head = first.bytes;
            }
        }
        let traffic = self.entry.reached(
            &cluster.config.name,
            lease.name(),
            lease.address,
            (lease.traffic(), stats.connect_duration.clone()),
        );
        let to_server = (upgrade + head.len()) as u64;
        traffic.add(Direction::ClientToServer, to_server);
        if let Err(e) = server.write_all(&head).await {
            debug!(peer = %self.peer, server = lease.name(), error = %e, "server write failed");
            stats.inc(DaemonStat::Aborted);
            return None;
        }
        Some(Sent {
            to_client,
            to_server,
            terminated,
            traffic,
            version,
        })
    }

    /// Step 4: whatever carries the connection from here to its end.
    async fn hand_off(
        &self,
        client: Client,
        server: TcpStream,
        (cluster, lease): (&ClusterRt, &Lease),
        sent: Sent,
    ) {
        let idle = cluster.config.idle_timeout;
        let websocket = self.listener.websocket();
        let stats = &self.shared.stats;
        let mqtt5 = sent.version == crate::mqtt::Version::V5;
        let disconnect = evict_disconnect(sent.version, &cluster.config);
        let outcome = match (client, sent.terminated, websocket) {
            (client, Some(pending), Some(ws)) => {
                let fd = client.tcp().as_raw_fd();
                self.entry.set_plane(Plane::WebSocket);
                // Its frame state lives in the relay: a hot upgrade leaves it here.
                self.entry.stays();
                let limits = stream::WsLimits {
                    idle,
                    max_frame: u64::from(ws.max_frame_size),
                };
                let traffic = sent.traffic;
                let relay =
                    stream::ws_terminate(client, fd, pending, server, limits, traffic, stats);
                Box::pin(evictable(relay, self.entry)).await
            }
            (Client::Plain(client), _, _) => {
                let pair = Pair {
                    client,
                    server,
                    id: self.entry.id,
                    client_addr: self.peer,
                    server_addr: lease.address,
                    server_index: lease.index as u32,
                    written_to_client: sent.to_client,
                    written_to_server: sent.to_server,
                    idle_timeout: idle,
                    promote: cluster.config.promote,
                    traffic: sent.traffic,
                    entry: self.entry.clone(),
                    // Nothing from the server has been read yet: a boundary.
                    boundary: disconnect.is_some().then(Boundary::new),
                    disconnect,
                };
                self.shared.plane.carry(pair).await
            }
            (Client::Tls(tls), _, _) => {
                self.entry.set_plane(Plane::Tls);
                let ctx = crate::dataplane::tls::Ctx {
                    idle,
                    traffic: sent.traffic,
                    stats,
                    entry: self.entry,
                };
                Box::pin(crate::dataplane::tls::relay(*tls, server, ctx)).await
            }
        };
        let place = Place {
            cluster: &cluster.config.name,
            server: Some(lease),
            access_log: self.listener.config.access_log,
            mqtt5,
        };
        ended(self.shared, self.entry, place, outcome);
    }
}

/// Where a carried connection was, for its end.
struct Place<'a> {
    cluster: &'a str,
    server: Option<&'a Lease>,
    access_log: bool,
    mqtt5: bool,
}

/// A carried connection ended: logged and counted, or (departed for a hot upgrade)
/// sent to the new process.
fn ended(shared: &Shared, entry: &Entry, place: Place<'_>, outcome: Outcome) {
    let stats = &shared.stats;
    let server = place.server.map_or("", Lease::name);
    if let Outcome::Departed(d) = outcome {
        depart(shared, entry, &place, *d);
        return;
    }
    if place.access_log {
        access_log(entry, &outcome);
    }
    stats.connection_ended(entry.listener(), place.cluster, server, outcome.name());
    count_outcome(stats, outcome, entry.client(), server);
}

/// Sends a departed connection to the new process of the hot upgrade under way.
fn depart(shared: &Shared, entry: &Entry, place: &Place<'_>, d: crate::dataplane::Departure) {
    let crate::dataplane::Departure {
        client,
        server,
        carried,
        written,
    } = d;
    let moving = crate::upgrade::Moving {
        id: entry.id,
        listener: entry.listener().to_owned(),
        client: entry.client(),
        client_id: entry.client_id().map(str::to_owned),
        cluster: place.cluster.to_owned(),
        server: place
            .server
            .map_or_else(String::new, |l| l.name().to_owned()),
        server_address: entry.server_address().unwrap_or(entry.client()),
        age_ms: entry.age().as_millis() as u64,
        started_unix: entry.started_unix(),
        bytes: entry.bytes(),
        written,
        mqtt5: place.mqtt5,
        pending: [0, 0],
        carried,
    };
    let leaving = crate::upgrade::Leaving {
        moving,
        client,
        server,
    };
    let out = crate::upgrade::old::Outgoing::Conn(Box::new(leaving));
    match shared.departures.get() {
        Some(tx) if tx.send(out).is_ok() => {
            shared
                .departed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // Planes depart only when an upgrade asks, which sets the queue first.
        _ => tracing::error!(
            id = entry.id,
            "departed with no upgrade under way: connection lost"
        ),
    }
}

/// Carries on a connection a hot upgrade's old process handed over: entered under
/// its id, counted on its server (when the new configuration still has it), resumed
/// by the plane where its bytes stood, and ended as any other.
pub async fn adopt(
    shared: Arc<Shared>,
    moving: crate::upgrade::Moving,
    client: std::os::fd::OwnedFd,
    server: std::os::fd::OwnedFd,
) {
    let stats = &shared.stats;
    let _active = ActiveGuard::new(stats);
    let stream = |fd: std::os::fd::OwnedFd| {
        let s = std::net::TcpStream::from(fd);
        s.set_nonblocking(true)?;
        TcpStream::from_std(s)
    };
    let (client, server) = match (stream(client), stream(server)) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(id = moving.id, error = %e, "upgrade: cannot take over a connection");
            return;
        }
    };
    let age = std::time::Duration::from_millis(moving.age_ms);
    let registered = shared.conns.adopt(
        moving.id,
        &moving.listener,
        moving.client,
        (age, moving.started_unix),
    );
    let entry = &registered.entry;
    if let Some(id) = &moving.client_id {
        entry.identified(moving.client, id);
    }
    // Counted among its source's open connections, as it was in the old process.
    let listener = shared.listener(&moving.listener);
    let _admitted = listener
        .as_ref()
        .and_then(|l| l.admission.adopted(moving.client.ip()));
    let cluster = shared.cluster(&moving.cluster);
    let lease = cluster
        .as_ref()
        .and_then(|c| c.pool.lease_named(&moving.server));
    let traffic = Arc::new(Traffic::carried_over(
        lease.as_ref().map(Lease::traffic),
        moving.bytes,
    ));
    let traffic = entry.resumed(
        &moving.cluster,
        &moving.server,
        moving.server_address,
        traffic,
    );
    let version = if moving.mqtt5 {
        crate::mqtt::Version::V5
    } else {
        crate::mqtt::Version::V311
    };
    // A cluster gone from the new configuration: carried with no idle timeout nor
    // promotion, to its end.
    let (idle_timeout, promote, disconnect) = match &cluster {
        Some(c) => (
            c.config.idle_timeout,
            c.config.promote,
            evict_disconnect(version, &c.config),
        ),
        None => (std::time::Duration::MAX / 4, Default::default(), None),
    };
    let outcome = match moving.carried {
        crate::dataplane::Carried::Tls(stopped) => {
            entry.set_plane(Plane::Tls);
            let ctx = crate::dataplane::tls::Ctx {
                idle: idle_timeout,
                traffic,
                stats,
                entry,
            };
            crate::dataplane::tls::resume(client, server, *stopped, ctx).await
        }
        carried => {
            let pair = Pair {
                client,
                server,
                id: moving.id,
                client_addr: moving.client,
                server_addr: moving.server_address,
                server_index: lease.as_ref().map_or(0, |l| l.index as u32),
                written_to_server: moving.written[0],
                written_to_client: moving.written[1],
                idle_timeout,
                promote,
                traffic,
                entry: entry.clone(),
                boundary: carried.boundary().map(Boundary::from_raw),
                disconnect,
            };
            shared.plane.resume(pair, carried).await
        }
    };
    let access_log = listener.as_ref().is_some_and(|l| l.config.access_log);
    let place = Place {
        cluster: &moving.cluster,
        server: lease.as_ref(),
        access_log,
        mqtt5: moving.mqtt5,
    };
    ended(&shared, entry, place, outcome);
}

/// The listener's access log line for a connection that ended (`access_log`):
/// never per packet, never a secret (no username or password).
fn access_log(entry: &Entry, outcome: &Outcome) {
    let row = entry.row();
    let end = outcome.name();
    tracing::info!(
        target: "mqttlb::access",
        client = %row.client,
        client_id = row.client_id.as_deref().unwrap_or(""),
        listener = %row.listener,
        server = row.server.as_deref().unwrap_or(""),
        plane = %row.plane,
        bytes_c2s = row.bytes_c2s,
        bytes_s2c = row.bytes_s2c,
        duration_ms = entry.age().as_millis() as u64,
        end,
        "connection ended"
    );
}

/// Counts how a carried connection ended.
fn count_outcome(stats: &Stats, outcome: Outcome, peer: SocketAddr, server: &str) {
    match outcome {
        Outcome::Closed => stats.inc(DaemonStat::Closed),
        Outcome::IdleTimeout => stats.inc(DaemonStat::IdleTimeout),
        Outcome::Evicted => stats.inc(DaemonStat::Evicted),
        Outcome::Aborted(e) => {
            stats.inc(DaemonStat::Aborted);
            debug!(%peer, server, error = %e, "connection aborted");
        }
        Outcome::Departed(_) => {}
    }
}

/// What an evacuation writes to a client before closing: an MQTT 5 client gets
/// DISCONNECT 0x9C (Use another server) with the cluster's `server_reference`; a 3.1.x
/// client has no way to be told and gets a clean close.
fn evict_disconnect(
    version: crate::mqtt::Version,
    cluster: &crate::config::Cluster,
) -> Option<Arc<[u8]>> {
    use crate::mqtt::encode;
    (version == crate::mqtt::Version::V5).then(|| {
        let reference = cluster.server_reference.as_deref();
        encode::disconnect_v5(encode::USE_ANOTHER_SERVER, reference).into()
    })
}

/// Runs the WebSocket relay until it ends or the connection is evicted. It keeps its
/// own buffers, so it cannot stop at a packet boundary: an evicted one is dropped,
/// which closes both TCP connections (the client reconnects as after any close).
async fn evictable(relay: impl std::future::Future<Output = Outcome>, entry: &Entry) -> Outcome {
    tokio::select! {
        outcome = relay => outcome,
        () = entry.evicted() => Outcome::Evicted,
    }
}
