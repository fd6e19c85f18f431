//! A hot upgrade of `[global] workers` (`mqttlb upgrade`, which reaches the
//! supervisor's control socket, or SIGUSR2 to the supervisor). Each worker is handed
//! over as a lone daemon is ([`crate::upgrade`]), to a worker of the same index that
//! the new supervisor starts:
//!
//! 1. The old supervisor starts the new binary (its own arguments, a channel as for a
//!    lone daemon). The new one reads its configuration and says hello.
//! 2. The old supervisor sends the instance lock, its control socket and every
//!    listener group ([`Message::Groups`]): nothing is bound again. The selection
//!    program attached to each group stays (a socket is in one socket array at a
//!    time; the number of workers, all it depends on, does not change).
//! 3. The new supervisor starts its workers one after the other. Each new worker
//!    waits on a new channel, whose other end goes to the old supervisor
//!    ([`Message::Worker`]) and on the link to the old worker of that index
//!    ([`Message::HandOver`]). The two workers then hand over as a lone daemon and
//!    its successor do; the old worker answers its supervisor
//!    ([`Message::HandedOver`]) and exits once it holds nothing.
//! 4. Once all new workers accept, the new supervisor says [`Message::Ready`]. The
//!    old one answers `mqttlb upgrade` with the sums, names the new one to systemd,
//!    waits for its workers to exit, and exits.
//!
//! A new process that fails before its worker 0 accepts (a broken file, a binary
//! that exits, maps of another layout) changes nothing: the old supervisor and its
//! workers serve on. A later new worker that fails is started afresh; the old worker
//! of its index then stops gracefully (its connections are evacuated).

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::{fd::AsFd, unix::net::UnixStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use tracing::{error, info, warn};

use super::supervisor::{Blocked, Group, Supervisor, bind_groups, exited};
use crate::{
    bpf::InstanceLock,
    config::Config,
    control::ControlSocket,
    daemon::{DaemonError, systemd},
    upgrade::{
        Message, Summary, UpgradeError,
        channel::Channel,
        new::Groups,
        old::{HELLO_WAIT, READY_WAIT, give_up, spawn, unexpected},
    },
};

/// How long the old supervisor waits for its workers' answers once the new
/// supervisor's workers accept (each old worker waits up to 10 s for its
/// connections to depart).
const ANSWER_WAIT: Duration = Duration::from_secs(90);

/// What a supervisor starts from: the instance lock, the listener groups, its control
/// socket, and in a hot upgrade the channel to the old supervisor.
pub(super) type Taken = (
    InstanceLock,
    Vec<Group>,
    (std::os::unix::net::UnixListener, ControlSocket),
    Option<Channel>,
);

/// The new supervisor's start from what the old one handed over: the lock, the
/// listener groups (bound anew only for a listener the old one did not have), the
/// control socket, and the channel to the old supervisor.
pub(super) fn take(config: &Config, arrived: Groups) -> Result<Taken, DaemonError> {
    let count = config.global.workers.get();
    if arrived.workers != count {
        return Err(DaemonError::Upgrade(format!(
            "[global] workers = {count} in the file, {} in the running daemon: a hot upgrade keeps the number of workers; restart to change it",
            arrived.workers
        )));
    }
    info!(
        workers = count,
        "upgrade: taking over the listener groups of the running supervisor"
    );
    let lock = InstanceLock::inherited(arrived.lock, &config.global.name);
    let inherited = arrived
        .groups
        .into_iter()
        .map(|(addr, fds, selected)| Group {
            addr,
            sockets: fds.into_iter().map(std::net::TcpListener::from).collect(),
            selected,
        })
        .collect();
    let groups = bind_groups(config, count, inherited)?;
    let path = super::supervisor_socket(&config.global.name);
    let control = crate::control::inherited(arrived.control, &path).map_err(|source| {
        DaemonError::Control {
            path: path.display().to_string(),
            source,
        }
    })?;
    Ok((lock, groups, control, Some(arrived.channel)))
}

impl Supervisor {
    /// An `upgrade [BINARY]` request waiting on the control socket: the binary and
    /// the asker. Any other request is answered with an error here.
    pub(super) fn upgrade_asked(&mut self) -> Option<(Option<PathBuf>, UnixStream)> {
        let (mut stream, _) = self.control.0.accept().ok()?;
        let mut line = String::new();
        let read = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(2))))
            .and_then(|()| BufReader::new((&stream).take(4096)).read_line(&mut line));
        if read.is_err() {
            return None;
        }
        match line.trim().strip_prefix("upgrade") {
            Some(rest) if rest.is_empty() || rest.starts_with(' ') => {
                let rest = rest.trim();
                Some(((!rest.is_empty()).then(|| PathBuf::from(rest)), stream))
            }
            _ => {
                let why = "the supervisor answers `upgrade` only; other requests go to a worker's control socket";
                answer(&mut stream, Err(why.to_owned()));
                None
            }
        }
    }

    /// A hot upgrade to `binary` (default: the one this supervisor was started
    /// from), answered on `asker`. Returns only if it did not happen; otherwise this
    /// supervisor waits for its workers to hand over and exit, and exits.
    pub(super) fn upgrade(
        &mut self,
        binary: Option<PathBuf>,
        mut asker: Option<UnixStream>,
        signals: &Blocked,
    ) {
        let binary = binary.unwrap_or_else(|| self.invocation.binary.clone());
        match self.hand_over(&binary) {
            Ok(summary) => {
                info!(
                    pid = summary.pid,
                    handed = summary.handed,
                    kept = summary.kept,
                    "upgrade: the new supervisor's workers accept; the old workers carry the rest to their end"
                );
                systemd::main_pid(summary.pid);
                if let Some(s) = asker.as_mut() {
                    answer(s, Ok(summary));
                }
                drop(asker);
                self.leave(signals)
            }
            Err(e) => {
                error!(error = %e, binary = %binary.display(), "upgrade failed");
                if let Some(s) = asker.as_mut() {
                    answer(s, Err(e.to_string()));
                }
            }
        }
    }

    /// Starts the new supervisor and passes each of its workers to the old worker
    /// of that index; the sums of what the old workers handed over.
    fn hand_over(&mut self, binary: &std::path::Path) -> Result<Summary, UpgradeError> {
        if let Some(why) = crate::upgrade::refusal(&self.config, true) {
            return Err(UpgradeError::Unsupported(why));
        }
        let (mut child, channel) = spawn(binary, &self.invocation)?;
        let mut asked = Vec::new();
        let outcome = self.introduce(&channel, &mut asked);
        drop(channel);
        let answers = self.answers(&asked);
        if let Err(e) = outcome {
            give_up(&mut child);
            return Err(e);
        }
        let mut summary = Summary {
            pid: child.id(),
            handed: 0,
            kept: 0,
        };
        for (index, answer) in answers {
            match answer {
                Ok(s) => {
                    summary.handed += s.handed;
                    summary.kept += s.kept;
                }
                Err(why) => {
                    error!(worker = index, error = %why, "upgrade: this worker's connections were not handed over; it stops gracefully (its new worker started afresh)");
                    if let Some(w) = &self.workers[index as usize] {
                        // SAFETY: signalling our own child.
                        unsafe { libc::kill(w.pid, libc::SIGTERM) };
                    }
                }
            }
        }
        Ok(summary)
    }

    /// Hello, the groups, then each new worker's channel passed to the old worker
    /// of its index (`asked`), up to Ready.
    fn introduce(&mut self, channel: &Channel, asked: &mut Vec<u32>) -> Result<(), UpgradeError> {
        let new_process = |step| move |source| UpgradeError::NewProcess { step, source };
        match channel
            .recv(Some(HELLO_WAIT))
            .map_err(new_process("hello"))?
        {
            (Message::Hello { pid }, _, _) => {
                info!(pid, "upgrade: new supervisor read its configuration");
            }
            (other, _, _) => return Err(unexpected("hello", &other)),
        }
        let mut fds = vec![self.lock.file().as_fd(), self.control.0.as_fd()];
        for g in &self.groups {
            fds.extend(g.sockets.iter().map(AsFd::as_fd));
        }
        let groups = Message::Groups {
            listeners: self.groups.iter().map(|g| g.addr).collect(),
            workers: self.workers.len() as u32,
            selected: self.groups.iter().map(|g| g.selected).collect(),
        };
        channel
            .send(&groups, &[], &fds)
            .map_err(new_process("groups"))?;
        loop {
            match channel
                .recv(Some(READY_WAIT))
                .map_err(new_process("workers"))?
            {
                (Message::Worker { index }, _, fds) => {
                    let link = self.links.get(index as usize).and_then(Option::as_ref);
                    let Some(link) = link else {
                        // Dropping the channel tells the new worker: it starts afresh.
                        warn!(
                            worker = index,
                            "upgrade: no such worker running here to hand over"
                        );
                        continue;
                    };
                    let fds: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
                    match link.send(&Message::HandOver, &[], &fds) {
                        Ok(()) => asked.push(index),
                        Err(e) => {
                            warn!(worker = index, error = %e, "upgrade: the worker's link failed")
                        }
                    }
                }
                (Message::Ready, _, _) => return Ok(()),
                (other, _, _) => return Err(unexpected("workers", &other)),
            }
        }
    }

    /// Each asked worker's answer, in order (an unanswered one as an error).
    fn answers(&self, asked: &[u32]) -> Vec<(u32, Result<Summary, String>)> {
        let deadline = Instant::now() + ANSWER_WAIT;
        asked
            .iter()
            .map(|&index| {
                let link = self.links[index as usize].as_ref();
                let wait = deadline.saturating_duration_since(Instant::now());
                let answer = match link.map(|l| l.recv(Some(wait))) {
                    Some(Ok((Message::HandedOver { outcome }, _, _))) => outcome,
                    Some(Ok((other, _, _))) => Err(format!("unexpected answer {other:?}")),
                    Some(Err(e)) => Err(format!("no answer: {e}")),
                    None => Err("the worker exited".to_owned()),
                };
                (index, answer)
            })
            .collect()
    }

    /// After a hand-over: waits until every old worker exited (a SIGTERM meanwhile
    /// goes to them), then exits without a clean stop (the lock, the sockets and the
    /// pins are the new supervisor's).
    fn leave(&mut self, signals: &Blocked) -> ! {
        self.groups.clear();
        self.links.clear();
        loop {
            for w in self.workers.iter_mut() {
                if w.as_ref().is_some_and(|w| exited(w.pid)) {
                    *w = None;
                }
            }
            if self.workers.iter().all(Option::is_none) {
                break;
            }
            if let Some(libc::SIGTERM | libc::SIGINT) = signals.wait(Duration::from_millis(100)) {
                warn!("SIGTERM during an upgrade: the old workers close what they still carry");
                self.signal_all(libc::SIGTERM);
            }
        }
        info!("upgrade: done; old supervisor exits");
        std::process::exit(0)
    }

    /// Starts worker `index` as the successor of the old worker of that index. A
    /// new worker 0 that fails ends the upgrade (nothing moved yet); a later one is
    /// started afresh.
    pub(super) fn succeed(&mut self, index: u32) -> std::io::Result<()> {
        let (ours, theirs) = Channel::pair()?;
        let (pid, ready) = self.fork(index, Some(theirs))?;
        let predecessor = self.predecessor.as_ref().expect("during a hot upgrade");
        predecessor.send(&Message::Worker { index }, &[], &[ours.as_fd()])?;
        drop(ours);
        match self.await_ready(index, pid, &ready) {
            Ok(()) => Ok(()),
            Err(e) if index == 0 => Err(e),
            Err(e) => {
                error!(worker = index, error = %e, "upgrade: the new worker did not take over; starting it afresh (the old one stops gracefully)");
                self.start(index)
            }
        }
    }
}

/// Writes the outcome to `mqttlb upgrade` as the daemon's control socket does.
fn answer(stream: &mut UnixStream, outcome: Result<Summary, String>) {
    let body = match outcome {
        Ok(summary) => serde_json::json!({ "upgraded": summary }),
        Err(e) => serde_json::json!({ "error": e }),
    };
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = stream.write_all(format!("{body}\n").as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Both);
}
