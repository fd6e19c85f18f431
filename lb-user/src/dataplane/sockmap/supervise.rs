//! Watching a spliced pair until it ends: events from the program, error readiness,
//! readability only while throttled, polling only where the kernel signals nothing,
//! and the idle timeout sampled from the byte counters.

use std::{
    io,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use tokio::io::Interest;

use super::{Signal, SockmapPlane, Supervised, direction::Dir, direction::DirState, quiet::Quiet};
use crate::dataplane::{Outcome, POLL_MAX, POLL_MIN, Pair};

/// The shortest window over which the splice's skb rate is judged: a burst (a large
/// retained message, say) is not a busy connection.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// Share of the larger direction's skbs the smaller one must carry for a promoted
/// conversation to stay one: one request skb, one response skb.
const BALANCED: f64 = 0.9;

/// When a spliced pair on `auto` goes back to the copy plane.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Demote {
    /// More than this many skbs a second both ways (`promote_max_rate`).
    pub max_rate: u64,
    /// Promoted as a busy conversation (`dataplane::copy::Talk`): busy is no reason
    /// while the skbs each way stay balanced, as a request answered by its response
    /// keeps them.
    pub conversation: bool,
}

/// When a spliced pair on `auto` stops paying and goes back to the copy plane: a
/// direction throttled (its destination cannot keep up, so the daemon would copy its
/// bytes anyway, slower than the copy plane), or more than `max_rate` skbs a second
/// both ways (pipelined streams: the splice sends every skb on as its own segment),
/// unless a conversation is still one.
struct Demotion {
    demote: Demote,
    /// Start of the current window and the skbs redirected each way by then.
    window: (Instant, [u64; 2]),
}

impl Demotion {
    fn new(demote: Demote) -> Self {
        Self {
            demote,
            window: (Instant::now(), [0; 2]),
        }
    }

    /// Whether the pair is busier than `max_rate`, given the skbs redirected each way
    /// so far: more than a second's worth within [`RATE_WINDOW`], or more than the
    /// rate over a longer window (which then starts again); a conversation whose skbs
    /// each way stayed [`BALANCED`] in the window is not.
    fn busy(&mut self, now: Instant, skbs: [u64; 2]) -> bool {
        let (start, at_start) = self.window;
        let elapsed = now.duration_since(start);
        let n = [0, 1].map(|i| skbs[i].saturating_sub(at_start[i]));
        let talking =
            self.demote.conversation && n[0].min(n[1]) as f64 >= BALANCED * n[0].max(n[1]) as f64;
        let limit = self.demote.max_rate as f64;
        if elapsed < RATE_WINDOW {
            return !talking && (n[0] + n[1]) as f64 > limit;
        }
        self.window = (now, skbs);
        !talking && (n[0] + n[1]) as f64 > limit * elapsed.as_secs_f64()
    }
}

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

/// What the supervision of a spliced pair keeps over its whole splice, loud start and
/// quiet rest alike: the idle clock and the demotion's window.
pub(super) struct Watch {
    idle: IdleWatch,
    demotion: Option<Demotion>,
}

impl Watch {
    /// `demote`: see [`SockmapPlane::supervise`].
    pub(super) fn new(idle_timeout: Duration, demote: Option<Demote>) -> Self {
        Self {
            idle: IdleWatch::new(idle_timeout),
            demotion: demote.map(Demotion::new),
        }
    }
}

impl SockmapPlane {
    /// Watches a spliced pair until it ends, or (with a [`Demote`] in `watch`) until it
    /// stops paying (see [`Demotion`]); `None` when a loud `quiet` has watched for
    /// [`super::quiet::HUSH_AFTER`] (the caller hushes it and goes on with the same
    /// `watch`).
    pub(super) async fn supervise(
        &self,
        pair: &Pair,
        dirs: &mut [Dir<'_>; 2],
        signal: &Signal,
        watch: &mut Watch,
        quiet: &mut Quiet,
    ) -> Option<Supervised> {
        match self.watch(pair, dirs, signal, watch, quiet).await {
            Ok(outcome) => Some(Supervised::Ended(outcome)),
            Err(Leave::Demote) => Some(Supervised::Demote),
            Err(Leave::Depart) => Some(Supervised::Depart),
            Err(Leave::Hush) => None,
        }
    }

    async fn watch(
        &self,
        pair: &Pair,
        dirs: &mut [Dir<'_>; 2],
        signal: &Signal,
        Watch { idle, demotion }: &mut Watch,
        quiet: &mut Quiet,
    ) -> Result<Outcome, Leave> {
        let mut wait = POLL_MIN;
        let hush_at = (!quiet.hushed()).then(|| Instant::now() + super::quiet::HUSH_AFTER);
        loop {
            if dirs.iter().all(|d| d.state == DirState::Done) {
                return Ok(Outcome::Closed);
            }
            let now = Instant::now();
            if hush_at.is_some_and(|t| now >= t) {
                // Between two steps: both directions' state is whole.
                return Err(Leave::Hush);
            }
            let deadline = if dirs.iter().any(|d| d.again) {
                now
            } else if dirs.iter().any(Dir::polled) {
                (now + wait).min(idle.sample_at)
            } else {
                idle.sample_at
            };
            let deadline = hush_at.map_or(deadline, |t| deadline.min(t));
            if let Err(e) = wait_event(dirs, quiet, signal, deadline, &pair.entry).await {
                return Ok(Outcome::Aborted(e));
            }
            if pair.entry.is_evicting() {
                return Ok(Outcome::Evicted);
            }
            // Between two steps both directions' state is whole: the new process
            // of a hot upgrade carries on from it.
            if pair.entry.is_departing() {
                return Err(Leave::Depart);
            }
            if signal.peer_gone.swap(false, Ordering::Relaxed) {
                return Ok(Outcome::Aborted(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "peer socket left the map",
                )));
            }
            let (changed, lag_event) = match self.advance_both(pair.id, dirs, signal) {
                Ok(c) => c,
                Err(e) => return Ok(Outcome::Aborted(e)),
            };
            if let Some(demotion) = demotion
                && self.stops_paying(dirs, demotion, lag_event)
            {
                return Err(Leave::Demote);
            }
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
                return Ok(Outcome::IdleTimeout);
            }
        }
    }

    /// Whether a pair on `auto` should go back to the copy plane now: a direction
    /// still carrying, neither one's FIN forwarded yet (a direction at EOF is handed
    /// over too: the copy plane reads the EOF again and forwards it), and one
    /// throttled or (looked at on lag events) the pair busier than the limit.
    fn stops_paying(&self, dirs: &[Dir<'_>; 2], demotion: &mut Demotion, lag_event: bool) -> bool {
        let carrying = |d: &Dir<'_>| matches!(d.state, DirState::Spliced | DirState::Throttled);
        if !dirs.iter().any(carrying) || dirs.iter().any(|d| d.state == DirState::Done) {
            return false;
        }
        if dirs.iter().any(|d| d.state == DirState::Throttled) {
            return true;
        }
        if !lag_event {
            return false;
        }
        let skbs = dirs
            .each_ref()
            .map(|d| self.bpf.sock(d.src_cookie).map_or(0, |s| s.packets));
        demotion.busy(Instant::now(), skbs)
    }

    /// Takes the program's signals (bytes to read, lag checks) and moves both
    /// directions forward; whether something changed, and whether a lag check came.
    fn advance_both(
        &self,
        id: u32,
        dirs: &mut [Dir<'_>; 2],
        signal: &Signal,
    ) -> io::Result<(bool, bool)> {
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
        Ok((changed, lag_bits != 0))
    }
}

/// Why a pair leaves the splice while it lives.
enum Leave {
    /// The splice stopped paying (see [`Demotion`]).
    Demote,
    /// A hot upgrade asked for it.
    Depart,
    /// The loud start is over (see [`super::quiet`]).
    Hush,
}

/// Waits for the next thing that concerns the pair, until `deadline`: readability of
/// a throttled source, an error on a spliced one, room for pending bytes, an event
/// from the program.
async fn wait_event(
    dirs: &mut [Dir<'_>; 2],
    quiet: &mut Quiet,
    signal: &Signal,
    deadline: Instant,
    entry: &crate::registry::Entry,
) -> io::Result<()> {
    let [d0, d1] = &mut *dirs;
    // Direction 0 reads the client (side 0) and writes the server (side 1);
    // direction 1 the other way round.
    // Input stays watched for as long as a direction is throttled (not only while
    // awaited), so that a throttle costs no epoll change per passed skb.
    quiet.read(0, d0.state == DirState::Throttled)?;
    quiet.read(1, d1.state == DirState::Throttled)?;
    let interest = |read: bool, error: bool, write: bool| {
        let wanted = [
            (read, Interest::READABLE),
            (error, Interest::ERROR),
            (write, Interest::WRITABLE),
        ];
        wanted
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, i)| i)
            .reduce(Interest::add)
    };
    let pending = (d0.pending.is_some(), d1.pending.is_some());
    let i0 = interest(d0.watch_readable(), d0.watch_errors(), pending.1);
    let i1 = interest(d1.watch_readable(), d1.watch_errors(), pending.0);
    let quiet = &*quiet;
    let (s0, s1) = (d0.src, d1.src);
    let ready = tokio::select! {
        r = quiet.ready(0, s0, i0.unwrap_or(Interest::ERROR)), if i0.is_some() => r.map(|r| Some((0, r))),
        r = quiet.ready(1, s1, i1.unwrap_or(Interest::ERROR)), if i1.is_some() => r.map(|r| Some((1, r))),
        () = signal.notify.notified() => Ok(None),
        () = entry.evicted_or_departing(true) => Ok(None),
        () = tokio::time::sleep_until(deadline.into()) => Ok(None),
    }?;
    // Input, or an error (a reset: the pump's read reports it), on a direction's
    // source; room to write needs nothing more (the pump writes what is pending).
    if let Some((side, ready)) = ready
        && (ready.is_readable() || ready.is_error() || ready.is_read_closed())
    {
        dirs[side].readable = true;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Above `max_rate` a pair is busy, within the first second as over a longer
    /// window; a promoted conversation is not while its skbs each way stay balanced,
    /// and is once one side runs ahead.
    #[test]
    fn demotion_spares_a_conversation_only_while_it_stays_one() {
        let demote = |conversation| Demote {
            max_rate: 100,
            conversation,
        };
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let window = |d: &mut Demotion| d.window = (t0, [0; 2]);

        let mut d = Demotion::new(demote(false));
        window(&mut d);
        assert!(!d.busy(at(500), [40, 40]), "80 skbs in half a second");
        assert!(d.busy(at(600), [60, 60]), "120 skbs within a second");
        window(&mut d);
        assert!(d.busy(at(2_000), [150, 150]), "300 skbs in 2 s");

        let mut d = Demotion::new(demote(true));
        window(&mut d);
        assert!(!d.busy(at(600), [60, 60]), "a conversation");
        assert!(!d.busy(at(2_000), [1_000, 999]), "still one");
        // The window started again at 2 s: from there one side runs ahead.
        assert!(d.busy(at(3_000), [2_000, 1_100]), "a pipelined stream now");
        // One side alone, but quiet: not busy.
        assert!(!d.busy(at(4_000), [2_010, 1_100]));
    }
}
