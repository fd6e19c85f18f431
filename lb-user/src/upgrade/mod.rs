//! Hot binary upgrade (`mqttlb upgrade`, or SIGUSR2): a new binary takes over the
//! listening sockets and the established connections of the running daemon, and the
//! old process exits: no connection closed, no byte lost or repeated.
//!
//! 1. The old process starts the new binary with its own arguments and one end of a
//!    [`channel::Channel`] (`MQTTLB_UPGRADE_FD`). The new one reads its configuration
//!    and says [`Message::Hello`].
//! 2. The old one sends [`Message::Sockets`]: the instance lock, the control socket,
//!    the admin listener and every listening socket, as descriptors, and the XDP
//!    guard's links and state maps ([`crate::guard`]). Both processes
//!    accept on them for a moment. The new one loads its BPF program over the pinned
//!    maps the old one uses (the same layout, checked: otherwise it refuses) and,
//!    once it accepts, says [`Message::Ready`]. A new binary that fails anywhere
//!    before that exits, and the old process serves on as if nothing happened.
//! 3. The old process stops accepting and asks every connection to depart
//!    ([`crate::registry::Entry::ask_departure`]). The plane carrying one stops it
//!    at a point where its state is whole: the copy plane between two reads (the
//!    bytes read and not yet written go along), a spliced pair between two steps of
//!    its supervision (its sockets stay in the pinned maps and the kernel keeps
//!    redirecting meanwhile). Each goes as a [`Message::Conn`] with its two sockets.
//! 4. The new process adopts each ([`crate::conn::adopt`]) under the same id, and its
//!    plane resumes it ([`crate::dataplane::DataPlane::resume`]).
//! 5. The old process exits once it holds nothing. What it cannot hand over it
//!    carries to the end first: TLS 1.2 connections and WebSocket connections it
//!    terminates (their record and frame state lives in rustls and in the relay).
//!
//! With `[global] workers` the supervisor upgrades, and each worker is handed over
//! this way to the new worker of its index ([`crate::workers::handover`]).

use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};

use crate::dataplane::Carried;

pub mod channel;
pub mod new;
pub mod old;

/// The environment variable that gives the new process its end of the channel.
pub const CHANNEL_ENV: &str = "MQTTLB_UPGRADE_FD";

/// What the two processes say to each other, in this order.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    /// New to old: configuration read; send the sockets.
    Hello {
        /// The new process.
        pid: u32,
    },
    /// Old to new, with the descriptors: the instance lock (when `lock`), the control
    /// socket, the admin listener (when `admin` is set), then one per entry of
    /// `listeners`.
    Sockets {
        /// Whether the instance lock comes first (a worker holds none).
        lock: bool,
        /// Where each listening socket is bound, in descriptor order.
        listeners: Vec<SocketAddr>,
        /// Where the admin listener is bound.
        admin: Option<SocketAddr>,
        /// The old process's next connection id.
        next_id: u32,
        /// Whether the old process splices in the kernel (the new one must too).
        spliced: bool,
        /// The XDP guard, whose descriptors follow the listeners
        /// ([`crate::guard::Handed`]).
        #[serde(default)]
        guard: Option<crate::guard::Moving>,
    },
    /// New to old: accepting; hand over the connections.
    Ready,
    /// Old to new, with the client's and the server's socket.
    Conn(Box<Moving>),
    /// Old to new: every connection that could go has gone; `kept` stay with the
    /// old process until they end.
    Done {
        /// Connections handed over.
        handed: u64,
        /// Connections the old process carries to their end.
        kept: u64,
    },
    /// Old supervisor to new (`[global] workers`), with the descriptors: the instance
    /// lock, the supervisor's control socket, then each listener's group, worker 0
    /// to `workers - 1` (listener by listener, as in `listeners`).
    Groups {
        /// Where each group is bound.
        listeners: Vec<SocketAddr>,
        /// Sockets in each group.
        workers: u32,
        /// Whether each group has the selection program attached (it stays, with
        /// its socket array: a socket is in one such array at a time).
        selected: Vec<bool>,
    },
    /// New supervisor to old, with one end of a channel: the new worker `index` waits
    /// on its other end for old worker `index`'s hand-over.
    Worker {
        /// The worker's index.
        index: u32,
    },
    /// Old supervisor to its worker, on their link, with the channel to the worker's
    /// successor: hand everything over to it.
    HandOver,
    /// Old worker to its supervisor: the hand-over's outcome.
    HandedOver {
        /// What it did, or why it did not.
        outcome: Result<Summary, String>,
    },
}

/// One connection as it moves (what `ctl conns` shows of it, and where its bytes
/// stand). Its pending bytes follow the JSON: `pending` gives their lengths.
#[derive(Debug, Serialize, Deserialize)]
pub struct Moving {
    /// Its id (the spliced pair's key in the maps).
    pub id: u32,
    /// The listener that accepted it.
    pub listener: String,
    /// The client (as a PROXY header named it).
    pub client: SocketAddr,
    /// MQTT client id.
    pub client_id: Option<String>,
    /// Cluster and server it reached.
    pub cluster: String,
    /// Server name.
    pub server: String,
    /// Server address.
    pub server_address: SocketAddr,
    /// Milliseconds since it was accepted.
    pub age_ms: u64,
    /// Wall-clock seconds since the epoch at accept.
    pub started_unix: u64,
    /// Bytes carried client to server and server to client.
    pub bytes: [u64; 2],
    /// Bytes the daemon wrote, or read to write, to the server and to the client.
    pub written: [u64; 2],
    /// The client speaks MQTT 5 (an evacuation tells it 0x9C).
    pub mqtt5: bool,
    /// Lengths of the pending bytes client to server and server to client.
    pub pending: [usize; 2],
    /// Where its bytes stand.
    pub carried: Carried,
}

/// A connection leaving the old process: its state and its two sockets.
#[derive(Debug)]
pub struct Leaving {
    /// Its state (the pending bytes still inside `moving.carried`).
    pub moving: Moving,
    /// The client socket.
    pub client: OwnedFd,
    /// The server socket.
    pub server: OwnedFd,
}

/// An upgrade asked for: on the control socket (`mqttlb upgrade`) or by SIGUSR2.
#[derive(Debug, Default)]
pub struct Request {
    /// The binary to start (default: the one the daemon was started from).
    pub binary: Option<std::path::PathBuf>,
    /// Where the outcome goes (none for a signal).
    pub reply: Option<tokio::sync::oneshot::Sender<Result<Summary, String>>>,
    /// Resolves once the outcome was written to the asker (the old process waits
    /// for it before it exits).
    pub answered: Option<tokio::sync::oneshot::Receiver<()>>,
    /// A worker's successor, already started by the new supervisor and waiting on
    /// the other end of this channel (none: start the binary).
    pub successor: Option<channel::Channel>,
}

/// What an upgrade did, as `mqttlb upgrade` prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// The new process.
    pub pid: u32,
    /// Connections handed over.
    pub handed: u64,
    /// Connections the old process carries to their end before it exits.
    pub kept: u64,
}

/// Why `config`'s daemon cannot be handed over, if it cannot. `supervised`: the
/// upgrade is a supervisor's (`[global] workers`), which keeps the privileges its
/// new workers need while each of its workers gives them up.
pub fn refusal(config: &crate::config::Config, supervised: bool) -> Option<&'static str> {
    if config.global.run_as.is_some() && !supervised {
        Some(
            "[global] user with one process: the daemon gave up the privileges the new process needs to load BPF (with [global] workers, the default, the supervisor keeps them)",
        )
    } else {
        None
    }
}

/// Why an upgrade did not happen (the running daemon serves on).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// This daemon's set-up cannot be handed over.
    #[error("hot upgrade is not available here: {0}")]
    Unsupported(&'static str),
    /// Another upgrade is under way.
    #[error("an upgrade is already under way")]
    Busy,
    /// The new binary could not be started.
    #[error("cannot start {binary}: {source}")]
    Spawn {
        /// The binary.
        binary: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The new process failed or went quiet before it accepted.
    #[error(
        "the new process did not take over ({step}): {source}; its log says why; this one serves on"
    )]
    NewProcess {
        /// What it was waiting for.
        step: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The channel itself failed.
    #[error("upgrade channel: {0}")]
    Channel(std::io::Error),
    /// The XDP guard's descriptors could not be duplicated to hand over.
    #[error("the XDP guard cannot be handed over: {0}")]
    Guard(std::io::Error),
}
