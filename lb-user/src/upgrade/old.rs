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
pub const HELLO_WAIT: Duration = Duration::from_secs(30);
/// How long it may take from there to accepting (BPF load, TLS keys, binds).
pub const READY_WAIT: Duration = Duration::from_secs(60);

/// Duplicates of what the new process takes over, kept by the running daemon from
/// its start for this.
#[derive(Debug)]
pub struct Handed {
    /// The instance lock (an `flock` lives with the open file, which both then
    /// share); a worker holds none (its supervisor does).
    pub lock: Option<OwnedFd>,
    /// The control socket, listening.
    pub control: OwnedFd,
    /// The admin listener and its address.
    pub admin: Option<(SocketAddr, OwnedFd)>,
    /// Every listening socket and its address.
    pub listeners: Vec<(SocketAddr, OwnedFd)>,
}

/// What the running daemon hands over besides its sockets, taken when the upgrade
/// starts.
#[derive(Debug)]
pub struct Standing {
    /// Its next connection id.
    pub next_id: u32,
    /// Whether it splices in the kernel.
    pub spliced: bool,
    /// Its XDP guard: what to say of it, and its descriptors
    /// ([`crate::guard::Guard::hand_over`]).
    pub guard: Option<(crate::guard::Moving, Vec<OwnedFd>)>,
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
    standing: Standing,
) -> Result<Successor, UpgradeError> {
    let (mut child, channel) = spawn(binary, invocation)?;
    match introduce_on(Arc::new(channel), handed, standing).await {
        Ok(successor) => Ok(successor),
        Err(e) => {
            let _ = tokio::task::spawn_blocking(move || give_up(&mut child)).await;
            Err(e)
        }
    }
}

/// A new process that did not take over: let finish saying why (its last log line)
/// if it is on its way out; one that hangs is killed, so it never takes over later.
pub fn give_up(child: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts `binary` with `invocation`'s arguments and the other end of a new channel
/// (a daemon, or with `[global] workers` a supervisor).
pub fn spawn(
    binary: &Path,
    invocation: &Invocation,
) -> Result<(std::process::Child, Channel), UpgradeError> {
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
    let child = command.spawn().map_err(|source| UpgradeError::Spawn {
        binary: binary.display().to_string(),
        source,
    })?;
    info!(pid = child.id(), binary = %binary.display(), "upgrade: new process started");
    Ok((child, channel))
}

/// Hands `handed` to the new process waiting on `channel` (started here, or a
/// worker the new supervisor started); returns once it accepts.
pub async fn introduce_on(
    channel: Arc<Channel>,
    handed: Arc<Handed>,
    standing: Standing,
) -> Result<Successor, UpgradeError> {
    let talk = {
        let channel = channel.clone();
        move || introduce(&channel, &handed, standing)
    };
    let pid = tokio::task::spawn_blocking(talk)
        .await
        .unwrap_or_else(|e| Err(UpgradeError::Channel(std::io::Error::other(e.to_string()))))?;
    Ok(Successor { pid, channel })
}

/// Hello, the sockets, Ready; the new process's pid.
fn introduce(channel: &Channel, handed: &Handed, standing: Standing) -> Result<u32, UpgradeError> {
    let new_process = |step| move |source| UpgradeError::NewProcess { step, source };
    let pid = match channel
        .recv(Some(HELLO_WAIT))
        .map_err(new_process("hello"))?
    {
        (Message::Hello { pid }, _, _) => {
            info!(pid, "upgrade: new process read its configuration");
            pid
        }
        (other, _, _) => return Err(unexpected("hello", &other)),
    };
    let mut fds: Vec<_> = handed.lock.iter().map(AsFd::as_fd).collect();
    fds.push(handed.control.as_fd());
    if let Some((_, fd)) = &handed.admin {
        fds.push(fd.as_fd());
    }
    fds.extend(handed.listeners.iter().map(|(_, fd)| fd.as_fd()));
    let (guard, guard_fds) = standing.guard.unzip();
    fds.extend(guard_fds.iter().flatten().map(AsFd::as_fd));
    let sockets = Message::Sockets {
        lock: handed.lock.is_some(),
        listeners: handed.listeners.iter().map(|(a, _)| *a).collect(),
        admin: handed.admin.as_ref().map(|(a, _)| *a),
        next_id: standing.next_id,
        spliced: standing.spliced,
        guard,
    };
    channel
        .send(&sockets, &[], &fds)
        .map_err(new_process("sockets"))?;
    match channel
        .recv(Some(READY_WAIT))
        .map_err(new_process("ready"))?
    {
        (Message::Ready, _, _) => Ok(pid),
        (other, _, _) => Err(unexpected("ready", &other)),
    }
}

/// A message out of its turn.
pub fn unexpected(step: &'static str, got: &Message) -> UpgradeError {
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
