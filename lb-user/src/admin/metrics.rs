//! `GET /metrics`: the daemon's state in the Prometheus exposition format
//! (`prometheus-client`), built at each scrape from the counters the daemon keeps
//! anyway: nothing on the connection path exists for the metrics alone.
//!
//! Names: `mqttlb_connections_active`, `mqttlb_connections_accepted_total`,
//! `mqttlb_connections_ended_total{reason}`, `mqttlb_connect_rejected_total{reason}`,
//! `mqttlb_bytes_total{direction,plane}` (`plane="kernel"` for bytes the splice
//! carried without the process, `"userspace"` for the rest); per server
//! `mqttlb_server_up`, `mqttlb_server_draining`, `mqttlb_server_weight`,
//! `mqttlb_server_connections_active`, `mqttlb_server_connections_total`,
//! `mqttlb_server_bytes_total{direction}`, `mqttlb_server_connect_failures_total`,
//! `mqttlb_server_health_flips_total`; `mqttlb_sticky_lookups_total{result}`,
//! `mqttlb_sticky_entries`, `mqttlb_tls_handshakes_total{result}`,
//! `mqttlb_connections_total{listener,cluster,server,result}` (at each end); the histograms
//! `mqttlb_server_reached_seconds`, `mqttlb_connect_duration_seconds` (accept to the
//! server's CONNACK; both, and `mqttlb_connections_total`, added up over workers) and
//! `mqttlb_health_check_duration_seconds{cluster, server}` (kept in `Stats`, observed
//! where the durations end); every other
//! daemon counter as `mqttlb_<name>_total` (gauges without `_total`), and the splice
//! program's as `mqttlb_bpf_<name>_total`.

use std::time::Instant;

use lb_common::DaemonStat as D;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    runtime::Shared,
    stats::{Observed, ServerLabels},
    views::{BackendView, Totals},
};

/// The exposition format `encode` writes, served to scrapers that accept it
/// (Prometheus asks for it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The classic Prometheus text format, served to everyone else (`curl`, `promtool
/// check metrics`, older scrapers): see [`text_format`].
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text as the classic text format 0.0.4: a counter's `HELP` and `TYPE`
/// name its samples (`x_total`, where OpenMetrics names the family `x`), and the
/// OpenMetrics-only lines (`# UNIT`, `# EOF`) go. Everything else is the same.
pub fn text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# EOF") || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let total = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out += &format!("{prefix}{name}{total} {tail}");
            }
            None => out += line,
        }
        out.push('\n');
    }
    out
}

type Labels = Vec<(&'static str, String)>;

/// A registry being filled for one scrape.
struct Scrape(Registry);

impl Scrape {
    fn counter(&mut self, name: &str, help: &str, value: u64) {
        let c: Counter = Counter::default();
        c.inc_by(value);
        self.0.register(name, help, c);
    }

    fn gauge(&mut self, name: &str, help: &str, value: u64) {
        let g: Gauge = Gauge::default();
        g.set(i64::try_from(value).unwrap_or(i64::MAX));
        self.0.register(name, help, g);
    }

    /// A counter family with a sample per label set.
    fn counters(&mut self, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, u64)>) {
        let f = Family::<Labels, Counter>::default();
        for (labels, v) in rows {
            f.get_or_create(&labels).inc_by(v);
        }
        self.0.register(name, help, f);
    }

    /// A gauge family with a sample per label set.
    fn gauges(&mut self, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, u64)>) {
        let f = Family::<Labels, Gauge>::default();
        for (labels, v) in rows {
            f.get_or_create(&labels)
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
        self.0.register(name, help, f);
    }
}

/// One label.
fn label(key: &'static str, value: &str) -> Labels {
    vec![(key, value.to_owned())]
}

/// Daemon counters shown in a labelled family, not again on their own.
const LABELLED: &[D] = &[
    D::Accepted,
    // Per server: mqttlb_server_connect_failures_total{cluster,server}.
    D::ServerConnectFailed,
    D::Active,
    D::Closed,
    D::Aborted,
    D::IdleTimeout,
    D::Evicted,
    D::RejectedInvalid,
    D::RejectedTimeout,
    D::RejectedEof,
    D::NoServer,
    D::RejectedProxy,
    D::RejectedOversize,
    D::RejectedBudget,
    D::RejectedLocalResource,
    D::WsRejectedHttp,
    D::WsBadFrames,
    D::TlsHandshakes,
    D::TlsResumed,
    D::TlsHandshakeFailures,
    D::TlsHandshakeTimeouts,
    D::StickyHits,
    D::StickyNew,
    D::StickyReplaced,
    D::StickyErrors,
    D::SplicedBytesC2s,
    D::SplicedBytesS2c,
];

/// Daemon counters that are gauges.
const GAUGES: &[D] = &[D::TasksAlive, D::SplicedActive];

/// The exposition text. `totals`: the instance's counters and servers, `observed`
/// its durations and connection ends (both every worker's; the health checks' are
/// this daemon's, and only worker 0 checks). `pinned`: the instance whose pinned
/// maps hold the splice program's counters, when BPF loaded.
/// `sticky_entries`: the sticky table's size (counted by the caller, who keeps it).
pub fn render(
    shared: &Shared,
    (totals, observed): (&Totals, &Observed),
    pinned: Option<&str>,
    started: Instant,
    sticky_entries: u64,
) -> String {
    let s = &shared.stats;
    let t = totals;
    let mut m = Scrape(Registry::with_prefix("mqttlb"));
    let uptime = started.elapsed().as_secs();
    m.gauge("uptime_seconds", "Seconds since the daemon started", uptime);
    m.gauge(
        "connections_active",
        "Client connections open now, whatever carries them",
        t.get(D::Active),
    );
    m.counter(
        "connections_accepted",
        "Client connections accepted on all listeners",
        t.get(D::Accepted),
    );
    labelled(&mut m, t);
    m.gauge(
        "sticky_entries",
        "Entries in the sticky table (expired ones included until reused)",
        sticky_entries,
    );
    let servers = &t.servers;
    bytes(&mut m, t, servers);
    per_server(&mut m, servers);
    for &d in D::ALL.iter().filter(|d| !LABELLED.contains(d)) {
        let help = "Daemon counter (see `mqttlb ctl stats`)";
        if GAUGES.contains(&d) {
            m.gauge(d.name(), help, t.get(d));
        } else {
            m.counter(d.name(), help, t.get(d));
        }
    }
    // Every worker's splice program, added up.
    let mut program: Vec<(&'static str, u64)> = Vec::new();
    let every = pinned.and_then(|instance| crate::workers::pinned(instance).ok());
    for p in every.unwrap_or_default() {
        for (name, value) in p.stats().unwrap_or_default() {
            match program.iter_mut().find(|(n, _)| *n == name) {
                Some((_, sum)) => *sum += value,
                None => program.push((name, value)),
            }
        }
    }
    for (name, value) in program {
        if name.starts_with("bpf_") {
            m.counter(name, "Counter of the in-kernel splice program", value);
        }
    }
    if let Some(g) = shared.guard.get() {
        let rows = g
            .counters()
            .into_iter()
            .map(|(name, v)| (label("verdict", name), v));
        m.counters(
            "guard_packets",
            "XDP guard: TCP packets to the listeners' ports by verdict (inspected, allowed, denied, syn_limited, syn_passed, unparsed)",
            rows,
        );
    }
    m.0.register(
        "server_reached_seconds",
        "Accept to the server connection established: the CONNECT read and checked, a server chosen and connected",
        observed.server_reached.clone(),
    );
    m.0.register(
        "connections",
        "Connections that ended after their CONNECT, by listener, cluster, server and result (no_server: refused with no server)",
        ends(&observed.ends),
    );
    m.0.register(
        "connect_duration_seconds",
        "Accept to the server's first bytes (its CONNACK) as forwarded by the daemon (not for connections spliced before the CONNACK)",
        observed.connect_duration.clone(),
    );
    m.0.register(
        "health_check_duration_seconds",
        "Active health checks by server, passed or failed",
        s.health_checks.clone(),
    );
    let mut out = String::with_capacity(16 << 10);
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &m.0);
    out
}

/// The connections' ends as a counter family by listener, cluster, server and result.
fn ends(rows: &[([String; 4], u64)]) -> Family<ServerLabels, Counter> {
    let family = Family::<ServerLabels, Counter>::default();
    for (values, n) in rows {
        let [listener, cluster, server, result] = values.clone();
        let labels = vec![
            ("listener", listener),
            ("cluster", cluster),
            ("server", server),
            ("result", result),
        ];
        family.get_or_create(&labels).inc_by(*n);
    }
    family
}

/// The families that break daemon counters down by a label: how connections ended,
/// why clients were turned away, TLS handshakes, sticky lookups.
fn labelled(m: &mut Scrape, s: &Totals) {
    let by = |key: &'static str, rows: &[(&str, D)]| -> Vec<(Labels, u64)> {
        rows.iter()
            .map(|(v, d)| (label(key, v), s.get(*d)))
            .collect()
    };
    m.counters(
        "connections_ended",
        "Carried connections that ended, by how",
        by(
            "reason",
            &[
                ("closed", D::Closed),
                ("aborted", D::Aborted),
                ("idle_timeout", D::IdleTimeout),
                ("evicted", D::Evicted),
            ],
        ),
    );
    m.counters(
        "connect_rejected",
        "Clients turned away before reaching a server, by reason",
        by(
            "reason",
            &[
                ("invalid_connect", D::RejectedInvalid),
                ("inspect_timeout", D::RejectedTimeout),
                ("client_eof", D::RejectedEof),
                ("no_server", D::NoServer),
                ("proxy_header", D::RejectedProxy),
                ("oversize", D::RejectedOversize),
                ("preconnect_budget", D::RejectedBudget),
                ("local_resource", D::RejectedLocalResource),
                ("websocket_http", D::WsRejectedHttp),
                ("websocket_frames", D::WsBadFrames),
                ("max_connections_per_source", D::LimitSourceConnections),
                ("connect_rate_per_source", D::LimitSourceRate),
                ("connect_rate_per_client_id", D::LimitClientIdRate),
                ("new_connection_rate", D::LimitNewConnectionRate),
            ],
        ),
    );
    m.counters(
        "tls_handshakes",
        "TLS handshakes on mqtts and wss listeners by result (resumed ones are also ok)",
        by(
            "result",
            &[
                ("ok", D::TlsHandshakes),
                ("resumed", D::TlsResumed),
                ("failed", D::TlsHandshakeFailures),
                ("timeout", D::TlsHandshakeTimeouts),
            ],
        ),
    );
    m.counters(
        "sticky_lookups",
        "Sticky table lookups of connections that reached a server, by result",
        by(
            "result",
            &[
                ("hit", D::StickyHits),
                ("new", D::StickyNew),
                ("replaced", D::StickyReplaced),
                ("write_error", D::StickyErrors),
            ],
        ),
    );
}

/// `bytes_total{direction,plane}`: every byte carried, by the kernel (the splice) or
/// by the process (copy plane, TLS and WebSocket relays, and what the daemon writes
/// itself: the CONNECT, PROXY headers, the hand-off).
fn bytes(m: &mut Scrape, s: &Totals, servers: &[BackendView]) {
    let total_c2s: u64 = servers.iter().map(|v| v.bytes_c2s).sum();
    let total_s2c: u64 = servers.iter().map(|v| v.bytes_s2c).sum();
    let mut rows = Vec::new();
    for (dir, total, kernel) in [
        ("client_to_server", total_c2s, s.get(D::SplicedBytesC2s)),
        ("server_to_client", total_s2c, s.get(D::SplicedBytesS2c)),
    ] {
        let labels = |plane: &str| vec![("direction", dir.to_owned()), ("plane", plane.to_owned())];
        rows.push((labels("kernel"), kernel));
        rows.push((labels("userspace"), total.saturating_sub(kernel)));
    }
    m.counters(
        "bytes",
        "Bytes carried between clients and servers, by direction and by who carried them",
        rows,
    );
}

/// The per-server families.
fn per_server(m: &mut Scrape, servers: &[BackendView]) {
    let of = |v: &BackendView| vec![("cluster", v.cluster.clone()), ("server", v.name.clone())];
    type Get = fn(&BackendView) -> u64;
    let gauges: [(&str, &str, Get); 4] = [
        (
            "server_up",
            "1 when new connections may go to the server",
            |v| u64::from(v.usable),
        ),
        (
            "server_draining",
            "1 while the server is drained (file or runtime)",
            |v| u64::from(v.state == "drain"),
        ),
        (
            "server_weight",
            "The server's weight (runtime changes included)",
            |v| u64::from(v.weight),
        ),
        (
            "server_connections_active",
            "Connections open to the server",
            |v| u64::from(v.active),
        ),
    ];
    for (name, help, get) in gauges {
        m.gauges(name, help, servers.iter().map(|v| (of(v), get(v))));
    }
    let counters: [(&str, &str, Get); 3] = [
        (
            "server_connections",
            "Connections made to the server",
            |v| v.connections,
        ),
        (
            "server_connect_failures",
            "Failed connects to the server",
            |v| v.connect_failures,
        ),
        (
            "server_health_flips",
            "Health state changes of the server",
            |v| v.health_flips,
        ),
    ];
    for (name, help, get) in counters {
        m.counters(name, help, servers.iter().map(|v| (of(v), get(v))));
    }
    let rows = servers.iter().flat_map(|v| {
        [
            ("client_to_server", v.bytes_c2s),
            ("server_to_client", v.bytes_s2c),
        ]
        .map(|(dir, n)| {
            let mut labels = of(v);
            labels.push(("direction", dir.to_owned()));
            (labels, n)
        })
    });
    m.counters(
        "server_bytes",
        "Bytes carried to and from the server, both planes",
        rows,
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn openmetrics_becomes_the_classic_text_format() {
        let om = "# HELP mqttlb_closed Connections closed.\n# TYPE mqttlb_closed counter\nmqttlb_closed_total 3\n# HELP mqttlb_active Open.\n# TYPE mqttlb_active gauge\nmqttlb_active 2\n# HELP mqttlb_s Seconds.\n# TYPE mqttlb_s histogram\n# UNIT mqttlb_s seconds\nmqttlb_s_bucket{le=\"+Inf\"} 1\nmqttlb_s_sum 0.5\nmqttlb_s_count 1\n# EOF\n";
        assert_eq!(
            super::text_format(om),
            "# HELP mqttlb_closed_total Connections closed.\n# TYPE mqttlb_closed_total counter\nmqttlb_closed_total 3\n# HELP mqttlb_active Open.\n# TYPE mqttlb_active gauge\nmqttlb_active 2\n# HELP mqttlb_s Seconds.\n# TYPE mqttlb_s histogram\nmqttlb_s_bucket{le=\"+Inf\"} 1\nmqttlb_s_sum 0.5\nmqttlb_s_count 1\n"
        );
    }
}
