//! `mqttlb ctl`: reads an instance's pinned BPF maps directly (counters, servers,
//! sticky table), so it answers even while the daemon is busy, and asks the daemon on
//! its control socket for what only the daemon knows (`conns`). It says when the
//! instance is not running and what it shows is what a stopped daemon left.

use std::io::Write;

use clap::Subcommand;

use crate::{
    bpf::{BpfError, Pinned},
    control,
    registry::ConnRow,
    sticky,
    views::{BackendView, StickyView, backend_view, sticky_views},
};

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
    /// Drain a server and close its connections at its cluster's `evict_rate`; MQTT 5
    /// clients get DISCONNECT 0x9C (Use another server) first.
    Evacuate {
        /// Its cluster.
        cluster: String,
        /// The server.
        server: String,
    },
    /// The XDP front guard: interfaces, lists, SYN rate, counters, the sources with
    /// the most drops; or a change to its lists, in force at once (kept over reloads
    /// until the daemon stops).
    Guard {
        /// A change; none: show the guard.
        #[command(subcommand)]
        change: Option<GuardChange>,
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

/// `ctl guard deny|allow|remove CIDR`.
#[derive(Debug, Clone, Subcommand)]
pub enum GuardChange {
    /// Drop every packet from this block to the listeners' ports.
    Deny {
        /// e.g. 203.0.113.0/24 or 2001:db8::/32.
        cidr: String,
    },
    /// Never drop this block (before deny and the SYN rate).
    Allow {
        /// e.g. 10.0.0.0/8.
        cidr: String,
    },
    /// Take the block out of both lists.
    Remove {
        /// As written in deny or allow.
        cidr: String,
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
        CtlCommand::Guard { change } => {
            return guard(instance, running, change.as_ref(), json, out);
        }
        CtlCommand::Drain { cluster, server } => Some(format!("drain {cluster} {server}")),
        CtlCommand::Enable { cluster, server } => Some(format!("enable {cluster} {server}")),
        CtlCommand::Evacuate { cluster, server } => Some(format!("evacuate {cluster} {server}")),
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
            return Err(CtlError::NotRunning(instance.to_owned()));
        }
        let answer = change_everywhere(instance, &request)?;
        if json {
            serde_json::to_writer_pretty(&mut *out, &answer)?;
            writeln!(out)?;
        } else if let Some(n) = answer["evacuating"]["connections"].as_u64() {
            writeln!(
                out,
                "{request}: drained; closing {n} connections at the cluster's evict_rate"
            )?;
        } else {
            writeln!(
                out,
                "{request}: done (overrides the file until changed again)"
            )?;
        }
        return Ok(());
    }
    let source = match crate::workers::pinned(instance) {
        Ok(all) => {
            if !running {
                not_running(instance);
            }
            Source::Pinned(all)
        }
        // No pins (BPF did not load for this instance): the daemons answer themselves.
        Err(BpfError::Map { .. }) if running => {
            Source::Daemon(instance, crate::workers::running(instance))
        }
        Err(e) => return Err(e.into()),
    };
    match cmd {
        CtlCommand::Conns
        | CtlCommand::Cleanup { .. }
        | CtlCommand::Drain { .. }
        | CtlCommand::Enable { .. }
        | CtlCommand::Evacuate { .. }
        | CtlCommand::Guard { .. }
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

/// Makes `request` on every worker (one without workers), worker 0 first: its
/// answer, with an evacuation's connections summed over all. A worker other than
/// 0 that does not answer is named on stderr; the change stands on the others.
fn change_everywhere(instance: &str, request: &str) -> Result<serde_json::Value, CtlError> {
    let mut answer = ask_daemon(instance, request)?;
    let mut evacuating = answer["evacuating"]["connections"].as_u64();
    for k in crate::workers::running(instance).into_iter().skip(1) {
        let path = crate::workers::socket_path(instance, k);
        match control::query_at(&path, request) {
            Ok(a) => {
                let n = a["evacuating"]["connections"].as_u64();
                evacuating = evacuating.map(|sum| sum + n.unwrap_or(0));
            }
            Err(e) => eprintln!("mqttlb ctl: worker {k} ({}): {e}", path.display()),
        }
    }
    if let Some(n) = evacuating {
        answer["evacuating"]["connections"] = n.into();
    }
    Ok(answer)
}

/// `ctl guard`: asks the daemon (the guard's maps are its own), changes first.
fn guard(
    instance: &str,
    running: bool,
    change: Option<&GuardChange>,
    json: bool,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    if !running {
        return Err(CtlError::NotRunning(instance.to_owned()));
    }
    let request = match change {
        None => "guard".to_owned(),
        Some(GuardChange::Deny { cidr }) => format!("guard deny {cidr}"),
        Some(GuardChange::Allow { cidr }) => format!("guard allow {cidr}"),
        Some(GuardChange::Remove { cidr }) => format!("guard remove {cidr}"),
    };
    let answer = ask_daemon(instance, &request)?;
    if json {
        return print_json(instance, "guard", answer["guard"].clone(), out);
    }
    if change.is_some() {
        writeln!(
            out,
            "{request}: done (in force now; kept over reloads until a restart)"
        )?;
    }
    let g = &answer["guard"];
    let list = |v: &serde_json::Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    for i in g["interfaces"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "interface {:<12} {}",
            str_of(&i["interface"]),
            str_of(&i["mode"])
        )?;
    }
    writeln!(
        out,
        "syn_rate {} syn_burst {}",
        g["syn_rate"], g["syn_burst"]
    )?;
    writeln!(out, "deny  {}", list(&g["deny"]))?;
    writeln!(out, "allow {}", list(&g["allow"]))?;
    for name in lb_common::GUARD_STATS {
        let n = g["counters"][name].as_u64().unwrap_or(0);
        writeln!(out, "{name:<14} {n:>12}")?;
    }
    writeln!(out, "{:<40} {:>12} {:>12}", "top source", "syns", "dropped")?;
    for s in g["top"].as_array().into_iter().flatten() {
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        writeln!(
            out,
            "{:<40} {:>12} {:>12}",
            str_of(&s["source"]),
            n("syns"),
            n("dropped")
        )?;
    }
    Ok(())
}

fn str_of(v: &serde_json::Value) -> &str {
    v.as_str().unwrap_or("")
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
/// Every counter summed over the workers; with workers, JSON also has each
/// worker's (`workers`, in worker order) and text a column per worker.
fn print_stats(
    instance: &str,
    per_worker: &[Vec<(String, u64)>],
    json: bool,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    let total = sum_stats(per_worker);
    let object = |stats: &[(String, u64)]| -> serde_json::Value {
        let map: serde_json::Map<String, serde_json::Value> = stats
            .iter()
            .map(|(k, v)| (k.clone(), (*v).into()))
            .collect();
        map.into()
    };
    if json {
        let mut doc = serde_json::Map::new();
        doc.insert("instance".into(), instance.into());
        doc.insert("stats".into(), object(&total));
        if per_worker.len() > 1 {
            let each = per_worker.iter().map(|w| object(w)).collect();
            doc.insert("workers".into(), serde_json::Value::Array(each));
        }
        serde_json::to_writer_pretty(&mut *out, &doc)?;
        writeln!(out)?;
        return Ok(());
    }
    if per_worker.len() > 1 {
        write!(out, "{:<28} {:>14}", "", "total")?;
        for k in 0..per_worker.len() {
            write!(out, " {:>14}", format!("worker {k}"))?;
        }
        writeln!(out)?;
    }
    for (i, (k, v)) in total.iter().enumerate() {
        write!(out, "{k:<28} {v:>14}")?;
        if per_worker.len() > 1 {
            for w in per_worker {
                write!(out, " {:>14}", w.get(i).map_or(0, |(_, v)| *v))?;
            }
        }
        writeln!(out)?;
    }
    Ok(())
}

/// The counters of several workers added up, by name, in the first worker's order.
fn sum_stats(per_worker: &[Vec<(String, u64)>]) -> Vec<(String, u64)> {
    let mut total = per_worker.first().cloned().unwrap_or_default();
    for w in per_worker.iter().skip(1) {
        for (name, v) in w {
            if let Some((_, t)) = total.iter_mut().find(|(n, _)| n == name) {
                *t += v;
            }
        }
    }
    total
}

/// Where the views come from: the pinned maps of each worker (the daemon may be
/// busy or gone; worker 0's first), or the workers' control sockets when the
/// instance runs without BPF.
enum Source<'a> {
    Pinned(Vec<Pinned>),
    Daemon(&'a str, Vec<u32>),
}

impl Source<'_> {
    fn ask<T: serde::de::DeserializeOwned>(
        instance: &str,
        worker: u32,
        what: &str,
    ) -> Result<T, CtlError> {
        let answer = if worker == 0 {
            ask_daemon(instance, what)?
        } else {
            let path = crate::workers::socket_path(instance, worker);
            control::query_at(&path, what).map_err(|source| CtlError::Control {
                path: path.display().to_string(),
                source,
            })?
        };
        Ok(serde_json::from_value(answer[what].clone())?)
    }

    /// Each worker's counters.
    fn stats(&self) -> Result<Vec<Vec<(String, u64)>>, CtlError> {
        match self {
            Self::Pinned(all) => all
                .iter()
                .map(|p| {
                    Ok(p.stats()?
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect())
                })
                .collect(),
            Self::Daemon(i, workers) => workers.iter().map(|&k| Self::ask(i, k, "stats")).collect(),
        }
    }

    /// The servers as worker 0 sees them, with every worker's connections and
    /// bytes added.
    fn backends(&self) -> Result<Vec<BackendView>, CtlError> {
        let per_worker: Vec<Vec<BackendView>> = match self {
            Self::Pinned(all) => all
                .iter()
                .map(|p| {
                    Ok(p.backends()?
                        .iter()
                        .map(|(slot, b)| backend_view(*slot, b))
                        .collect())
                })
                .collect::<Result<_, CtlError>>()?,
            Self::Daemon(i, workers) => workers
                .iter()
                .map(|&k| Self::ask(i, k, "backends"))
                .collect::<Result<_, CtlError>>()?,
        };
        let mut it = per_worker.into_iter();
        let mut total = it.next().unwrap_or_default();
        for other in it {
            crate::views::add_traffic(&mut total, &other);
        }
        Ok(total)
    }

    /// The one sticky table every worker shares.
    fn sticky(&self) -> Result<Vec<StickyView>, CtlError> {
        match self {
            Self::Pinned(all) => {
                let p = &all[0];
                Ok(sticky_views(&p.sticky()?, &p.backends()?))
            }
            Self::Daemon(i, _) => Self::ask(i, 0, "sticky"),
        }
    }
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
        let mut rows = Vec::new();
        for k in crate::workers::running(instance) {
            match Source::ask::<Vec<ConnRow>>(instance, k, "conns") {
                Ok(mut some) => rows.append(&mut some),
                // A worker restarting: the others' connections still show.
                Err(e) if k > 0 => eprintln!("mqttlb ctl: worker {k} left out: {e}"),
                Err(e) => return Err(e),
            }
        }
        rows
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
    let removed =
        crate::workers::remove_left_behind(instance) + crate::bpf::unpin_dir(&dir, !sticky);
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

/// The daemon's answer to `request` on its control socket.
fn ask_daemon(instance: &str, request: &str) -> Result<serde_json::Value, CtlError> {
    control::query(instance, request).map_err(|source| {
        if source.kind() == std::io::ErrorKind::InvalidInput {
            return CtlError::Refused(source.to_string());
        }
        CtlError::Control {
            path: control::socket_path(instance).display().to_string(),
            source,
        }
    })
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
    /// The daemon refused the request (an unknown server, say).
    #[error("the daemon refused: {0}")]
    Refused(String),
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
