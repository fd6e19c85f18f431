//! The checked configuration the rest of the program uses: typed values, never
//! strings again.

use std::{net::SocketAddr, num::NonZeroU32, time::Duration};

use serde::Deserialize;

/// How connections are carried after the first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DataPlaneKind {
    /// Sockmap where BPF works, copy otherwise.
    Auto,
    /// In-kernel splice; failing to load BPF is a startup error.
    Sockmap,
    /// Userspace copy.
    Copy,
}

/// Listener protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerKind {
    /// Plain MQTT over TCP.
    Mqtt,
    /// MQTT over TLS.
    Mqtts,
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

/// Balancing algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Weighted round robin.
    RoundRobin,
    /// Fewest active connections (weighted).
    LeastConn,
    /// Hash of the client address.
    Source,
    /// Consistent hash of the MQTT client id.
    ClientId,
    /// Two random choices, the less loaded wins.
    Random,
}

/// What the sticky table is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sticky {
    /// No sticky table.
    None,
    /// MQTT client id.
    ClientId,
    /// MQTT username.
    Username,
    /// Client address.
    Source,
}

/// PROXY protocol header sent to servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyProtocol {
    /// No header.
    None,
    /// Text header.
    V1,
    /// Binary header.
    V2,
}

/// Health check kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthKind {
    /// No active check.
    None,
    /// A TCP connect must succeed.
    Tcp,
    /// CONNECT, expect a successful CONNACK.
    Mqtt,
}

/// Administrative state of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerState {
    /// Takes new connections.
    Up,
    /// Keeps its connections, takes no new ones.
    Drain,
    /// Takes nothing.
    Down,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[global]`.
    pub global: Global,
    /// `[admin]` (or the older `[stats]`), when present.
    pub admin: Option<Admin>,
    /// `[[listeners]]`.
    pub listeners: Vec<Listener>,
    /// `[[clusters]]`.
    pub clusters: Vec<Cluster>,
    /// `[guard]`, when present.
    pub guard: Option<GuardConfig>,
}

/// A rate with its burst: `rate` a second on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Events a second.
    pub rate: f64,
    /// Events at once.
    pub burst: u32,
}

/// A listener's admission limits; each `None` is off. A refused MQTT 5 client gets
/// CONNACK 0x97 (quota) or 0x9F (rate), a 3.x client CONNACK 3, and no server sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Connections open at once from one source address.
    pub max_connections_per_source: Option<u32>,
    /// New connections a second from one source address.
    pub per_source: Option<Rate>,
    /// Connections a second this listener hands to servers; excess ones wait.
    pub new_connections: Option<Rate>,
    /// At most this many wait for `new_connections`; past it they are refused.
    pub new_connection_queue: u32,
    /// Connections a second with the same client id.
    pub per_client_id: Option<Rate>,
}

impl Limits {
    /// What one of `workers` processes enforces: the listener's `new_connections`
    /// rate, burst and queue shared out (the workers see about equal shares of new
    /// connections); the per-source limits whole (each client address meets one
    /// worker, see `workers::select`); `per_client_id` whole (the workers count in
    /// one table, see `workers::rates`).
    pub fn per_worker(&self, workers: u32) -> Self {
        let n = workers.max(1);
        let mut mine = self.clone();
        if let Some(r) = &mut mine.new_connections {
            r.rate /= f64::from(n);
            r.burst = r.burst.div_ceil(n);
        }
        mine.new_connection_queue = self.new_connection_queue.div_ceil(n);
        mine
    }
}

/// `[guard]`: the XDP front guard on these interfaces, for the listeners' ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardConfig {
    /// Interfaces the program is attached to.
    pub interfaces: Vec<String>,
    /// Sources whose packets to the listeners' ports are dropped.
    pub deny: Vec<crate::guard::Cidr>,
    /// Sources never dropped (before `deny` and the SYN rate).
    pub allow: Vec<crate::guard::Cidr>,
    /// SYNs a second per source address; 0: not limited.
    pub syn_rate: u32,
    /// SYNs a source may send at once (default: one second's worth).
    pub syn_burst: u32,
}

/// Most worker processes an instance runs (`[global] workers`).
pub const MAX_WORKERS: u32 = 64;

/// `[global]`.
#[derive(Debug, Clone)]
pub struct Global {
    /// Instance name; BPF maps are pinned under `/sys/fs/bpf/mqttlb/<name>/`.
    pub name: String,
    /// Data plane choice.
    pub data_plane: DataPlaneKind,
    /// Connections open at once, all listeners together; `None`: as many as the
    /// descriptor limit allows (`limits::connections_for`).
    pub max_connections: Option<NonZeroU32>,
    /// Bytes all connections together may buffer before their CONNECT.
    pub max_preconnect_bytes: usize,
    /// SIGTERM: how long `/readyz` fails while connections are still accepted, so that
    /// a load balancer in front stops sending new clients first.
    pub shutdown_delay: Duration,
    /// SIGTERM: how long open connections may go on once accepting stopped.
    pub shutdown_grace: Duration,
    /// `user` / `group`: the account the daemon switches to after set-up.
    pub run_as: Option<crate::privilege::Account>,
    /// Worker processes sharing the listeners (1: the daemon serves alone, no
    /// supervisor).
    pub workers: NonZeroU32,
    /// `workers` was not in the file: one per core, or one process where the
    /// workers could not share a sticky table ([`crate::workers::by_default`]).
    pub workers_by_default: bool,
}

/// `[admin]`: the admin HTTP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// Its address.
    pub bind: SocketAddr,
    /// The bearer token writes need (and reads off loopback), read from `token_file`.
    pub token: Option<Token>,
    /// `[admin.tls]`: HTTPS with the listeners' TLS settings (ALPN `http/1.1`).
    pub tls: Option<TlsListener>,
    /// Written as `[stats]`, the first wave's name for the stats page.
    pub from_stats_section: bool,
}

/// A secret read from a file: never printed, not even by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// One `[[listeners]]` entry.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Unique name.
    pub name: String,
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Index into [`Config::clusters`].
    pub cluster: usize,
    /// Time allowed for the first complete MQTT packet.
    pub inspect_timeout: Duration,
    /// Expect a PROXY header first.
    pub accept_proxy_protocol: bool,
    /// One log line per connection at its end (target `mqttlb::access`).
    pub access_log: bool,
    /// Largest first packet accepted, in bytes.
    pub max_connect_size: u32,
    /// CONNECT fields replaced by client certificate fields.
    pub rewrite: Rewrite,
    /// What its clients speak, with the settings of that protocol only.
    pub protocol: Protocol,
    /// Admission limits (per source, per client id, the listener's rate).
    pub limits: Limits,
}

/// A listener's protocol (`kind`) and the settings only that kind has: a listener
/// cannot hold TLS settings without TLS, or a path without WebSocket.
#[derive(Debug, Clone)]
pub enum Protocol {
    /// `mqtt`: plain MQTT over TCP.
    Mqtt,
    /// `mqtts`: MQTT over TLS.
    Mqtts(TlsListener),
    /// `ws`: MQTT over WebSocket.
    Ws(WebSocket),
    /// `wss`: MQTT over WebSocket over TLS.
    Wss(TlsListener, WebSocket),
}

/// A `ws`/`wss` listener's WebSocket settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSocket {
    /// The HTTP path of the upgrade.
    pub path: String,
    /// Largest client frame after the CONNECT where mqttlb terminates the WebSocket
    /// (a server without `ws_address`), in bytes.
    pub max_frame_size: u32,
}

impl Listener {
    /// Its `kind`.
    pub fn kind(&self) -> ListenerKind {
        match self.protocol {
            Protocol::Mqtt => ListenerKind::Mqtt,
            Protocol::Mqtts(_) => ListenerKind::Mqtts,
            Protocol::Ws(_) => ListenerKind::Ws,
            Protocol::Wss(..) => ListenerKind::Wss,
        }
    }

    /// Its TLS setup (`mqtts`, `wss`).
    pub fn tls(&self) -> Option<&TlsListener> {
        match &self.protocol {
            Protocol::Mqtts(t) | Protocol::Wss(t, _) => Some(t),
            Protocol::Mqtt | Protocol::Ws(_) => None,
        }
    }

    /// Its WebSocket settings (`ws`, `wss`).
    pub fn websocket(&self) -> Option<&WebSocket> {
        match &self.protocol {
            Protocol::Ws(w) | Protocol::Wss(_, w) => Some(w),
            Protocol::Mqtt | Protocol::Mqtts(_) => None,
        }
    }
}

/// A listener's TLS setup: the settings and the configuration built from them.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// `[listeners.tls]`.
    pub settings: crate::tls::TlsSettings,
    /// Built from the settings (files read at check time and on reload).
    pub config: std::sync::Arc<rustls::ServerConfig>,
    /// Time allowed for the handshake.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once on this listener; more wait.
    pub max_handshakes: NonZeroU32,
}

/// Equal when the settings are (the rustls configuration is built from them).
impl PartialEq for TlsListener {
    fn eq(&self, other: &Self) -> bool {
        (&self.settings, self.handshake_timeout, self.max_handshakes)
            == (
                &other.settings,
                other.handshake_timeout,
                other.max_handshakes,
            )
    }
}

impl Eq for TlsListener {}

/// `[listeners.rewrite]`: CONNECT fields set from the verified client certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// Client id from this certificate field.
    pub client_id: Option<crate::tls::CertField>,
    /// Username from this certificate field.
    pub username: Option<crate::tls::CertField>,
}

/// One `[[clusters]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// Unique name.
    pub name: String,
    /// Algorithm.
    pub balance: Balance,
    /// Algorithm for connections whose client id is empty when `balance` is
    /// `client-id`: an empty id identifies nobody, so it must not pick one server.
    pub empty_client_id: Balance,
    /// Sticky key.
    pub sticky: Sticky,
    /// Lifetime of a sticky entry after its last use.
    pub sticky_expire: Duration,
    /// Sticky table capacity.
    pub sticky_table_size: NonZeroU32,
    /// PROXY header sent to servers.
    pub proxy_protocol: ProxyProtocol,
    /// Time allowed for a server connect.
    pub connect_timeout: Duration,
    /// A connection with no traffic either way for this long is closed.
    pub idle_timeout: Duration,
    /// `data_plane = "auto"`: when a connection moves from the copy plane to the splice.
    pub promote: Promote,
    /// Connections a second an evacuation closes.
    pub evict_rate: std::num::NonZeroU32,
    /// Server Reference sent to MQTT 5 clients with DISCONNECT 0x9C at an evacuation.
    pub server_reference: Option<String>,
    /// Active health check.
    pub health: Health,
    /// Local addresses server connections are made from, in turn (empty: the
    /// kernel's choice); each address gives another ~60,000 ports per server.
    pub source_addresses: Vec<std::net::IpAddr>,
    /// Servers, in file order (the index is the server's id).
    pub servers: Vec<Server>,
}

/// `[clusters.health]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Kind of check.
    pub kind: HealthKind,
    /// Time between checks.
    pub interval: Duration,
    /// Time allowed for one check.
    pub timeout: Duration,
    /// Successes that bring a server up.
    pub rise: NonZeroU32,
    /// Failures that take a server down.
    pub fall: NonZeroU32,
    /// Client id prefix of `mqtt` checks (the server name is appended).
    pub client_id: Option<String>,
}

/// When `auto` moves a connection from the copy plane to the in-kernel splice: after
/// `after_bytes` bytes either way, or once it has lived `after` and is not busy,
/// whichever comes first (`None`: that threshold is off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Promote {
    /// `promote_after_bytes`.
    pub after_bytes: Option<u64>,
    /// `promote_after`.
    pub after: Option<Duration>,
    /// `promote_max_rate`: reads a second over the last `after`, both directions,
    /// above which promotion by age waits another `after` (`None`: no limit).
    pub max_rate: Option<u64>,
    /// `promote_min_rate`: reads a second over the last `after`, both directions,
    /// below which promotion by age waits another `after` (`None`: no floor): an
    /// idle connection costs more memory spliced than copied and gains nothing.
    pub min_rate: Option<u64>,
    /// `promote_conversations`: a connection busier than `max_rate` whose reads are
    /// each one whole MQTT packet answered from the other side (request and response,
    /// one at a time) is promoted at once instead of put off: the splice carries it
    /// with less latency than the copy plane (see `dataplane::copy::Talk`). Only with
    /// promotion by age on and a `max_rate`.
    pub conversations: bool,
}

/// One `[[clusters.servers]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// Unique within its cluster.
    pub name: String,
    /// Where to connect.
    pub address: SocketAddr,
    /// Relative share.
    pub weight: NonZeroU32,
    /// Used only while no primary server is up.
    pub backup: bool,
    /// Administrative state.
    pub state: ServerState,
    /// Failed connects within `fail_timeout` that mark the server down (0: never).
    pub max_fails: u32,
    /// Window for `max_fails`, and how long the server then stays down.
    pub fail_timeout: Duration,
    /// Connections at once to this server.
    pub max_connections: Option<NonZeroU32>,
    /// Its MQTT-over-WebSocket address (for `ws`/`wss` listeners).
    pub ws_address: Option<SocketAddr>,
}
