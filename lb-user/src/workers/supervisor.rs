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
    daemon::{DaemonError, systemd},
};

/// How long a worker may take from its start to accepting.
const READY_WAIT: Duration = Duration::from_secs(60);

/// How long a worker that gave up before accepting may take to log why and exit.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// A worker that died this soon after its start is restarted only after a pause (a
/// worker failing at start would otherwise be restarted in a tight loop).
const QUICK_DEATH: Duration = Duration::from_secs(10);

/// One worker process.
struct Worker {
    pid: libc::pid_t,
    started: Instant,
}

/// What the supervisor owns while it runs.
struct Supervisor {
    config_path: PathBuf,
    config: Config,
    plane: Option<DataPlaneKind>,
    /// `groups[l][k]`: worker k's listening socket of listener l.
    groups: Vec<Vec<std::net::TcpListener>>,
    workers: Vec<Option<Worker>>,
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
    // Before the listeners are bound: whoever sees them accept can tell that the
    // workers are still to come (until "all workers accepting").
    info!(instance = %name, workers = count, "starting workers");
    let _lock = InstanceLock::acquire(&name).map_err(DaemonError::Instance)?;
    super::remove_left_behind(&name);
    let groups = bind_groups(&config, count)?;
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
    let _selection = match select::attach(&choices, &groups) {
        Ok(s) => Some(s),
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
        groups,
        workers: (0..count).map(|_| None).collect(),
    };
    for index in 0..count {
        if let Err(e) = sup.start(index) {
            error!(worker = index, error = %e, "a worker did not start; stopping the others");
            sup.stop_all();
            return Err(DaemonError::Worker(e.to_string()));
        }
    }
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
        let wait = watchdog.map_or(Duration::from_secs(1), |w| w.min(Duration::from_secs(1)));
        match signals.wait(wait) {
            Some(libc::SIGHUP) => {
                // Applied or refused by each worker, they serve either way.
                systemd::reloading();
                sup.reload();
                systemd::reloaded();
            }
            Some(libc::SIGTERM | libc::SIGINT) => break,
            _ => sup.reap_and_restart(),
        }
    }
    systemd::stopping();
    info!("stopping the workers");
    sup.stop_all();
    super::remove_left_behind(&name);
    info!("all workers stopped");
    Ok(())
}

impl Supervisor {
    /// Forks worker `index` and waits until it accepts (or fails).
    fn start(&mut self, index: u32) -> io::Result<()> {
        let seat = Seat {
            index,
            count: self.workers.len() as u32,
        };
        let (read_end, write_end) = pipe()?;
        // SAFETY: getpid has no preconditions.
        let supervisor = unsafe { libc::getpid() };
        // SAFETY: this process is single-threaded (no runtime, no other thread), so
        // the child may run anything.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            drop(read_end);
            let code = self.in_child(seat, write_end, supervisor);
            // The child never returns into the supervisor's loop.
            std::process::exit(code);
        }
        drop(write_end);
        self.workers[index as usize] = Some(Worker {
            pid,
            started: Instant::now(),
        });
        match wait_ready(&read_end, READY_WAIT) {
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
                Err(e)
            }
        }
    }

    /// The worker process: its sockets only, the signals unblocked, then the daemon.
    fn in_child(&mut self, seat: Seat, ready: OwnedFd, supervisor: libc::pid_t) -> i32 {
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
        let mut sockets = Vec::new();
        for group in std::mem::take(&mut self.groups) {
            for (k, socket) in (0..).zip(group) {
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
            error!(worker = index, pid, status = %describe(status), "worker exited; starting it again (its connections were lost)");
            if started.is_some_and(|s| s.elapsed() < QUICK_DEATH) {
                std::thread::sleep(Duration::from_secs(1));
            }
            if let Err(e) = self.start(index as u32) {
                error!(worker = index, error = %e, "worker did not start again; the next check retries");
            }
        }
    }

    fn signal_all(&self, signal: libc::c_int) {
        for w in self.workers.iter().flatten() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(w.pid, signal) };
        }
    }

    /// SIGTERM to every worker, then waits for each (they stop within
    /// `shutdown_delay` + `shutdown_grace`; past that and 10 s more, SIGKILL).
    fn stop_all(&mut self) {
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

/// Each listener's group: one `SO_REUSEPORT` socket per worker.
fn bind_groups(
    config: &Config,
    count: u32,
) -> Result<Vec<Vec<std::net::TcpListener>>, DaemonError> {
    config
        .listeners
        .iter()
        .map(|l| {
            let group = (0..count)
                .map(|_| crate::daemon::listen_shared(l.bind))
                .collect::<io::Result<Vec<_>>>();
            group.map_err(|source| DaemonError::Bind {
                name: l.name.clone(),
                addr: l.bind,
                source,
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
fn exited(pid: libc::pid_t) -> bool {
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
fn describe(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status}")
    }
}

/// The supervisor's signals, blocked and taken with `sigtimedwait`.
struct Blocked {
    set: libc::sigset_t,
}

const SIGNALS: [libc::c_int; 4] = [libc::SIGHUP, libc::SIGTERM, libc::SIGINT, libc::SIGCHLD];

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
    fn wait(&self, limit: Duration) -> Option<libc::c_int> {
        let t = libc::timespec {
            tv_sec: limit.as_secs() as libc::time_t,
            tv_nsec: limit.subsec_nanos() as libc::c_long,
        };
        // SAFETY: valid set and timeout; no siginfo wanted.
        let s = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &t) };
        (s > 0).then_some(s)
    }
}
