//! The admin HTTP listener (`[admin]`): the live stats page (`/`, `/stats`), Prometheus
//! metrics (`/metrics`), health endpoints for a load balancer in front, keepalived or
//! systemd (`/healthz`, `/readyz`), an NGINX-style `/status`, and the JSON API
//! (`/api/v1/...`) with runtime changes to servers.
//!
//! Reads are open on a loopback address and need the bearer token elsewhere (but
//! `/healthz` and `/readyz`, which a load balancer's checks call); every write needs
//! it (`token_file`; without one, writes are refused: use `mqttlb ctl` on the host,
//! which goes through the control socket).

use std::{sync::Arc, time::Instant};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    config::ServerState,
    runtime::{Override, Shared},
    views,
};

mod metrics;
mod tls;

/// The stats page: one self-contained document (no CDN: many operators' hosts are
/// offline), refreshed from the JSON API.
const STATS_PAGE: &str = include_str!("stats.html");

/// What every request handler shares.
#[derive(Clone)]
struct App {
    shared: Arc<Shared>,
    /// The instance, when BPF loaded (its pinned maps hold the program's counters).
    pinned: Option<Arc<str>>,
    instance: Arc<str>,
    token: Option<Arc<str>>,
    /// Reads need the token too (bound to a non-loopback address).
    guard_reads: bool,
    started: Instant,
    /// The sticky table's size and when it was counted: counting walks the whole
    /// table (a syscall per entry for the BPF map), so the page and the scrapes
    /// share one count for [`STICKY_COUNT_AGE`].
    sticky_count: Arc<std::sync::Mutex<Option<(Instant, usize)>>>,
}

/// How old the sticky table's count may be.
const STICKY_COUNT_AGE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the admin API on `listener` until the daemon stops.
pub fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    bpf_loaded: bool,
    instance: &str,
    (token, tls): (Option<String>, Option<&crate::config::TlsListener>),
) -> JoinHandle<()> {
    let local = listener.local_addr().ok();
    let guard_reads = local.is_some_and(|a| !a.ip().is_loopback());
    if guard_reads && token.is_none() {
        warn!(bind = ?local, "[admin] is bound to a non-loopback address without token_file: every request is refused");
    }
    let app = App {
        shared,
        pinned: bpf_loaded.then(|| instance.into()),
        instance: instance.into(),
        token: token.map(Into::into),
        guard_reads,
        started: Instant::now(),
        sticky_count: Arc::default(),
    };
    let router = Router::new()
        .route("/", get(stats_page))
        .route("/stats", get(stats_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/api/v1/servers", get(servers))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/conns", get(conns))
        .route("/api/v1/sticky", get(sticky))
        .route("/api/v1/servers/{cluster}/{server}", post(change_server))
        .route("/api/v1/guard", get(guard).post(change_guard))
        .route(
            "/api/v1/servers/{cluster}/{server}/evacuate",
            post(evacuate_server),
        )
        .with_state(app);
    info!(bind = ?local, https = tls.is_some(), "admin API and stats page listening");
    let tls = tls.map(|t| {
        let max = t.max_handshakes.get() as usize;
        (t.config.clone(), t.handshake_timeout, max)
    });
    tokio::spawn(async move {
        let served = match tls {
            None => axum::serve(listener, router).await,
            Some((config, timeout, max)) => {
                match tls::Listener::new(listener, config, timeout, max) {
                    Ok(l) => axum::serve(l, router).await,
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = served {
            warn!(error = %e, "admin listener stopped");
        }
    })
}

/// A refusal: the status and one line saying why.
fn refuse(status: StatusCode, why: &str) -> Response {
    (status, Json(serde_json::json!({ "error": why }))).into_response()
}

impl App {
    /// Whether `headers` carry the bearer token (compared in constant time).
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return false;
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        constant_time_eq(given.as_bytes(), token.as_bytes())
    }

    /// The refusal of a write without the token (every write needs it), or None.
    fn refuse_write(&self, headers: &HeaderMap) -> Option<Response> {
        if self.token.is_none() {
            return Some(refuse(
                StatusCode::UNAUTHORIZED,
                "changes need [admin] token_file (or `mqttlb ctl` on the host)",
            ));
        }
        (!self.authorized(headers))
            .then(|| refuse(StatusCode::UNAUTHORIZED, "bearer token required"))
    }

    /// Entries in the sticky table, counted at most every [`STICKY_COUNT_AGE`].
    fn sticky_entries(&self) -> usize {
        let mut cached = self.sticky_count.lock().expect("sticky count lock");
        match *cached {
            Some((at, n)) if at.elapsed() < STICKY_COUNT_AGE => n,
            _ => {
                let n = self.shared.sticky.entries().len();
                *cached = Some((Instant::now(), n));
                n
            }
        }
    }

    /// None when a read may go on; otherwise the 401.
    fn check_read(&self, headers: &HeaderMap) -> Option<Response> {
        (self.guard_reads && !self.authorized(headers))
            .then(|| refuse(StatusCode::UNAUTHORIZED, "bearer token required"))
    }
}

/// Equal bytes, in a time that depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn stats_page(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Some(r) = app.check_read(&headers) {
        return r;
    }
    Html(STATS_PAGE).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 while at least one cluster has a usable server and no shutdown is under way.
async fn readyz(State(app): State<App>) -> Response {
    match app.shared.ready() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

/// The counters as NGINX's `stub_status` prints them, for scripts that parse it
/// (accepts = handled: a connection over `max_connections` waits in the kernel's
/// queue rather than being dropped; requests counts connections).
async fn status(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Some(r) = app.check_read(&headers) {
        return r;
    }
    use lb_common::DaemonStat as D;
    let t = crate::workers::peers::totals(&app.shared).await;
    let (active, accepted) = (t.get(D::Active), t.get(D::Accepted));
    let reading = app.shared.conns.inspecting();
    let writing = active.saturating_sub(reading);
    format!(
        "Active connections: {active} \nserver accepts handled requests\n {accepted} {accepted} {accepted} \nReading: {reading} Writing: {writing} Waiting: 0 \n"
    )
    .into_response()
}

async fn metrics(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Some(r) = app.check_read(&headers) {
        return r;
    }
    let sticky = app.sticky_entries() as u64;
    let totals = crate::workers::peers::totals(&app.shared).await;
    let observed = crate::workers::peers::observed(&app.shared).await;
    let text = metrics::render(
        &app.shared,
        (&totals, &observed),
        app.pinned.as_deref(),
        app.started,
        sticky,
    );
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if openmetrics {
        ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
    } else {
        let text = metrics::text_format(&text);
        ([(header::CONTENT_TYPE, metrics::TEXT_CONTENT_TYPE)], text).into_response()
    }
}

async fn servers(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Some(r) = app.check_read(&headers) {
        return r;
    }
    Json(serde_json::json!({
        "instance": &*app.instance,
        "servers": crate::workers::peers::totals(&app.shared).await.servers,
        "sticky_entries": app.sticky_entries(),
    }))
    .into_response()
}

async fn stats(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Some(r) = app.check_read(&headers) {
        return r;
    }
    Json(serde_json::json!({
        "instance": &*app.instance,
        "uptime_s": app.started.elapsed().as_secs(),
        "stats": crate::workers::peers::totals(&app.shared).await.counters_map(),
    }))
    .into_response()
}

/// `?server=NAME&client_id=ID`: only the connections to that server / of that client.
#[derive(Deserialize)]
struct ConnFilter {
    server: Option<String>,
    client_id: Option<String>,
}

async fn conns(
    State(app): State<App>,
    headers: HeaderMap,
    Query(filter): Query<ConnFilter>,
) -> Response {
    if let Some(r) = app.check_read(&headers) {
        return r;
    }
    let rows: Vec<_> = app
        .shared
        .conns
        .rows()
        .into_iter()
        .filter(|r| {
            filter
                .server
                .as_deref()
                .is_none_or(|s| r.server.as_deref() == Some(s))
        })
        .filter(|r| {
            filter
                .client_id
                .as_deref()
                .is_none_or(|c| r.client_id.as_deref() == Some(c))
        })
        .collect();
    Json(serde_json::json!({ "instance": &*app.instance, "conns": rows })).into_response()
}

async fn sticky(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Some(r) = app.check_read(&headers) {
        return r;
    }
    Json(serde_json::json!({
        "instance": &*app.instance,
        "sticky": views::sticky(&app.shared),
    }))
    .into_response()
}

async fn guard(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Some(r) = app.check_read(&headers) {
        return r;
    }
    match app.shared.guard.get() {
        Some(g) => Json(serde_json::json!({ "instance": &*app.instance, "guard": g.view() }))
            .into_response(),
        None => refuse(
            StatusCode::NOT_FOUND,
            "no [guard] in this instance's configuration",
        ),
    }
}

/// A change of the guard's lists.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GuardChangeBody {
    /// `deny`, `allow` or `remove`.
    change: String,
    /// The block.
    cidr: String,
}

/// `POST /api/v1/guard`: `{"change": "deny"|"allow"|"remove", "cidr": "..."}`, in force
/// at once; answers with the guard's view.
async fn change_guard(
    State(app): State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = app.refuse_write(&headers) {
        return r;
    }
    let Some(g) = app.shared.guard.get() else {
        return refuse(
            StatusCode::NOT_FOUND,
            "no [guard] in this instance's configuration",
        );
    };
    let change: GuardChangeBody = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &format!("body: {e}")),
    };
    match crate::guard::change_from_words(g, &change.change, &change.cidr) {
        Ok(()) => Json(serde_json::json!({ "guard": g.view() })).into_response(),
        Err(e) => refuse(StatusCode::BAD_REQUEST, &e),
    }
}

/// `POST /api/v1/servers/{cluster}/{server}`: `{"state": "up"|"drain"|"down"}` and/or
/// `{"weight": N}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    state: Option<ServerState>,
    weight: Option<std::num::NonZeroU32>,
}

async fn change_server(
    State(app): State<App>,
    headers: HeaderMap,
    Path((cluster, server)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = app.refuse_write(&headers) {
        return r;
    }
    let change: Change = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &format!("body: {e}")),
    };
    if change.state.is_none() && change.weight.is_none() {
        return refuse(StatusCode::BAD_REQUEST, "body: give state and/or weight");
    }
    let o = Override {
        state: change.state,
        weight: change.weight,
    };
    match app.shared.override_server(&cluster, &server, o) {
        Ok(()) => {
            info!(%cluster, %server, state = ?change.state, weight = ?change.weight.map(|w| w.get()), "server changed through the admin API (overrides the file until changed again)");
            for line in crate::control::change_lines(&cluster, &server, o) {
                crate::workers::peers::forward(&app.shared, &line).await;
            }
            let view = views::servers(&app.shared)
                .into_iter()
                .find(|v| v.cluster == cluster && v.name == server);
            Json(serde_json::json!({ "server": view })).into_response()
        }
        Err(e) => refuse(StatusCode::NOT_FOUND, &e.to_string()),
    }
}

/// `POST /api/v1/servers/{cluster}/{server}/evacuate`: drains the server and closes
/// its connections at the cluster's `evict_rate` (see [`crate::evacuate`]).
async fn evacuate_server(
    State(app): State<App>,
    headers: HeaderMap,
    Path((cluster, server)): Path<(String, String)>,
) -> Response {
    if let Some(r) = app.refuse_write(&headers) {
        return r;
    }
    match crate::evacuate::server(&app.shared, &cluster, &server) {
        Ok(n) => {
            // Every worker evacuates its own connections to that server.
            let line = format!("evacuate {cluster} {server}");
            let others: u64 = crate::workers::peers::forward(&app.shared, &line)
                .await
                .iter()
                .filter_map(|a| a["evacuating"]["connections"].as_u64())
                .sum();
            Json(serde_json::json!({
                "evacuating": { "cluster": cluster, "server": server, "connections": n as u64 + others }
            }))
            .into_response()
        }
        Err(e) => refuse(StatusCode::NOT_FOUND, &e.to_string()),
    }
}
