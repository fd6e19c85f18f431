//! The file as written: `Raw*` structs that mirror it (unknown keys refused, spans
//! kept for error lines) and the defaults of every key. [`super::check`] turns them
//! into the typed configuration.

use std::{num::NonZeroU32, path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::{Balance, DataPlaneKind, HealthKind, ListenerKind, ProxyProtocol, ServerState, Sticky};

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) global: RawGlobal,
    pub(super) stats: Option<RawStats>,
    pub(super) admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    pub(super) listeners: Vec<RawListener>,
    #[serde(default)]
    pub(super) clusters: Vec<RawCluster>,
    pub(super) guard: Option<Spanned<RawGuard>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGuard {
    #[serde(default)]
    pub(super) interfaces: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) deny: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) syn_rate: u32,
    pub(super) syn_burst: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGlobal {
    #[serde(default = "default_name")]
    pub(super) name: Spanned<String>,
    #[serde(default = "default_data_plane")]
    pub(super) data_plane: DataPlaneKind,
    pub(super) max_connections: Option<NonZeroU32>,
    #[serde(default = "default_max_preconnect_bytes")]
    pub(super) max_preconnect_bytes: Spanned<u64>,
    #[serde(default = "default_shutdown_delay")]
    pub(super) shutdown_delay: Dur,
    #[serde(default = "default_shutdown_grace")]
    pub(super) shutdown_grace: Dur,
    pub(super) user: Option<Spanned<String>>,
    pub(super) group: Option<Spanned<String>>,
    pub(super) workers: Option<Spanned<RawWorkers>>,
}

/// `workers`: a count, or `"auto"` (one per core); any other word is an error
/// checked by name.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub(super) enum RawWorkers {
    Count(i64),
    Word(String),
}

impl Default for RawGlobal {
    fn default() -> Self {
        Self {
            name: default_name(),
            data_plane: default_data_plane(),
            max_connections: None,
            max_preconnect_bytes: default_max_preconnect_bytes(),
            shutdown_delay: default_shutdown_delay(),
            shutdown_grace: default_shutdown_grace(),
            user: None,
            group: None,
            workers: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) bind: Spanned<String>,
    pub(super) token_file: Option<Spanned<PathBuf>>,
    pub(super) tls: Option<Spanned<RawTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStats {
    pub(super) bind: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) name: Spanned<String>,
    pub(super) bind: Spanned<String>,
    #[serde(default = "default_listener_kind")]
    pub(super) kind: Spanned<ListenerKind>,
    pub(super) cluster: Option<Spanned<String>>,
    #[serde(default = "default_inspect_timeout")]
    pub(super) inspect_timeout: Dur,
    #[serde(default = "default_false")]
    pub(super) accept_proxy_protocol: Spanned<bool>,
    #[serde(default)]
    pub(super) access_log: bool,
    #[serde(default = "default_max_connect_size")]
    pub(super) max_connect_size: Spanned<u32>,
    pub(super) max_frame_size: Option<Spanned<u32>>,
    pub(super) tls: Option<Spanned<RawTls>>,
    pub(super) rewrite: Option<Spanned<RawRewrite>>,
    pub(super) path: Option<Spanned<String>>,
    pub(super) max_connections_per_source: Option<Spanned<u32>>,
    pub(super) connect_rate_per_source: Option<Spanned<f64>>,
    pub(super) connect_burst_per_source: Option<Spanned<u32>>,
    pub(super) new_connection_rate: Option<Spanned<f64>>,
    pub(super) new_connection_queue: Option<Spanned<u32>>,
    pub(super) connect_rate_per_client_id: Option<Spanned<f64>>,
    pub(super) connect_burst_per_client_id: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    #[serde(default)]
    pub(super) certs: Vec<RawSniCert>,
    pub(super) client_ca: Option<PathBuf>,
    pub(super) verify: Option<crate::tls::Verify>,
    pub(super) crl: Option<PathBuf>,
    #[serde(default = "default_min_version")]
    pub(super) min_version: crate::tls::MinVersion,
    #[serde(default = "default_session_cache_size")]
    pub(super) session_cache_size: usize,
    #[serde(default = "default_true")]
    pub(super) session_tickets: bool,
    #[serde(default = "default_handshake_timeout")]
    pub(super) handshake_timeout: Dur,
    #[serde(default = "default_max_handshakes")]
    pub(super) max_handshakes: NonZeroU32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSniCert {
    pub(super) server_names: Vec<String>,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRewrite {
    pub(super) client_id: Option<crate::tls::CertField>,
    pub(super) username: Option<crate::tls::CertField>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) name: Spanned<String>,
    #[serde(default = "default_balance")]
    pub(super) balance: Spanned<Balance>,
    #[serde(default = "default_empty_client_id")]
    pub(super) empty_client_id: Spanned<Balance>,
    #[serde(default = "default_sticky")]
    pub(super) sticky: Spanned<Sticky>,
    #[serde(default = "default_sticky_expire")]
    pub(super) sticky_expire: Dur,
    #[serde(default = "default_sticky_table_size")]
    pub(super) sticky_table_size: NonZeroU32,
    #[serde(default = "default_proxy_protocol")]
    pub(super) proxy_protocol: ProxyProtocol,
    #[serde(default = "default_connect_timeout")]
    pub(super) connect_timeout: Dur,
    #[serde(default = "default_idle_timeout")]
    pub(super) idle_timeout: Dur,
    pub(super) promote_after_bytes: Option<u64>,
    #[serde(default = "default_promote_after")]
    pub(super) promote_after: Option<Dur>,
    #[serde(default = "default_promote_max_rate")]
    pub(super) promote_max_rate: u64,
    #[serde(default)]
    pub(super) promote_min_rate: u64,
    #[serde(default = "default_true")]
    pub(super) promote_conversations: bool,
    #[serde(default = "default_evict_rate")]
    pub(super) evict_rate: u32,
    pub(super) server_reference: Option<String>,
    #[serde(default)]
    pub(super) health: RawHealth,
    #[serde(default)]
    pub(super) source_addresses: Vec<std::net::IpAddr>,
    #[serde(default)]
    pub(super) servers: Vec<RawServer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    #[serde(default = "default_health_kind")]
    pub(super) kind: HealthKind,
    #[serde(default = "default_health_interval")]
    pub(super) interval: Dur,
    #[serde(default = "default_health_timeout")]
    pub(super) timeout: Dur,
    #[serde(default = "default_rise_fall")]
    pub(super) rise: NonZeroU32,
    #[serde(default = "default_rise_fall")]
    pub(super) fall: NonZeroU32,
    pub(super) client_id: Option<String>,
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
pub(super) struct RawServer {
    pub(super) name: Spanned<String>,
    pub(super) address: Spanned<String>,
    #[serde(default = "default_weight")]
    pub(super) weight: NonZeroU32,
    #[serde(default)]
    pub(super) backup: bool,
    #[serde(default = "default_server_state")]
    pub(super) state: ServerState,
    #[serde(default = "default_max_fails")]
    pub(super) max_fails: u32,
    #[serde(default = "default_fail_timeout")]
    pub(super) fail_timeout: Dur,
    pub(super) max_connections: Option<NonZeroU32>,
    pub(super) ws_address: Option<Spanned<String>>,
}

pub(super) fn default_name() -> Spanned<String> {
    Spanned::new(0..0, "default".to_owned())
}
pub(super) fn default_data_plane() -> DataPlaneKind {
    DataPlaneKind::Auto
}
fn default_shutdown_delay() -> Dur {
    Dur(Duration::ZERO)
}
fn default_shutdown_grace() -> Dur {
    Dur(Duration::from_secs(5))
}
pub(super) fn default_max_preconnect_bytes() -> Spanned<u64> {
    Spanned::new(0..0, 64 << 20)
}
pub(super) fn default_max_frame_size() -> Spanned<u32> {
    Spanned::new(0..0, 1 << 20)
}
pub(super) fn default_listener_kind() -> Spanned<ListenerKind> {
    Spanned::new(0..0, ListenerKind::Mqtt)
}
pub(super) fn default_inspect_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
pub(super) fn default_false() -> Spanned<bool> {
    Spanned::new(0..0, false)
}
pub(super) fn default_max_connect_size() -> Spanned<u32> {
    Spanned::new(0..0, 64 * 1024)
}
pub(super) fn default_min_version() -> crate::tls::MinVersion {
    crate::tls::MinVersion::Tls12
}
pub(super) fn default_session_cache_size() -> usize {
    20_480
}
pub(super) fn default_true() -> bool {
    true
}
pub(super) fn default_handshake_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
pub(super) fn default_max_handshakes() -> NonZeroU32 {
    NonZeroU32::new(1024).expect("non-zero")
}
pub(super) fn default_empty_client_id() -> Spanned<Balance> {
    Spanned::new(0..0, Balance::LeastConn)
}
pub(super) fn default_balance() -> Spanned<Balance> {
    Spanned::new(0..0, Balance::RoundRobin)
}
pub(super) fn default_sticky() -> Spanned<Sticky> {
    Spanned::new(0..0, Sticky::None)
}
pub(super) fn default_sticky_expire() -> Dur {
    Dur(Duration::from_secs(30 * 60))
}
pub(super) fn default_sticky_table_size() -> NonZeroU32 {
    NonZeroU32::new(100_000).expect("non-zero")
}
pub(super) fn default_proxy_protocol() -> ProxyProtocol {
    ProxyProtocol::None
}
pub(super) fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
/// Reads a second (both directions) above which a connection is too busy to promote
/// by age: measured, the splice loses to the copy plane on pipelined streams and bulk
/// transfers (docs/ARCHITECTURE.md, "Choosing a plane").
pub const DEFAULT_PROMOTE_MAX_RATE: u64 = 1000;
pub(super) fn default_promote_max_rate() -> u64 {
    DEFAULT_PROMOTE_MAX_RATE
}
/// Connections a second that evacuation closes (EMQX's `--conn-evict-rate` default).
pub(super) fn default_evict_rate() -> u32 {
    500
}

pub(super) fn default_promote_after() -> Option<Dur> {
    Some(Dur(Duration::from_secs(10)))
}
pub(super) fn default_idle_timeout() -> Dur {
    Dur(Duration::from_secs(30 * 60))
}
pub(super) fn default_health_kind() -> HealthKind {
    HealthKind::Tcp
}
pub(super) fn default_health_interval() -> Dur {
    Dur(Duration::from_secs(2))
}
pub(super) fn default_health_timeout() -> Dur {
    Dur(Duration::from_secs(1))
}
pub(super) fn default_rise_fall() -> NonZeroU32 {
    NonZeroU32::new(2).expect("non-zero")
}
pub(super) fn default_weight() -> NonZeroU32 {
    NonZeroU32::MIN
}
pub(super) fn default_server_state() -> ServerState {
    ServerState::Up
}
pub(super) fn default_max_fails() -> u32 {
    1
}
pub(super) fn default_fail_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
