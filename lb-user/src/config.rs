//! The configuration file: TOML parsed once into typed values, checked as a whole, with
//! every problem reported as one line naming the key and its line.
//!
//! The raw (`Raw*`) structs mirror the file and reject unknown keys; [`Config::parse`]
//! turns them into the typed structs the rest of the program uses, which never see
//! strings again.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    num::NonZeroU32,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{key}: {message}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct ConfigError {
    /// 1-based line of the offending key, when known.
    pub line: Option<usize>,
    /// Dotted path of the key, e.g. `clusters[0].servers[1].address`.
    pub key: String,
    /// What is wrong and, where useful, what is accepted.
    pub message: String,
}

/// Every problem found in a file (at least one).
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

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

/// A duration written as `"250ms"`, `"10s"`, `"30m"`, `"2h"` or `"1d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses `"<integer><unit>"` with unit `ms`, `s`, `m`, `h` or `d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let bad = || {
        format!(
            "invalid duration {s:?}: write a whole number and a unit, e.g. \"250ms\", \"10s\", \"30m\", \"2h\", \"1d\""
        )
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(ms).map(Duration::from_millis).ok_or_else(bad)
}

// ---------------------------------------------------------------------------------------
// Raw file layout.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    global: RawGlobal,
    stats: Option<RawStats>,
    #[serde(default)]
    listeners: Vec<RawListener>,
    #[serde(default)]
    clusters: Vec<RawCluster>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGlobal {
    #[serde(default = "default_name")]
    name: Spanned<String>,
    #[serde(default = "default_data_plane")]
    data_plane: DataPlaneKind,
    max_connections: Option<NonZeroU32>,
    #[serde(default = "default_max_preconnect_bytes")]
    max_preconnect_bytes: Spanned<u64>,
}

impl Default for RawGlobal {
    fn default() -> Self {
        Self {
            name: default_name(),
            data_plane: default_data_plane(),
            max_connections: None,
            max_preconnect_bytes: default_max_preconnect_bytes(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStats {
    bind: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    bind: Spanned<String>,
    #[serde(default = "default_listener_kind")]
    kind: Spanned<ListenerKind>,
    cluster: Option<Spanned<String>>,
    #[serde(default = "default_inspect_timeout")]
    inspect_timeout: Dur,
    #[serde(default = "default_false")]
    accept_proxy_protocol: Spanned<bool>,
    #[serde(default = "default_max_connect_size")]
    max_connect_size: Spanned<u32>,
    max_frame_size: Option<Spanned<u32>>,
    tls: Option<Spanned<RawTls>>,
    rewrite: Option<Spanned<RawRewrite>>,
    path: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    certs: Vec<RawSniCert>,
    client_ca: Option<PathBuf>,
    verify: Option<crate::tls::Verify>,
    crl: Option<PathBuf>,
    #[serde(default = "default_min_version")]
    min_version: crate::tls::MinVersion,
    #[serde(default = "default_session_cache_size")]
    session_cache_size: usize,
    #[serde(default = "default_true")]
    session_tickets: bool,
    #[serde(default = "default_handshake_timeout")]
    handshake_timeout: Dur,
    #[serde(default = "default_max_handshakes")]
    max_handshakes: NonZeroU32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSniCert {
    server_names: Vec<String>,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRewrite {
    client_id: Option<crate::tls::CertField>,
    username: Option<crate::tls::CertField>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Spanned<String>,
    #[serde(default = "default_balance")]
    balance: Spanned<Balance>,
    #[serde(default = "default_empty_client_id")]
    empty_client_id: Spanned<Balance>,
    #[serde(default = "default_sticky")]
    sticky: Spanned<Sticky>,
    #[serde(default = "default_sticky_expire")]
    sticky_expire: Dur,
    #[serde(default = "default_sticky_table_size")]
    sticky_table_size: NonZeroU32,
    #[serde(default = "default_proxy_protocol")]
    proxy_protocol: ProxyProtocol,
    #[serde(default = "default_connect_timeout")]
    connect_timeout: Dur,
    #[serde(default = "default_idle_timeout")]
    idle_timeout: Dur,
    promote_after_bytes: Option<u64>,
    #[serde(default = "default_promote_after")]
    promote_after: Option<Dur>,
    #[serde(default = "default_promote_max_rate")]
    promote_max_rate: u64,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    source_addresses: Vec<std::net::IpAddr>,
    #[serde(default)]
    servers: Vec<RawServer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default = "default_health_kind")]
    kind: HealthKind,
    #[serde(default = "default_health_interval")]
    interval: Dur,
    #[serde(default = "default_health_timeout")]
    timeout: Dur,
    #[serde(default = "default_rise_fall")]
    rise: NonZeroU32,
    #[serde(default = "default_rise_fall")]
    fall: NonZeroU32,
    client_id: Option<String>,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            kind: default_health_kind(),
            interval: default_health_interval(),
            timeout: default_health_timeout(),
            rise: default_rise_fall(),
            fall: default_rise_fall(),
            client_id: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    name: Spanned<String>,
    address: Spanned<String>,
    #[serde(default = "default_weight")]
    weight: NonZeroU32,
    #[serde(default)]
    backup: bool,
    #[serde(default = "default_server_state")]
    state: ServerState,
    #[serde(default = "default_max_fails")]
    max_fails: u32,
    #[serde(default = "default_fail_timeout")]
    fail_timeout: Dur,
    max_connections: Option<NonZeroU32>,
    ws_address: Option<Spanned<String>>,
}

fn default_name() -> Spanned<String> {
    Spanned::new(0..0, "default".to_owned())
}
fn default_data_plane() -> DataPlaneKind {
    DataPlaneKind::Auto
}
fn default_max_preconnect_bytes() -> Spanned<u64> {
    Spanned::new(0..0, 64 << 20)
}
fn default_max_frame_size() -> Spanned<u32> {
    Spanned::new(0..0, 1 << 20)
}
fn default_listener_kind() -> Spanned<ListenerKind> {
    Spanned::new(0..0, ListenerKind::Mqtt)
}
fn default_inspect_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_false() -> Spanned<bool> {
    Spanned::new(0..0, false)
}
fn default_max_connect_size() -> Spanned<u32> {
    Spanned::new(0..0, 64 * 1024)
}
fn default_min_version() -> crate::tls::MinVersion {
    crate::tls::MinVersion::Tls12
}
fn default_session_cache_size() -> usize {
    20_480
}
fn default_true() -> bool {
    true
}
fn default_handshake_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_max_handshakes() -> NonZeroU32 {
    NonZeroU32::new(1024).expect("non-zero")
}
fn default_empty_client_id() -> Spanned<Balance> {
    Spanned::new(0..0, Balance::LeastConn)
}
fn default_balance() -> Spanned<Balance> {
    Spanned::new(0..0, Balance::RoundRobin)
}
fn default_sticky() -> Spanned<Sticky> {
    Spanned::new(0..0, Sticky::None)
}
fn default_sticky_expire() -> Dur {
    Dur(Duration::from_secs(30 * 60))
}
fn default_sticky_table_size() -> NonZeroU32 {
    NonZeroU32::new(100_000).expect("non-zero")
}
fn default_proxy_protocol() -> ProxyProtocol {
    ProxyProtocol::None
}
fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
/// Reads a second (both directions) above which a connection is too busy to promote
/// by age: measured, the splice loses to the copy plane on pipelined streams and bulk
/// transfers (docs/ARCHITECTURE.md, "Choosing a plane").
pub const DEFAULT_PROMOTE_MAX_RATE: u64 = 1000;
fn default_promote_max_rate() -> u64 {
    DEFAULT_PROMOTE_MAX_RATE
}
fn default_promote_after() -> Option<Dur> {
    Some(Dur(Duration::from_secs(10)))
}
fn default_idle_timeout() -> Dur {
    Dur(Duration::from_secs(30 * 60))
}
fn default_health_kind() -> HealthKind {
    HealthKind::Tcp
}
fn default_health_interval() -> Dur {
    Dur(Duration::from_secs(2))
}
fn default_health_timeout() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_rise_fall() -> NonZeroU32 {
    NonZeroU32::new(2).expect("non-zero")
}
fn default_weight() -> NonZeroU32 {
    NonZeroU32::MIN
}
fn default_server_state() -> ServerState {
    ServerState::Up
}
fn default_max_fails() -> u32 {
    1
}
fn default_fail_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

// ---------------------------------------------------------------------------------------
// Typed configuration.

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[global]`.
    pub global: Global,
    /// `[stats]`, when present.
    pub stats: Option<StatsConfig>,
    /// `[[listeners]]`.
    pub listeners: Vec<Listener>,
    /// `[[clusters]]`.
    pub clusters: Vec<Cluster>,
}

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
}

/// `[stats]`.
#[derive(Debug, Clone)]
pub struct StatsConfig {
    /// Address of the stats page.
    pub bind: SocketAddr,
}

/// One `[[listeners]]` entry.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Unique name.
    pub name: String,
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Protocol.
    pub kind: ListenerKind,
    /// Index into [`Config::clusters`].
    pub cluster: usize,
    /// Time allowed for the first complete MQTT packet.
    pub inspect_timeout: Duration,
    /// Expect a PROXY header first.
    pub accept_proxy_protocol: bool,
    /// Largest first packet accepted, in bytes.
    pub max_connect_size: u32,
    /// `ws`/`wss`: largest client frame after the CONNECT where mqttlb terminates the
    /// WebSocket (a server without `ws_address`), in bytes.
    pub max_frame_size: u32,
    /// TLS termination (`mqtts`).
    pub tls: Option<TlsListener>,
    /// CONNECT fields replaced by client certificate fields.
    pub rewrite: Rewrite,
    /// `ws`/`wss`: the HTTP path of the upgrade.
    pub path: String,
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

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                line: None,
                key: "file".to_owned(),
                message: format!("cannot read it: {e}"),
            }])
        })?;
        Self::parse_in(&text, path.parent().unwrap_or(Path::new(".")))
    }

    /// Parses and checks configuration text; relative file paths are relative to the
    /// working directory.
    pub fn parse(text: &str) -> Result<Self, ConfigErrors> {
        Self::parse_in(text, Path::new("."))
    }

    /// Parses and checks configuration text whose relative file paths (certificates,
    /// keys) are relative to `dir`, the configuration file's directory.
    pub fn parse_in(text: &str, dir: &Path) -> Result<Self, ConfigErrors> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigErrors(vec![toml_error(text, &e)]))?;
        let mut c = Checker {
            text,
            dir,
            errors: Vec::new(),
        };
        let config = c.check(raw);
        // In file order, whatever order the checks ran in.
        c.errors.sort_by_key(|e| e.line);
        if c.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(c.errors))
        }
    }
}

/// Stands in for an address that failed its check (the configuration is refused).
const UNSPECIFIED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// Turns a TOML/serde error into one line: `line N: key: message`.
fn toml_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let line = e.span().map(|s| line_of(text, s.start));
    // The key is what stands before `=` on the offending line, when there is one.
    let key = line
        .and_then(|l| text.lines().nth(l - 1))
        .and_then(|l| l.split_once('=').map(|(k, _)| k.trim().to_owned()))
        .filter(|k| !k.is_empty() && !k.starts_with('['))
        .unwrap_or_else(|| "file".to_owned());
    ConfigError {
        line,
        key,
        message: e.message().trim().replace('\n', " "),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

struct Checker<'a> {
    text: &'a str,
    dir: &'a Path,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    /// Checks a listener's `[listeners.tls]` against its kind and builds it (reading
    /// the files it names).
    fn listener_tls(
        &mut self,
        key: &str,
        kind: ListenerKind,
        name: &Spanned<String>,
        raw: Option<Spanned<RawTls>>,
    ) -> Option<TlsListener> {
        let wants_tls = matches!(kind, ListenerKind::Mqtts | ListenerKind::Wss);
        let Some(raw) = raw else {
            if wants_tls {
                self.err(
                    name.span(),
                    format!("{key}.tls"),
                    "a TLS listener needs [listeners.tls] with cert and key",
                );
            }
            return None;
        };
        let span = raw.span();
        if !wants_tls {
            self.err(
                span,
                format!("{key}.tls"),
                "only \"mqtts\" and \"wss\" listeners use TLS",
            );
            return None;
        }
        let raw = raw.into_inner();
        let at = |p: PathBuf| self.dir.join(p);
        let settings = crate::tls::TlsSettings {
            cert: at(raw.cert),
            key: at(raw.key),
            certs: raw
                .certs
                .into_iter()
                .map(|c| crate::tls::SniCert {
                    server_names: c.server_names,
                    cert: at(c.cert),
                    key: at(c.key),
                })
                .collect(),
            verify: raw.verify.unwrap_or(crate::tls::Verify::Required),
            client_ca: raw.client_ca.map(at),
            crl: raw.crl.map(at),
            min_version: raw.min_version,
            session_cache_size: raw.session_cache_size,
            session_tickets: raw.session_tickets,
        };
        self.positive(
            span.clone(),
            format!("{key}.tls.handshake_timeout"),
            raw.handshake_timeout.0,
        );
        if raw.verify.is_some() && settings.client_ca.is_none() {
            self.err(
                span.clone(),
                format!("{key}.tls.verify"),
                "needs tls.client_ca",
            );
        }
        match crate::tls::server_config(&settings) {
            Ok(config) => Some(TlsListener {
                settings,
                config,
                handshake_timeout: raw.handshake_timeout.0,
                max_handshakes: raw.max_handshakes,
            }),
            Err(e) => {
                self.err(span, format!("{key}.tls.{}", e.key), e.message);
                None
            }
        }
    }

    /// `value` of a listener key only `ws` and `wss` listeners have; on another kind
    /// it is an error and treated as absent.
    fn websocket_only<T>(
        &mut self,
        value: Option<Spanned<T>>,
        websocket: bool,
        listener: &str,
        name: &str,
    ) -> Option<Spanned<T>> {
        match value {
            Some(v) if !websocket => {
                self.err(
                    v.span(),
                    format!("{listener}.{name}"),
                    "only \"ws\" and \"wss\" listeners have this key",
                );
                None
            }
            v => v,
        }
    }

    /// A listener address: an IP and a port (host names are not taken: a listener
    /// binds an address of this host).
    fn bind_addr(&mut self, raw: &Spanned<String>, key: String) -> Option<SocketAddr> {
        match raw.get_ref().parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => {
                self.err(
                    raw.span(),
                    key,
                    "port 0 would pick a random port: give the port clients connect to",
                );
                None
            }
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    raw.span(),
                    key,
                    format!(
                        "expected IP:port, e.g. 0.0.0.0:1883 or [::]:1883 (got {:?})",
                        raw.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// A server address: IP:port, or host:port resolved now (at start and at each
    /// reload; the address is then fixed until the next reload), first address given.
    fn server_addr(&mut self, raw: &Spanned<String>, key: String) -> Option<SocketAddr> {
        use std::net::ToSocketAddrs;
        let text = raw.get_ref();
        if let Ok(a) = text.parse::<SocketAddr>() {
            return Some(a);
        }
        let parsed = text
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
            .filter(|(host, _)| !host.is_empty() && !host.contains(':'));
        let Some((host, port)) = parsed else {
            self.err(
                raw.span(),
                key,
                format!("expected IP:port or host:port, e.g. 127.0.0.1:1883 or broker-1:1883 (got {text:?})"),
            );
            return None;
        };
        match (host, port).to_socket_addrs() {
            Ok(mut addrs) => match addrs.next() {
                Some(a) => Some(a),
                None => {
                    self.err(
                        raw.span(),
                        key,
                        format!("host name {host:?} resolves to no address"),
                    );
                    None
                }
            },
            Err(e) => {
                self.err(
                    raw.span(),
                    key,
                    format!("cannot resolve host name {host:?} ({e}); give IP:port, or a name this host resolves"),
                );
                None
            }
        }
    }

    /// A duration that must not be zero.
    fn positive(&mut self, span: Range<usize>, key: String, d: Duration) {
        if d.is_zero() {
            self.err(span, key, "must be more than 0s");
        }
    }

    fn err(&mut self, span: Range<usize>, key: String, message: impl Into<String>) {
        let line = (span.end > 0).then(|| line_of(self.text, span.start));
        self.errors.push(ConfigError {
            line,
            key,
            message: message.into(),
        });
    }

    fn check(&mut self, raw: RawConfig) -> Config {
        let name = raw.global.name.get_ref().clone();
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            self.err(
                raw.global.name.span(),
                "global.name".into(),
                "must be 1 to 64 characters of letters, digits, '-' or '_' (it names a bpffs directory)",
            );
        }

        if *raw.global.max_preconnect_bytes.get_ref() < 64 << 10 {
            self.err(
                raw.global.max_preconnect_bytes.span(),
                "global.max_preconnect_bytes".into(),
                "must be at least 65536 bytes",
            );
        }

        let mut clusters = Vec::new();
        let mut cluster_names = HashSet::new();
        for (ci, rc) in raw.clusters.into_iter().enumerate() {
            let key = format!("clusters[{ci}]");
            if !cluster_names.insert(rc.name.get_ref().clone()) {
                self.err(
                    rc.name.span(),
                    format!("{key}.name"),
                    format!("duplicate cluster name {:?}", rc.name.get_ref()),
                );
            }
            if rc.servers.len() > 1024 {
                self.err(
                    rc.name.span(),
                    format!("{key}.servers"),
                    "at most 1024 servers per cluster",
                );
            }
            if *rc.empty_client_id.get_ref() == Balance::ClientId {
                self.err(
                    rc.empty_client_id.span(),
                    format!("{key}.empty_client_id"),
                    "an empty client id cannot be hashed: least-conn, round-robin, random or source",
                );
            }
            if rc.sticky_table_size.get() > 10_000_000 {
                self.err(
                    rc.name.span(),
                    format!("{key}.sticky_table_size"),
                    "at most 10000000 entries",
                );
            }
            if rc.servers.is_empty() {
                self.err(
                    rc.name.span(),
                    format!("{key}.servers"),
                    "a cluster needs at least one [[clusters.servers]] entry",
                );
            }
            for (name, d) in [
                ("connect_timeout", rc.connect_timeout.0),
                ("idle_timeout", rc.idle_timeout.0),
                ("health.interval", rc.health.interval.0),
                ("health.timeout", rc.health.timeout.0),
            ] {
                self.positive(rc.name.span(), format!("{key}.{name}"), d);
            }
            if rc.health.timeout.0 > rc.health.interval.0 {
                self.err(
                    rc.name.span(),
                    format!("{key}.health.timeout"),
                    "must not exceed health.interval",
                );
            }
            let mut servers = Vec::new();
            let mut server_names = HashSet::new();
            let mut addresses = HashSet::new();
            for (si, rs) in rc.servers.into_iter().enumerate() {
                let skey = format!("{key}.servers[{si}]");
                if !server_names.insert(rs.name.get_ref().clone()) {
                    self.err(
                        rs.name.span(),
                        format!("{skey}.name"),
                        format!(
                            "duplicate server name {:?} in this cluster",
                            rs.name.get_ref()
                        ),
                    );
                }
                let address = self.server_addr(&rs.address, format!("{skey}.address"));
                if address.is_some_and(|a| !addresses.insert(a)) {
                    self.err(
                        rs.address.span(),
                        format!("{skey}.address"),
                        "duplicate server address in this cluster",
                    );
                }
                let ws_address = rs
                    .ws_address
                    .as_ref()
                    .and_then(|w| self.server_addr(w, format!("{skey}.ws_address")));
                servers.push(Server {
                    name: rs.name.into_inner(),
                    address: address.unwrap_or(UNSPECIFIED),
                    weight: rs.weight,
                    backup: rs.backup,
                    state: rs.state,
                    max_fails: rs.max_fails,
                    fail_timeout: rs.fail_timeout.0,
                    max_connections: rs.max_connections,
                    ws_address,
                });
            }
            if !rc.source_addresses.is_empty() {
                for server in &servers {
                    let family = server.address.is_ipv4();
                    if !rc.source_addresses.iter().any(|a| a.is_ipv4() == family) {
                        self.err(
                            rc.name.span(),
                            format!("{key}.source_addresses"),
                            format!(
                                "no address of the family of server {:?} ({})",
                                server.name, server.address
                            ),
                        );
                    }
                }
            }
            clusters.push(Cluster {
                name: rc.name.into_inner(),
                balance: rc.balance.into_inner(),
                empty_client_id: rc.empty_client_id.into_inner(),
                sticky: rc.sticky.into_inner(),
                sticky_expire: rc.sticky_expire.0,
                sticky_table_size: rc.sticky_table_size,
                proxy_protocol: rc.proxy_protocol,
                connect_timeout: rc.connect_timeout.0,
                idle_timeout: rc.idle_timeout.0,
                promote: Promote {
                    after_bytes: rc.promote_after_bytes.filter(|&b| b > 0),
                    after: rc.promote_after.map(|d| d.0).filter(|d| !d.is_zero()),
                    max_rate: Some(rc.promote_max_rate).filter(|&r| r > 0),
                },
                health: Health {
                    kind: rc.health.kind,
                    interval: rc.health.interval.0,
                    timeout: rc.health.timeout.0,
                    rise: rc.health.rise,
                    fall: rc.health.fall,
                    client_id: rc.health.client_id,
                },
                source_addresses: rc.source_addresses,
                servers,
            });
        }

        let mut listeners = Vec::new();
        let mut listener_names = HashSet::new();
        let mut binds = HashSet::new();
        if raw.listeners.is_empty() {
            self.err(
                0..0,
                "listeners".into(),
                "at least one [[listeners]] entry is required",
            );
        }
        for (li, rl) in raw.listeners.into_iter().enumerate() {
            let key = format!("listeners[{li}]");
            if !listener_names.insert(rl.name.get_ref().clone()) {
                self.err(
                    rl.name.span(),
                    format!("{key}.name"),
                    format!("duplicate listener name {:?}", rl.name.get_ref()),
                );
            }
            let bind = self.bind_addr(&rl.bind, format!("{key}.bind"));
            if bind.is_some_and(|b| !binds.insert(b)) {
                self.err(
                    rl.bind.span(),
                    format!("{key}.bind"),
                    format!("{} is already used by another listener", rl.bind.get_ref()),
                );
            }
            self.positive(
                rl.name.span(),
                format!("{key}.inspect_timeout"),
                rl.inspect_timeout.0,
            );
            let kind = *rl.kind.get_ref();
            let websocket = matches!(kind, ListenerKind::Ws | ListenerKind::Wss);
            let path = match self.websocket_only(rl.path, websocket, &key, "path") {
                Some(p) if !p.get_ref().starts_with('/') => {
                    self.err(p.span(), format!("{key}.path"), "must start with '/'");
                    String::new()
                }
                Some(p) => p.into_inner(),
                None => "/mqtt".to_owned(),
            };
            let tls = self.listener_tls(&key, kind, &rl.name, rl.tls);
            let rewrite = match rl.rewrite {
                None => Rewrite::default(),
                Some(r) => {
                    let span = r.span();
                    let r = r.into_inner();
                    if tls.as_ref().is_none_or(|t| t.settings.client_ca.is_none()) {
                        self.err(
                            span,
                            format!("{key}.rewrite"),
                            "needs client certificates: a TLS listener with tls.client_ca",
                        );
                    }
                    Rewrite {
                        client_id: r.client_id,
                        username: r.username,
                    }
                }
            };
            let max_frame_size =
                match self.websocket_only(rl.max_frame_size, websocket, &key, "max_frame_size") {
                    Some(m) if !(128..=256 << 20).contains(m.get_ref()) => {
                        self.err(
                            m.span(),
                            format!("{key}.max_frame_size"),
                            "must be between 128 and 268435456 bytes",
                        );
                        0
                    }
                    Some(m) => m.into_inner(),
                    None => default_max_frame_size().into_inner(),
                };
            if !(16..=16 * 1024 * 1024).contains(rl.max_connect_size.get_ref()) {
                self.err(
                    rl.max_connect_size.span(),
                    format!("{key}.max_connect_size"),
                    "must be between 16 and 16777216 bytes",
                );
            }
            let cluster = match &rl.cluster {
                None => {
                    self.err(
                        rl.name.span(),
                        format!("{key}.cluster"),
                        "missing: name the [[clusters]] entry this listener feeds",
                    );
                    None
                }
                Some(name) => {
                    let found = clusters.iter().position(|c| &c.name == name.get_ref());
                    if found.is_none() {
                        self.err(
                            name.span(),
                            format!("{key}.cluster"),
                            format!("no [[clusters]] entry is named {:?}", name.get_ref()),
                        );
                    }
                    found
                }
            };
            listeners.push(Listener {
                name: rl.name.into_inner(),
                bind: bind.unwrap_or(UNSPECIFIED),
                kind: rl.kind.into_inner(),
                cluster: cluster.unwrap_or(0),
                inspect_timeout: rl.inspect_timeout.0,
                accept_proxy_protocol: rl.accept_proxy_protocol.into_inner(),
                max_connect_size: rl.max_connect_size.into_inner(),
                max_frame_size,
                tls,
                rewrite,
                path,
            });
        }

        Config {
            global: Global {
                name,
                data_plane: raw.global.data_plane,
                max_connections: raw.global.max_connections,
                max_preconnect_bytes: *raw.global.max_preconnect_bytes.get_ref() as usize,
            },
            stats: raw.stats.map(|s| StatsConfig {
                bind: self
                    .bind_addr(&s.bind, "stats.bind".into())
                    .unwrap_or(UNSPECIFIED),
            }),
            listeners,
            clusters,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[global]
name = "t1"
data_plane = "copy"

[[listeners]]
name = "mqtt"
bind = "127.0.0.1:1883"
cluster = "brokers"
inspect_timeout = "250ms"

[[clusters]]
name = "brokers"
connect_timeout = "2s"

[[clusters.servers]]
name = "node1"
address = "127.0.0.1:18831"
weight = 3

[[clusters.servers]]
name = "node2"
address = "127.0.0.1:18832"
state = "drain"
"#;

    #[test]
    fn every_problem_is_reported_at_once_with_its_key_and_what_to_write() {
        let text = GOOD
            .replace("bind = \"127.0.0.1:1883\"", "bind = \"localhost:1883\"")
            .replace("cluster = \"brokers\"\n", "")
            .replace("connect_timeout = \"2s\"", "connect_timeout = \"0s\"")
            .replace("address = \"127.0.0.1:18832\"", "address = \"10.0.0.1\"");
        let e = errors(&text);
        for want in [
            "line 8: listeners[0].bind: expected IP:port, e.g. 0.0.0.0:1883",
            "line 7: listeners[0].cluster: missing",
            "line 12: clusters[0].connect_timeout: must be more than 0s",
            "line 22: clusters[0].servers[1].address: expected IP:port or host:port",
        ] {
            assert!(e.iter().any(|l| l.contains(want)), "{want}: {e:?}");
        }
        assert_eq!(e.len(), 4, "{e:?}");
        let e = errors(&GOOD.replace("127.0.0.1:1883", "127.0.0.1:0"));
        assert!(e[0].contains("port 0"), "{e:?}");
    }

    #[test]
    fn servers_may_be_given_by_host_name_resolved_at_load() {
        let c = Config::parse(&GOOD.replace("127.0.0.1:18831", "localhost:18831")).expect("valid");
        assert!(c.clusters[0].servers[0].address.ip().is_loopback());
        assert_eq!(c.clusters[0].servers[0].address.port(), 18831);
        let e = errors(&GOOD.replace("127.0.0.1:18831", "no-such-host.invalid:18831"));
        assert!(
            e[0].contains("cannot resolve host name \"no-such-host.invalid\""),
            "{e:?}"
        );
    }

    #[test]
    fn parses_a_good_file_into_typed_values() {
        let c = Config::parse(GOOD).expect("valid");
        assert_eq!(c.global.name, "t1");
        assert_eq!(c.global.data_plane, DataPlaneKind::Copy);
        assert_eq!(c.global.max_connections, None);
        assert_eq!(c.global.max_preconnect_bytes, 64 << 20);
        let l = &c.listeners[0];
        assert_eq!(l.bind, "127.0.0.1:1883".parse().expect("addr"));
        assert_eq!(l.inspect_timeout, Duration::from_millis(250));
        assert_eq!(l.max_connect_size, 65536);
        let cl = &c.clusters[l.cluster];
        assert_eq!(cl.connect_timeout, Duration::from_secs(2));
        assert_eq!(cl.idle_timeout, Duration::from_secs(1800));
        assert_eq!(
            cl.promote,
            Promote {
                after_bytes: None,
                after: Some(Duration::from_secs(10)),
                max_rate: Some(DEFAULT_PROMOTE_MAX_RATE),
            }
        );
        assert_eq!(cl.servers.len(), 2);
        assert_eq!(cl.servers[0].weight.get(), 3);
        assert_eq!(cl.servers[1].state, ServerState::Drain);
    }

    fn errors(text: &str) -> Vec<String> {
        Config::parse(text)
            .expect_err("invalid")
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn unknown_key_names_the_key_and_line() {
        let text = GOOD.replace("weight = 3", "wieght = 3");
        let e = errors(&text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("line 19: wieght: unknown field `wieght`"),
            "{e:?}"
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = errors(&GOOD.replace("\"250ms\"", "\"fast\""));
        assert!(
            e[0].starts_with("line 10: inspect_timeout: invalid duration \"fast\""),
            "{e:?}"
        );
        let e = errors(&GOOD.replace("127.0.0.1:18832", "127.0.0.1:99999"));
        assert!(
            e[0].starts_with("line 23: clusters[0].servers[1].address: expected IP:port"),
            "{e:?}"
        );
        let e = errors(&GOOD.replace("\"drain\"", "\"sleepy\""));
        assert!(
            e[0].contains("state") && e[0].contains("unknown variant"),
            "{e:?}"
        );
    }

    #[test]
    fn second_wave_keys_are_checked_by_name() {
        // An empty client id cannot fall back to hashing it.
        let e = errors(&GOOD.replace(
            "connect_timeout = \"2s\"",
            "connect_timeout = \"2s\"\nempty_client_id = \"client-id\"",
        ));
        assert!(
            e[0].contains("clusters[0].empty_client_id: an empty"),
            "{e:?}"
        );
        let c = Config::parse(&GOOD.replace(
            "connect_timeout = \"2s\"",
            "connect_timeout = \"2s\"\nempty_client_id = \"round-robin\"",
        ))
        .expect("valid");
        assert_eq!(c.clusters[0].empty_client_id, Balance::RoundRobin);
        // WebSocket-only keys on a plain listener.
        let plain = GOOD.replace(
            "inspect_timeout = \"250ms\"",
            "inspect_timeout = \"250ms\"\nmax_frame_size = 4096\npath = \"/mqtt\"",
        );
        let e = errors(&plain);
        assert_eq!(e.len(), 2, "{e:?}");
        for key in [
            "listeners[0].max_frame_size: only",
            "listeners[0].path: only",
        ] {
            assert!(e.iter().any(|l| l.contains(key)), "{key}: {e:?}");
        }
        let ws = GOOD.replace(
            "inspect_timeout = \"250ms\"",
            "inspect_timeout = \"250ms\"\nkind = \"ws\"\nmax_frame_size = 16",
        );
        let e = errors(&ws);
        assert!(e[0].contains("max_frame_size: must be between"), "{e:?}");
        let small = GOOD.replace("[global]\n", "[global]\nmax_preconnect_bytes = 1000\n");
        let e = errors(&small);
        assert!(e[0].contains("global.max_preconnect_bytes"), "{e:?}");
        // Thresholds: "0s" turns promotion by age off; bytes are taken as given.
        let c = Config::parse(&GOOD.replace(
            "connect_timeout = \"2s\"",
            "connect_timeout = \"2s\"\npromote_after = \"0s\"\npromote_after_bytes = 65536\npromote_max_rate = 0",
        ))
        .expect("valid");
        assert_eq!(
            c.clusters[0].promote,
            Promote {
                after_bytes: Some(65536),
                after: None,
                max_rate: None,
            }
        );
        let c = Config::parse(&GOOD.replace("data_plane = \"copy\"", "max_connections = 500"))
            .expect("valid");
        assert_eq!(c.global.max_connections.map(NonZeroU32::get), Some(500));
    }

    #[test]
    fn semantic_problems_are_all_reported_with_lines() {
        let text = GOOD
            .replace("cluster = \"brokers\"", "cluster = \"nope\"")
            .replace("node2", "node1");
        let e = errors(&text);
        assert!(
            e.contains(
                &"line 9: listeners[0].cluster: no [[clusters]] entry is named \"nope\"".to_owned()
            ),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m
                    .starts_with("line 22: clusters[0].servers[1].name: duplicate server name")),
            "{e:?}"
        );
    }

    #[test]
    fn tls_problems_name_the_key() {
        let mqtts = GOOD.replace(
            "cluster = \"brokers\"\ninspect",
            "kind = \"mqtts\"\ncluster = \"brokers\"\ninspect",
        );
        let e = errors(&mqtts);
        assert!(
            e.iter()
                .any(|m| m.contains("listeners[0].tls: a TLS listener needs")),
            "{e:?}"
        );
        let missing = mqtts.replace(
            "inspect_timeout = \"250ms\"",
            "inspect_timeout = \"250ms\"\n[listeners.tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"",
        );
        let e = errors(&missing);
        assert!(
            e.iter().any(|m| m.contains(
                "listeners[0].tls.cert: cannot read certificates from /nonexistent/cert.pem"
            )),
            "{e:?}"
        );
        let plain_with_tls = missing.replace("kind = \"mqtts\"\n", "");
        let e = errors(&plain_with_tls);
        assert!(
            e.iter()
                .any(|m| m.contains("listeners[0].tls: only \"mqtts\" and \"wss\"")),
            "{e:?}"
        );
        let rewrite = GOOD.replace(
            "inspect_timeout = \"250ms\"",
            "inspect_timeout = \"250ms\"\n[listeners.rewrite]\nclient_id = \"cert.serial\"",
        );
        let e = errors(&rewrite);
        assert!(
            e.iter()
                .any(|m| m.contains("listeners[0].rewrite: needs client certificates")),
            "{e:?}"
        );
        let bad_field = rewrite.replace("cert.serial", "cert.colour");
        let e = errors(&bad_field);
        assert!(e.iter().any(|m| m.contains("client_id")), "{e:?}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn instance_name_must_be_a_safe_path_component() {
        let e = errors(&GOOD.replace("\"t1\"", "\"../x\""));
        assert!(e[0].starts_with("line 3: global.name:"), "{e:?}");
    }
}
