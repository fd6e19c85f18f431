//! The in-kernel data plane: both sockets go into the sockhash maps and the verdict
//! program (`lb-ebpf/src/splice.bpf.c`) redirects each direction to the peer socket.
//! Userspace keeps one small task per pair that owns the kernel's traps:
//!
//! - **Queued bytes at hand-off.** Each side is read until `EAGAIN` and forwarded
//!   before insertion (a partly read skb would be forwarded again); whole skbs that
//!   arrive after that are flushed by a read once the sockets are in the maps (a read
//!   runs the verdict over the receive queue first).
//! - **Wake-ups.** A spliced socket turns readable for every redirected skb, so the
//!   task does not wait for readability (that ran it once per message): the program
//!   reports the FIN and bytes it passed after the daemon's last read as events, and
//!   resets come as error readiness.
//! - **FIN.** The program drops the zero-length FIN skb (passing it can set EPIPE on
//!   the socket, see the program) and reports it; the task sees `recv() == 0`
//!   and sends `shutdown(SHUT_WR)` to the peer only once the peer's send queue has taken
//!   every redirected byte (BPF byte counter against `tcpi_bytes_acked + SIOCOUTQ`).
//! - **No backpressure.** Every `lag_check_step` redirected bytes the program sends an
//!   event; when a direction's lag (redirected bytes still on the peer's psock
//!   backlog, not yet in its send queue) passes [`HIGH_WATER`] the task sets
//!   the source's `ctrl` word to throttled and the program *passes* its skbs instead:
//!   they wait in the source's own queue, charged to its receive buffer, so TCP flow
//!   control holds the sender back. When the lag falls to [`LOW_WATER`] the task
//!   forwards the passed bytes itself (after every redirected byte has reached the
//!   peer's send queue; the bit stays set while it reads), then clears the bit and
//!   reports how many it forwarded; the program
//!   redirects again once that count matches what it passed, so nothing is overtaken.
//!   The socket never leaves `sources` while the pair lives: an skb being verdicted
//!   when its socket leaves is dropped by the kernel although TCP acknowledged it.
//! - **Refusals.** A socket the kernel will not take (e.g. `CLOSE_WAIT`) sends the whole
//!   pair to the copy plane, after every redirected byte has reached its peer.
//! - **Demotion** (`auto` only). A pair whose splice stops paying (a direction
//!   throttled, or more than `promote_max_rate` skbs a second, unless it was promoted
//!   as a conversation and its skbs each way stay balanced) goes to the copy plane
//!   the same way: both sockets pass for good and stay in the maps.

use std::{
    collections::HashMap,
    io,
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::SystemTime,
};

use lb_common::{
    ConnInfo, DIR_SERVER_TO_CLIENT, DaemonStat, EVENT_FIN, EVENT_LAG_CHECK, EVENT_PASSED,
    EVENT_PEER_GONE, EVENT_STREAM_BROKEN, Event, SOCK_TRACK_MQTT,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::Notify,
};

use super::{
    Carried, CarryFuture, DataPlane, Outcome, Pair,
    copy::{CopyPlane, Handover},
    reset_both,
};
use crate::{
    bpf::{Bpf, InsertRefused, PairSockets, addr_bytes},
    mqtt::boundary::Boundary,
    stats::Stats,
    sys,
};

mod direction;
mod evict;
mod handoff;
mod quiet;
mod supervise;

use direction::{Dir, DirStopped};
pub(crate) use handoff::Declined;
use quiet::Quiet;
pub(crate) use supervise::Demote;
use supervise::Watch;

/// `SO_SNDBUF`/`SO_RCVBUF` of spliced sockets: the kernel stops autotuning buffers for
/// redirected bytes, and the default ones halved bulk throughput.
const SPLICE_BUFFER: u32 = 4 << 20;
/// Lag (see `SockmapPlane::lag`) in one direction above which its source is throttled.
pub const HIGH_WATER: u64 = 4 << 20;
/// Lag at or below which a throttled direction resumes.
pub const LOW_WATER: u64 = 1 << 20;
/// Redirected bytes between two lag checks (the program's `lag_check_step`).
pub const LAG_STEP: u64 = 1 << 20;
/// Bytes the hand-off may copy while waiting for a side to go quiet; past this the
/// connection stays on the copy plane rather than spin behind a sender that never
/// pauses.
const HANDOFF_LIMIT: u64 = 8 << 20;
/// Passed bytes one pump forwards before letting other tasks run.
const PUMP_BUDGET: u64 = 1 << 20;

/// Wakes a pair's task on events from the program.
#[derive(Default)]
struct Signal {
    notify: Notify,
    /// Bit per direction that asked for a lag check.
    lag: AtomicU32,
    /// Bit per direction whose source must be read: its FIN arrived, or the program
    /// passed bytes after the daemon's last read.
    read: AtomicU32,
    /// A redirect failed: the peer socket is gone.
    peer_gone: AtomicBool,
}

/// The sockmap data plane.
pub struct SockmapPlane {
    bpf: Arc<Bpf>,
    stats: Arc<Stats>,
    copy: CopyPlane,
    registry: Mutex<HashMap<u32, Arc<Signal>>>,
}

impl DataPlane for SockmapPlane {
    fn name(&self) -> &'static str {
        "sockmap"
    }
    fn carry(&self, pair: Pair) -> CarryFuture<'_> {
        Box::pin(self.run(pair, None, false))
    }
    fn resume(&self, pair: Pair, carried: Carried) -> CarryFuture<'_> {
        // Each kind's own future, boxed: one future for all of them would be as
        // large as the largest for every pair.
        match carried {
            Carried::Spliced(stopped) => Box::pin(self.resume_spliced(pair, stopped, None)),
            Carried::Unspliced(u) => Box::pin(self.resume_unspliced(pair, u)),
            // Nothing half-done: spliced as after its CONNECT.
            Carried::Copy(stopped)
                if stopped.pending.iter().all(Vec::is_empty) && stopped.done == [false; 2] =>
            {
                Box::pin(self.run(pair, None, false))
            }
            Carried::Copy(stopped) => self.copy.resume(pair, Carried::Copy(stopped)),
            // Not a data plane's: `conn::adopt` resumes TLS connections itself.
            Carried::Tls(t) => self.copy.resume(pair, Carried::Tls(t)),
        }
    }
}

/// How the supervision of a spliced pair ended.
pub(super) enum Supervised {
    /// The pair ended.
    Ended(Outcome),
    /// The splice stopped paying: the copy plane carries the rest (`auto`).
    Demote,
    /// A hot upgrade asked for the pair: it stays in the maps for the new process.
    Depart,
}

/// Where a spliced pair stood when a hot upgrade moved it (see
/// [`super::Carried::Spliced`]): its sockets' cookies and both directions' state
/// machines. The maps are pinned and the new process loads over them, so the kernel
/// side (the sockets in `sources` and `targets`, their counters and `ctrl` words)
/// does not move at all.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Stopped {
    cookies: [u64; 2],
    dirs: [direction::DirStopped; 2],
    /// The pair's [`Pair::boundary`] ([`Boundary::raw`]).
    pub boundary: Option<u64>,
    /// Promoted by `auto` as a busy conversation (see [`Demote::conversation`]).
    #[serde(default)]
    pub conversation: bool,
}

/// Where a pair on the copy plane after the splice stood when a hot upgrade moved
/// it (see [`super::Carried::Unspliced`]).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Unspliced {
    cookies: [u64; 2],
    dirs: [direction::DirStopped; 2],
    /// Which sockets are in `sources` (passing).
    in_sources: [bool; 2],
    /// The copy plane's state.
    pub copy: super::copy::Stopped,
}

impl Stopped {
    /// Bytes read and not yet written, client to server and server to client.
    pub fn pending_mut(&mut self) -> [&mut Vec<u8>; 2] {
        let [a, b] = &mut self.dirs;
        [&mut a.pending, &mut b.pending]
    }
}

/// The two cookies of a pair.
#[derive(Clone, Copy, Debug)]
pub(super) struct Cookies {
    client: u64,
    server: u64,
}

impl Cookies {
    /// From `[client, server]` (as a hot upgrade passes them).
    fn of([client, server]: [u64; 2]) -> Self {
        Self { client, server }
    }
}

impl SockmapPlane {
    /// A sockmap plane over loaded BPF, with a copy plane for fallbacks.
    pub fn new(bpf: Arc<Bpf>, stats: Arc<Stats>) -> Arc<Self> {
        let copy = CopyPlane::new(stats.clone());
        Arc::new(Self {
            bpf,
            stats,
            copy,
            registry: Mutex::new(HashMap::new()),
        })
    }

    /// The loaded program and maps.
    pub fn bpf(&self) -> &Arc<Bpf> {
        &self.bpf
    }

    /// Reads the program's ring buffer and wakes the pairs it names; runs for the life
    /// of the daemon.
    pub async fn run_events(self: Arc<Self>) -> io::Result<()> {
        quiet::prepare();
        let ring = self
            .bpf
            .take_events()
            .ok_or_else(|| io::Error::other("events taken"))?;
        // SAFETY: the ring buffer owns its map fd, which stays open and unchanged until
        // the AsyncFd (and the RingBuf inside it) is dropped.
        let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        loop {
            let mut guard = ring.readable_mut().await?;
            while let Some(item) = guard.get_inner_mut().next() {
                let Some(bytes) = item.get(..size_of::<Event>()) else {
                    continue;
                };
                let ev: Event = bytemuck::pod_read_unaligned(bytes);
                let signal = self
                    .registry
                    .lock()
                    .expect("registry lock")
                    .get(&ev.conn_id)
                    .cloned();
                let Some(signal) = signal else { continue };
                match ev.kind {
                    EVENT_LAG_CHECK => {
                        signal.lag.fetch_or(1 << ev.dir, Ordering::Relaxed);
                    }
                    EVENT_FIN | EVENT_PASSED => {
                        signal.read.fetch_or(1 << ev.dir, Ordering::Relaxed);
                    }
                    // Either way the pair cannot go on: it is reset.
                    EVENT_PEER_GONE | EVENT_STREAM_BROKEN => {
                        signal.peer_gone.store(true, Ordering::Relaxed);
                    }
                    _ => continue,
                }
                signal.notify.notify_one();
            }
            guard.clear_ready();
        }
    }

    /// Splices `pair` until it ends: 1. the hand-off drain (unless `drained`: the
    /// caller ran [`SockmapPlane::drain_both`] itself), 2. insertion, 3. the
    /// supervision of both directions, 4. the server's byte count and removal.
    /// `demote`: when the pair goes back to the copy plane (`auto`); `None`: spliced
    /// for good. A pair whose drain does not go quiet is copied for good.
    ///
    /// Its future lives as long as the connection, so it is kept small: the steps
    /// before and after the splice, and the rare ones, are boxed while they run, and
    /// this and [`SockmapPlane::resume_spliced`] are plain functions returning an
    /// `async move` block, which keeps the pair in place where an `async fn` stores
    /// its arguments twice (3.6 KB per spliced pair before, measured with
    /// `-Zprint-type-sizes`).
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would store its arguments twice"
    )]
    pub(crate) fn run(
        &self,
        mut pair: Pair,
        demote: Option<Demote>,
        drained: bool,
    ) -> impl Future<Output = Outcome> {
        async move {
            let drain = if drained {
                Ok(())
            } else {
                self.drain_both(&mut pair)
            };
            match drain {
                Ok(()) => {}
                Err(Declined::Busy(pending)) => {
                    let handover = Handover {
                        pending,
                        ..Handover::default()
                    };
                    return Box::pin(self.copy.run_handed_over(&pair, handover)).await;
                }
                Err(Declined::Failed(outcome)) => return outcome,
            }
            for fd in [pair.client.as_raw_fd(), pair.server.as_raw_fd()] {
                let _ = sys::set_buffers(fd, SPLICE_BUFFER);
            }
            let (cookies, mut stopped) = match Dir::both(&pair) {
                Ok((cookies, mut dirs)) => (cookies, dirs.each_mut().map(Dir::stop)),
                Err(e) => {
                    reset_both(&pair);
                    return Outcome::Aborted(e);
                }
            };
            let signal = Arc::new(Signal::default());
            self.registry
                .lock()
                .expect("registry lock")
                .insert(pair.id, signal.clone());
            let inserted = self.insert(&pair, cookies).map_err(Box::new);
            let place = (&mut pair, cookies, &mut stopped);
            self.in_maps(place, &signal, inserted, demote).await
        }
    }

    /// Carries on a spliced pair a hot upgrade's old process gave up: its sockets
    /// are still in the (pinned) maps, and its directions resume where they stood.
    /// Events the program sent before the pair was registered here went to no one:
    /// both directions are read and lag-checked at once.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would store its arguments twice"
    )]
    pub(crate) fn resume_spliced(
        &self,
        mut pair: Pair,
        mut stopped: Stopped,
        demote: Option<Demote>,
    ) -> impl Future<Output = Outcome> {
        async move {
            let cookies = Cookies::of(stopped.cookies);
            let same = |s: &tokio::net::TcpStream, cookie| {
                sys::socket_cookie(s.as_raw_fd()).is_ok_and(|c| c == cookie)
            };
            if !same(&pair.client, cookies.client) || !same(&pair.server, cookies.server) {
                // Not the sockets the maps hold: nothing here can carry them.
                reset_both(&pair);
                return Outcome::Aborted(io::Error::other(
                    "handed sockets do not match their cookies",
                ));
            }
            let signal = Arc::new(Signal::default());
            self.registry
                .lock()
                .expect("registry lock")
                .insert(pair.id, signal.clone());
            signal.read.store(0b11, Ordering::Relaxed);
            signal.lag.store(0b11, Ordering::Relaxed);
            let place = (&mut pair, cookies, &mut stopped.dirs);
            self.in_maps(place, &signal, Ok(()), demote).await
        }
    }

    /// A pair from its insertion (`inserted`) to its end: supervised while spliced
    /// (its sockets quiet, see [`quiet`]), on the copy plane after a refusal or a
    /// demotion; then its server byte count and its removal from the maps (unless it
    /// departed for a hot upgrade). `stopped`: both directions as they stand.
    async fn in_maps(
        &self,
        (pair, cookies, stopped): (&mut Pair, Cookies, &mut [DirStopped; 2]),
        signal: &Signal,
        inserted: Result<(), Box<InsertRefused>>,
        demote: Option<Demote>,
    ) -> Outcome {
        let supervised = match inserted {
            Ok(()) => Ok(self.quietly(pair, cookies, stopped, signal, demote).await),
            Err(refused) => Err(refused),
        };
        // What follows the splice runs rarely, once: boxed, so that the spliced
        // pair's future does not carry its state.
        let stopped = stopped.each_mut().map(DirStopped::take);
        let conversation = demote.is_some_and(|d| d.conversation);
        Box::pin(self.after_splice(pair, cookies, stopped, supervised, conversation)).await
    }

    /// How a pair ends after its splice (`supervised`) or the kernel's refusal;
    /// `conversation` travels with a pair a hot upgrade moves.
    async fn after_splice(
        &self,
        pair: &Pair,
        cookies: Cookies,
        stopped: [DirStopped; 2],
        supervised: Result<Supervised, Box<InsertRefused>>,
        conversation: bool,
    ) -> Outcome {
        let dirs = &mut Dir::resumed_both(pair, cookies, stopped);
        let outcome = match supervised {
            Ok(Supervised::Ended(outcome)) => {
                if let Outcome::Evicted = outcome {
                    let deadline = std::time::Instant::now() + super::evict::EVICT_WAIT;
                    Box::pin(self.tell_evicted(pair, dirs, deadline)).await;
                }
                outcome
            }
            Ok(Supervised::Demote) => {
                self.stats.inc(DaemonStat::Demoted);
                for d in dirs.iter() {
                    self.bpf.set_conn_flag(pair.id, d.flag, false);
                }
                Box::pin(self.unsplice(pair, cookies, dirs, [true, true])).await
            }
            Ok(Supervised::Depart) => {
                for d in dirs.iter_mut() {
                    self.count_redirected(d);
                }
                let written = [dirs[0].written, dirs[1].written];
                let stopped = Stopped {
                    cookies: [cookies.client, cookies.server],
                    dirs: dirs.each_mut().map(Dir::stop),
                    boundary: pair.boundary.map(Boundary::raw),
                    conversation,
                };
                super::departure(pair, Carried::Spliced(stopped), written)
            }
            Err(refused) => {
                tracing::debug!(id = pair.id, error = %refused.error, in_sources = ?refused.in_sources, "sockmap refused the pair; copy plane");
                self.stats.inc(DaemonStat::SpliceFallback);
                Box::pin(self.unsplice(pair, cookies, dirs, refused.in_sources)).await
            }
        };
        self.finish(pair, cookies, dirs, outcome).await
    }

    /// The spliced stretch of a pair's life. For its first [`quiet::HUSH_AFTER`] its
    /// sockets stay with the daemon's reactor (a short session ends before that and
    /// never pays for moving them); from then on they are quiet (see [`quiet`]). They
    /// are back with the daemon's reactor when it returns, with both directions as
    /// they stand.
    async fn quietly(
        &self,
        pair: &mut Pair,
        cookies: Cookies,
        stopped: &mut [DirStopped; 2],
        signal: &Signal,
        demote: Option<Demote>,
    ) -> Supervised {
        pair.entry.set_plane(crate::registry::Plane::Sockmap);
        self.stats.inc(DaemonStat::Spliced);
        self.stats.inc(DaemonStat::SplicedActive);
        let mut quiet = Quiet::loud(pair);
        let mut watch = Watch::new(pair.idle_timeout, demote);
        // Whole skbs that arrived since the drain: the first pump's read runs the
        // verdict over them.
        let mut flags = [(true, false); 2];
        let supervised = loop {
            let (supervised, now) = {
                let mut dirs =
                    Dir::resumed_both(pair, cookies, stopped.each_mut().map(DirStopped::take));
                for (d, &(readable, again)) in dirs.iter_mut().zip(&flags) {
                    (d.readable, d.again) = (readable, again);
                }
                let s = self
                    .supervise(pair, &mut dirs, signal, &mut watch, &mut quiet)
                    .await;
                flags = dirs.each_ref().map(|d| (d.readable, d.again));
                (s, dirs.each_mut().map(Dir::stop))
            };
            *stopped = now;
            if let Some(s) = supervised {
                break s;
            }
            // The pair outlived its loud start: its sockets go quiet. If they cannot
            // (out of descriptors, most likely), the pair stays loud and tries again
            // one `HUSH_AFTER` later.
            if let Err(failed) = quiet.hush(pair) {
                let e = failed.error;
                if failed.stranded {
                    let e =
                        io::Error::new(e.kind(), format!("cannot watch the spliced sockets: {e}"));
                    break Supervised::Ended(Outcome::Aborted(e));
                }
                if crate::limits::is_local_resource(&e) {
                    self.stats.inc(DaemonStat::LocalResourceErrors);
                }
                if quiet::HUSH_FAILED_LOG.allow() {
                    tracing::warn!(id = pair.id, error = %e, "cannot quiet a spliced pair's sockets; it stays watched as it was and tries again");
                }
            }
        };
        self.stats.dec(DaemonStat::SplicedActive);
        // The streams go back to the daemon's reactor only for what carries on with
        // them: the copy plane after a demotion, an eviction's DISCONNECT and
        // lingering close. A pair that ended or departs closes (or hands over) its
        // streams where they are once its watch is dropped: that saves the way back,
        // about ten system calls, which could fail for want of a descriptor.
        let back = matches!(
            supervised,
            Supervised::Demote | Supervised::Ended(Outcome::Evicted)
        );
        let supervised = if !back {
            drop(quiet);
            supervised
        } else {
            match quiet.wake(pair) {
                Ok(()) => supervised,
                // The streams cannot be watched again: whatever came next ends here.
                Err(e) => {
                    let e =
                        io::Error::new(e.kind(), format!("cannot watch the sockets again: {e}"));
                    Supervised::Ended(Outcome::Aborted(e))
                }
            }
        };
        if let Supervised::Ended(Outcome::Aborted(_)) = supervised {
            reset_both(pair);
        }
        supervised
    }

    /// A pair's end: the server's byte count and the removal from the maps (but for
    /// one that departed for a hot upgrade: the new process carries on with it).
    async fn finish(
        &self,
        pair: &Pair,
        cookies: Cookies,
        dirs: &mut [Dir<'_>; 2],
        outcome: Outcome,
    ) -> Outcome {
        if let Outcome::Departed(_) = outcome {
            self.registry
                .lock()
                .expect("registry lock")
                .remove(&pair.id);
            return outcome;
        }
        // The server's bytes (redirected, and forwarded while throttled), then the
        // maps (a finished pair has no redirected byte left in flight).
        for d in dirs.iter_mut() {
            self.count_redirected(d);
        }
        self.remove(pair, cookies);
        if let Outcome::Evicted = outcome {
            // Out of the maps: a plain close, lingering for the client's side.
            let deadline = std::time::Instant::now() + super::evict::EVICT_WAIT;
            Box::pin(super::evict::linger_close(&pair.client, deadline)).await;
        }
        outcome
    }

    /// Continues a pair on the copy plane: one the kernel refused, or a demoted one.
    /// Bytes already redirected reach their peer first; a socket in `sources` passes
    /// its bytes to its own queue from then on. The sockets stay in the maps (their
    /// psocks hold the kernel's transmit backlog and the passed bytes) until the copy
    /// plane is done.
    async fn unsplice(
        &self,
        pair: &Pair,
        cookies: Cookies,
        dirs: &mut [Dir<'_>; 2],
        in_sources: [bool; 2],
    ) -> Outcome {
        for (d, _) in dirs.iter_mut().zip(in_sources).filter(|(_, v)| *v) {
            if let Err(e) = self.set_passing(d, true) {
                reset_both(pair);
                return Outcome::Aborted(e);
            }
        }
        // Where the server's stream stands, for an evacuation's DISCONNECT (MQTT 5).
        let follow_from = if in_sources == [true, true] {
            self.stream_position(pair, &dirs[DIR_SERVER_TO_CLIENT as usize])
        } else {
            None
        };
        let pending = dirs
            .each_mut()
            .map(|d| d.pending.take().unwrap_or_default());
        let handover = Handover {
            pending,
            follow_from,
            ..Handover::default()
        };
        self.copy_unspliced(pair, cookies, dirs, in_sources, (handover, true))
            .await
    }

    /// The copy plane over a pair still in the maps: `handover` (with `wait`, every
    /// byte redirected before reaches its peer first). A departure for a hot upgrade
    /// takes the directions' state along.
    async fn copy_unspliced(
        &self,
        pair: &Pair,
        cookies: Cookies,
        dirs: &mut [Dir<'_>; 2],
        in_sources: [bool; 2],
        (handover, wait): (Handover<'_>, bool),
    ) -> Outcome {
        let outcome = {
            let dirs = &*dirs;
            let ready = |i: usize, _read: u64| self.arrived(&dirs[i]);
            // Every byte read from a socket in `sources` was passed by the program
            // (the pumps read `consumed` of them before).
            let eof_final = move |i: usize, read: u64| {
                let d = &dirs[i];
                Ok(!in_sources[i] || self.bpf.sock(d.src_cookie)?.passed == d.consumed + read)
            };
            let handover = Handover {
                ready: wait.then_some(&ready as &super::copy::Gate<'_>),
                eof_final: Some(&eof_final),
                ..handover
            };
            self.copy.run_handed_over(pair, handover).await
        };
        let Outcome::Departed(mut d) = outcome else {
            return outcome;
        };
        let Carried::Copy(copy) =
            std::mem::replace(&mut d.carried, Carried::Copy(Default::default()))
        else {
            unreachable!("the copy plane departs as copied");
        };
        for (dir, read) in dirs.iter_mut().zip(copy.read) {
            dir.consumed += read;
        }
        d.carried = Carried::Unspliced(Unspliced {
            cookies: [cookies.client, cookies.server],
            dirs: dirs.each_mut().map(Dir::stop),
            in_sources,
            copy,
        });
        Outcome::Departed(d)
    }

    /// Carries on a pair a hot upgrade's old process was copying after the splice:
    /// its sockets still in the maps, passing; removed at its end as any other.
    /// (An `async move` block: see [`SockmapPlane::run`].)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would store its arguments twice"
    )]
    pub(crate) fn resume_unspliced(
        &self,
        pair: Pair,
        u: Unspliced,
    ) -> impl Future<Output = Outcome> {
        async move {
            let cookies = Cookies::of(u.cookies);
            let mut dirs = Dir::resumed_both(&pair, cookies, u.dirs);
            let super::copy::Stopped { pending, done, .. } = u.copy;
            let handover = Handover {
                pending,
                done,
                ..Handover::default()
            };
            let outcome = self
                .copy_unspliced(&pair, cookies, &mut dirs, u.in_sources, (handover, false))
                .await;
            self.finish(&pair, cookies, &mut dirs, outcome).await
        }
    }

    /// Where the server's stream stands, for an evacuation of a demoted pair: the
    /// program's position after the bytes it has passed so far, and how many of
    /// those the daemon has yet to read. Taken from two equal reads of the socket's
    /// entry (so not torn by a verdict running meanwhile: it writes the count, then
    /// the position). `None` when the stream is not followed, or no two reads in a
    /// hundred agreed (that pair is evicted without the DISCONNECT).
    fn stream_position(&self, pair: &Pair, d: &Dir<'_>) -> Option<(u64, Boundary)> {
        pair.disconnect.as_ref()?;
        pair.boundary?;
        let mut last = self.bpf.sock(d.src_cookie).ok()?;
        for _ in 0..100 {
            let now = self.bpf.sock(d.src_cookie).ok()?;
            if now == last && now.flags & SOCK_TRACK_MQTT != 0 {
                let unread = now.passed.checked_sub(d.consumed)?;
                return Some((unread, Boundary::from_raw(now.mqtt)));
            }
            last = now;
        }
        None
    }

    /// Enters the pair in the maps (`sources` last: from then on the program runs).
    fn insert(&self, pair: &Pair, c: Cookies) -> Result<(), InsertRefused> {
        let info = ConnInfo {
            client_addr: addr_bytes(pair.client_addr),
            server_addr: addr_bytes(pair.server_addr),
            client_cookie: c.client,
            server_cookie: c.server,
            started_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            client_port: pair.client_addr.port(),
            server_port: pair.server_addr.port(),
            server_index: pair.server_index,
            ..ConnInfo::default()
        };
        let sockets = PairSockets {
            client: (c.client, pair.client.as_raw_fd()),
            server: (c.server, pair.server.as_raw_fd()),
        };
        // The program follows the server's packets only where an eviction would
        // write a DISCONNECT (MQTT 5), from where the daemon left the stream.
        let track = pair.disconnect.is_some().then_some(pair.boundary).flatten();
        self.bpf
            .insert_pair(pair.id, info, sockets, track.map(|b| b.raw()))
    }

    /// Removes every map entry of the pair and its event registration.
    fn remove(&self, pair: &Pair, c: Cookies) {
        self.bpf.remove_pair(pair.id, [c.client, c.server]);
        self.registry
            .lock()
            .expect("registry lock")
            .remove(&pair.id);
    }
}
