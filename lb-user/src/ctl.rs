//! `mqttlb ctl`: reads an instance's pinned BPF maps directly (counters, servers,
//! sticky table), so it answers even while the daemon is busy, and asks the daemon on
//! its control socket for what only the daemon knows (`conns`). It says when the
//! instance is not running and what it shows is what a stopped daemon left.

use std::io::Write;

use clap::Subcommand;

use lb_common::{
    BACKEND_BACKUP, BACKEND_DOWN, BACKEND_DRAIN, BACKEND_FAILED, BACKEND_FULL, BACKEND_HEALTH_DOWN,
    BACKEND_OVERRIDDEN, BackendInfo,
};
use serde::{Deserialize, Serialize};

use crate::{
    bpf::{BpfError, Pinned, addr_string},
    control,
    registry::ConnRow,
    sticky,
};

/// One server as `ctl backends`, the control socket and the admin API show it.
#[derive(Debug, Serialize, Deserialize)]
pub struct BackendView {
    /// Position in the `backends` map.
    pub slot: u32,
    /// Its cluster.
    pub cluster: String,
    /// Its name.
    pub name: String,
    /// Its address.
    pub address: String,
    /// Configured state (runtime changes included): up, drain or down.
    pub state: String,
    /// Whether new connections may go to it now.
    pub usable: bool,
    /// Why not, or what else holds: backup, health-down, failed, full, runtime (state
    /// or weight changed at runtime, overriding the file).
    pub flags: Vec<String>,
    /// State or weight changed at runtime.
    #[serde(default)]
    pub overridden: bool,
    /// Weight (runtime changes included).
    pub weight: u32,
    /// Connections open now.
    pub active: u32,
    /// `max_connections`.
    pub max_connections: Option<u32>,
    /// Connections made.
    pub connections: u64,
    /// Bytes carried client to server (both planes).
    pub bytes_c2s: u64,
    /// Bytes carried server to client (both planes).
    pub bytes_s2c: u64,
    /// Failed connects.
    pub connect_failures: u64,
    /// Health state changes.
    pub health_flips: u64,
}

fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// A `backends` map row as `ctl backends` shows it.
pub fn backend_view(slot: u32, b: &BackendInfo) -> BackendView {
    let mut flags = Vec::new();
    for (bit, name) in [
        (BACKEND_BACKUP, "backup"),
        (BACKEND_HEALTH_DOWN, "health-down"),
        (BACKEND_FAILED, "failed"),
        (BACKEND_FULL, "full"),
        (BACKEND_OVERRIDDEN, "runtime"),
    ] {
        if b.flags & bit != 0 {
            flags.push(name.to_owned());
        }
    }
    let state = match b.state {
        BACKEND_DRAIN => "drain",
        BACKEND_DOWN => "down",
        _ => "up",
    };
    BackendView {
        slot,
        cluster: text(&b.cluster),
        name: text(&b.name),
        address: addr_string(b.addr, b.port),
        state: state.to_owned(),
        usable: state == "up"
            && b.flags & (BACKEND_HEALTH_DOWN | BACKEND_FAILED | BACKEND_FULL) == 0,
        flags,
        overridden: b.flags & BACKEND_OVERRIDDEN != 0,
        weight: b.weight,
        active: b.active,
        max_connections: (b.max_connections != 0).then_some(b.max_connections),
        connections: b.connections,
        bytes_c2s: b.bytes_c2s,
        bytes_s2c: b.bytes_s2c,
        connect_failures: b.connect_failures,
        health_flips: b.health_flips,
    }
}

impl BackendView {
    /// The text view's one word: `up` only when new connections may go to the server;
    /// otherwise its configured state, or for an `up` server what keeps it from use.
    fn status(&self) -> &str {
        if self.usable || self.state != "up" {
            return &self.state;
        }
        self.flags
            .iter()
            .map(String::as_str)
            .find(|f| *f != "backup" && *f != "runtime")
            .unwrap_or("unusable")
    }
}

/// One sticky entry as `ctl sticky` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct StickyView {
    cluster: String,
    kind: String,
    key: String,
    /// Whether `key` is a prefix followed by the SHA-256 of the whole key.
    hashed: bool,
    server: String,
    server_address: String,
    age_ms: u64,
    expires_in_ms: u64,
}

/// What `ctl` shows.
#[derive(Debug, Clone, Subcommand)]
pub enum CtlCommand {
    /// Remove what an instance that is no longer running left (pinned maps, lock and
    /// control socket files); the sticky table is kept unless `--sticky`.
    Cleanup {
        /// Remove the sticky table too (reconnecting devices lose their server).
        #[arg(long)]
        sticky: bool,
    },
    /// Every connection, whatever carries it: client, client id, listener, server,
    /// plane, bytes each way, age.
    Conns,
    /// Global counters of the BPF programs and the daemon.
    Stats,
    /// Every server: state, health, open connections, bytes each way.
    Backends,
    /// The sticky table: key, server, age, expiry.
    Sticky,
    /// Take no new connections to a server (established ones stay); overrides the
    /// file until `enable`, and survives reloads.
    Drain {
        /// Its cluster.
        cluster: String,
        /// The server.
        server: String,
    },
    /// Take new connections to a server again (state `up`, overriding the file).
    Enable {
        /// Its cluster.
        cluster: String,
        /// The server.
        server: String,
    },
    /// Set a server's weight at runtime (overrides the file, survives reloads).
    Weight {
        /// Its cluster.
        cluster: String,
        /// The server.
        server: String,
        /// The new weight, from 1.
        weight: u32,
    },
}

/// Prints the answer to `cmd` for `instance` on `out`.
pub fn run(
    cmd: CtlCommand,
    instance: &str,
    json: bool,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    let running = control::running(instance);
    let change = match &cmd {
        CtlCommand::Conns => return conns(instance, running, json, out),
        CtlCommand::Cleanup { sticky } => return cleanup(instance, running, *sticky, out),
        CtlCommand::Drain { cluster, server } => Some(format!("drain {cluster} {server}")),
        CtlCommand::Enable { cluster, server } => Some(format!("enable {cluster} {server}")),
        CtlCommand::Weight {
            cluster,
            server,
            weight,
        } => Some(format!("weight {cluster} {server} {weight}")),
        _ => None,
    };
    if let Some(request) = change {
        // A change is the daemon's to make: through its control socket.
        if !running {
            not_running(instance);
            return Err(CtlError::NotRunning(instance.to_owned()));
        }
        let answer = control::query(instance, &request).map_err(|source| CtlError::Control {
            path: control::socket_path(instance).display().to_string(),
            source,
        })?;
        if json {
            serde_json::to_writer_pretty(&mut *out, &answer)?;
            writeln!(out)?;
        } else {
            writeln!(
                out,
                "{request}: done (overrides the file until changed again)"
            )?;
        }
        return Ok(());
    }
    let source = match Pinned::open(instance) {
        Ok(pinned) => {
            if !running {
                not_running(instance);
            }
            Source::Pinned(pinned)
        }
        // No pins (BPF did not load for this instance): the daemon answers itself.
        Err(BpfError::Map { .. }) if running => Source::Daemon(instance),
        Err(e) => return Err(e.into()),
    };
    match cmd {
        CtlCommand::Conns
        | CtlCommand::Cleanup { .. }
        | CtlCommand::Drain { .. }
        | CtlCommand::Enable { .. }
        | CtlCommand::Weight { .. } => unreachable!("answered above"),
        CtlCommand::Backends => print_backends(instance, &source.backends()?, json, out),
        CtlCommand::Sticky => {
            let mut rows = source.sticky()?;
            rows.sort_by(|a, b| (&a.cluster, &a.key).cmp(&(&b.cluster, &b.key)));
            print_sticky(instance, &rows, json, out)
        }
        CtlCommand::Stats => print_stats(instance, &source.stats()?, json, out),
    }
}

/// `{ "instance": ..., key: value }`, pretty, on its own line.
fn print_json(
    instance: &str,
    key: &str,
    value: serde_json::Value,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    let mut doc = serde_json::Map::new();
    doc.insert("instance".into(), instance.into());
    doc.insert(key.into(), value);
    serde_json::to_writer_pretty(&mut *out, &doc)?;
    writeln!(out)?;
    Ok(())
}

/// `ctl backends`: a row per server.
fn print_backends(
    instance: &str,
    rows: &[BackendView],
    json: bool,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    if json {
        return print_json(instance, "backends", serde_json::to_value(rows)?, out);
    }
    writeln!(
        out,
        "{:<12} {:<12} {:<22} {:<11} {:>6} {:>7} {:>10} {:>14} {:>14}  flags",
        "cluster",
        "server",
        "address",
        "status",
        "weight",
        "active",
        "conns",
        "bytes_c2s",
        "bytes_s2c"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:<12} {:<12} {:<22} {:<11} {:>6} {:>7} {:>10} {:>14} {:>14}  {}",
            r.cluster,
            r.name,
            r.address,
            r.status(),
            r.weight,
            r.active,
            r.connections,
            r.bytes_c2s,
            r.bytes_s2c,
            r.flags.join(",")
        )?;
    }
    Ok(())
}

/// `ctl sticky`: a row per entry, then the count.
fn print_sticky(
    instance: &str,
    rows: &[StickyView],
    json: bool,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    if json {
        return print_json(instance, "sticky", serde_json::to_value(rows)?, out);
    }
    writeln!(
        out,
        "{:<12} {:<9} {:<32} {:<12} {:<22} {:>9} {:>11}",
        "cluster", "kind", "key", "server", "address", "age_s", "expires_s"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:<12} {:<9} {:<32} {:<12} {:<22} {:>9} {:>11}",
            r.cluster,
            r.kind,
            r.key,
            r.server,
            r.server_address,
            r.age_ms / 1000,
            r.expires_in_ms / 1000
        )?;
    }
    let n = rows.len();
    writeln!(out, "{n} sticky entr{}", if n == 1 { "y" } else { "ies" })?;
    Ok(())
}

/// `ctl stats`: every counter by name.
fn print_stats(
    instance: &str,
    stats: &[(String, u64)],
    json: bool,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    if json {
        let map: serde_json::Map<String, serde_json::Value> = stats
            .iter()
            .map(|(k, v)| (k.clone(), (*v).into()))
            .collect();
        return print_json(instance, "stats", map.into(), out);
    }
    for (k, v) in stats {
        writeln!(out, "{k:<28} {v}")?;
    }
    Ok(())
}

/// Where the views come from: the pinned maps (the daemon may be busy or gone), or
/// the daemon's control socket when it runs without BPF.
enum Source<'a> {
    Pinned(Pinned),
    Daemon(&'a str),
}

impl Source<'_> {
    fn ask<T: serde::de::DeserializeOwned>(instance: &str, what: &str) -> Result<T, CtlError> {
        let answer = control::query(instance, what).map_err(|source| CtlError::Control {
            path: control::socket_path(instance).display().to_string(),
            source,
        })?;
        Ok(serde_json::from_value(answer[what].clone())?)
    }

    fn stats(&self) -> Result<Vec<(String, u64)>, CtlError> {
        match self {
            Self::Pinned(p) => Ok(p
                .stats()?
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect()),
            Self::Daemon(i) => Self::ask(i, "stats"),
        }
    }

    fn backends(&self) -> Result<Vec<BackendView>, CtlError> {
        match self {
            Self::Pinned(p) => Ok(p
                .backends()?
                .iter()
                .map(|(slot, b)| backend_view(*slot, b))
                .collect()),
            Self::Daemon(i) => Self::ask(i, "backends"),
        }
    }

    fn sticky(&self) -> Result<Vec<StickyView>, CtlError> {
        match self {
            Self::Pinned(p) => Ok(sticky_views(&p.sticky()?, &p.backends()?)),
            Self::Daemon(i) => Self::ask(i, "sticky"),
        }
    }
}

/// Sticky entries as `ctl sticky` shows them, each named by its server in `backends`
/// (slot, row) when the server is still there.
pub fn sticky_views(
    entries: &[(lb_common::StickyKey, lb_common::StickyValue)],
    backends: &[(u32, BackendInfo)],
) -> Vec<StickyView> {
    let now = sticky::now_ms();
    entries
        .iter()
        .map(|(k, v)| {
            let address = sticky::server_of(v);
            let owner = backends.iter().find(|(_, b)| {
                sticky::cluster_tag(&text(&b.cluster)) == k.cluster
                    && addr_string(b.addr, b.port) == address.to_string()
            });
            StickyView {
                cluster: owner
                    .map_or_else(|| format!("#{:08x}", k.cluster), |(_, b)| text(&b.cluster)),
                kind: sticky::kind_name(k.kind).to_owned(),
                key: sticky::key_text(k),
                hashed: k.hashed == 1,
                server: owner.map_or_else(|| "(removed)".to_owned(), |(_, b)| text(&b.name)),
                server_address: address.to_string(),
                age_ms: now.saturating_sub(v.last_used_ms),
                expires_in_ms: v.expires_ms.saturating_sub(now),
            }
        })
        .collect()
}

/// Says on stderr (so JSON on stdout stays whole) that what follows is what a
/// stopped or killed instance left, not live state.
fn not_running(instance: &str) {
    eprintln!(
        "mqttlb ctl: instance {instance:?} is not running (no daemon holds {}); showing what it left in its pinned maps",
        control::lock_path(instance).display()
    );
}

/// `ctl conns`: every connection, from the daemon itself (whatever the plane, with
/// or without BPF); for an instance that is not running, the spliced pairs its pinned
/// maps still hold.
fn conns(instance: &str, running: bool, json: bool, out: &mut impl Write) -> Result<(), CtlError> {
    let rows: Vec<ConnRow> = if running {
        let answer = control::query(instance, "conns").map_err(|source| CtlError::Control {
            path: control::socket_path(instance).display().to_string(),
            source,
        })?;
        serde_json::from_value(answer["conns"].clone())?
    } else {
        let pinned = Pinned::open(instance)?;
        not_running(instance);
        let now = sticky::now_ms() / 1000;
        pinned
            .conns()?
            .into_iter()
            .map(|c| ConnRow {
                id: c.id,
                listener: String::new(),
                client: c.client,
                client_id: None,
                server: None,
                server_address: Some(c.server),
                plane: "sockmap".to_owned(),
                bytes_c2s: c.bytes_c2s,
                bytes_s2c: c.bytes_s2c,
                age_s: now.saturating_sub(c.started_unix),
                started_unix: c.started_unix,
            })
            .collect()
    };
    if json {
        serde_json::to_writer_pretty(
            &mut *out,
            &serde_json::json!({ "instance": instance, "running": running, "conns": rows }),
        )?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:>8}  {:<22} {:<24} {:<10} {:<12} {:<10} {:>12} {:>12} {:>7}",
        "id",
        "client",
        "client_id",
        "listener",
        "server",
        "plane",
        "bytes_c2s",
        "bytes_s2c",
        "age_s"
    )?;
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    for r in &rows {
        writeln!(
            out,
            "{:>8}  {:<22} {:<24} {:<10} {:<12} {:<10} {:>12} {:>12} {:>7}",
            r.id,
            r.client,
            or_dash(&r.client_id),
            if r.listener.is_empty() {
                "-"
            } else {
                &r.listener
            },
            r.server
                .clone()
                .or_else(|| r.server_address.clone())
                .unwrap_or_else(|| "-".to_owned()),
            r.plane,
            r.bytes_c2s,
            r.bytes_s2c,
            r.age_s
        )?;
    }
    writeln!(out, "{} connection(s)", rows.len())?;
    Ok(())
}

/// `ctl cleanup`: only for an instance no daemon runs.
fn cleanup(
    instance: &str,
    running: bool,
    sticky: bool,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    if running {
        return Err(CtlError::Running(instance.to_owned()));
    }
    let dir = crate::bpf::pin_dir(instance);
    let removed = crate::bpf::unpin_dir(&dir, !sticky);
    for file in [control::socket_path(instance), control::lock_path(instance)] {
        let _ = std::fs::remove_file(file);
    }
    let kept = if !sticky && dir.join(lb_common::maps::STICKY).exists() {
        " (kept the sticky table; --sticky removes it)"
    } else {
        ""
    };
    writeln!(
        out,
        "instance {instance:?}: removed {removed} pinned map(s) from {}{kept}",
        dir.display()
    )?;
    Ok(())
}

/// Why `ctl` failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The maps could not be read.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// Output failed.
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
    /// JSON encoding failed.
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A change asked of an instance no daemon runs.
    #[error("instance {0:?} is not running: nothing to change")]
    NotRunning(String),
    /// `cleanup` of an instance a daemon runs.
    #[error("instance {0:?} is running: stop it first (cleanup is for what a killed daemon left)")]
    Running(String),
    /// The running daemon did not answer on its control socket.
    #[error("cannot ask the daemon on {path}: {source} (ctl needs root, like the daemon)")]
    Control {
        /// Socket path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}
