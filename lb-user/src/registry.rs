//! Every connection the daemon holds, whatever carries it: what `mqttlb ctl conns`
//! lists (through the control socket, [`crate::control`]). A connection is entered
//! when it is accepted and leaves when its task ends, so the row count always equals
//! the `active` counter.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::dataplane::{Direction, Traffic};

/// What carries a connection's bytes at the moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Plane {
    /// Accepted; TLS handshake, WebSocket upgrade or CONNECT not finished yet.
    Inspecting = 0,
    /// A server is being chosen and connected.
    Connecting = 1,
    /// Userspace copy (`copy`, or `auto` before promotion).
    Copy = 2,
    /// In-kernel splice.
    Sockmap = 3,
    /// TLS terminated here, relayed in userspace.
    Tls = 4,
    /// WebSocket terminated here (the server speaks plain MQTT), relayed in userspace.
    WebSocket = 5,
}

impl Plane {
    /// The name `ctl conns` shows.
    pub fn name(self) -> &'static str {
        match self {
            Self::Inspecting => "inspecting",
            Self::Connecting => "connecting",
            Self::Copy => "copy",
            Self::Sockmap => "sockmap",
            Self::Tls => "tls",
            Self::WebSocket => "websocket",
        }
    }

    fn from_u8(v: u8) -> Self {
        [
            Self::Inspecting,
            Self::Connecting,
            Self::Copy,
            Self::Sockmap,
            Self::Tls,
            Self::WebSocket,
        ]
        .get(usize::from(v))
        .copied()
        .unwrap_or(Self::Inspecting)
    }
}

/// The server a connection reached.
#[derive(Debug)]
struct Reached {
    cluster: String,
    name: String,
    address: SocketAddr,
    traffic: Arc<Traffic>,
}

/// Requests to whatever carries a connection (end it for an evacuation, hand it to a
/// hot upgrade's new process), each raised once, and one wake-up for both: a plane
/// waits on one `Notify` per loop turn, not two (each costs a lock to register).
#[derive(Debug, Default)]
struct Requests {
    evict: AtomicBool,
    depart: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Requests {
    fn raise(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::Release);
        // A stored permit: a plane that starts waiting later still wakes.
        self.notify.notify_one();
    }

    /// Resolves once `raised` holds, checked at each wake-up.
    async fn until(&self, raised: impl Fn(&Self) -> bool) {
        while !raised(self) {
            self.notify.notified().await;
        }
    }
}

/// One connection.
#[derive(Debug)]
pub struct Entry {
    /// Daemon-wide id (also the key of the spliced pair in the `conns` map).
    pub id: u32,
    listener: String,
    client: Mutex<SocketAddr>,
    client_id: OnceLock<String>,
    server: OnceLock<Reached>,
    plane: AtomicU8,
    started: Instant,
    started_unix: u64,
    /// An evacuation's request (the plane carrying the connection ends it), a hot
    /// upgrade's (it gives the connection up to the new process where its state is
    /// whole, [`crate::upgrade`]).
    requests: Requests,
    /// What carries it cannot hand it over: it stays to its end.
    staying: AtomicBool,
}

impl Entry {
    /// The client as the PROXY header named it, and its client id, once the CONNECT
    /// is read.
    pub fn identified(&self, client: SocketAddr, client_id: &str) {
        *self.client.lock().expect("client lock") = client;
        let _ = self.client_id.set(client_id.to_owned());
        self.set_plane(Plane::Connecting);
    }

    /// The server reached: returns the connection's own byte counters, which also add
    /// to the server's `traffic` and observe into `first_reply` the time from accept
    /// to the server's first bytes.
    pub fn reached(
        &self,
        cluster: &str,
        name: &str,
        address: SocketAddr,
        (server, first_reply): (Arc<Traffic>, crate::stats::Seconds),
    ) -> Arc<Traffic> {
        let traffic = Arc::new(Traffic::timed(server, self.started, first_reply));
        self.resumed(cluster, name, address, traffic)
    }

    /// The server a connection a hot upgrade handed over had reached, and its
    /// counters (`traffic`, see [`Traffic::carried_over`]).
    pub fn resumed(
        &self,
        cluster: &str,
        name: &str,
        address: SocketAddr,
        traffic: Arc<Traffic>,
    ) -> Arc<Traffic> {
        let _ = self.server.set(Reached {
            cluster: cluster.to_owned(),
            name: name.to_owned(),
            address,
            traffic: traffic.clone(),
        });
        traffic
    }

    /// The address of the server it reached.
    pub fn server_address(&self) -> Option<SocketAddr> {
        self.server.get().map(|r| r.address)
    }

    /// The listener that accepted it.
    pub fn listener(&self) -> &str {
        &self.listener
    }

    /// Wall-clock seconds since the epoch at accept.
    pub fn started_unix(&self) -> u64 {
        self.started_unix
    }

    /// Bytes carried client to server and server to client.
    pub fn bytes(&self) -> [u64; 2] {
        let server = self.server.get();
        [Direction::ClientToServer, Direction::ServerToClient]
            .map(|dir| server.map_or(0, |s| s.traffic.get(dir)))
    }

    /// What carries the connection from now on.
    pub fn set_plane(&self, plane: Plane) {
        self.plane.store(plane as u8, Ordering::Relaxed);
    }

    /// What carries the connection now.
    pub fn plane(&self) -> Plane {
        Plane::from_u8(self.plane.load(Ordering::Relaxed))
    }

    /// The cluster of the server it reached.
    pub fn cluster(&self) -> Option<&str> {
        self.server.get().map(|r| r.cluster.as_str())
    }

    /// Whether it is connected to `server` of `cluster`.
    pub fn is_on(&self, cluster: &str, server: &str) -> bool {
        self.server
            .get()
            .is_some_and(|r| r.cluster == cluster && r.name == server)
    }

    /// Asks whatever carries the connection to end it as an evacuation does (an
    /// MQTT 5 client first gets DISCONNECT 0x9C at the next packet boundary).
    pub fn evict(&self) {
        self.requests.raise(&self.requests.evict);
    }

    /// Whether [`Entry::evict`] was called.
    pub fn is_evicting(&self) -> bool {
        self.requests.evict.load(Ordering::Acquire)
    }

    /// Resolves once [`Entry::evict`] is called (at once if it was).
    pub async fn evicted(&self) {
        self.requests
            .until(|r| r.evict.load(Ordering::Acquire))
            .await;
    }

    /// Resolves once [`Entry::evict`] is called, or [`Entry::ask_departure`] when
    /// `departable`: one wait for both (the caller looks which).
    pub async fn evicted_or_departing(&self, departable: bool) {
        self.requests
            .until(|r| {
                r.evict.load(Ordering::Acquire) || departable && r.depart.load(Ordering::Acquire)
            })
            .await;
    }

    /// Asks whatever carries the connection to hand it to the new process of a hot
    /// upgrade (planes that cannot ignore it and carry on).
    pub fn ask_departure(&self) {
        self.requests.raise(&self.requests.depart);
    }

    /// Says that what carries it cannot hand it to a hot upgrade's new process.
    pub fn stays(&self) {
        self.staying.store(true, Ordering::Relaxed);
    }

    /// Whether [`Entry::stays`] was called.
    pub fn is_staying(&self) -> bool {
        self.staying.load(Ordering::Relaxed)
    }

    /// Whether [`Entry::ask_departure`] was called.
    pub fn is_departing(&self) -> bool {
        self.requests.depart.load(Ordering::Acquire)
    }

    /// The client id, once the CONNECT is read.
    pub fn client_id(&self) -> Option<&str> {
        self.client_id.get().map(String::as_str)
    }

    /// The client (as a PROXY header named it, once read).
    pub fn client(&self) -> SocketAddr {
        *self.client.lock().expect("client lock")
    }

    /// How long ago it was accepted.
    pub fn age(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Its row as `ctl conns` shows it.
    pub fn row(&self) -> ConnRow {
        let server = self.server.get();
        let bytes = |dir| server.map_or(0, |s| s.traffic.get(dir));
        ConnRow {
            id: self.id,
            listener: self.listener.clone(),
            client: crate::addr::show(*self.client.lock().expect("client lock")),
            client_id: self.client_id.get().cloned(),
            server: server.map(|s| s.name.clone()),
            server_address: server.map(|s| crate::addr::show(s.address)),
            plane: self.plane().name().to_owned(),
            bytes_c2s: bytes(Direction::ClientToServer),
            bytes_s2c: bytes(Direction::ServerToClient),
            age_s: self.started.elapsed().as_secs(),
            started_unix: self.started_unix,
        }
    }
}

/// One connection as `ctl conns` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ConnRow {
    /// Daemon-wide id.
    pub id: u32,
    /// Listener that accepted it.
    pub listener: String,
    /// Client address (the one a PROXY header named, when there was one).
    pub client: String,
    /// MQTT client id, once the CONNECT is read.
    pub client_id: Option<String>,
    /// Server name, once connected.
    pub server: Option<String>,
    /// Server address, once connected.
    pub server_address: Option<String>,
    /// [`Plane::name`].
    pub plane: String,
    /// Bytes client to server since the server was reached (the CONNECT included).
    pub bytes_c2s: u64,
    /// Bytes server to client.
    pub bytes_s2c: u64,
    /// Seconds since accepted.
    pub age_s: u64,
    /// Wall-clock seconds since the epoch at accept.
    pub started_unix: u64,
}

/// The table of connections.
#[derive(Debug, Default)]
pub struct Registry {
    conns: Mutex<HashMap<u32, Arc<Entry>>>,
    next_id: std::sync::atomic::AtomicU32,
}

impl Registry {
    /// Enters a connection accepted on `listener` from `client`; it leaves when the
    /// returned guard is dropped.
    pub fn open(self: &Arc<Self>, listener: &str, client: SocketAddr) -> Registered {
        // Ids start at 1 and wrap past u32::MAX (0 skipped): unique among live ones in
        // practice (four billion connections apart).
        let mut id = self.next_id.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        if id == 0 {
            id = self.next_id.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        }
        let started_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.enter(id, listener, client, (Instant::now(), started_unix))
    }

    /// Enters a connection a hot upgrade handed over, under the id it had (the
    /// program's maps and events name a spliced pair by it), accepted `age` ago at
    /// `started_unix`.
    pub fn adopt(
        self: &Arc<Self>,
        id: u32,
        listener: &str,
        client: SocketAddr,
        (age, started_unix): (std::time::Duration, u64),
    ) -> Registered {
        let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        self.enter(id, listener, client, (started, started_unix))
    }

    /// The next id after the ones given so far (what a hot upgrade's new process
    /// counts on from, see [`Registry::continue_after`]).
    pub fn next_id(&self) -> u32 {
        self.next_id.load(Ordering::Relaxed)
    }

    /// Gives new connections ids far from those of a hot upgrade's old process, which
    /// still accepts under `old_next` and up while the new one starts (2^30 apart).
    pub fn continue_after(&self, old_next: u32) {
        self.next_id
            .store(old_next.wrapping_add(1 << 30), Ordering::Relaxed);
    }

    fn enter(
        self: &Arc<Self>,
        id: u32,
        listener: &str,
        client: SocketAddr,
        (started, started_unix): (Instant, u64),
    ) -> Registered {
        let entry = Arc::new(Entry {
            id,
            listener: listener.to_owned(),
            client: Mutex::new(client),
            client_id: OnceLock::new(),
            server: OnceLock::new(),
            plane: AtomicU8::new(Plane::Inspecting as u8),
            started,
            started_unix,
            requests: Requests::default(),
            staying: AtomicBool::new(false),
        });
        self.conns
            .lock()
            .expect("registry lock")
            .insert(id, entry.clone());
        Registered {
            registry: self.clone(),
            entry,
        }
    }

    /// Every connection held now, in no particular order.
    pub fn entries(&self) -> Vec<Arc<Entry>> {
        self.conns
            .lock()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    /// Every connection, by id.
    pub fn rows(&self) -> Vec<ConnRow> {
        let mut rows: Vec<ConnRow> = self.entries().iter().map(|e| e.row()).collect();
        rows.sort_by_key(|r| r.id);
        rows
    }

    /// Connections still before their CONNECT and server (`inspecting`).
    pub fn inspecting(&self) -> u64 {
        let conns = self.conns.lock().expect("registry lock");
        conns
            .values()
            .filter(|e| e.plane() == Plane::Inspecting)
            .count() as u64
    }

    /// Connections held now.
    pub fn len(&self) -> usize {
        self.conns.lock().expect("registry lock").len()
    }

    /// Whether no connection is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A connection's place in the [`Registry`], given up on drop.
#[derive(Debug)]
pub struct Registered {
    registry: Arc<Registry>,
    /// The connection's entry.
    pub entry: Arc<Entry>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry
            .conns
            .lock()
            .expect("registry lock")
            .remove(&self.entry.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_leave_with_their_guard_and_count_bytes_for_their_server_too() {
        let r = Arc::new(Registry::default());
        let a = r.open("mqtt", "127.0.0.1:1000".parse().expect("addr"));
        let b = r.open("tls", "127.0.0.1:1001".parse().expect("addr"));
        assert_eq!(r.len(), 2);
        a.entry
            .identified("10.0.0.1:5000".parse().expect("addr"), "dev-1");
        let server = Arc::new(Traffic::default());
        let first_reply = crate::stats::Stats::default().connect_duration;
        let t = a.entry.reached(
            "c",
            "s1",
            "127.0.0.1:1883".parse().expect("addr"),
            (server.clone(), first_reply.clone()),
        );
        t.add(Direction::ClientToServer, 10);
        t.add(Direction::ServerToClient, 7);
        a.entry.set_plane(Plane::Sockmap);
        let rows = r.rows();
        assert_eq!(rows[0].client, "10.0.0.1:5000");
        assert_eq!(rows[0].client_id.as_deref(), Some("dev-1"));
        assert_eq!(rows[0].server.as_deref(), Some("s1"));
        assert_eq!((rows[0].bytes_c2s, rows[0].bytes_s2c), (10, 7));
        assert_eq!(rows[0].plane, "sockmap");
        assert_eq!(rows[1].plane, "inspecting");
        assert_eq!(
            (
                server.get(Direction::ClientToServer),
                server.get(Direction::ServerToClient)
            ),
            (10, 7)
        );
        assert!(a.entry.is_on("c", "s1") && !a.entry.is_on("c", "s2") && !b.entry.is_on("c", "s1"));
        assert_eq!(a.entry.cluster(), Some("c"));
        drop(a);
        assert_eq!(r.rows().len(), 1);
        drop(b);
        assert!(r.is_empty());
    }

    #[tokio::test]
    async fn an_eviction_wakes_a_waiter_whether_it_came_before_or_after() {
        let r = Arc::new(Registry::default());
        let a = r.open("mqtt", "127.0.0.1:1000".parse().expect("addr"));
        // Before: resolves at once.
        a.entry.evict();
        tokio::time::timeout(std::time::Duration::from_secs(1), a.entry.evicted())
            .await
            .expect("evicted before waiting");
        // After: a waiter already parked wakes.
        let b = r.open("mqtt", "127.0.0.1:1001".parse().expect("addr"));
        let entry = b.entry.clone();
        let waiter = tokio::spawn(async move { entry.evicted().await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished() && !b.entry.is_evicting());
        b.entry.evict();
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("evicted while waiting")
            .expect("task");
    }
}
