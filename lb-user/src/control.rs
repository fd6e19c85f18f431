//! The control socket: `/run/mqttlb/<instance>.sock` (mode 0600, next to the instance
//! lock), through which `mqttlb ctl` reads what only the daemon knows, whatever the
//! data plane and whether or not BPF loads. One request line, one JSON answer, then the
//! daemon closes:
//!
//! - `conns`: `{"conns": [ConnRow...]}`, every connection held (see [`Registry`]);
//! - `stats`: `{"stats": [[name, value]...]}`, the daemon's counters;
//! - `observed`: `{"observed": Observed}`, its duration histograms and connection
//!   ends (`stats::Observed`), which `/metrics` adds up over workers;
//! - `backends`, `sticky`: the views `ctl` otherwise reads from the pinned maps, for
//!   an instance running without BPF;
//! - `drain|enable|down|evacuate CLUSTER SERVER`, `weight CLUSTER SERVER N`: runtime
//!   changes; `guard [deny|allow|remove CIDR]`;
//! - `upgrade [BINARY]`: a hot upgrade (`mqttlb upgrade`), answered with
//!   `{"upgraded": {"pid", "handed", "kept"}}` once the new process carries on.
//!
//! With `[global] workers` each worker has its own socket
//! (`workers::socket_path`); worker 0's is this one.
//!
//! The daemon holds the instance lock before it binds, so a socket file left by a
//! killed daemon is removed and replaced safely.

use std::{
    io,
    num::NonZeroU32,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    time::timeout,
};
use tracing::{debug, warn};

use crate::{
    config::ServerState,
    runtime::{Override, Shared},
    views,
};

/// Where instance locks and control sockets live.
pub const RUN_DIR: &str = "/run/mqttlb";

/// How long either side waits for the other.
const WAIT: Duration = Duration::from_secs(2);

/// The control socket of `instance`.
pub fn socket_path(instance: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{instance}.sock"))
}

/// The instance lock's file name (in [`RUN_DIR`]; tests put it elsewhere).
pub fn lock_name(instance: &str) -> String {
    format!("{instance}.lock")
}

/// The instance lock of `instance`.
pub fn lock_path(instance: &str) -> PathBuf {
    Path::new(RUN_DIR).join(lock_name(instance))
}

/// The socket file, removed when dropped (at a clean stop) once it is this
/// process's.
pub struct ControlSocket {
    path: PathBuf,
    /// Not while a hot upgrade's new process shares it with the old one, which
    /// serves on if the upgrade fails ([`Self::own`]).
    owned: bool,
}

impl ControlSocket {
    /// The hot upgrade took over: this process removes the file at its clean stop.
    pub fn own(&mut self) {
        self.owned = true;
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the control socket at `path` (the caller's instance lock is held, by it or
/// by its supervisor; no async runtime needed, so it happens before the privilege
/// drop).
pub fn bind(path: &Path) -> io::Result<(std::os::unix::net::UnixListener, ControlSocket)> {
    let path = path.to_owned();
    match std::fs::remove_file(&path) {
        Ok(()) => {
            debug!(path = %path.display(), "removed a control socket left by a stopped daemon")
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok((listener, ControlSocket { path, owned: true }))
}

/// The control socket a hot upgrade's old process handed over (listening at `path`).
pub fn inherited(
    fd: std::os::fd::OwnedFd,
    path: &Path,
) -> io::Result<(std::os::unix::net::UnixListener, ControlSocket)> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    Ok((
        listener,
        ControlSocket {
            path: path.to_owned(),
            owned: false,
        },
    ))
}

/// Answers on `listener` (from [`bind`]) from `shared` (connections, counters,
/// servers, sticky table) until the runtime stops.
pub fn serve(
    listener: std::os::unix::net::UnixListener,
    shared: Arc<Shared>,
) -> io::Result<tokio::task::JoinHandle<()>> {
    let listener = UnixListener::from_std(listener)?;
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &shared).await {
                            debug!(error = %e, "control request failed");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

async fn answer(stream: UnixStream, shared: &Arc<Shared>) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    timeout(WAIT, BufReader::new(r.take(256)).read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    let line = line.trim();
    let (body, answered) = match line.strip_prefix("upgrade") {
        Some(rest) if rest.is_empty() || rest.starts_with(' ') => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (upgrade(shared, rest.trim(), rx).await, Some(tx))
        }
        _ => (request(shared, line), None),
    };
    let mut bytes = serde_json::to_vec(&body).map_err(io::Error::other)?;
    bytes.push(b'\n');
    timeout(WAIT, w.write_all(&bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "reader too slow"))??;
    let shut = w.shutdown().await;
    if let Some(answered) = answered {
        let _ = answered.send(());
    }
    shut
}

/// How long an `upgrade` request may take (the new process starting, loading and
/// taking over).
pub const UPGRADE_WAIT: Duration = Duration::from_secs(120);

/// `upgrade [BINARY]`: a hot upgrade (see [`crate::upgrade`]), answered once the new
/// process accepts and the connections that can go have gone.
async fn upgrade(
    shared: &Shared,
    binary: &str,
    answered: tokio::sync::oneshot::Receiver<()>,
) -> serde_json::Value {
    let Some(requests) = shared.upgrades.get() else {
        return serde_json::json!({ "error": "this daemon cannot be upgraded yet (starting)" });
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let request = crate::upgrade::Request {
        binary: (!binary.is_empty()).then(|| PathBuf::from(binary)),
        reply: Some(reply),
        answered: Some(answered),
        successor: None,
    };
    if requests.try_send(request).is_err() {
        return serde_json::json!({ "error": crate::upgrade::UpgradeError::Busy.to_string() });
    }
    match timeout(UPGRADE_WAIT, answer).await {
        Ok(Ok(Ok(summary))) => serde_json::json!({ "upgraded": summary }),
        Ok(Ok(Err(e))) => serde_json::json!({ "error": e }),
        Ok(Err(_)) | Err(_) => serde_json::json!({ "error": "the upgrade gave no answer" }),
    }
}

/// The answer to one request line: a view (`conns`, `stats`, `backends`, `sticky`) or
/// a runtime change (`drain|enable|evacuate CLUSTER SERVER`, `weight CLUSTER SERVER N`).
fn request(shared: &Arc<Shared>, line: &str) -> serde_json::Value {
    let words: Vec<&str> = line.split_whitespace().collect();
    let change = |cluster: &str, server: &str, o: Override| match shared
        .override_server(cluster, server, o)
    {
        Ok(()) => {
            tracing::info!(cluster, server, state = ?o.state, weight = ?o.weight.map(|w| w.get()), "server changed through mqttlb ctl (overrides the file until changed again)");
            serde_json::json!({ "changed": { "cluster": cluster, "server": server } })
        }
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    let state = |state| Override {
        state: Some(state),
        weight: None,
    };
    match words.as_slice() {
        ["conns"] => serde_json::json!({ "conns": shared.conns.rows() }),
        ["stats"] => serde_json::json!({ "stats": views::stats(shared) }),
        ["observed"] => serde_json::json!({ "observed": shared.stats.observed() }),
        ["backends"] => serde_json::json!({ "backends": views::servers(shared) }),
        ["sticky"] => serde_json::json!({ "sticky": views::sticky(shared) }),
        ["drain", c, s] => change(c, s, state(ServerState::Drain)),
        ["down", c, s] => change(c, s, state(ServerState::Down)),
        ["enable", c, s] => change(c, s, state(ServerState::Up)),
        ["evacuate", c, s] => match crate::evacuate::server(shared, c, s) {
            Ok(n) => serde_json::json!({
                "evacuating": { "cluster": c, "server": s, "connections": n }
            }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        },
        ["guard"] => guard(shared, None),
        ["guard", change, cidr] => guard(shared, Some((change, cidr))),
        ["weight", c, s, n] => match n.parse::<NonZeroU32>() {
            Ok(w) => change(
                c,
                s,
                Override {
                    state: None,
                    weight: Some(w),
                },
            ),
            Err(_) => {
                serde_json::json!({ "error": format!("weight {n:?}: a whole number from 1") })
            }
        },
        _ => serde_json::json!({ "error": format!("unknown request {line:?}") }),
    }
}

/// The request lines that make the runtime change `o` to a server (what another
/// worker is sent).
pub fn change_lines(cluster: &str, server: &str, o: Override) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(state) = o.state {
        let word = match state {
            ServerState::Up => "enable",
            ServerState::Drain => "drain",
            ServerState::Down => "down",
        };
        lines.push(format!("{word} {cluster} {server}"));
    }
    if let Some(w) = o.weight {
        lines.push(format!("weight {cluster} {server} {w}"));
    }
    lines
}

/// `guard` and `guard deny|allow|remove CIDR`: the change made, then the guard's view.
fn guard(shared: &Shared, change: Option<(&str, &str)>) -> serde_json::Value {
    let Some(g) = shared.guard.get() else {
        return serde_json::json!({ "error": "no [guard] in this instance's configuration" });
    };
    if let Some((change, cidr)) = change
        && let Err(e) = crate::guard::change_from_words(g, change, cidr)
    {
        return serde_json::json!({ "error": e });
    }
    serde_json::json!({ "guard": g.view() })
}

/// Sends `request` to the daemon of `instance` and returns its JSON answer.
pub fn query(instance: &str, request: &str) -> io::Result<serde_json::Value> {
    query_at(&socket_path(instance), request)
}

/// Sends `request` to the control socket at `path` and returns its JSON answer.
pub fn query_at(path: &Path, request: &str) -> io::Result<serde_json::Value> {
    query_waiting(path, request, WAIT)
}

/// [`query_at`], waiting up to `wait` for the answer.
pub fn query_waiting(path: &Path, request: &str, wait: Duration) -> io::Result<serde_json::Value> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(wait))?;
    s.set_write_timeout(Some(WAIT))?;
    s.write_all(format!("{request}\n").as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let v: serde_json::Value = serde_json::from_slice(&out).map_err(io::Error::other)?;
    if let Some(e) = v.get("error") {
        // InvalidInput: the daemon was reached and refused the request.
        let why = e.as_str().map_or_else(|| e.to_string(), str::to_owned);
        return Err(io::Error::new(io::ErrorKind::InvalidInput, why));
    }
    Ok(v)
}

/// Whether a daemon holds the instance lock of `instance` now (a `kill -9` leaves
/// pins and files behind but releases the lock).
pub fn running(instance: &str) -> bool {
    use std::os::fd::AsRawFd;
    let file = match std::fs::File::open(lock_path(instance)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return false,
        // Not ours to read (ctl without root): assume it runs; asking it says more.
        Err(_) => return true,
    };
    // SAFETY: flock on a descriptor we own; a shared lock we get is dropped with it.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
}
