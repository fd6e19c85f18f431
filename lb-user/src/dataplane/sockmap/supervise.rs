//! Watching a spliced pair until it ends: events from the program, error readiness,
//! readability only while throttled, polling only where the kernel signals nothing,
//! and the idle timeout sampled from the byte counters.

use std::{
    io,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use tokio::io::Interest;

use super::{Signal, SockmapPlane, direction::Dir, direction::DirState};
use crate::dataplane::{Outcome, POLL_MAX, POLL_MIN, Pair};

/// The idle timeout of a spliced pair: activity is sampled every twentieth of
/// `idle_timeout`, so the connection closes between `idle` and `idle` + 5% after its
/// last byte.
struct IdleWatch {
    idle: Duration,
    sample: Duration,
    sample_at: Instant,
    active_at: Instant,
    /// Bytes each way at the last sample.
    activity: (u64, u64),
}

impl IdleWatch {
    fn new(idle: Duration) -> Self {
        let sample = (idle / 20).max(POLL_MIN);
        let now = Instant::now();
        Self {
            idle,
            sample,
            sample_at: now + sample,
            active_at: now,
            activity: (0, 0),
        }
    }

    /// Whether the pair has been idle for `idle`, given the bytes it carried each way
    /// (read only when a sample is due).
    fn expired(&mut self, now: Instant, bytes: impl FnOnce() -> (u64, u64)) -> bool {
        if now < self.sample_at {
            return false;
        }
        self.sample_at = now + self.sample;
        let bytes = bytes();
        if bytes != self.activity {
            self.activity = bytes;
            self.active_at = now;
            return false;
        }
        now.duration_since(self.active_at) >= self.idle
    }
}

impl SockmapPlane {
    /// Watches a spliced pair until it ends.
    pub(super) async fn supervise(
        &self,
        pair: &Pair,
        dirs: &mut [Dir<'_>; 2],
        signal: &Signal,
    ) -> Outcome {
        let mut idle = IdleWatch::new(pair.idle_timeout);
        let mut wait = POLL_MIN;
        loop {
            if dirs.iter().all(|d| d.state == DirState::Done) {
                return Outcome::Closed;
            }
            let now = Instant::now();
            let deadline = if dirs.iter().any(|d| d.again) {
                now
            } else if dirs.iter().any(Dir::polled) {
                (now + wait).min(idle.sample_at)
            } else {
                idle.sample_at
            };
            if let Err(e) = wait_event(dirs, signal, deadline, &pair.entry).await {
                return Outcome::Aborted(e);
            }
            if pair.entry.is_evicting() {
                return Outcome::Evicted;
            }
            if signal.peer_gone.swap(false, Ordering::Relaxed) {
                return Outcome::Aborted(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "peer socket left the map",
                ));
            }
            let changed = match self.advance_both(pair.id, dirs, signal) {
                Ok(c) => c,
                Err(e) => return Outcome::Aborted(e),
            };
            wait = if changed {
                POLL_MIN
            } else {
                (wait * 2).min(POLL_MAX)
            };
            let [d0, d1] = &mut *dirs;
            let bytes = || {
                (
                    self.count_redirected(d0) + d0.consumed,
                    self.count_redirected(d1) + d1.consumed,
                )
            };
            if idle.expired(Instant::now(), bytes) {
                return Outcome::IdleTimeout;
            }
        }
    }

    /// Takes the program's signals (bytes to read, lag checks) and moves both
    /// directions forward; true when something changed.
    fn advance_both(&self, id: u32, dirs: &mut [Dir<'_>; 2], signal: &Signal) -> io::Result<bool> {
        let read_bits = signal.read.swap(0, Ordering::Relaxed);
        for d in dirs.iter_mut().filter(|d| read_bits & (1 << d.dir) != 0) {
            d.readable = true;
        }
        let lag_bits = signal.lag.swap(0, Ordering::Relaxed);
        for d in dirs.iter_mut().filter(|d| lag_bits & (1 << d.dir) != 0) {
            self.count_redirected(d);
        }
        let mut changed = false;
        for d in dirs.iter_mut() {
            match self.advance(id, d, lag_bits & (1 << d.dir) != 0) {
                Ok(c) => changed |= c,
                Err(e) => {
                    tracing::debug!(id, dir = d.dir, error = %e, state = ?d.state, "spliced direction failed");
                    return Err(e);
                }
            }
        }
        Ok(changed)
    }
}

/// Waits for the next thing that concerns the pair, until `deadline`: readability of
/// a throttled source, an error on a spliced one, room for pending bytes, an event
/// from the program.
async fn wait_event(
    dirs: &mut [Dir<'_>; 2],
    signal: &Signal,
    deadline: Instant,
    entry: &crate::registry::Entry,
) -> io::Result<()> {
    let [d0, d1] = &mut *dirs;
    let (r0, r1) = (d0.watch_readable(), d1.watch_readable());
    let (e0, e1) = (d0.watch_errors(), d1.watch_errors());
    let (w0, w1) = (d0.pending.is_some(), d1.pending.is_some());
    let readable = tokio::select! {
        r = d0.src.readable(), if r0 => r.map(|()| Some(0)),
        r = d1.src.readable(), if r1 => r.map(|()| Some(1)),
        // A reset: the pump's read reports it.
        r = d0.src.ready(Interest::ERROR), if e0 => r.map(|_| Some(0)),
        r = d1.src.ready(Interest::ERROR), if e1 => r.map(|_| Some(1)),
        r = d0.dst.writable(), if w0 => r.map(|()| None),
        r = d1.dst.writable(), if w1 => r.map(|()| None),
        () = signal.notify.notified() => Ok(None),
        () = entry.evicted() => Ok(None),
        () = tokio::time::sleep_until(deadline.into()) => Ok(None),
    }?;
    if let Some(i) = readable {
        dirs[i].readable = true;
    }
    Ok(())
}
