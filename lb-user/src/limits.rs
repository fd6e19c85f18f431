//! Limits that protect the process itself: the memory every connection may buffer before
//! its CONNECT (per connection and all together), the descriptor limit behind
//! `max_connections`, and local resource errors (EMFILE, ENOBUFS, ...), which are the
//! process's own trouble and never a server's fault.

use std::{
    io,
    sync::{
        LazyLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// Descriptors kept back from connections: listeners, health checks, BPF maps and
/// programs, the runtime's own, log files, a reload reading certificates.
pub const FD_RESERVE: u64 = 128;

/// Bytes buffered by connections that have not completed their CONNECT (TLS
/// plaintext, WebSocket upgrade and frames, PROXY header, CONNECT), against a global
/// limit: past it, new bytes are refused and that connection is closed, so a flood of
/// slow or hostile clients cannot grow the process without bound.
#[derive(Debug)]
pub struct PreConnectBudget {
    used: AtomicUsize,
    limit: usize,
}

impl PreConnectBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// A charge of nothing yet, for one connection.
    pub fn charge(&self) -> Charge<'_> {
        Charge {
            budget: self,
            held: 0,
        }
    }
}

/// One connection's share of a [`PreConnectBudget`]; given back when dropped.
#[derive(Debug)]
pub struct Charge<'a> {
    budget: &'a PreConnectBudget,
    held: usize,
}

impl Charge<'_> {
    /// Makes the charge `bytes` (a buffer's capacity); false, holding what it held,
    /// when the budget cannot take the growth.
    pub fn hold(&mut self, bytes: usize) -> bool {
        if bytes <= self.held {
            return true;
        }
        let more = bytes - self.held;
        let taken = self
            .budget
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used + more <= self.budget.limit).then_some(used + more)
            });
        if taken.is_ok() {
            self.held = bytes;
        }
        taken.is_ok()
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.held, Ordering::Relaxed);
    }
}

/// Whether an error comes from a resource of this host (descriptors, socket buffers,
/// memory, local ports) rather than from the peer: such an error says nothing about a
/// server's health.
pub fn is_local_resource(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// One warning a second at most about local resource errors, wherever they are met
/// (accept, server connects, health checks).
pub static LOCAL_RESOURCE_LOG: LazyLock<LogOnce> =
    LazyLock::new(|| LogOnce::new(Duration::from_secs(1)));

/// Lets a warning through at most once per `period`: the first of an episode, then one
/// a period while it lasts. Counting is the caller's job; this only keeps the log
/// readable under a flood.
#[derive(Debug)]
pub struct LogOnce {
    /// Milliseconds since `epoch` of the last warning let through, plus one (0: never).
    last: AtomicU64,
    epoch: Instant,
    period: Duration,
}

impl LogOnce {
    /// At most one warning per `period`.
    pub fn new(period: Duration) -> Self {
        Self {
            last: AtomicU64::new(0),
            epoch: Instant::now(),
            period,
        }
    }

    /// True when a warning may be logged now.
    pub fn allow(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let period = self.period.as_millis() as u64;
        self.last
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                (last == 0 || now >= last + period).then_some(now)
            })
            .is_ok()
    }
}

/// The process's open-files limit, after raising the soft limit to the hard one (as
/// HAProxy and NGINX do); `None` when it cannot be read.
pub fn raise_nofile() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own; raising soft to hard needs no
        // privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Some(lim.rlim_cur)
}

/// The most connections `nofile` descriptors can carry: two each (client and server),
/// after [`FD_RESERVE`].
pub fn connections_for(nofile: u64) -> u32 {
    (nofile.saturating_sub(FD_RESERVE) / 2).clamp(1, u64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_shared_and_given_back() {
        let budget = PreConnectBudget::new(1000);
        let mut a = budget.charge();
        let mut b = budget.charge();
        assert!(a.hold(600));
        assert!(a.hold(500), "shrinking keeps what is held");
        assert!(!b.hold(500), "over the limit");
        assert!(b.hold(400));
        assert_eq!(budget.used(), 1000);
        drop(a);
        assert_eq!(budget.used(), 400);
        assert!(b.hold(1000));
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn local_errors_are_told_apart() {
        for code in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::EADDRNOTAVAIL,
        ] {
            assert!(is_local_resource(&io::Error::from_raw_os_error(code)));
        }
        for code in [libc::ECONNREFUSED, libc::ETIMEDOUT, libc::ECONNRESET] {
            assert!(!is_local_resource(&io::Error::from_raw_os_error(code)));
        }
        assert!(!is_local_resource(&io::Error::other("x")));
    }

    #[test]
    fn log_once_per_period() {
        let l = LogOnce::new(Duration::from_millis(200));
        assert!(l.allow());
        assert!(!l.allow());
        std::thread::sleep(Duration::from_millis(220));
        assert!(l.allow());
        assert!(!l.allow());
    }

    #[test]
    fn connections_from_descriptors() {
        assert_eq!(connections_for(20_000), 9_936);
        assert_eq!(connections_for(100), 1);
    }
}
