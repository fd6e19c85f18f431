//! Types shared by the eBPF programs and userspace: map names, value layouts, counter
//! indices and their names.
//!
//! The eBPF side is C (`lb-ebpf/src/*.h`); every struct here is mirrored there with the
//! same field order and a `_Static_assert` on its size. Layouts have no implicit padding
//! so that `bytemuck::Pod` holds; userspace gets `aya::Pod` through the `user` feature.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Root of the bpffs tree; an instance pins its maps under `PIN_ROOT/<name>/`.
pub const PIN_ROOT: &str = "/sys/fs/bpf/mqttlb";

/// Map names, as the C symbols spell them (aya finds maps by symbol name and pins them
/// under the same name).
pub mod maps {
    /// SOCKHASH, key = socket cookie: sockets whose received bytes the verdict program
    /// redirects (or, while its direction is throttled, passes to its own queue for the
    /// daemon to read: it never leaves the map until the pair ends).
    pub const SOURCES: &str = "sources";
    /// SOCKHASH, key = socket cookie: every spliced socket, as a redirect destination.
    pub const TARGETS: &str = "targets";
    /// HASH, key = socket cookie, value = [`crate::SockInfo`].
    pub const SOCKS: &str = "socks";
    /// HASH, key = connection id, value = [`crate::ConnInfo`].
    pub const CONNS: &str = "conns";
    /// PERCPU_ARRAY, index = [`crate::Stat`], value = u64: the BPF programs' counters.
    pub const STATS: &str = "stats";
    /// ARRAY, index = [`crate::DaemonStat`], value = u64: the daemon's counters,
    /// published here so that `mqttlb ctl stats` reads them without asking the daemon.
    pub const DAEMON_STATS: &str = "daemon_stats";
    /// RINGBUF of [`crate::Event`].
    pub const EVENTS: &str = "events";
    /// Socket cookie -> throttle word ([`crate::CTRL_THROTTLE`] | bytes consumed).
    pub const CTRL: &str = "ctrl";
    /// HASH, key = backend slot (u32), value = [`crate::BackendInfo`]: every server of
    /// every cluster as the daemon sees it, refreshed four times a second.
    pub const BACKENDS: &str = "backends";
    /// LRU_HASH, key = [`crate::StickyKey`], value = [`crate::StickyValue`]: the sticky
    /// table. Kept across daemon restarts (never unpinned by the daemon).
    pub const STICKY: &str = "sticky";

    /// Maps whose contents mean nothing once the daemon that filled them is gone
    /// (they describe its sockets, servers and counters, and their size can change
    /// between versions); a new daemon removes their pins before loading.
    pub const PER_PROCESS: [&str; 9] = [
        SOURCES,
        TARGETS,
        SOCKS,
        CTRL,
        CONNS,
        EVENTS,
        BACKENDS,
        STATS,
        DAEMON_STATS,
    ];
}

/// Name of the verdict program (the C function name).
pub const VERDICT_PROGRAM: &str = "mqttlb_verdict";
/// `volatile const` global: redirected bytes per direction between two lag checks.
pub const LAG_STEP_GLOBAL: &str = "lag_check_step";

/// Capacity of the `conns` map; `socks` and the sockhashes hold two entries per
/// connection.
pub const MAX_SPLICED: u32 = 262_144;

/// Capacity of the `backends` map (servers of all clusters together).
pub const MAX_BACKENDS: u32 = 4096;

/// Direction of a byte stream, as stored in [`SockInfo::dir`].
pub const DIR_CLIENT_TO_SERVER: u32 = 0;
/// Server to client.
pub const DIR_SERVER_TO_CLIENT: u32 = 1;

/// Bit of a `ctrl` map value asking the program to pass a socket's bytes to its own
/// queue instead of redirecting them; the low 63 bits count the passed bytes the
/// daemon has forwarded. The program redirects again only when the bit is clear and
/// that count equals [`SockInfo::passed`] (see `lb-ebpf/src/splice.bpf.c`).
pub const CTRL_THROTTLE: u64 = 1 << 63;
/// Bit of a `ctrl` map value asking the program to end a socket's stream at the next
/// MQTT packet boundary (evacuation of a spliced MQTT 5 connection), honoured with
/// [`CTRL_THROTTLE`] (the daemon forwards the bytes itself) on sockets with
/// [`SOCK_TRACK_MQTT`]: the skb that holds the boundary is passed and
/// [`SockInfo::evict_end`] says where in the passed bytes the stream ends; every
/// later skb is dropped; [`EVENT_EVICT_CUT`] is sent.
pub const CTRL_EVICT: u64 = 1 << 62;

/// Per spliced socket, keyed by its cookie: where its bytes go and how many went.
///
/// `bytes`/`packets` count what the verdict program redirected *from* this socket to
/// its peer, so they are the byte count of one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockInfo {
    /// Cookie of the peer socket (the key in `targets`).
    pub peer_cookie: u64,
    /// Bytes redirected from this socket to the peer.
    pub bytes: u64,
    /// Skbs redirected from this socket to the peer.
    pub packets: u64,
    /// Value of `bytes` when the last lag-check event was sent.
    pub checked: u64,
    /// Bytes passed to this socket's own queue (throttled) for the daemon to forward.
    pub passed: u64,
    /// Bytes cut from the head of retransmissions that overlapped bytes already
    /// carried (see `lb-ebpf/src/splice.bpf.c`).
    pub trimmed: u64,
    /// Connection id (key of `conns`).
    pub conn_id: u32,
    /// [`DIR_CLIENT_TO_SERVER`] or [`DIR_SERVER_TO_CLIENT`].
    pub dir: u32,
    /// TCP sequence number of the next byte the program has not seen (program-owned).
    pub next_seq: u32,
    /// Flags: [`SOCK_SEQ_KNOWN`], [`SOCK_EVICT_CUT`] (program-owned),
    /// [`SOCK_TRACK_MQTT`] (set by the daemon at insertion).
    pub flags: u32,
    /// With [`SOCK_TRACK_MQTT`]: where the MQTT packets verdicted so far stand, packed
    /// as `lb_user::mqtt::boundary::Boundary` (0: between two packets).
    pub mqtt: u64,
    /// With [`SOCK_EVICT_CUT`]: passed bytes before the cut (the daemon forwards
    /// those and no more).
    pub evict_end: u64,
}
const _: () = assert!(core::mem::size_of::<SockInfo>() == 80);

/// `SockInfo::flags`: `next_seq` has been seeded.
pub const SOCK_SEQ_KNOWN: u32 = 1;
/// `SockInfo::flags`: follow MQTT packet boundaries in this socket's bytes.
pub const SOCK_TRACK_MQTT: u32 = 2;
/// `SockInfo::flags`: the stream was cut at a boundary for an eviction ([`CTRL_EVICT`]).
pub const SOCK_EVICT_CUT: u32 = 4;

/// Immediate of the raw kfunc call in the verdict program; the loader replaces it with
/// the BTF id of `bpf_cast_to_kern_ctx` (aya 0.14 does not resolve kfuncs).
pub const KFUNC_PLACEHOLDER: u32 = 0x7ead_beef;

/// Per spliced connection: who talks to whom. Written once by the daemon at hand-off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ConnInfo {
    /// Client address, IPv6 or IPv4-mapped IPv6, network byte order.
    pub client_addr: [u8; 16],
    /// Server address, same encoding.
    pub server_addr: [u8; 16],
    /// Cookie of the client socket (key in `socks`).
    pub client_cookie: u64,
    /// Cookie of the server socket (key in `socks`).
    pub server_cookie: u64,
    /// Wall-clock seconds since the epoch at hand-off.
    pub started_unix: u64,
    /// Client port, host byte order.
    pub client_port: u16,
    /// Server port, host byte order.
    pub server_port: u16,
    /// Index of the server in its cluster.
    pub server_index: u32,
    /// [`CONN_THROTTLED_C2S`] | [`CONN_THROTTLED_S2C`].
    pub flags: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ConnInfo>() == 72);

/// `ConnInfo::flags`: client-to-server direction is throttled (the program passes the
/// client's skbs to its own queue; the socket stays in `sources`).
pub const CONN_THROTTLED_C2S: u32 = 1;
/// `ConnInfo::flags`: server-to-client direction is throttled.
pub const CONN_THROTTLED_S2C: u32 = 2;

/// `BackendInfo::state`: takes new connections.
pub const BACKEND_UP: u8 = 0;
/// `BackendInfo::state`: draining (keeps its connections, takes no new ones).
pub const BACKEND_DRAIN: u8 = 1;
/// `BackendInfo::state`: administratively down.
pub const BACKEND_DOWN: u8 = 2;
/// `BackendInfo::flags`: a backup server.
pub const BACKEND_BACKUP: u8 = 1;
/// `BackendInfo::flags`: the active health check has it down.
pub const BACKEND_HEALTH_DOWN: u8 = 2;
/// `BackendInfo::flags`: passively failed (`max_fails` within `fail_timeout`).
pub const BACKEND_FAILED: u8 = 4;
/// `BackendInfo::flags`: at its `max_connections`.
pub const BACKEND_FULL: u8 = 8;
/// `BackendInfo::flags`: state or weight changed at runtime (admin API or `ctl`),
/// overriding the file.
pub const BACKEND_OVERRIDDEN: u8 = 16;

/// One server as the daemon sees it (`backends` map; written by the daemon only).
/// Names are NUL-padded UTF-8, cut at 32 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendInfo {
    /// Cluster name.
    pub cluster: [u8; 32],
    /// Server name.
    pub name: [u8; 32],
    /// Server address, IPv6 or IPv4-mapped IPv6, network byte order.
    pub addr: [u8; 16],
    /// Server port, host byte order.
    pub port: u16,
    /// [`BACKEND_UP`], [`BACKEND_DRAIN`] or [`BACKEND_DOWN`] (configured state).
    pub state: u8,
    /// `BACKEND_*` flags.
    pub flags: u8,
    /// Configured weight.
    pub weight: u32,
    /// Connections open now.
    pub active: u32,
    /// Configured `max_connections` (0: none).
    pub max_connections: u32,
    /// Connections handed to this server since the daemon started.
    pub connections: u64,
    /// Bytes client to server (counted as they are carried; spliced bytes when the
    /// connection closes).
    pub bytes_c2s: u64,
    /// Bytes server to client.
    pub bytes_s2c: u64,
    /// Failed connects.
    pub connect_failures: u64,
    /// Health state changes (up to down and back).
    pub health_flips: u64,
}
const _: () = assert!(core::mem::size_of::<BackendInfo>() == 136);

/// Bytes of a sticky key stored verbatim; longer keys are stored as their first
/// [`STICKY_PREFIX_LEN`] bytes followed by their SHA-256.
pub const STICKY_KEY_LEN: usize = 64;
/// Verbatim prefix of a hashed sticky key.
pub const STICKY_PREFIX_LEN: usize = 32;
/// `StickyKey::kind`: MQTT client id.
pub const STICKY_CLIENT_ID: u8 = 1;
/// `StickyKey::kind`: MQTT username.
pub const STICKY_USERNAME: u8 = 2;
/// `StickyKey::kind`: client address (16 bytes, IPv4-mapped for IPv4).
pub const STICKY_SOURCE: u8 = 3;

/// Key of the sticky table. Keys up to [`STICKY_KEY_LEN`] bytes are exact; a longer
/// one is its prefix plus its SHA-256 (`hashed` = 1), so two keys collide only if
/// they share the prefix, the length and the hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct StickyKey {
    /// FNV-1a of the cluster name: clusters have separate tables in one map.
    pub cluster: u32,
    /// `STICKY_CLIENT_ID`, `STICKY_USERNAME` or `STICKY_SOURCE`.
    pub kind: u8,
    /// 1 when `key` holds a prefix and a hash.
    pub hashed: u8,
    /// Length of the original key in bytes (saturating at 65535).
    pub len: u16,
    /// Key bytes, zero-padded.
    pub key: [u8; STICKY_KEY_LEN],
}
const _: () = assert!(core::mem::size_of::<StickyKey>() == 72);

/// Value of the sticky table: the server a key goes to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct StickyValue {
    /// Server address, IPv6 or IPv4-mapped IPv6, network byte order (a server keeps
    /// its entries across reloads that re-order or rename servers).
    pub server_addr: [u8; 16],
    /// Server port, host byte order.
    pub server_port: u16,
    /// Explicit padding; always zero.
    pub _pad: u16,
    /// Index of the server in its cluster when the entry was written.
    pub server_index: u32,
    /// Last use, milliseconds since the Unix epoch.
    pub last_used_ms: u64,
    /// Expiry (last use + `sticky_expire`), milliseconds since the Unix epoch.
    pub expires_ms: u64,
}
const _: () = assert!(core::mem::size_of::<StickyValue>() == 40);

/// A ring-buffer record from the BPF programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Event {
    /// One of the `EVENT_*` constants.
    pub kind: u32,
    /// Connection id.
    pub conn_id: u32,
    /// Direction the event is about.
    pub dir: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
    /// Bytes redirected in that direction so far.
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Event>() == 24);

/// Event: a direction redirected another `lag_check_step` bytes; check its lag.
pub const EVENT_LAG_CHECK: u32 = 1;
/// Event: a redirect failed because the peer socket is gone.
pub const EVENT_PEER_GONE: u32 = 2;
/// Event: an overlapping retransmission could not be cut; the stream cannot be
/// carried exactly and the connection must be reset.
pub const EVENT_STREAM_BROKEN: u32 = 3;
/// Event: the socket received the peer's FIN (alone, or with the last data): the daemon
/// reads it to EOF. Spliced sockets' readability is not watched, so this is how the
/// daemon learns of it.
pub const EVENT_FIN: u32 = 4;
/// Event: an skb was passed to the socket's own queue after the daemon's last read (the
/// program catches up on passed bytes before it redirects again): read again.
pub const EVENT_PASSED: u32 = 5;
/// Event: the stream of a socket asked to [`CTRL_EVICT`] was cut at a packet boundary;
/// `bytes` is [`SockInfo::evict_end`].
pub const EVENT_EVICT_CUT: u32 = 6;

macro_rules! counters {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $idx:literal => $label:literal,)* }) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($(#[$vmeta])* $variant = $idx,)* }

        impl $name {
            /// Every counter, in index order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];
            /// Number of counters (the map's `max_entries`).
            pub const COUNT: u32 = [$($idx,)*].len() as u32;
            /// Stable name used by `mqttlb ctl stats` and the metrics.
            pub const fn name(self) -> &'static str {
                match self { $($name::$variant => $label,)* }
            }
        }
    };
}

counters! {
    /// Counters bumped by the BPF programs (indices of the `stats` map, mirrored in
    /// `lb_consts.h`). Every early return of a program bumps one.
    Stat {
        /// Skb redirected to the peer socket.
        Redirected = 0 => "bpf_redirected",
        /// Zero-length skb (a FIN): dropped; userspace sees EOF from TCP state.
        FinDropped = 1 => "bpf_fin_dropped",
        /// Socket has no `socks` entry: bytes passed to its own receive queue.
        UnknownSocket = 2 => "bpf_unknown_socket",
        /// Peer not in `targets` (closed): bytes dropped.
        PeerGone = 3 => "bpf_peer_gone",
        /// Lag-check event emitted.
        LagEvent = 4 => "bpf_lag_events",
        /// Ring buffer full: event lost (userspace also polls throttled pairs).
        EventDropped = 5 => "bpf_events_dropped",
        /// Skbs left in their socket's queue for the daemon (throttled direction).
        Passed = 6 => "bpf_passed_throttled",
        /// Retransmissions overlapping bytes already carried: the overlap was cut.
        OverlapTrimmed = 7 => "bpf_overlap_trimmed",
        /// Skbs holding only bytes already carried: dropped.
        DuplicateDropped = 8 => "bpf_duplicate_dropped",
        /// Overlap that could not be cut: skb dropped, connection reset.
        StreamBroken = 9 => "bpf_stream_broken",
    }
}

counters! {
    /// Counters kept by the daemon and published in the `daemon_stats` map.
    DaemonStat {
        /// Connections accepted on all listeners.
        Accepted = 0 => "accepted",
        /// Connections currently open (gauge).
        Active = 1 => "active",
        /// First packet was not a valid CONNECT.
        RejectedInvalid = 2 => "rejected_invalid_connect",
        /// No complete first packet within `inspect_timeout`.
        RejectedTimeout = 3 => "rejected_inspect_timeout",
        /// Client closed before sending a complete first packet.
        RejectedEof = 4 => "rejected_client_eof",
        /// No server could take the connection (CONNACK refusal sent).
        NoServer = 5 => "rejected_no_server",
        /// Failed attempts to connect to a server.
        ServerConnectFailed = 6 => "server_connect_failures",
        /// Connections handed to the sockmap data plane.
        Spliced = 7 => "spliced",
        /// Connections carried by the copy data plane.
        Copied = 8 => "copied",
        /// Sockmap refused a socket (e.g. CLOSE_WAIT): carried by copy instead.
        SpliceFallback = 9 => "splice_fallback_to_copy",
        /// A direction was throttled because its peer did not read.
        Throttled = 10 => "splice_throttled",
        /// Half-closes propagated (FIN forwarded after all bytes).
        HalfClosed = 11 => "half_closes",
        /// Connections ended by a reset or error on either side.
        Aborted = 12 => "aborted",
        /// Connections closed by `idle_timeout`.
        IdleTimeout = 13 => "idle_timeouts",
        /// Connections closed normally.
        Closed = 14 => "closed",
        /// Bytes carried client to server by userspace (copy plane and hand-off).
        CopiedBytesC2s = 15 => "copied_bytes_c2s",
        /// Bytes carried server to client by userspace.
        CopiedBytesS2c = 16 => "copied_bytes_s2c",
        /// Config reloads applied.
        Reloads = 17 => "reloads",
        /// Config reloads refused (bad config; the old one keeps running).
        ReloadFailures = 18 => "reload_failures",
        /// Tokio tasks alive in the daemon (gauge; leak detector).
        TasksAlive = 19 => "tasks_alive",
        /// Spliced connection pairs currently in the BPF maps (gauge).
        SplicedActive = 20 => "spliced_active",
        /// Listeners with `accept_proxy_protocol`: no valid PROXY header came first.
        RejectedProxy = 21 => "rejected_proxy_header",
        /// Invalid first packets by reason (each is also in `rejected_invalid_connect`):
        /// not a CONNECT, or fixed-header flags not 0.
        InvalidNotConnect = 22 => "invalid_not_connect",
        /// Remaining length over 4 bytes.
        InvalidRemainingLength = 23 => "invalid_remaining_length",
        /// Larger than the listener's `max_connect_size`.
        InvalidTooLarge = 24 => "invalid_too_large",
        /// Unknown protocol name or level.
        InvalidProtocol = 25 => "invalid_protocol",
        /// Connect flags against the specification.
        InvalidFlags = 26 => "invalid_flags",
        /// A string not well-formed UTF-8 or holding U+0000.
        InvalidUtf8 = 27 => "invalid_utf8",
        /// An MQTT 5 property unknown, misplaced, duplicated or out of range.
        InvalidProperty = 28 => "invalid_property",
        /// Field lengths that do not match the remaining length.
        InvalidLength = 29 => "invalid_length",
        /// Servers changing health state (up to down or back), by any check.
        HealthFlips = 30 => "health_flips",
        /// Connections sent to the server their sticky entry named.
        StickyHits = 31 => "sticky_hits",
        /// Sticky entries created (no entry, or an expired one).
        StickyNew = 32 => "sticky_new",
        /// Sticky entries replaced because their server was unusable or removed.
        StickyReplaced = 33 => "sticky_replaced",
        /// Sticky table writes the kernel refused (the connection goes on unsticky).
        StickyErrors = 34 => "sticky_errors",
        /// TLS handshakes completed.
        TlsHandshakes = 35 => "tls_handshakes",
        /// Of those, sessions resumed (ticket or cache).
        TlsResumed = 36 => "tls_resumed",
        /// TLS handshakes that failed (not TLS, bad or missing client certificate,
        /// no common version or ALPN...).
        TlsHandshakeFailures = 37 => "tls_handshake_failures",
        /// TLS handshakes not finished within `handshake_timeout`.
        TlsHandshakeTimeouts = 38 => "tls_handshake_timeouts",
        /// `[listeners.rewrite]`: the certificate lacks the field, or the CONNECT
        /// cannot take it; the connection is closed.
        RewriteFailed = 39 => "rewrite_failed",
        /// WebSocket upgrades answered with `101`.
        WsUpgrades = 40 => "ws_upgrades",
        /// HTTP requests that were not a proper upgrade on the listener's path
        /// (answered with an HTTP error).
        WsRejectedHttp = 41 => "ws_rejected_http",
        /// Client frames before the CONNECT that were unmasked, not binary, or too large.
        WsBadFrames = 42 => "ws_bad_frames",
        /// Servers that did not answer the forwarded upgrade with a matching `101`.
        WsServerRefused = 43 => "ws_server_refused",
        /// Clients closed before the CONNECT for passing a per-connection cap: bytes
        /// buffered or WebSocket frames (a ping flood, say).
        RejectedOversize = 44 => "rejected_oversize",
        /// Clients closed before the CONNECT because every connection's pre-CONNECT
        /// buffers together reached `[global] max_preconnect_bytes`.
        RejectedBudget = 45 => "rejected_preconnect_budget",
        /// Clients refused (CONNACK "server unavailable") because a local resource ran
        /// out (descriptors, buffers, source ports), not because of a server.
        RejectedLocalResource = 46 => "rejected_local_resource",
        /// Local resource errors seen (EMFILE, ENFILE, ENOBUFS, ENOMEM, EADDRNOTAVAIL) on
        /// accept, server connects and health checks; never counted against a server.
        LocalResourceErrors = 47 => "local_resource_errors",
        /// Times the accept loops found `max_connections` connections open and waited.
        MaxConnectionsReached = 48 => "max_connections_reached",
        /// `auto`: connections moved from the copy plane to the splice (also counted
        /// in `copied` and `spliced`).
        Promoted = 49 => "promoted",
        /// `auto`: promotions by age put off because the connection was busy (more
        /// than its cluster's `promote_max_rate` reads a second): it stays on the copy
        /// plane and is looked at again one `promote_after` later.
        PromotionDeferred = 50 => "promotion_deferred_busy",
        /// Bytes the splice carried client to server in the kernel (the process never
        /// read them), counted as the daemon looks at its pairs.
        SplicedBytesC2s = 51 => "spliced_bytes_c2s",
        /// Bytes the splice carried server to client in the kernel.
        SplicedBytesS2c = 52 => "spliced_bytes_s2c",
        /// Connections closed by an evacuation (API, `ctl evacuate`, SIGTERM).
        Evicted = 53 => "evicted",
        /// Of those, MQTT 5 clients sent DISCONNECT 0x9C (Use another server) at a
        /// packet boundary first.
        EvictedDisconnect = 54 => "evicted_disconnect_sent",
        /// Refused: the source address had `max_connections_per_source` open
        /// (CONNACK 0x97 Quota exceeded / 3).
        LimitSourceConnections = 55 => "limit_source_connections",
        /// Refused: over `connect_rate_per_source` (CONNACK 0x9F / 3).
        LimitSourceRate = 56 => "limit_source_rate",
        /// Refused: the client id reconnected over `connect_rate_per_client_id`.
        LimitClientIdRate = 57 => "limit_client_id_rate",
        /// Refused: `new_connection_rate`'s queue was full (CONNACK 0x9F / 3).
        LimitNewConnectionRate = 58 => "limit_new_connection_rate",
        /// Connections that waited for `new_connection_rate` before reaching a server.
        LimitDelayed = 59 => "limit_delayed",
        /// `auto`: spliced connections moved back to the copy plane because the
        /// splice stopped paying (a throttle, or more than `promote_max_rate` skbs a
        /// second); they stay there (also counted in `copied`).
        Demoted = 60 => "demoted",
        /// `auto`: promotions by age put off because the connection was quiet (fewer
        /// than its cluster's `promote_min_rate` reads a second): it stays on the
        /// copy plane and is looked at again one `promote_after` later.
        PromotionDeferredIdle = 61 => "promotion_deferred_idle",
        /// `auto`: promotions of busy conversations (also counted in `promoted`):
        /// reads each one whole MQTT packet answered from the other side, promoted
        /// at once where promotion by age would put them off as busy (see the
        /// cluster's `promote_conversations`).
        PromotedConversation = 62 => "promoted_conversation",
    }
}

/// Per source address in the guard's `guard_sources` LRU hash (see
/// `lb-ebpf/src/guard.bpf.c`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct GuardSource {
    /// GCRA: theoretical arrival time of the source's next SYN (ktime ns).
    pub tat_ns: u64,
    /// SYNs seen to a guarded port.
    pub syns: u64,
    /// Packets dropped (denied, or SYNs over the rate).
    pub dropped: u64,
    /// Last SYN or drop (ktime ns).
    pub last_ns: u64,
}

const _: () = assert!(core::mem::size_of::<GuardSource>() == 32);

/// The guard's SYN rate (`guard_conf[0]`): GCRA interval and burst tolerance.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct GuardConf {
    /// 1e9 / `syn_rate`; 0: SYNs are not limited.
    pub interval_ns: u64,
    /// (`syn_burst` - 1) * `interval_ns`.
    pub tolerance_ns: u64,
}

const _: () = assert!(core::mem::size_of::<GuardConf>() == 16);

/// The guard's counters (`guard_stats`, per CPU), by index, as `ctl guard` and
/// `/metrics` name them.
pub const GUARD_STATS: [&str; 6] = [
    "inspected",
    "allowed",
    "denied",
    "syn_limited",
    "syn_passed",
    "unparsed",
];

/// Map names of the guard program.
pub mod guard_maps {
    /// LPM trie of denied sources (IPv4 mapped into IPv6).
    pub const DENY: &str = "guard_deny";
    /// LPM trie of allowed sources (never dropped).
    pub const ALLOW: &str = "guard_allow";
    /// Guarded TCP ports.
    pub const PORTS: &str = "guard_ports";
    /// Per source: SYN rate state and counts (LRU).
    pub const SOURCES: &str = "guard_sources";
    /// The SYN rate.
    pub const CONF: &str = "guard_conf";
    /// Counters, per CPU.
    pub const STATS: &str = "guard_stats";
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data with no padding, checked by the size asserts above.
    unsafe impl aya::Pod for super::GuardSource {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GuardConf {}
    // SAFETY: plain-old-data with no padding, checked by the size asserts above.
    unsafe impl aya::Pod for super::SockInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BackendInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StickyKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StickyValue {}
}
