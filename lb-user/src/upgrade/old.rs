//! The running daemon's side of a hot upgrade: start the new binary, give it the
//! sockets, then send it the connections as their planes let them go.

use std::{
    ffi::OsString,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{error, info};

use super::{Leaving, Message, UpgradeError, channel::Channel};

/// How long the new binary may take to read its configuration.
const HELLO_WAIT: Duration = Duration::from_secs(30);
/// How long it may take from there to accepting (BPF load, TLS keys, binds).
const READY_WAIT: Duration = Duration::from_secs(60);

/// Duplicates of what the new process takes over, kept by the running daemon from
/// its start for this.
#[derive(Debug)]
pub struct Handed {
    /// The instance lock (an `flock` lives with the open file, which both then share).
    pub lock: OwnedFd,
    /// The control socket, listening.
    pub control: OwnedFd,
    /// The admin listener and its address.
    pub admin: Option<(SocketAddr, OwnedFd)>,
    /// Every listening socket and its address.
    pub listeners: Vec<(SocketAddr, OwnedFd)>,
}

/// How the running daemon was started: what the new process is started with.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The binary (resolved when the daemon started, so a rebuilt file at the same
    /// path is what an upgrade runs).
    pub binary: PathBuf,
    /// The arguments after it.
    pub args: Vec<OsString>,
}

impl Invocation {
    /// This process's own.
    pub fn current() -> Self {
        let mut args = std::env::args_os();
        let first = args.next().map(PathBuf::from).unwrap_or_default();
        let binary = std::env::current_exe().unwrap_or(first);
        Self {
            binary,
            args: args.collect(),
        }
    }
}

/// The new process, accepting.
#[derive(Debug)]
pub struct Successor {
    /// Its pid.
    pub pid: u32,
    channel: Arc<Channel>,
}

/// What the sender thread sends, in order.
#[derive(Debug)]
pub enum Outgoing {
    /// A connection.
    Conn(Box<Leaving>),
    /// The summary.
    Done {
        /// Connections handed over.
        handed: u64,
        /// Connections kept to their end.
        kept: u64,
    },
}

/// Starts `binary` (with `invocation`'s arguments) and hands it `handed`; returns
/// once it accepts. On error the new process is stopped (if it still runs) and
/// nothing changed here.
pub async fn start(
    binary: &Path,
    invocation: &Invocation,
    handed: Arc<Handed>,
    (next_id, spliced): (u32, bool),
) -> Result<Successor, UpgradeError> {
    let (channel, theirs) = Channel::pair().map_err(UpgradeError::Channel)?;
    let mut command = std::process::Command::new(binary);
    command
        .args(&invocation.args)
        .env(super::CHANNEL_ENV, theirs.as_raw_fd().to_string());
    let raw = theirs.as_raw_fd();
    // SAFETY: between fork and exec only fcntl runs, which is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            crate::sys::keep_on_exec(raw)
        });
    }
    let mut child = command.spawn().map_err(|source| UpgradeError::Spawn {
        binary: binary.display().to_string(),
        source,
    })?;
    drop(theirs);
    let pid = child.id();
    info!(pid, binary = %binary.display(), "upgrade: new process started");
    let channel = Arc::new(channel);
    let talk = {
        let channel = channel.clone();
        move || introduce(&channel, &handed, next_id, spliced)
    };
    let result = tokio::task::spawn_blocking(talk)
        .await
        .unwrap_or_else(|e| Err(UpgradeError::Channel(std::io::Error::other(e.to_string()))));
    match result {
        Ok(()) => Ok(Successor { pid, channel }),
        Err(e) => {
            // It may hang rather than have exited: it must not take over later.
            let _ = child.kill();
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
            Err(e)
        }
    }
}

/// Hello, the sockets, Ready.
fn introduce(
    channel: &Channel,
    handed: &Handed,
    next_id: u32,
    spliced: bool,
) -> Result<(), UpgradeError> {
    let new_process = |step| move |source| UpgradeError::NewProcess { step, source };
    match channel
        .recv(Some(HELLO_WAIT))
        .map_err(new_process("hello"))?
    {
        (Message::Hello { pid }, _, _) => info!(pid, "upgrade: new process read its configuration"),
        (other, _, _) => return Err(unexpected("hello", &other)),
    }
    let mut fds = vec![handed.lock.as_fd(), handed.control.as_fd()];
    if let Some((_, fd)) = &handed.admin {
        fds.push(fd.as_fd());
    }
    fds.extend(handed.listeners.iter().map(|(_, fd)| fd.as_fd()));
    let sockets = Message::Sockets {
        listeners: handed.listeners.iter().map(|(a, _)| *a).collect(),
        admin: handed.admin.as_ref().map(|(a, _)| *a),
        next_id,
        spliced,
    };
    channel
        .send(&sockets, &[], &fds)
        .map_err(new_process("sockets"))?;
    match channel
        .recv(Some(READY_WAIT))
        .map_err(new_process("ready"))?
    {
        (Message::Ready, _, _) => Ok(()),
        (other, _, _) => Err(unexpected("ready", &other)),
    }
}

fn unexpected(step: &'static str, got: &Message) -> UpgradeError {
    UpgradeError::NewProcess {
        step,
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected message {got:?}"),
        ),
    }
}

impl Successor {
    /// Sends what `rx` gives, in order, on a thread of its own, up to the summary
    /// ([`Outgoing::Done`]). A connection that cannot be sent (the new process died) is lost with its
    /// sockets: said loudly.
    pub fn send_all(&self, mut rx: UnboundedReceiver<Outgoing>) -> std::thread::JoinHandle<()> {
        let channel = self.channel.clone();
        std::thread::spawn(move || {
            while let Some(out) = rx.blocking_recv() {
                match out {
                    Outgoing::Conn(leaving) => {
                        if let Err(e) = send_conn(&channel, *leaving) {
                            error!(error = %e, "upgrade: a connection could not be handed to the new process and is lost");
                        }
                    }
                    Outgoing::Done { handed, kept } => {
                        let _ = channel.send(&Message::Done { handed, kept }, &[], &[]);
                        return;
                    }
                }
            }
        })
    }
}

/// One connection: its state, its pending bytes, its two sockets.
fn send_conn(channel: &Channel, leaving: Leaving) -> std::io::Result<()> {
    let Leaving {
        mut moving,
        client,
        server,
    } = leaving;
    let [p0, p1] = moving.carried.pending_mut().map(std::mem::take);
    moving.pending = [p0.len(), p1.len()];
    let msg = Message::Conn(Box::new(moving));
    channel.send(&msg, &[&p0, &p1], &[client.as_fd(), server.as_fd()])
}
