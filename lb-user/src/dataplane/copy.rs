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
    /// `read` bytes moved; `rest` holds the tail `dst` did not take; `whole` when
    /// they were one whole MQTT packet, as one message of a conversation is (see
    /// [`Talk`]).
    Bytes {
        read: usize,
        rest: Option<Vec<u8>>,
        whole: bool,
    },
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
        let whole = crate::mqtt::packet_len(&buf[..n]) == Ok(Some(n));
        let rest = match write(&buf[..n]) {
            Ok(m) if m == n => None,
            Ok(m) => Some(buf[m..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(buf[..n].to_vec()),
            Err(e) => return Err(e),
        };
        Ok(Moved::Bytes {
            read: n,
            rest,
            whole,
        })
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
    /// Reads that returned one whole MQTT packet.
    whole: u64,
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
            Moved::Bytes { read, rest, whole } => {
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
                self.whole += u64::from(whole);
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
    /// Promoted as a busy conversation (see [`Talk`]): the splice keeps it while it
    /// stays one.
    pub conversation: bool,
}

/// Reads (both directions) over which a busy connection is judged a conversation.
const TALK_WINDOW: u64 = 1024;
/// Share of a window's reads that must each be one whole MQTT packet, and the share
/// that must be turns (a read from the other side than the read before it).
const TALK_SHARE: f64 = 0.9;

/// Promotion of a busy conversation: a connection that makes more than `max_rate`
/// reads a second is put off by promotion by age (pipelined and bulk streams are
/// carried faster copied), but one whose reads are each one whole MQTT packet answered
/// from the other side (a request, its response, the next request: one message in
/// flight) gains from the splice what the copy plane cannot give it, a shorter round
/// trip (docs/ARCHITECTURE.md, "Choosing a plane"), so it is promoted as soon as one
/// window of [`TALK_WINDOW`] reads shows it. Counted from the reads the copy plane
/// makes anyway: no timer, no system call. Pipelined streams fail the test: their
/// reads hold several packets, or follow each other from one side.
struct Talk {
    /// Whether conversations are promoted (see [`Promote::conversations`]).
    on: bool,
    max_rate: u64,
    /// Reads each side had made when last noted, the side that made the last read,
    /// and the turns so far.
    seen: [u64; 2],
    last: Option<usize>,
    turns: u64,
    /// Start of the current window: time, reads, whole-packet reads, turns.
    window: (Instant, u64, u64, u64),
}

impl Talk {
    fn new(promote: Promote, now: Instant) -> Self {
        Self {
            on: promote.conversations && promote.after.is_some() && promote.max_rate.is_some(),
            max_rate: promote.max_rate.unwrap_or(u64::MAX),
            seen: [0; 2],
            last: None,
            turns: 0,
            window: (now, 0, 0, 0),
        }
    }

    /// Notes the reads each side has made (after every step; one side moves at a
    /// time).
    fn note(&mut self, reads: [u64; 2]) {
        for (side, (&now, seen)) in reads.iter().zip(&mut self.seen).enumerate() {
            if now != *seen {
                *seen = now;
                if self.last.is_some_and(|l| l != side) {
                    self.turns += 1;
                }
                self.last = Some(side);
            }
        }
    }

    /// Whether a window ends at `reads` (both directions): [`Talk::ripe`] is due.
    fn due(&self, reads: u64) -> bool {
        self.on && reads - self.window.1 >= TALK_WINDOW
    }

    /// Whether to promote now, at the end of a window (see [`Talk::due`]), given the
    /// reads and whole-packet reads so far (both directions): when the window was a
    /// busy conversation and nothing is pending (else looked at again after the next
    /// read); otherwise the next window starts.
    fn ripe(&mut self, now: Instant, reads: u64, whole: u64, promotable: bool) -> bool {
        let (start, reads0, whole0, turns0) = self.window;
        let made = reads - reads0;
        let share = |n: u64| n as f64 >= TALK_SHARE * made as f64;
        let busy = made as f64 > self.max_rate as f64 * now.duration_since(start).as_secs_f64();
        let conversation = busy && share(whole - whole0) && share(self.turns - turns0);
        if conversation && promotable {
            return true;
        }
        if !conversation {
            self.window = (now, reads, whole, self.turns);
        }
        false
    }
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
            whole: 0,
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
        let mut talk = Talk::new(promote, last);
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
                        return Ok(Ended::Promote(Promoted { copied: [c2s.read, s2c.read], boundary: s2c.boundary, conversation: false }));
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
            let by_bytes = promote
                .after_bytes
                .is_some_and(|b| c2s.read + s2c.read >= b);
            talk.note([c2s.reads, s2c.reads]);
            let reads = c2s.reads + s2c.reads;
            let conversation = talk.due(reads)
                && talk.ripe(
                    Instant::now(),
                    reads,
                    c2s.whole + s2c.whole,
                    promotable(&c2s, &s2c),
                );
            if conversation || (by_bytes && promotable(&c2s, &s2c)) {
                return Ok(Ended::Promote(Promoted {
                    copied: [c2s.read, s2c.read],
                    boundary: s2c.boundary,
                    conversation,
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
            conversations: true,
        }
    }

    /// A window of `n` reads from `talk`'s current counts, `whole` of them one whole
    /// packet, alternating sides when `turns`; then whether it is ripe `secs` after
    /// `t0`.
    fn window(talk: &mut Talk, n: u64, whole: u64, turns: bool, secs: f64, t0: Instant) -> bool {
        let (mut reads, mut wholes) = (talk.seen, talk.window.2);
        for i in 0..n {
            let side = if turns { (i % 2) as usize } else { 0 };
            reads[side] += 1;
            wholes += u64::from(i < whole);
            talk.note(reads);
            let total = reads[0] + reads[1];
            if talk.due(total) {
                let now = t0 + Duration::from_secs_f64(secs);
                return talk.ripe(now, total, wholes, true);
            }
        }
        false
    }

    /// A busy conversation (over `max_rate`, reads each one whole packet, each from the
    /// other side than the last) is promoted at the end of its first window, long
    /// before `promote_after`; pipelined reads, one-sided reads and a quiet
    /// conversation are not, and each window is judged alone.
    #[test]
    fn talk_promotes_busy_conversations_and_nothing_else() {
        let t0 = Instant::now();
        // 1,024 reads in 0.1 s against a limit of 100 a second.
        let mut talk = Talk::new(promote(Some(100), None), t0);
        assert!(window(&mut talk, TALK_WINDOW, TALK_WINDOW, true, 0.1, t0));

        // Pipelined: a fifth of the reads hold several packets.
        let mut talk = Talk::new(promote(Some(100), None), t0);
        assert!(!window(
            &mut talk,
            TALK_WINDOW,
            TALK_WINDOW * 4 / 5,
            true,
            0.1,
            t0
        ));
        // The next window alone: a conversation.
        assert!(window(&mut talk, TALK_WINDOW, TALK_WINDOW, true, 0.2, t0));

        // One side reading (a stream of single packets).
        let mut talk = Talk::new(promote(Some(100), None), t0);
        assert!(!window(&mut talk, TALK_WINDOW, TALK_WINDOW, false, 0.1, t0));

        // Not busy: 1,024 reads in 20 s is promotion by age's to judge.
        let mut talk = Talk::new(promote(Some(100), None), t0);
        assert!(!window(&mut talk, TALK_WINDOW, TALK_WINDOW, true, 20.0, t0));

        // Something pending: not now, but the window stays and the next read decides.
        let mut talk = Talk::new(promote(Some(100), None), t0);
        let (reads, whole) = (TALK_WINDOW, TALK_WINDOW);
        talk.seen = [reads / 2; 2];
        talk.turns = reads - 1;
        assert!(talk.due(reads));
        assert!(!talk.ripe(t0 + Duration::from_millis(100), reads, whole, false));
        assert!(talk.ripe(t0 + Duration::from_millis(101), reads + 1, whole + 1, true));

        // Off: by the key, without promotion by age, without a rate limit.
        let off = [
            Promote {
                conversations: false,
                ..promote(Some(100), None)
            },
            Promote {
                after: None,
                ..promote(Some(100), None)
            },
            promote(None, None),
        ];
        for p in off {
            let mut talk = Talk::new(p, t0);
            assert!(
                !window(&mut talk, 4 * TALK_WINDOW, 4 * TALK_WINDOW, true, 0.1, t0),
                "{p:?}"
            );
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
