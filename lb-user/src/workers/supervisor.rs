//! The supervisor of `[global] workers = N`: binds the listener groups, starts the
//! workers (worker 0 first: it prepares what the others share, the pin directory and
//! the sticky table), restarts one that dies, passes SIGHUP on, and at SIGTERM stops
//! them and waits for their graceful stop. A single thread without an async runtime,
//! so that it may fork at any time.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use tracing::{error, info, warn};

use super::{Assigned, Seat, select};
use crate::{
    bpf::InstanceLock,
    config::{Config, DataPlaneKind},
    control::ControlSocket,
    daemon::{DaemonError, systemd},
    upgrade::{channel::Channel, old::Invocation},
};

/// How long a worker may take from its start to accepting.
const READY_WAIT: Duration = Duration::from_secs(60);

/// How long a worker that gave up before accepting may take to log why and exit.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// A worker that died this soon after its start is restarted only after a pause (a
/// worker failing at start would otherwise be restarted in a tight loop).
const QUICK_DEATH: Duration = Duration::from_secs(10);

/// One worker process.
pub(super) struct Worker {
    pub(super) pid: libc::pid_t,
    started: Instant,
}

/// What the supervisor owns while it runs.
pub(super) struct Supervisor {
    pub(super) config_path: PathBuf,
    pub(super) config: Config,
    plane: Option<DataPlaneKind>,
    pub(super) lock: InstanceLock,
    /// `groups[l]`: listener l's address and worker k's listening socket at `[k]`.
    pub(super) groups: Vec<Group>,
    pub(super) workers: Vec<Option<Worker>>,
    /// The supervisor's end of each worker's link ([`super::link`]).
    pub(super) links: Vec<Option<Channel>>,
    /// Its control socket (`mqttlb upgrade`), and its file (removed at a clean stop;
    /// a child never drops it).
    pub(super) control: (std::os::unix::net::UnixListener, ControlSocket),
    /// How it was started (what a hot upgrade starts).
    pub(super) invocation: Invocation,
    /// While a hot upgrade's new supervisor starts its workers: the channel to the
    /// old supervisor.
    pub(super) predecessor: Option<Channel>,
}

/// One listener's `SO_REUSEPORT` group.
pub(super) struct Group {
    pub(super) addr: std::net::SocketAddr,
    /// Worker k's socket at `[k]`.
    pub(super) sockets: Vec<std::net::TcpListener>,
    /// Whether the selection program is attached (by this supervisor or the one
    /// it took over from).
    pub(super) selected: bool,
}

/// Runs `config` with its workers until SIGTERM/SIGINT. A worker that cannot start
/// at first stops them all (the error says which); later, a dead one is restarted.
pub fn run(
    config_path: PathBuf,
    config: Config,
    plane: Option<DataPlaneKind>,
) -> Result<(), DaemonError> {
    let name = config.global.name.clone();
    let count = config.global.workers.get();
    // Started by a hot upgrade: the old supervisor's lock and sockets.
    let arrived = crate::upgrade::new::arrive_as_supervisor()
        .transpose()
        .map_err(|e| DaemonError::Upgrade(e.to_string()))?;
    if arrived.is_none() {
        // Before the listeners are bound: whoever sees them accept can tell that the
        // workers are still to come (until "all workers accepting").
        info!(instance = %name, workers = count, "starting workers");
    }
    let (lock, mut groups, control, predecessor) = match arrived {
        Some(a) => super::handover::take(&config, a)?,
        None => {
            let lock = InstanceLock::acquire(&name).map_err(DaemonError::Instance)?;
            super::remove_left_behind(&name);
            let groups = bind_groups(&config, count, Vec::new())?;
            let path = super::supervisor_socket(&name);
            let control = crate::control::bind(&path).map_err(|source| DaemonError::Control {
                path: path.display().to_string(),
                source,
            })?;
            (lock, groups, control, None)
        }
    };
    for l in &config.listeners {
        info!(listener = %l.name, bind = %l.bind, kind = ?l.kind(), workers = count, "listening");
    }
    if !crate::bpf::bpffs_mounted() {
        warn!(
            "bpffs is not mounted at /sys/fs/bpf: each worker keeps its own sticky table in memory, so a reconnecting client id may meet another broker through another worker; run `mount -t bpf bpf /sys/fs/bpf` as root, or set `[global] workers = 1`"
        );
    }
    let choices: Vec<select::Choice> = config.listeners.iter().map(select::Choice::of).collect();
    for c in choices.iter().filter(|c| c.by_address) {
        info!(listener = %c.listener, "per-source limits: each client address meets one worker");
    }
    // Without BPF the kernel's own hash of the connection spreads them (a client's
    // source port then says nothing of its worker).
    let (kept, fresh): (Vec<_>, Vec<_>) = choices
        .iter()
        .zip(&mut groups)
        .partition(|(_, g)| g.selected);
    if !kept.is_empty() {
        info!(
            listeners = kept.len(),
            "upgrade: the running worker selection program stays"
        );
    }
    let (choices, mut fresh): (Vec<_>, Vec<_>) =
        fresh.into_iter().map(|(c, g)| (c.clone(), g)).unzip();
    let sockets: Vec<&[std::net::TcpListener]> =
        fresh.iter().map(|g| g.sockets.as_slice()).collect();
    let _selection = match select::attach(&choices, &sockets) {
        Ok(s) => {
            for g in &mut fresh {
                g.selected = true;
            }
            Some(s)
        }
        Err(e) => {
            warn!(error = %e, "no worker selection program: the kernel's hash chooses the worker");
            None
        }
    };
    // Before the first fork: every worker seals and opens the same TLS tickets, and
    // counts client ids' connection rates in the same table.
    crate::tls::tickets::draw();
    super::rates::map()
        .map_err(|e| DaemonError::Worker(format!("the client id rate table: {e}")))?;
    let signals = Blocked::block().map_err(DaemonError::Signals)?;
    let mut sup = Supervisor {
        config_path,
        config,
        plane,
        lock,
        groups,
        workers: (0..count).map(|_| None).collect(),
        links: (0..count).map(|_| None).collect(),
        control,
        invocation: Invocation::current(),
        predecessor,
    };
    if let Err(e) = sup.start_all() {
        error!(error = %e, "a worker did not start; stopping the others");
        sup.stop_all();
        return Err(DaemonError::Worker(e.to_string()));
    }
    // In a hot upgrade: taken over, the files are this supervisor's now.
    sup.lock.own();
    sup.control.1.own();
    info!(
        instance = %name,
        workers = count,
        "all workers accepting (each connection to the worker its client source port selects)"
    );
    systemd::ready_workers(sup.config.listeners.len(), count);
    // `WatchdogSec=`: pinged from this loop, at least every half interval.
    let watchdog = sd_notify::watchdog_enabled().map(|every| every / 2);
    let mut pinged = Instant::now();
    loop {
        if let Some(every) = watchdog
            && pinged.elapsed() >= every
        {
            systemd::ping();
            pinged = Instant::now();
        }
        let wait = watchdog.map_or(TURN, |w| w.min(TURN));
        match signals.wait(wait) {
            Some(libc::SIGHUP) => {
                // Applied or refused by each worker, they serve either way.
                systemd::reloading();
                sup.reload();
                systemd::reloaded();
            }
            Some(libc::SIGTERM | libc::SIGINT) => break,
            Some(libc::SIGUSR2) => {
                info!("SIGUSR2: hot upgrade to the binary this supervisor was started from");
                // Returns only when the upgrade did not happen.
                sup.upgrade(None, None, &signals);
            }
            _ => {
                sup.reap_and_restart();
                if let Some((binary, asker)) = sup.upgrade_asked() {
                    sup.upgrade(binary, Some(asker), &signals);
                }
            }
        }
    }
    systemd::stopping();
    info!("stopping the workers");
    sup.stop_all();
    super::remove_left_behind(&name);
    drop(sup);
    info!("all workers stopped");
    Ok(())
}

/// The longest the supervisor waits for a signal before it looks for exited
/// workers and `mqttlb upgrade` requests.
const TURN: Duration = Duration::from_millis(200);

impl Supervisor {
    /// Starts every worker, worker 0 first. In a hot upgrade each new worker first
    /// takes over from the old worker of its index ([`super::handover`]).
    fn start_all(&mut self) -> io::Result<()> {
        for index in 0..self.workers.len() as u32 {
            if self.predecessor.is_some() {
                self.succeed(index)?;
            } else {
                self.start(index)?;
            }
        }
        if let Some(predecessor) = self.predecessor.take() {
            // The old supervisor may go.
            let _ = predecessor.send(&crate::upgrade::Message::Ready, &[], &[]);
        }
        Ok(())
    }

    /// Forks worker `index` and waits until it accepts (or fails).
    pub(super) fn start(&mut self, index: u32) -> io::Result<()> {
        let (pid, ready) = self.fork(index, None)?;
        self.await_ready(index, pid, &ready)
    }

    /// Forks worker `index` (with `arrival`: the successor of the old worker of that
    /// index, which hands over on that channel); returns its pid and the pipe it
    /// says "ready" on.
    pub(super) fn fork(
        &mut self,
        index: u32,
        arrival: Option<OwnedFd>,
    ) -> io::Result<(libc::pid_t, OwnedFd)> {
        let seat = Seat {
            index,
            count: self.workers.len() as u32,
        };
        let (read_end, write_end) = pipe()?;
        let (link, theirs) = Channel::pair()?;
        // SAFETY: getpid has no preconditions.
        let supervisor = unsafe { libc::getpid() };
        // SAFETY: this process is single-threaded (no runtime, no other thread), so
        // the child may run anything.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            drop((read_end, link));
            let given = (write_end, Channel::from_fd(theirs), arrival);
            let code = self.in_child(seat, given, supervisor);
            // The child never returns into the supervisor's loop.
            std::process::exit(code);
        }
        drop((write_end, theirs));
        self.workers[index as usize] = Some(Worker {
            pid,
            started: Instant::now(),
        });
        self.links[index as usize] = Some(link);
        Ok((pid, read_end))
    }

    /// Waits until worker `index` (`pid`) says it accepts on `ready`.
    pub(super) fn await_ready(
        &mut self,
        index: u32,
        pid: libc::pid_t,
        ready: &OwnedFd,
    ) -> io::Result<()> {
        match wait_ready(ready, READY_WAIT) {
            Ok(()) => {
                info!(worker = index, pid, "worker accepting");
                Ok(())
            }
            Err(e) => {
                // A worker that gave up closed the pipe on its way out, before its
                // last log line (why): it is let finish that. One that hangs is
                // killed.
                let grace = match e.kind() {
                    io::ErrorKind::TimedOut => Duration::ZERO,
                    _ => EXIT_GRACE,
                };
                let deadline = Instant::now() + grace;
                while !exited(pid) {
                    if Instant::now() >= deadline {
                        // SAFETY: signalling our own child.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                        let _ = wait_for(pid);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                self.workers[index as usize] = None;
                self.links[index as usize] = None;
                Err(e)
            }
        }
    }

    /// The worker process: its sockets only, the signals unblocked, then the daemon.
    fn in_child(
        &mut self,
        seat: Seat,
        (ready, link, arrival): (OwnedFd, Channel, Option<OwnedFd>),
        supervisor: libc::pid_t,
    ) -> i32 {
        Blocked::unblock_in_child();
        // A supervisor killed outright (SIGKILL, a crash) takes its workers down
        // gracefully: they stop as at SIGTERM, rather than serve on unsupervised.
        // SAFETY: prctl with an integer argument.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != supervisor {
            // It died before the line above: nobody to serve for.
            return 2;
        }
        // The supervisor's own ends: the others' links, the channel to an old
        // supervisor.
        self.links.clear();
        self.predecessor = None;
        let mut sockets = Vec::new();
        for group in std::mem::take(&mut self.groups) {
            for (k, socket) in (0..).zip(group.sockets) {
                if k == seat.index {
                    sockets.push(socket);
                }
                // Others' sockets close here (dropped).
            }
        }
        let assigned = Assigned {
            seat,
            sockets,
            ready,
            link,
            arrival,
        };
        let config = self.config.clone();
        let path = self.config_path.clone();
        match crate::daemon::serve_worker(path, config, self.plane, assigned) {
            Ok(()) => 0,
            Err(e) => {
                error!(worker = seat.index, error = %e, "worker failed");
                2
            }
        }
    }

    /// SIGHUP: the supervisor's copy of the file (for workers it restarts later) and
    /// every worker's reload.
    fn reload(&mut self) {
        match Config::load(&self.config_path) {
            Ok(c) => {
                if c.global.workers != self.config.global.workers {
                    warn!(
                        workers = self.config.global.workers.get(),
                        file = c.global.workers.get(),
                        "[global] workers changed: takes effect at the next start"
                    );
                }
                let mut c = c;
                c.global.workers = self.config.global.workers;
                self.config = c;
            }
            Err(errors) => {
                for e in errors.0 {
                    warn!(error = %e, "reload: the file has errors; the workers keep their configuration");
                }
            }
        }
        self.signal_all(libc::SIGHUP);
    }

    /// Collects workers that exited and starts them again.
    fn reap_and_restart(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our children, not blocking.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            let Some(index) = self
                .workers
                .iter()
                .position(|w| w.as_ref().is_some_and(|w| w.pid == pid))
            else {
                continue;
            };
            let started = self.workers[index].take().map(|w| w.started);
            self.links[index] = None;
            error!(worker = index, pid, status = %describe(status), "worker exited; starting it again (its connections were lost)");
            if started.is_some_and(|s| s.elapsed() < QUICK_DEATH) {
                std::thread::sleep(Duration::from_secs(1));
            }
            if let Err(e) = self.start(index as u32) {
                error!(worker = index, error = %e, "worker did not start again; the next check retries");
            }
        }
    }

    pub(super) fn signal_all(&self, signal: libc::c_int) {
        for w in self.workers.iter().flatten() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(w.pid, signal) };
        }
    }

    /// SIGTERM to every worker, then waits for each (they stop within
    /// `shutdown_delay` + `shutdown_grace`; past that and 10 s more, SIGKILL).
    pub(super) fn stop_all(&mut self) {
        self.signal_all(libc::SIGTERM);
        // Our copies of the listening sockets go, so a group closes with its worker.
        self.groups.clear();
        let g = &self.config.global;
        let deadline =
            Instant::now() + g.shutdown_delay + g.shutdown_grace + Duration::from_secs(10);
        for w in self.workers.iter_mut() {
            let Some(worker) = w.take() else { continue };
            while !exited(worker.pid) {
                if Instant::now() > deadline {
                    warn!(
                        pid = worker.pid,
                        "worker still running after the grace period: killed"
                    );
                    // SAFETY: signalling our own child.
                    unsafe { libc::kill(worker.pid, libc::SIGKILL) };
                    let _ = wait_for(worker.pid);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Each listener's group: one `SO_REUSEPORT` socket per worker, taken from
/// `inherited` (a hot upgrade's old supervisor's, by address) where it has one.
pub(super) fn bind_groups(
    config: &Config,
    count: u32,
    mut inherited: Vec<Group>,
) -> Result<Vec<Group>, DaemonError> {
    config
        .listeners
        .iter()
        .map(|l| {
            if let Some(i) = inherited.iter().position(|g| g.addr == l.bind) {
                return Ok(inherited.swap_remove(i));
            }
            let group = (0..count)
                .map(|_| crate::daemon::listen_shared(l.bind))
                .collect::<io::Result<Vec<_>>>();
            let sockets = group.map_err(|source| DaemonError::Bind {
                name: l.name.clone(),
                addr: l.bind,
                source,
            })?;
            Ok(Group {
                addr: l.bind,
                sockets,
                selected: false,
            })
        })
        .collect()
}

/// A close-on-exec pipe: (read, write).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just made and are ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Waits for the worker's "ready" byte; end of file means it exited first.
fn wait_ready(pipe: &OwnedFd, limit: Duration) -> io::Result<()> {
    let mut poll = libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut poll, 1, limit.as_millis() as libc::c_int) };
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("not accepting after {limit:?}"),
        ));
    }
    let mut byte = [0u8; 1];
    // SAFETY: reading one byte into our buffer.
    let got = unsafe { libc::read(pipe.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
    if got == 1 {
        Ok(())
    } else {
        Err(io::Error::other(
            "exited before accepting (see its log above)",
        ))
    }
}

/// Whether `pid` has exited (and collects it).
pub(super) fn exited(pid: libc::pid_t) -> bool {
    let mut status = 0;
    // SAFETY: waitpid on our own child, not blocking.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    r == pid || r < 0
}

fn wait_for(pid: libc::pid_t) -> io::Result<()> {
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An exit status as words.
pub(super) fn describe(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status}")
    }
}

/// The supervisor's signals, blocked and taken with `sigtimedwait`.
pub(super) struct Blocked {
    set: libc::sigset_t,
}

const SIGNALS: [libc::c_int; 5] = [
    libc::SIGHUP,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGCHLD,
    libc::SIGUSR2,
];

impl Blocked {
    fn set() -> libc::sigset_t {
        // SAFETY: sigemptyset/sigaddset initialise and fill a set we own.
        unsafe {
            let mut set = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in SIGNALS {
                libc::sigaddset(&mut set, s);
            }
            set
        }
    }

    fn block() -> io::Result<Self> {
        let set = Self::set();
        // SAFETY: changing this (only) thread's mask with a valid set.
        if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { set })
    }

    /// A worker starts with the signals as a daemon expects them.
    fn unblock_in_child() {
        let set = Self::set();
        // SAFETY: as in `block`.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }

    /// The next signal, or None after `limit`.
    pub(super) fn wait(&self, limit: Duration) -> Option<libc::c_int> {
        let t = libc::timespec {
            tv_sec: limit.as_secs() as libc::time_t,
            tv_nsec: limit.subsec_nanos() as libc::c_long,
        };
        // SAFETY: valid set and timeout; no siginfo wanted.
        let s = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &t) };
        (s > 0).then_some(s)
    }
}
