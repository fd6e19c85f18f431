//! The new process's side of a hot upgrade: the sockets it takes instead of binding,
//! then the connections it adopts.

use std::{
    net::SocketAddr,
    os::fd::{FromRawFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::{CHANNEL_ENV, Message, UpgradeError, channel::Channel};
use crate::runtime::Shared;

/// How long the old process may take to send the sockets.
const SOCKETS_WAIT: Duration = Duration::from_secs(10);

/// What the old process handed over, taken as the daemon is set up.
#[derive(Debug)]
pub struct Inherited {
    /// The instance lock.
    pub lock: Option<OwnedFd>,
    /// The control socket, listening.
    pub control: Option<OwnedFd>,
    /// The admin listener and its address.
    pub admin: Option<(SocketAddr, OwnedFd)>,
    /// Listening sockets by address.
    pub listeners: Vec<(SocketAddr, OwnedFd)>,
    /// The old process's next connection id.
    pub next_id: u32,
    /// Whether the old process splices in the kernel.
    pub spliced: bool,
    /// The old process's XDP guard.
    pub guard: Option<crate::guard::Handed>,
}

impl Inherited {
    /// The listening socket bound at `addr`, if the old process had one.
    pub fn take_listener(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let i = self.listeners.iter().position(|(a, _)| *a == addr)?;
        Some(std::net::TcpListener::from(self.listeners.swap_remove(i).1))
    }

    /// The admin listener, if the old one was bound at `addr`.
    pub fn take_admin(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        match self.admin.take() {
            Some((a, fd)) if a == addr => Some(std::net::TcpListener::from(fd)),
            other => {
                self.admin = other;
                None
            }
        }
    }
}

/// A process started by an upgrade, before it accepts.
#[derive(Debug)]
pub struct Arrival {
    channel: Channel,
}

/// When this process was started by an upgrade (`MQTTLB_UPGRADE_FD` set): says hello
/// and receives the sockets. `None` for a plain start.
pub fn arrive() -> Option<Result<(Arrival, Inherited), UpgradeError>> {
    Some(channel_from_env()?.and_then(arrive_over))
}

/// The channel to the old process, when this one was started by an upgrade: said
/// hello on.
fn channel_from_env() -> Option<Result<Channel, UpgradeError>> {
    let value = std::env::var_os(CHANNEL_ENV)?;
    Some(channel_on(&value.to_string_lossy()))
}

fn channel_on(value: &str) -> Result<Channel, UpgradeError> {
    let bad = |why: &str| {
        UpgradeError::Channel(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{CHANNEL_ENV}={value:?}: {why}"),
        ))
    };
    let fd: i32 = value.parse().map_err(|_| bad("not a descriptor"))?;
    // SAFETY: F_GETFD only reads the descriptor's flags.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad("not an open descriptor"));
    }
    // SAFETY: the descriptor is open, was given to this process for this, and
    // nothing else in it owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Not to be inherited by whatever this process starts later.
    // SAFETY: fcntl on the descriptor just taken.
    unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::F_SETFD,
            libc::FD_CLOEXEC,
        )
    };
    hello(Channel::from_fd(fd))
}

/// A new worker of `[global] workers` that its supervisor started for an upgrade:
/// says hello to the old worker of its index on `fd` and receives its sockets.
pub fn arrive_as_worker(fd: OwnedFd) -> Result<(Arrival, Inherited), UpgradeError> {
    hello(Channel::from_fd(fd)).and_then(arrive_over)
}

/// Says hello (with this process's pid) on `channel`.
fn hello(channel: Channel) -> Result<Channel, UpgradeError> {
    // SAFETY: getpid has no preconditions (a forked worker's own pid, not the
    // supervisor's, which std::process::id would give as well).
    let pid = unsafe { libc::getpid() } as u32;
    channel
        .send(&Message::Hello { pid }, &[], &[])
        .map_err(UpgradeError::Channel)?;
    Ok(channel)
}

/// Receives the sockets of the old process (or with `[global] workers` of the old
/// worker of the same index) on `channel`.
fn arrive_over(channel: Channel) -> Result<(Arrival, Inherited), UpgradeError> {
    let bad = |why: &str| {
        UpgradeError::Channel(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("from the old process: {why}"),
        ))
    };
    let (msg, _, fds) = channel
        .recv(Some(SOCKETS_WAIT))
        .map_err(UpgradeError::Channel)?;
    let Message::Sockets {
        lock,
        listeners,
        admin,
        next_id,
        spliced,
        guard,
    } = msg
    else {
        return Err(bad(match msg {
            Message::Groups { .. } => {
                "the running daemon runs workers and this one would be one process ([global] workers): set the same number of workers, or restart"
            }
            _ => "expected the sockets",
        }));
    };
    let expected = usize::from(lock)
        + 1
        + usize::from(admin.is_some())
        + listeners.len()
        + guard.as_ref().map_or(0, crate::guard::Handed::descriptors);
    if fds.len() != expected {
        return Err(bad("wrong number of descriptors"));
    }
    let mut fds = fds.into_iter();
    let mut next = || fds.next().expect("counted");
    let lock = lock.then(&mut next);
    let control = Some(next());
    let admin = admin.map(|a| (a, next()));
    let listeners = listeners.into_iter().map(|a| (a, next())).collect();
    let guard = guard.map(|moving| crate::guard::Handed::from_descriptors(moving, fds));
    let inherited = Inherited {
        lock,
        control,
        admin,
        listeners,
        next_id,
        spliced,
        guard,
    };
    Ok((Arrival { channel }, inherited))
}

/// What the old supervisor of `[global] workers` handed over.
#[derive(Debug)]
pub struct Groups {
    /// The channel to the old supervisor.
    pub channel: Channel,
    /// The instance lock.
    pub lock: OwnedFd,
    /// The supervisor's control socket, listening.
    pub control: OwnedFd,
    /// Each listener's group by address, worker 0's socket first, and whether the
    /// selection program is attached to it.
    pub groups: Vec<(SocketAddr, Vec<OwnedFd>, bool)>,
    /// Sockets per group.
    pub workers: u32,
}

/// When this supervisor was started by an upgrade: says hello and receives the
/// listener groups. `None` for a plain start.
pub fn arrive_as_supervisor() -> Option<Result<Groups, UpgradeError>> {
    Some(channel_from_env()?.and_then(groups_over))
}

fn groups_over(channel: Channel) -> Result<Groups, UpgradeError> {
    let (msg, _, fds) = channel
        .recv(Some(SOCKETS_WAIT))
        .map_err(UpgradeError::Channel)?;
    let bad = |why: String| {
        UpgradeError::Channel(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("from the old supervisor: {why}"),
        ))
    };
    let Message::Groups {
        listeners,
        workers,
        selected,
    } = msg
    else {
        return Err(bad(match msg {
            Message::Sockets { .. } => "the running daemon is one process and this one would run workers ([global] workers): set the same number of workers, or restart".to_owned(),
            other => format!("expected the listener groups, got {other:?}"),
        }));
    };
    if fds.len() != 2 + listeners.len() * workers as usize || selected.len() != listeners.len() {
        return Err(bad("wrong number of descriptors".to_owned()));
    }
    let mut fds = fds.into_iter();
    let lock = fds.next().expect("counted");
    let control = fds.next().expect("counted");
    let groups = listeners
        .into_iter()
        .zip(selected)
        .map(|(a, s)| (a, fds.by_ref().take(workers as usize).collect(), s))
        .collect();
    Ok(Groups {
        channel,
        lock,
        control,
        groups,
        workers,
    })
}

impl Arrival {
    /// Tells the old process this one accepts, then adopts every connection it sends
    /// (each under a permit of `permits` when one is free: an adopted connection is
    /// never refused) until it exits.
    pub fn ready(self, shared: Arc<Shared>, permits: Arc<Semaphore>) -> Result<(), UpgradeError> {
        self.channel
            .send(&Message::Ready, &[], &[])
            .map_err(UpgradeError::Channel)?;
        let runtime = tokio::runtime::Handle::current();
        std::thread::spawn(move || {
            let mut adopted = 0u64;
            loop {
                match self.channel.recv(None) {
                    Ok((Message::Conn(moving), bytes, fds)) => {
                        let Ok([client, server]) = <[OwnedFd; 2]>::try_from(fds) else {
                            warn!(
                                id = moving.id,
                                "upgrade: a connection came without its two sockets"
                            );
                            continue;
                        };
                        let mut moving = *moving;
                        let split = moving.pending[0].min(bytes.len());
                        let (p0, p1) = bytes.split_at(split);
                        let [q0, q1] = moving.carried.pending_mut();
                        *q0 = p0.to_vec();
                        *q1 = p1.to_vec();
                        adopted += 1;
                        let permit = permits.clone().try_acquire_owned().ok();
                        let shared = shared.clone();
                        runtime.spawn(async move {
                            crate::conn::adopt(shared, moving, client, server).await;
                            drop(permit);
                        });
                    }
                    Ok((Message::Done { handed, kept }, _, _)) => {
                        info!(
                            handed,
                            kept, adopted, "upgrade: the old process handed over its connections"
                        );
                    }
                    Ok((other, _, _)) => warn!(?other, "upgrade: unexpected message"),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        info!(adopted, "upgrade: the old process exited");
                        return;
                    }
                    Err(e) => {
                        warn!(error = %e, "upgrade: channel failed");
                        return;
                    }
                }
            }
        });
        Ok(())
    }
}
