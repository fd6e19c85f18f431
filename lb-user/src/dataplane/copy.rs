//! The userspace data plane: readiness-driven copy through one per-thread scratch
//! buffer. An idle connection holds no buffer; a heap buffer exists only while a peer
//! has not taken all of a read (and then the direction stops reading, so TCP flow
//! control holds the sender back).

use std::{
    cell::RefCell,
    io,
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
    time::Instant,
};

use lb_common::DaemonStat;
use tokio::net::TcpStream;

use super::{
    CarryFuture, DataPlane, Outcome, POLL_MAX, POLL_MIN, Pair, Traffic, evict, reset_both,
};
use crate::{config::Promote, mqtt::boundary::Boundary, stats::Stats, sys};

/// Size of the per-thread scratch buffer (64 KiB measured twice as fast as 8 KiB).
const SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// What one [`move_once`] step did.
pub(crate) enum Moved {
    /// Nothing to read now (readiness cleared).
    Idle,
    /// The source reached EOF.
    Eof,
    /// `read` bytes moved; `rest` holds the tail `dst` did not take.
    Bytes { read: usize, rest: Option<Vec<u8>> },
}

/// Reads once from `src` into the thread's scratch buffer and writes it to `dst`,
/// never waiting. Only a tail `dst` did not take is copied to the heap. The read
/// trusts the runtime's readiness (it is skipped while the runtime has seen none):
/// right for a task that waits for readability.
pub(crate) fn move_once(
    src: &TcpStream,
    dst: &TcpStream,
    boundary: Option<&mut Boundary>,
) -> io::Result<Moved> {
    move_from(|buf| src.try_read(buf), |b| dst.try_write(b), boundary)
}

/// [`move_once`] reading at most `max` bytes, not following packets.
fn move_at_most(src: &TcpStream, dst: &TcpStream, max: u64) -> io::Result<Moved> {
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    move_from(
        |buf| src.try_read(&mut buf[..max.min(SCRATCH)]),
        |b| dst.try_write(b),
        None,
    )
}

/// [`move_once`] with a read that always asks the socket: for a task that does not
/// wait for readability and so cannot count on the runtime having seen the latest
/// readiness edge (the sockmap pump).
pub(crate) fn move_once_now(
    src: &TcpStream,
    dst: &TcpStream,
    boundary: Option<&mut Boundary>,
) -> io::Result<Moved> {
    move_from(
        |buf| sys::recv_now(src.as_raw_fd(), buf),
        |b| dst.try_write(b),
        boundary,
    )
}

/// [`move_once_now`] between sockets the runtime keeps no readiness for (a spliced
/// pair's, see `sockmap::quiet`): a plain `recv` and a plain `send`.
pub(crate) fn move_once_raw(src: RawFd, dst: RawFd) -> io::Result<Moved> {
    move_from(
        |buf| sys::recv_now(src, buf),
        |b| sys::send_now(dst, b),
        None,
    )
}

/// Moves one read; `boundary`, when given, follows the packets read.
fn move_from(
    read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    write: impl FnOnce(&[u8]) -> io::Result<usize>,
    boundary: Option<&mut Boundary>,
) -> io::Result<Moved> {
    SCRATCH_BUF.with_borrow_mut(|buf| {
        let n = match read(buf) {
            Ok(0) => return Ok(Moved::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Moved::Idle),
            Err(e) => return Err(io::Error::new(e.kind(), format!("read: {e}"))),
        };
        if let Some(b) = boundary {
            b.advance(&buf[..n]);
        }
        let rest = match write(&buf[..n]) {
            Ok(m) if m == n => None,
            Ok(m) => Some(buf[m..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(buf[..n].to_vec()),
            Err(e) => return Err(e),
        };
        Ok(Moved::Bytes { read: n, rest })
    })
}

/// Writes what it can of `pending` to `dst` without waiting; true once it is all
/// written.
pub(crate) fn write_pending(dst: &TcpStream, pending: &mut Vec<u8>) -> io::Result<bool> {
    write_pending_with(|b| dst.try_write(b), pending)
}

/// [`write_pending`] with a plain `send` (see [`move_once_raw`]).
pub(crate) fn write_pending_raw(dst: RawFd, pending: &mut Vec<u8>) -> io::Result<bool> {
    write_pending_with(|b| sys::send_now(dst, b), pending)
}

fn write_pending_with(
    write: impl FnOnce(&[u8]) -> io::Result<usize>,
    pending: &mut Vec<u8>,
) -> io::Result<bool> {
    match write(pending) {
        Ok(n) => {
            pending.drain(..n);
            Ok(pending.is_empty())
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// The copy data plane.
#[derive(Debug, Clone)]
pub struct CopyPlane {
    stats: Arc<Stats>,
}

impl CopyPlane {
    /// A copy plane counting into `stats`.
    pub fn new(stats: Arc<Stats>) -> Self {
        Self { stats }
    }

    /// Carries the pair from its start.
    ///
    /// This and the steps below it return `async move` blocks rather than being
    /// `async fn`s: a copied pair's future lives as long as the connection, and an
    /// `async fn` stores its arguments twice (the pair's future was 2.4 KB, measured
    /// with `-Zprint-type-sizes`).
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would store its arguments twice"
    )]
    pub fn run(&self, pair: Pair) -> impl Future<Output = Outcome> {
        async move { self.run_handed_over(&pair, Handover::default()).await }
    }

    /// Carries the pair from its start until it ends, or until it crosses a
    /// `promote` threshold with nothing read and unwritten either way and neither side
    /// finished: then returns the bytes copied each way (client to server, server to
    /// client), and the pair is the caller's to splice.
    pub fn run_promotable(
        &self,
        pair: &Pair,
        promote: Promote,
    ) -> impl Future<Output = Result<Outcome, Promoted>> {
        self.promotable_from(pair, Handover::default(), promote)
    }

    /// [`CopyPlane::run_promotable`] from where `handover` says (a hot upgrade's
    /// pair: its pending bytes and finished directions).
    fn promotable_from(
        &self,
        pair: &Pair,
        handover: Handover<'_>,
        promote: Promote,
    ) -> impl Future<Output = Result<Outcome, Promoted>> {
        self.stats.inc(DaemonStat::Copied);
        let boundary = pair.boundary.map(|b| (0, b));
        async move {
            match copy_both(pair, handover, boundary, &self.stats, promote).await {
                Ok(Ended::Promote(promoted)) => Err(promoted),
                Ok(Ended::Depart(stopped)) => Ok(depart(pair, stopped)),
                Ok(Ended::Outcome(o)) => {
                    if let Outcome::Aborted(_) = o {
                        reset_both(pair);
                    }
                    Ok(o)
                }
                Err(e) => {
                    reset_both(pair);
                    Ok(Outcome::Aborted(e))
                }
            }
        }
    }

    /// Carries a pair, possibly one the sockmap plane hands over mid-stream. Resets both
    /// sockets on error; the caller closes them.
    pub fn run_handed_over(
        &self,
        pair: &Pair,
        handover: Handover<'_>,
    ) -> impl Future<Output = Outcome> {
        self.stats.inc(DaemonStat::Copied);
        // No promotion threshold: `copy_both` ends only with an outcome. A fresh pair
        // starts where the pair says; one handed over mid-stream where the hand-over
        // says.
        let boundary = if handover.ready.is_none() {
            pair.boundary.map(|b| (0, b))
        } else {
            handover.follow_from
        };
        async move {
            let copied = copy_both(pair, handover, boundary, &self.stats, Promote::default());
            let result = copied.await.map(|ended| match ended {
                Ended::Outcome(o) => o,
                Ended::Depart(stopped) => depart(pair, stopped),
                Ended::Promote(_) => unreachable!("promoted without a threshold"),
            });
            if let Err(_) | Ok(Outcome::Aborted(_)) = &result {
                reset_both(pair);
            }
            result.unwrap_or_else(Outcome::Aborted)
        }
    }

    /// Carries on a pair a hot upgrade moved while it was copied, from where it
    /// stood: `promote` as for a fresh pair (the `auto` plane's thresholds).
    pub(crate) fn resume_copied(
        &self,
        pair: &Pair,
        stopped: Stopped,
        promote: Promote,
    ) -> impl Future<Output = Result<Outcome, Promoted>> {
        let Stopped { pending, done, .. } = stopped;
        let handover = Handover {
            pending,
            done,
            ..Handover::default()
        };
        self.promotable_from(pair, handover, promote)
    }
}

/// Where a copied pair stood when a hot upgrade moved it (see
/// [`super::Carried::Copy`]).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Stopped {
    /// Read from each direction's source, not yet written (travels beside the
    /// state).
    #[serde(skip)]
    pub pending: [Vec<u8>; 2],
    /// Directions whose EOF was read and forwarded.
    pub done: [bool; 2],
    /// Where the server's stream stands once `pending[1]` is written
    /// ([`Boundary::raw`]), when followed.
    pub boundary: Option<u64>,
    /// Bytes read each way on this plane (pending ones included).
    #[serde(skip)]
    pub(crate) read: [u64; 2],
}

/// The pair as a departure (sockets duplicated; the caller then drops its own).
fn depart(pair: &Pair, stopped: Stopped) -> Outcome {
    let written = [
        pair.written_to_server + stopped.read[0],
        pair.written_to_client + stopped.read[1],
    ];
    super::departure(pair, super::Carried::Copy(stopped), written)
}

impl DataPlane for CopyPlane {
    fn name(&self) -> &'static str {
        "copy"
    }
    fn carry(&self, pair: Pair) -> CarryFuture<'_> {
        Box::pin(self.run(pair))
    }
    fn resume(&self, pair: Pair, carried: super::Carried) -> CarryFuture<'_> {
        match carried {
            super::Carried::Copy(stopped) => Box::pin(async move {
                self.resume_copied(&pair, stopped, Promote::default())
                    .await
                    .unwrap_or_else(|_| unreachable!("promoted without a threshold"))
            }),
            // The new process refuses the upgrade before this can happen (see
            // `upgrade`): without BPF it cannot follow a spliced pair.
            super::Carried::Spliced(_) | super::Carried::Unspliced(_) | super::Carried::Tls(_) => {
                reset_both(&pair);
                Box::pin(std::future::ready(Outcome::Aborted(io::Error::other(
                    "a spliced connection needs the sockmap plane",
                ))))
            }
        }
    }
}

/// State of a pair the sockmap plane hands over (the default: a fresh pair); directions
/// are indexed 0 = client to server, 1 = server to client.
#[derive(Default)]
pub struct Handover<'a> {
    /// Whether a direction may start: every byte the kernel redirected in it has
    /// reached its destination's send queue (writing earlier would reorder). Each
    /// direction waits for its own gate only, so one blocked direction cannot stall
    /// the other (on which it may depend: an echoing server).
    pub ready: Option<&'a Gate<'a>>,
    /// Bytes already read from a direction's source and not yet written.
    pub pending: [Vec<u8>; 2],
    /// Whether EOF on a direction's source is final given the bytes read from it so
    /// far: a socket the verdict program passes bytes to can report EOF while passed
    /// skbs are still on their way to its queue.
    pub eof_final: Option<&'a Gate<'a>>,
    /// Where the server's stream stands once `pending[1]` is written and this many
    /// more bytes are read from it, when known (followed from there for an
    /// evacuation).
    pub follow_from: Option<(u64, Boundary)>,
    /// Directions already finished (EOF read and forwarded), for a pair a hot
    /// upgrade moved.
    pub done: [bool; 2],
}

/// A per-direction check supplied by the sockmap plane (see [`Handover`]).
pub type Gate<'a> = dyn Fn(usize, u64) -> io::Result<bool> + Send + Sync + 'a;

/// One direction of a copied connection.
struct OneWay<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    /// Bytes read but not yet taken by `dst`.
    pending: Option<Vec<u8>>,
    /// EOF seen and forwarded.
    done: bool,
    /// Read once before waiting for readiness: a socket handed over by the sockmap
    /// plane may hold bytes whose readiness edge was already consumed there.
    probe: bool,
    /// Hand-over gate still closed (see [`Handover::ready`]).
    gate: Option<&'a Gate<'a>>,
    /// See [`Handover::eof_final`].
    eof_final: Option<&'a Gate<'a>>,
    /// Bytes read from `src`.
    read: u64,
    /// Reads that returned bytes (a busy connection makes many).
    reads: u64,
    /// Where the packets read stand (followed server to client for an evacuation).
    boundary: Option<Boundary>,
    /// Bytes to read before `boundary` is known, and where it stands then (see
    /// [`Handover::follow_from`]).
    sync: Option<(u64, Boundary)>,
    index: usize,
    stat: DaemonStat,
    traffic: &'a Traffic,
}

impl OneWay<'_> {
    /// Moves one read's worth of bytes, or finishes a pending write; false when
    /// nothing moved (the idle timer keeps running).
    /// Cancel-safe: state changes only after the awaits.
    async fn step(&mut self, stats: &Stats) -> io::Result<bool> {
        if let Some(ready) = self.gate {
            let mut wait = POLL_MIN;
            while !ready(self.index, self.read)? {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(POLL_MAX);
            }
            self.gate = None;
        }
        if let Some(p) = &mut self.pending {
            self.dst.writable().await?;
            if write_pending(self.dst, p)? {
                self.pending = None;
            }
            return Ok(true);
        }
        if self.probe {
            self.probe = false;
        } else {
            self.src.readable().await?;
        }
        let moved = match self.sync {
            Some((left, _)) => move_at_most(self.src, self.dst, left)?,
            None => move_once(self.src, self.dst, self.boundary.as_mut())?,
        };
        match moved {
            Moved::Idle => return Ok(false),
            Moved::Bytes { read, rest } => {
                if let Some((left, at)) = &mut self.sync {
                    *left -= read as u64;
                    if *left == 0 {
                        self.boundary = Some(*at);
                        self.sync = None;
                    }
                }
                stats.add(self.stat, read as u64);
                self.traffic
                    .add(super::Direction::of(self.index), read as u64);
                self.read += read as u64;
                self.reads += 1;
                self.pending = rest;
            }
            Moved::Eof
                if self
                    .eof_final
                    .map(|f| f(self.index, self.read))
                    .transpose()?
                    == Some(false) =>
            {
                // Read again shortly; readiness is not cleared by an EOF.
                tokio::time::sleep(POLL_MIN).await;
                return Ok(false);
            }
            Moved::Eof => {
                // EOF: every byte before it is already in dst's send queue.
                sys::shutdown_write(self.dst.as_raw_fd()).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("{}: shutdown after EOF: {e}", self.stat.name()),
                    )
                })?;
                stats.inc(DaemonStat::HalfClosed);
                self.done = true;
            }
        }
        Ok(true)
    }
}

/// How [`copy_both`] stopped.
enum Ended {
    /// The pair ended.
    Outcome(Outcome),
    /// A promotion threshold was crossed with nothing pending.
    Promote(Promoted),
    /// A hot upgrade asked for the pair, and it was free to go.
    Depart(Stopped),
}

/// A pair the copy plane gives up for the splice, with nothing read and unwritten.
#[derive(Debug, Clone, Copy)]
pub struct Promoted {
    /// Bytes copied client to server and server to client.
    pub copied: [u64; 2],
    /// Where the server's stream stands (when followed).
    pub boundary: Option<Boundary>,
}

/// Promotion by age: when the next look is due, and the reads at the previous look. A
/// connection that read more than `max_rate` a second since then is left on the copy
/// plane, where pipelined and bulk streams are carried faster (docs/ARCHITECTURE.md,
/// "Choosing a plane"), and so is one that read fewer than `min_rate` a second (idle:
/// spliced it would cost more memory and gain nothing); either is looked at again one
/// `promote_after` later.
struct AgeCheck {
    promote: Promote,
    /// When to look next (None: promotion by age is off).
    at: Option<Instant>,
    /// Time and reads (both directions) at the previous look.
    window: (Instant, u64),
}

impl AgeCheck {
    fn new(promote: Promote, now: Instant) -> Self {
        Self {
            promote,
            at: promote.after.map(|d| now + d),
            window: (now, 0),
        }
    }

    /// Whether to promote now, at `reads` so far; otherwise when to look again is
    /// moved on (busy or idle: one `promote_after`; something pending: shortly).
    fn ripe(&mut self, now: Instant, reads: u64, promotable: bool, stats: &Stats) -> bool {
        let Some(after) = self.promote.after else {
            return false;
        };
        if self.at.is_none_or(|p| now < p) {
            return false;
        }
        // Reads since the last look, against what a rate would make in that time.
        let (made, secs) = (
            (reads - self.window.1) as f64,
            now.duration_since(self.window.0).as_secs_f64(),
        );
        let deferred = if self
            .promote
            .max_rate
            .is_some_and(|max| made > max as f64 * secs)
        {
            Some(DaemonStat::PromotionDeferred)
        } else if self
            .promote
            .min_rate
            .is_some_and(|min| made < min as f64 * secs)
        {
            Some(DaemonStat::PromotionDeferredIdle)
        } else {
            None
        };
        if let Some(stat) = deferred {
            stats.inc(stat);
            self.window = (now, reads);
            self.at = Some(now + after);
            false
        } else if promotable {
            true
        } else {
            self.at = Some(now + POLL_MAX);
            false
        }
    }
}

/// Ends an evicted pair from the copy plane: what the server sent up to its next
/// packet boundary, then the DISCONNECT (see [`evict::finish`]).
async fn evicted(pair: &Pair, s2c: &mut OneWay<'_>, stats: &Stats) -> Outcome {
    let (skip, boundary) = match s2c.sync {
        Some((left, b)) => (left, Some(b)),
        None => (0, s2c.boundary),
    };
    let tail = evict::Tail {
        pending: s2c.pending.take(),
        boundary,
        skip,
        disconnect: pair.disconnect.as_deref(),
    };
    evict::finish(&pair.client, &pair.server, tail, &pair.traffic, stats).await
}

/// Copies both directions of `pair` until it ends, or until it crosses a promotion
/// threshold with nothing pending either way.
/// An `async move` block, not an `async fn`, which would store its arguments twice
/// (see [`CopyPlane::run`]).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would store its arguments twice"
)]
fn copy_both(
    pair: &Pair,
    mut handover: Handover<'_>,
    boundary: Option<(u64, Boundary)>,
    stats: &Stats,
    promote: Promote,
) -> impl Future<Output = io::Result<Ended>> {
    async move {
        pair.entry.set_plane(crate::registry::Plane::Copy);
        let (gate, eof_final, done) = (handover.ready, handover.eof_final, handover.done);
        let [p0, p1] = std::mem::take(&mut handover.pending);
        let direction = |index: usize, src, dst, pending: Vec<u8>, stat| OneWay {
            src,
            dst,
            pending: (!pending.is_empty()).then_some(pending),
            done: done[index],
            probe: true,
            gate,
            eof_final,
            read: 0,
            reads: 0,
            boundary: None,
            sync: None,
            index,
            stat,
            traffic: &pair.traffic,
        };
        let (client, server) = (&pair.client, &pair.server);
        let mut c2s = direction(0, client, server, p0, DaemonStat::CopiedBytesC2s);
        let mut s2c = direction(1, server, client, p1, DaemonStat::CopiedBytesS2c);
        match boundary {
            Some((0, b)) => s2c.boundary = Some(b),
            sync => s2c.sync = sync,
        }
        let idle = pair.idle_timeout;
        let mut last = Instant::now();
        // One timer for the idle timeout and promotion by age (checked when due, then
        // shortly again while a write is pending).
        let mut age = AgeCheck::new(promote, last);
        let due =
            |last: Instant, age: &AgeCheck| age.at.map_or(last + idle, |p| p.min(last + idle));
        let sleep = tokio::time::sleep_until(due(last, &age).into());
        tokio::pin!(sleep);
        let promotable = |c2s: &OneWay<'_>, s2c: &OneWay<'_>| {
            !c2s.done && !s2c.done && c2s.pending.is_none() && s2c.pending.is_none()
        };
        while !(c2s.done && s2c.done) {
            // A hot upgrade takes the pair once every byte redirected before a hand-over
            // from the splice arrived and the server's stream position is known.
            let departable = c2s.gate.is_none() && s2c.gate.is_none() && s2c.sync.is_none();
            tokio::select! {
                r = c2s.step(stats), if !c2s.done => if r? { last = Instant::now(); },
                r = s2c.step(stats), if !s2c.done => if r? { last = Instant::now(); },
                () = &mut sleep => {
                    let now = Instant::now();
                    if now.duration_since(last) >= idle {
                        return Ok(Ended::Outcome(Outcome::IdleTimeout));
                    }
                    let reads = c2s.reads + s2c.reads;
                    if age.ripe(now, reads, promotable(&c2s, &s2c), stats) {
                        return Ok(Ended::Promote(Promoted { copied: [c2s.read, s2c.read], boundary: s2c.boundary }));
                    }
                    sleep.as_mut().reset(due(last, &age).into());
                }
                () = pair.entry.evicted_or_departing(departable) => {
                    if !pair.entry.is_evicting() {
                        let pending = |d: &mut OneWay<'_>| d.pending.take().unwrap_or_default();
                        return Ok(Ended::Depart(Stopped {
                            pending: [pending(&mut c2s), pending(&mut s2c)],
                            done: [c2s.done, s2c.done],
                            boundary: s2c.boundary.map(Boundary::raw),
                            read: [c2s.read, s2c.read],
                        }));
                    }
                    // Boxed: rare, and large inline in every copied pair's future.
                    return Ok(Ended::Outcome(Box::pin(evicted(pair, &mut s2c, stats)).await));
                }
            }
            if promote
                .after_bytes
                .is_some_and(|b| c2s.read + s2c.read >= b)
                && promotable(&c2s, &s2c)
            {
                return Ok(Ended::Promote(Promoted {
                    copied: [c2s.read, s2c.read],
                    boundary: s2c.boundary,
                }));
            }
        }
        Ok(Ended::Outcome(Outcome::Closed))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn promote(max_rate: Option<u64>, min_rate: Option<u64>) -> Promote {
        Promote {
            after_bytes: None,
            after: Some(Duration::from_secs(10)),
            max_rate,
            min_rate,
        }
    }

    /// Promotion by age waits for `promote_after`, then promotes a connection whose
    /// rate since the last look is within the limits; a busy or an idle one is put off
    /// one `promote_after`, counted by kind, and judged on the next window alone.
    #[test]
    fn age_promotes_between_the_rate_limits_and_puts_off_the_rest() {
        let stats = Stats::default();
        let t0 = Instant::now();
        let secs = |s: u64| t0 + Duration::from_secs(s);
        let mut age = AgeCheck::new(promote(Some(100), Some(1)), t0);
        assert!(!age.ripe(secs(9), 50, true, &stats), "before promote_after");
        assert!(age.ripe(secs(10), 50, true, &stats), "5 reads a second");

        // Idle: 3 reads in 10 s is under 1 a second.
        let mut age = AgeCheck::new(promote(Some(100), Some(1)), t0);
        assert!(!age.ripe(secs(10), 3, true, &stats));
        assert_eq!(stats.get(DaemonStat::PromotionDeferredIdle), 1);
        assert_eq!(
            age.at,
            Some(secs(20)),
            "looked at again one promote_after later"
        );
        assert!(!age.ripe(secs(19), 40, true, &stats), "not due yet");
        // The next window alone: 37 reads in 10 s.
        assert!(age.ripe(secs(20), 40, true, &stats));

        // Busy: 2,000 reads in 10 s is over 100 a second.
        let mut age = AgeCheck::new(promote(Some(100), Some(1)), t0);
        assert!(!age.ripe(secs(10), 2_000, true, &stats));
        assert_eq!(stats.get(DaemonStat::PromotionDeferred), 1);
        assert!(age.ripe(secs(20), 2_100, true, &stats), "quieter since");

        // No floor (the default): an idle connection is promoted.
        let mut age = AgeCheck::new(promote(Some(100), None), t0);
        assert!(age.ripe(secs(10), 0, true, &stats));
        // Something pending: not now, and looked at again shortly.
        let mut age = AgeCheck::new(promote(None, None), t0);
        assert!(!age.ripe(secs(10), 0, false, &stats));
        assert_eq!(age.at, Some(secs(10) + POLL_MAX));
        assert_eq!(stats.get(DaemonStat::PromotionDeferredIdle), 1);
    }
}
