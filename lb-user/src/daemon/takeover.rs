//! A hot upgrade from the running daemon's side ([`crate::upgrade`]): start the new
//! binary, and once it accepts, stop accepting, hand every connection that can go to
//! it, carry the rest to their end, and exit.

use std::{
    io,
    net::SocketAddr,
    os::fd::AsFd,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tracing::{error, info, warn};

use super::{Running, Signals, systemd};
use crate::{
    bpf::InstanceLock,
    config::Config,
    upgrade::{
        Request, Summary, UpgradeError,
        channel::Channel,
        old::{Handed, Invocation, Outgoing, Standing, Successor},
    },
};

/// How long the old process waits for its connections to depart before it answers
/// (connections still before their CONNECT go later, as they reach a plane).
const DEPART_WAIT: Duration = Duration::from_secs(10);

/// Duplicates of the lock, the control socket, the admin listener and the
/// listeners, for a later upgrade.
pub(super) fn handed<'a>(
    lock: Option<&InstanceLock>,
    control: &std::os::unix::net::UnixListener,
    admin: Option<(SocketAddr, &std::net::TcpListener)>,
    listeners: impl Iterator<Item = (SocketAddr, &'a std::net::TcpListener)>,
) -> io::Result<Handed> {
    let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned();
    Ok(Handed {
        lock: lock.map(|l| dup(l.file().as_fd())).transpose()?,
        control: dup(control.as_fd())?,
        admin: admin
            .map(|(a, s)| dup(s.as_fd()).map(|fd| (a, fd)))
            .transpose()?,
        listeners: listeners
            .map(|(a, s)| dup(s.as_fd()).map(|fd| (a, fd)))
            .collect::<io::Result<_>>()?,
    })
}

impl Running {
    /// A hot upgrade to `request`'s binary (default: `invocation`'s). When the new
    /// process takes over, this one hands over and exits; otherwise the error is
    /// logged (and answered) and the daemon serves on, unchanged.
    pub(super) async fn upgrade(
        self,
        config: &Config,
        invocation: &Invocation,
        mut request: Request,
        signals: &mut Signals,
    ) -> Self {
        let binary = request.binary.take();
        let binary = binary.unwrap_or_else(|| invocation.binary.clone());
        let successor = request.successor.take();
        match self.begin(config, (&binary, successor), invocation).await {
            Ok(successor) => self.hand_over(successor, request, signals).await,
            Err(e) => {
                error!(error = %e, binary = %binary.display(), "upgrade failed");
                if let Some(guard) = self.shared.guard.get() {
                    guard.reclaim();
                }
                if let Some(reply) = request.reply {
                    let _ = reply.send(Err(e.to_string()));
                }
                self
            }
        }
    }

    /// Starts the new process (a worker's was started by the new supervisor and
    /// waits on `successor`) and waits until it accepts.
    async fn begin(
        &self,
        config: &Config,
        (binary, successor): (&std::path::Path, Option<Channel>),
        invocation: &Invocation,
    ) -> Result<Successor, UpgradeError> {
        let why = if self.shared.seat.get().is_some() && successor.is_none() {
            Some(
                "this is a worker of [global] workers: ask the supervisor (`mqttlb upgrade`, or SIGUSR2 to its pid)",
            )
        } else {
            crate::upgrade::refusal(config, self.shared.seat.get().is_some())
        };
        if let Some(why) = why {
            return Err(UpgradeError::Unsupported(why));
        }
        let handed = self.handed.clone();
        let guard = match self.shared.guard.get() {
            Some(g) => Some(g.hand_over().map_err(UpgradeError::Guard)?),
            None => None,
        };
        let standing = Standing {
            next_id: self.shared.conns.next_id(),
            spliced: self.events.is_some(),
            guard,
        };
        match successor {
            Some(channel) => {
                crate::upgrade::old::introduce_on(Arc::new(channel), handed, standing).await
            }
            None => crate::upgrade::old::start(binary, invocation, handed, standing).await,
        }
    }

    /// The new process accepts: stop accepting and answering, hand every connection
    /// that can go, answer, carry the rest to their end, exit.
    async fn hand_over(
        mut self,
        successor: Successor,
        request: Request,
        signals: &mut Signals,
    ) -> ! {
        let pid = successor.pid;
        info!(pid, "upgrade: the new process accepts; handing over");
        // With workers, the old supervisor names the new one.
        if self.shared.seat.get().is_none() {
            systemd::main_pid(pid);
        }
        let _ = self.stop.send(true);
        for t in self.accept_tasks.drain(..) {
            let _ = t.await;
        }
        // From here the new process alone reads the program's events, writes the
        // published counters, answers `ctl` and the admin listener, checks health.
        for t in [self.events.take(), self.admin.take(), Some(self.publisher)]
            .into_iter()
            .flatten()
            .chain(self.checks)
        {
            t.abort();
        }
        self.control_task.abort();
        let shared = self.shared;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let _ = shared.departures.set(tx.clone());
        let sender = successor.send_all(rx);
        for entry in shared.conns.entries() {
            entry.ask_departure();
        }
        // What cannot go (a terminated WebSocket, TLS 1.2) stays; what is still
        // before its plane goes when it gets there.
        let deadline = Instant::now() + DEPART_WAIT;
        while Instant::now() < deadline && !shared.conns.entries().iter().all(|e| e.is_staying()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let handed = shared.departed.load(Ordering::Relaxed);
        let kept = shared.conns.len() as u64;
        info!(
            pid,
            handed,
            kept,
            "upgrade: connections handed over; this process carries the rest to their end, then exits"
        );
        if let Some(reply) = request.reply {
            let _ = reply.send(Ok(Summary { pid, handed, kept }));
        }
        if let Some(answered) = request.answered {
            // `mqttlb upgrade` gets its answer before this process goes.
            let _ = tokio::time::timeout(Duration::from_secs(2), answered).await;
        }
        loop {
            if shared.conns.is_empty() {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = signals.term.recv() => {
                    warn!(open = shared.conns.len(), "SIGTERM during an upgrade: closing what this process still carries");
                    break;
                }
                _ = signals.int.recv() => break,
            }
        }
        let answered = handed;
        let handed = shared.departed.load(Ordering::Relaxed);
        // Some of those kept reached a plane later and went too.
        let kept = kept.saturating_sub(handed - answered);
        let _ = tx.send(Outgoing::Done { handed, kept });
        let _ = tokio::task::spawn_blocking(move || sender.join()).await;
        info!(handed, "upgrade: done; old process exits");
        // No clean stop: the pins, the lock, the control socket and the listeners
        // are the new process's now.
        std::process::exit(0)
    }
}
