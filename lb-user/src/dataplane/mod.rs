//! Data planes: what carries a connection's bytes after the first packet has been
//! forwarded. Both implement [`DataPlane`] and pass the same tests.
//!
//! Contract for every data plane: the caller has written to each socket everything it
//! read from the other (counted in [`Pair`]); from then on every byte is delivered once,
//! in order; a half-close is forwarded only after every byte before it; an error or
//! reset on one side resets the other; memory per connection stays bounded when a peer
//! stops reading; and nothing (socket, map entry, task) outlives the connection.

pub mod auto;
pub mod copy;
pub(crate) mod evict;
pub mod sockmap;
pub mod stream;
pub mod tls;

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::net::TcpStream;

/// A client connection and its server connection, ready to be carried.
#[derive(Debug)]
pub struct Pair {
    /// Client side.
    pub client: TcpStream,
    /// Server side.
    pub server: TcpStream,
    /// Daemon-wide connection id.
    pub id: u32,
    /// Client address.
    pub client_addr: SocketAddr,
    /// Server address.
    pub server_addr: SocketAddr,
    /// Server index in its cluster.
    pub server_index: u32,
    /// Bytes already written to the client socket by the daemon.
    pub written_to_client: u64,
    /// Bytes already written to the server socket by the daemon (PROXY header, CONNECT).
    pub written_to_server: u64,
    /// No traffic either way for this long closes the connection.
    pub idle_timeout: Duration,
    /// When the `auto` plane moves the pair from copy to the splice.
    pub promote: crate::config::Promote,
    /// The connection's byte counters (adding to its server's), which the plane adds
    /// its bytes to.
    pub traffic: Arc<Traffic>,
    /// The connection's row in the registry: the plane says what carries it, and
    /// ends it when an evacuation asks ([`crate::registry::Entry::evicted`]).
    pub entry: Arc<crate::registry::Entry>,
    /// What an evacuation writes to the client at a packet boundary of the server's
    /// stream before closing (an MQTT 5 DISCONNECT 0x9C); `None`: just close.
    pub disconnect: Option<Arc<[u8]>>,
    /// Where the server's stream stands at the first byte the plane carries: followed
    /// by the plane while `disconnect` is set (`None`: not followed).
    pub boundary: Option<crate::mqtt::boundary::Boundary>,
}

/// Which way bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server (index 0, as in the BPF maps and events).
    ClientToServer = 0,
    /// Server to client (index 1).
    ServerToClient = 1,
}

impl Direction {
    /// The direction of index `i` (0 or 1; anything else is server to client).
    pub fn of(i: usize) -> Self {
        if i == 0 {
            Self::ClientToServer
        } else {
            Self::ServerToClient
        }
    }
}

/// Bytes carried each way (per server, or per connection adding to its server's).
#[derive(Debug, Default)]
pub struct Traffic {
    bytes: [AtomicU64; 2],
    /// Counters that every byte counted here is added to as well.
    parent: Option<Arc<Traffic>>,
    /// A connection's: the time from accept to the server's first bytes (its
    /// CONNACK), observed once.
    first_reply: Option<FirstReply>,
}

/// See [`Traffic::first_reply`].
#[derive(Debug)]
struct FirstReply {
    accepted: Instant,
    seen: AtomicBool,
    histogram: crate::stats::Seconds,
}

impl Traffic {
    /// Counters whose bytes also count in `parent` (a connection's, under its server's).
    pub fn under(parent: Arc<Traffic>) -> Self {
        Self {
            parent: Some(parent),
            ..Self::default()
        }
    }

    /// A connection's counters as a hot upgrade handed it over: `bytes` carried so
    /// far (each way), under its server's `parent` from here on (when the server is
    /// still configured).
    pub fn carried_over(parent: Option<Arc<Traffic>>, bytes: [u64; 2]) -> Self {
        Self {
            bytes: bytes.map(AtomicU64::new),
            parent,
            first_reply: None,
        }
    }

    /// A connection's counters under its server's `parent`, which observe into
    /// `histogram` the time from `accepted` to the first bytes from the server.
    pub fn timed(
        parent: Arc<Traffic>,
        accepted: Instant,
        histogram: crate::stats::Seconds,
    ) -> Self {
        Self {
            first_reply: Some(FirstReply {
                accepted,
                seen: AtomicBool::new(false),
                histogram,
            }),
            ..Self::under(parent)
        }
    }

    /// Adds `n` bytes to direction `dir`, as they are carried.
    pub fn add(&self, dir: Direction, n: u64) {
        if dir == Direction::ServerToClient
            && n > 0
            && let Some(f) = &self.first_reply
            && !f.seen.load(Ordering::Relaxed)
            && !f.seen.swap(true, Ordering::Relaxed)
        {
            f.histogram.observe(f.accepted.elapsed().as_secs_f64());
        }
        self.add_later(dir, n);
    }

    /// Adds `n` bytes carried some time ago (the splice's, read from the kernel
    /// later): they do not time the server's first reply.
    pub fn add_later(&self, dir: Direction, n: u64) {
        self.bytes[dir as usize].fetch_add(n, Ordering::Relaxed);
        if let Some(p) = &self.parent {
            p.add_later(dir, n);
        }
    }

    /// Bytes carried in direction `dir`.
    pub fn get(&self, dir: Direction) -> u64 {
        self.bytes[dir as usize].load(Ordering::Relaxed)
    }
}

/// How a carried connection ended.
#[derive(Debug)]
pub enum Outcome {
    /// Both directions finished with FIN.
    Closed,
    /// Neither side sent anything for `idle_timeout`.
    IdleTimeout,
    /// Closed by an evacuation (after a DISCONNECT to an MQTT 5 client).
    Evicted,
    /// A reset or error on one side; both sides were reset.
    Aborted(std::io::Error),
    /// Given up, still open, to the new process of a hot upgrade ([`crate::upgrade`]).
    Departed(Box<Departure>),
}

impl Outcome {
    /// How it ended, as the access log and the metrics name it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::IdleTimeout => "idle_timeout",
            Self::Evicted => "evicted",
            Self::Aborted(_) => "aborted",
            Self::Departed(_) => "departed",
        }
    }
}

/// A connection a plane gave up for a hot upgrade: duplicates of its two sockets and
/// where its bytes stand. Nothing was written or shut down on the way: the new
/// process continues exactly where this one stopped.
#[derive(Debug)]
pub struct Departure {
    /// The client socket.
    pub client: std::os::fd::OwnedFd,
    /// The server socket.
    pub server: std::os::fd::OwnedFd,
    /// Where the bytes stand.
    pub carried: Carried,
    /// Bytes the daemon has written, or read to write, to the server and to the
    /// client since the connection began (the splice's byte accounting needs them).
    pub written: [u64; 2],
}

/// Where a carried connection's bytes stand when a hot upgrade moves it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum Carried {
    /// On the copy plane.
    Copy(copy::Stopped),
    /// In the splice (its sockets stay in the pinned maps).
    Spliced(sockmap::Stopped),
    /// On the copy plane after the splice (demoted, or refused by the kernel): its
    /// sockets are still in the maps, passing.
    Unspliced(sockmap::Unspliced),
    /// A TLS client relayed in userspace (its keys and records along).
    Tls(Box<tls::Stopped>),
}

impl Carried {
    /// Where the server's stream stood for an evacuation ([`crate::mqtt::boundary::Boundary::raw`]).
    pub fn boundary(&self) -> Option<u64> {
        match self {
            Self::Copy(c) => c.boundary,
            Self::Spliced(s) => s.boundary,
            Self::Unspliced(u) => u.copy.boundary,
            Self::Tls(_) => None,
        }
    }

    /// The bytes read and not yet written, client to server and server to client
    /// (sent beside the state, not inside it).
    pub fn pending_mut(&mut self) -> [&mut Vec<u8>; 2] {
        match self {
            Self::Copy(c) => c.pending.each_mut(),
            Self::Spliced(s) => s.pending_mut(),
            Self::Unspliced(u) => u.copy.pending.each_mut(),
            Self::Tls(t) => t.pending.each_mut(),
        }
    }
}

/// Polling of a state the kernel does not signal (bytes reaching a peer's send queue):
/// first and longest interval.
pub(crate) const POLL_MIN: Duration = Duration::from_millis(1);
pub(crate) const POLL_MAX: Duration = Duration::from_millis(50);

/// Boxed future returned by [`DataPlane::carry`].
pub type CarryFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// Carries spliced connections.
pub trait DataPlane: Send + Sync {
    /// `sockmap` or `copy`.
    fn name(&self) -> &'static str;
    /// Carries `pair` until both directions are closed.
    fn carry(&self, pair: Pair) -> CarryFuture<'_>;
    /// Carries on a pair a hot upgrade's old process gave up where `carried` says.
    fn resume(&self, pair: Pair, carried: Carried) -> CarryFuture<'_>;
}

/// `pair` given up to a hot upgrade where `carried` says (see [`departure_of`]).
pub(crate) fn departure(pair: &Pair, carried: Carried, written: [u64; 2]) -> Outcome {
    departure_of((&pair.client, &pair.server), carried, written)
}

/// A connection given up to a hot upgrade: its two sockets duplicated (the caller
/// then drops its own, which closes nothing). A failed duplication (out of
/// descriptors) resets both instead.
pub(crate) fn departure_of(
    (client, server): (&TcpStream, &TcpStream),
    carried: Carried,
    written: [u64; 2],
) -> Outcome {
    use std::os::fd::AsFd;
    let dup = |s: &TcpStream| s.as_fd().try_clone_to_owned();
    match (dup(client), dup(server)) {
        (Ok(client), Ok(server)) => Outcome::Departed(Box::new(Departure {
            client,
            server,
            carried,
            written,
        })),
        (Err(e), _) | (_, Err(e)) => {
            reset_sockets(client, server);
            Outcome::Aborted(e)
        }
    }
}

/// Resets both sockets when the pair is dropped after an error.
pub(crate) fn reset_both(pair: &Pair) {
    reset_sockets(&pair.client, &pair.server);
}

/// Makes the close of both sockets a reset.
fn reset_sockets(client: &TcpStream, server: &TcpStream) {
    use std::os::fd::AsRawFd;
    // Best effort: the sockets are about to be closed either way.
    let _ = crate::sys::set_linger_zero(client.as_raw_fd());
    let _ = crate::sys::set_linger_zero(server.as_raw_fd());
}
