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

use std::{
    collections::HashMap,
    io,
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Instant, SystemTime},
};

use lb_common::{
    CONN_THROTTLED_C2S, CONN_THROTTLED_S2C, CTRL_THROTTLE, ConnInfo, DIR_CLIENT_TO_SERVER,
    DIR_SERVER_TO_CLIENT, DaemonStat, EVENT_FIN, EVENT_LAG_CHECK, EVENT_PASSED, EVENT_PEER_GONE,
    EVENT_STREAM_BROKEN, Event,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
    sync::Notify,
};

use super::{
    CarryFuture, DataPlane, Direction, Outcome, POLL_MAX, POLL_MIN, Pair,
    copy::{CopyPlane, Handover, Moved, move_once_now, write_pending},
    reset_both,
};
use crate::{
    bpf::{Bpf, InsertRefused, PairSockets, addr_bytes},
    stats::Stats,
    sys,
};

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
        Box::pin(self.run(pair))
    }
}

/// The two cookies of a pair.
#[derive(Clone, Copy, Debug)]
struct Cookies {
    client: u64,
    server: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DirState {
    /// Bytes are redirected in-kernel (bytes passed during a throttle are forwarded
    /// by the task first).
    Spliced,
    /// The program passes the source's bytes to its own queue, where they stay unread
    /// until the peer catches up.
    Throttled,
    /// EOF seen; waiting for every byte to reach the peer's send queue.
    Eof,
    /// FIN forwarded.
    Done,
}

/// One direction of a spliced pair.
struct Dir<'a> {
    dir: u32,
    src: &'a TcpStream,
    dst: &'a TcpStream,
    src_cookie: u64,
    /// Bytes the daemon wrote to `dst` itself (before the splice, and passed bytes
    /// forwarded since).
    written: u64,
    /// What `dst`'s send counters read above the data bytes written (its SYN, for a
    /// socket that connected), measured at hand-off.
    offset: u64,
    /// Passed bytes read from `src` (what the `ctrl` word reports once written).
    consumed: u64,
    /// The server's byte counters.
    traffic: &'a super::Traffic,
    /// Redirected bytes already added to `traffic` (passed bytes are added as the
    /// task forwards them).
    counted: u64,
    /// The `ctrl` word last written.
    ctrl: u64,
    /// Read from `src`, not yet taken by `dst`.
    pending: Option<Vec<u8>>,
    /// `src` signalled readable and has not been read to `EAGAIN` since.
    readable: bool,
    /// The last pump stopped at its budget with bytes left: pump again at once.
    again: bool,
    state: DirState,
    flag: u32,
    stat: DaemonStat,
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

    /// Splices `pair` (the hand-off: drain, insert, supervise) until it ends.
    pub(crate) async fn run(&self, mut pair: Pair) -> Outcome {
        // 1. Hand-off: no partly read skb may stay in either receive queue.
        for to_server in [true, false] {
            let (src, dst) = if to_server {
                (&pair.client, &pair.server)
            } else {
                (&pair.server, &pair.client)
            };
            match drain(src, dst) {
                Ok(Drained::Quiet(n)) if to_server => {
                    pair.written_to_server += n;
                    pair.traffic.add(Direction::ClientToServer, n);
                }
                Ok(Drained::Quiet(n)) => {
                    pair.written_to_client += n;
                    pair.traffic.add(Direction::ServerToClient, n);
                }
                Ok(Drained::Busy(rest)) => {
                    tracing::debug!(
                        id = pair.id,
                        to_server,
                        "hand-off drain did not go quiet; copy plane"
                    );
                    self.stats.inc(DaemonStat::SpliceFallback);
                    let mut pending = [Vec::new(), Vec::new()];
                    pending[usize::from(!to_server)] = rest;
                    let handover = Handover {
                        pending,
                        ..Handover::default()
                    };
                    return self.copy.run_handed_over(&pair, handover).await;
                }
                Err(e) => {
                    reset_both(&pair);
                    return Outcome::Aborted(e);
                }
            }
        }
        for fd in [pair.client.as_raw_fd(), pair.server.as_raw_fd()] {
            let _ = sys::set_buffers(fd, SPLICE_BUFFER);
        }
        let cookies = match (
            sys::socket_cookie(pair.client.as_raw_fd()),
            sys::socket_cookie(pair.server.as_raw_fd()),
        ) {
            (Ok(client), Ok(server)) => Cookies { client, server },
            (Err(e), _) | (_, Err(e)) => {
                reset_both(&pair);
                return Outcome::Aborted(e);
            }
        };
        let mut dirs = match (
            Dir::new(
                DIR_CLIENT_TO_SERVER,
                &pair.client,
                &pair.server,
                cookies.client,
                pair.written_to_server,
                &pair.traffic,
            ),
            Dir::new(
                DIR_SERVER_TO_CLIENT,
                &pair.server,
                &pair.client,
                cookies.server,
                pair.written_to_client,
                &pair.traffic,
            ),
        ) {
            (Ok(a), Ok(b)) => [a, b],
            (Err(e), _) | (_, Err(e)) => {
                reset_both(&pair);
                return Outcome::Aborted(e);
            }
        };
        let signal = Arc::new(Signal::default());
        self.registry
            .lock()
            .expect("registry lock")
            .insert(pair.id, signal.clone());

        // 2. Insert; 3. flush whole skbs that arrived since the drain.
        let outcome = match self.insert(&pair, cookies) {
            Ok(()) => {
                pair.entry.set_plane(crate::registry::Plane::Sockmap);
                self.stats.inc(DaemonStat::Spliced);
                self.stats.inc(DaemonStat::SplicedActive);
                // Whole skbs that arrived since the drain: the first pump's read runs
                // the verdict over them.
                for d in &mut dirs {
                    d.readable = true;
                }
                let o = self.supervise(&pair, &mut dirs, &signal).await;
                self.stats.dec(DaemonStat::SplicedActive);
                if matches!(o, Outcome::Aborted(_)) {
                    reset_both(&pair);
                }
                o
            }
            Err(refused) => {
                tracing::debug!(id = pair.id, error = %refused.error, in_sources = ?refused.in_sources, "sockmap refused the pair; copy plane");
                self.unsplice(&pair, &dirs, refused.in_sources).await
            }
        };
        // 4. Count the server's bytes (redirected, and forwarded while throttled), then
        // leave the maps (a finished pair has no redirected byte left in flight).
        for d in &mut dirs {
            self.count_redirected(d);
        }
        self.remove(&pair, cookies);
        outcome
    }

    /// Continues a pair the kernel refused on the copy plane. Bytes already redirected
    /// reach their peer first; a socket that made it into `sources` passes its bytes
    /// to its own queue from then on. The sockets stay in the maps (their psocks hold
    /// the kernel's transmit backlog) until the copy plane is done.
    async fn unsplice(&self, pair: &Pair, dirs: &[Dir<'_>; 2], in_sources: [bool; 2]) -> Outcome {
        for (d, _) in dirs.iter().zip(in_sources).filter(|(_, v)| *v) {
            if let Err(e) = self.bpf.set_ctrl(d.src_cookie, CTRL_THROTTLE) {
                reset_both(pair);
                return Outcome::Aborted(e);
            }
        }
        self.stats.inc(DaemonStat::SpliceFallback);
        let ready = |i: usize, _read: u64| self.arrived(&dirs[i]);
        // Every byte read from a socket in `sources` was passed by the program.
        let eof_final = move |i: usize, read: u64| {
            Ok(!in_sources[i] || self.bpf.sock(dirs[i].src_cookie)?.passed == read)
        };
        let handover = Handover {
            ready: Some(&ready),
            eof_final: Some(&eof_final),
            ..Handover::default()
        };
        self.copy.run_handed_over(pair, handover).await
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
        self.bpf.insert_pair(pair.id, info, sockets)
    }

    /// Removes every map entry of the pair and its event registration.
    fn remove(&self, pair: &Pair, c: Cookies) {
        self.bpf.remove_pair(pair.id, [c.client, c.server]);
        self.registry
            .lock()
            .expect("registry lock")
            .remove(&pair.id);
    }

    /// Whether every byte redirected in direction `d` is in its peer's send queue.
    fn arrived(&self, d: &Dir<'_>) -> io::Result<bool> {
        let redirected = self.bpf.redirected(d.src_cookie).unwrap_or(0);
        if let Some(e) = d.dst.take_error()? {
            return Err(e);
        }
        Ok(sys::send_progress(d.dst.as_raw_fd())?.enqueued() >= d.offset + d.written + redirected)
    }

    /// Bytes redirected in direction `d` that the peer's send queue has not taken yet:
    /// they wait on the peer's psock backlog, the one queue the kernel does not bound
    /// (the send queue itself is bounded by the peer's send buffer). A peer whose
    /// receiver stops reading fills its send queue, then this backlog grows.
    fn lag(&self, d: &Dir<'_>) -> io::Result<u64> {
        let redirected = self.bpf.redirected(d.src_cookie).unwrap_or(0);
        let enqueued = sys::send_progress(d.dst.as_raw_fd())?.enqueued();
        Ok((d.offset + d.written + redirected).saturating_sub(enqueued))
    }

    /// Adds the bytes direction `d` redirected since the last call to the server's
    /// traffic counters (so `ctl backends` moves while the pair lives: the task runs at
    /// every lag event, i.e. every `lag_check_step` bytes, and every idle sample).
    fn count_redirected(&self, d: &mut Dir<'_>) -> u64 {
        let redirected = self.bpf.redirected(d.src_cookie).unwrap_or(d.counted);
        if redirected > d.counted {
            d.traffic
                .add(Direction::of(d.dir as usize), redirected - d.counted);
            d.counted = redirected;
        }
        d.counted
    }

    /// Watches a spliced pair until it ends.
    async fn supervise(&self, pair: &Pair, dirs: &mut [Dir<'_>; 2], signal: &Signal) -> Outcome {
        // Idle: activity is sampled every twentieth of `idle_timeout`, so the
        // connection closes between `idle` and `idle` + 5% after its last byte.
        let idle = pair.idle_timeout;
        let sample = (idle / 20).max(POLL_MIN);
        let mut active_at = Instant::now();
        let mut sample_at = active_at + sample;
        let mut activity = (0, 0);
        let mut wait = POLL_MIN;
        loop {
            if dirs.iter().all(|d| d.state == DirState::Done) {
                return Outcome::Closed;
            }
            let now = Instant::now();
            let deadline = if dirs.iter().any(|d| d.again) {
                now
            } else if dirs.iter().any(Dir::polled) {
                (now + wait).min(sample_at)
            } else {
                sample_at
            };
            let [d0, d1] = &mut *dirs;
            let (r0, r1) = (d0.watch_readable(), d1.watch_readable());
            let (e0, e1) = (d0.watch_errors(), d1.watch_errors());
            let (w0, w1) = (d0.pending.is_some(), d1.pending.is_some());
            let event = tokio::select! {
                r = d0.src.readable(), if r0 => r.map(|()| Some(0)),
                r = d1.src.readable(), if r1 => r.map(|()| Some(1)),
                // A reset: the pump's read reports it.
                r = d0.src.ready(Interest::ERROR), if e0 => r.map(|_| Some(0)),
                r = d1.src.ready(Interest::ERROR), if e1 => r.map(|_| Some(1)),
                r = d0.dst.writable(), if w0 => r.map(|()| None),
                r = d1.dst.writable(), if w1 => r.map(|()| None),
                () = signal.notify.notified() => Ok(None),
                () = tokio::time::sleep_until(deadline.into()) => Ok(None),
            };
            match event {
                Ok(Some(i)) => dirs[i].readable = true,
                Ok(None) => {}
                Err(e) => return Outcome::Aborted(e),
            }
            if signal.peer_gone.swap(false, Ordering::Relaxed) {
                return Outcome::Aborted(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "peer socket left the map",
                ));
            }
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
                match self.advance(pair.id, d, lag_bits & (1 << d.dir) != 0) {
                    Ok(c) => changed |= c,
                    Err(e) => {
                        tracing::debug!(id = pair.id, dir = d.dir, error = %e, state = ?d.state, "spliced direction failed");
                        return Outcome::Aborted(e);
                    }
                }
            }
            wait = if changed {
                POLL_MIN
            } else {
                (wait * 2).min(POLL_MAX)
            };
            let now = Instant::now();
            if now >= sample_at {
                let [d0, d1] = &mut *dirs;
                let bytes = (
                    self.count_redirected(d0) + d0.consumed,
                    self.count_redirected(d1) + d1.consumed,
                );
                if bytes != activity {
                    activity = bytes;
                    active_at = now;
                } else if now.duration_since(active_at) >= idle {
                    return Outcome::IdleTimeout;
                }
                sample_at = now + sample;
            }
        }
    }

    /// Moves one direction's state machine forward; true when something changed.
    fn advance(&self, id: u32, d: &mut Dir<'_>, lag_event: bool) -> io::Result<bool> {
        match d.state {
            DirState::Spliced if lag_event && self.lag(d)? > HIGH_WATER => {
                self.set_passing(d, true)?;
                self.bpf.set_conn_flag(id, d.flag, true);
                self.stats.inc(DaemonStat::Throttled);
                d.state = DirState::Throttled;
                Ok(true)
            }
            DirState::Spliced if d.readable || d.pending.is_some() => self.pump(d),
            DirState::Throttled => {
                // Its bytes wait unread, so an error would otherwise go unseen.
                if let Some(e) = d.src.take_error()? {
                    return Err(e);
                }
                if self.lag(d)? > LOW_WATER {
                    return Ok(false);
                }
                // The pump forwards what was passed, then lets the program redirect.
                self.bpf.set_conn_flag(id, d.flag, false);
                d.state = DirState::Spliced;
                d.readable = true;
                self.pump(d)?;
                Ok(true)
            }
            DirState::Eof if self.arrived(d)? => {
                sys::shutdown_write(d.dst.as_raw_fd())?;
                let sock = self.bpf.sock(d.src_cookie)?;
                tracing::debug!(
                    id,
                    dir = d.dir,
                    redirected = sock.bytes,
                    passed = sock.passed,
                    consumed = d.consumed,
                    written = d.written,
                    "FIN forwarded"
                );
                self.stats.inc(DaemonStat::HalfClosed);
                d.state = DirState::Done;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Forwards bytes the program passed to `src`'s own queue (during a throttle, or
    /// after it until the count matches), then reports the count in `ctrl` so the
    /// program redirects again. Reading also runs the verdict over skbs still in the
    /// receive queue, and finds EOF.
    fn pump(&self, d: &mut Dir<'_>) -> io::Result<bool> {
        d.again = false;
        // Reading runs the verdict over skbs still in the receive queue, and a
        // redirect made inside recv() would be lost from the socket's copied_seq
        // when recv() returns (tcp_bpf_recvmsg_parser writes back its snapshot).
        // So the program passes while the daemon reads.
        self.set_passing(d, true)?;
        // Redirected bytes still on their way to `dst` would be overtaken.
        if !self.arrived(d)? {
            return Ok(false);
        }
        let mut moved = 0u64;
        loop {
            if let Some(p) = &mut d.pending {
                let before = p.len();
                let all = write_pending(d.dst, p)?;
                d.written += (before - p.len()) as u64;
                if !all {
                    return Ok(moved > 0);
                }
                d.pending = None;
            }
            if moved >= PUMP_BUDGET {
                d.again = true;
                return Ok(true);
            }
            match move_once_now(d.src, d.dst)? {
                Moved::Idle => {
                    d.readable = false;
                    // The program redirects again once it has passed no more than
                    // this count.
                    self.set_passing(d, false)?;
                    // An skb passed between the last read and that word is read at
                    // once (the program reports later ones as events).
                    if self.bpf.sock(d.src_cookie)?.passed != d.consumed {
                        d.readable = true;
                        d.again = true;
                    }
                    return Ok(moved > 0);
                }
                Moved::Eof if self.bpf.sock(d.src_cookie)?.passed != d.consumed => {
                    // Passed skbs can still sit in the psock's backlog on their way to
                    // the socket's queue, and recv() already reports EOF: poll again.
                    return Ok(moved > 0);
                }
                Moved::Eof => {
                    d.readable = false;
                    d.state = DirState::Eof;
                    return Ok(true);
                }
                Moved::Bytes { read, rest } => {
                    let read = read as u64;
                    self.stats.add(d.stat, read);
                    d.traffic.add(Direction::of(d.dir as usize), read);
                    moved += read;
                    d.consumed += read;
                    d.written += read - rest.as_ref().map_or(0, |r| r.len() as u64);
                    d.pending = rest;
                }
            }
        }
    }

    /// Writes the direction's `ctrl` word: pass (throttled, or the daemon is reading)
    /// or redirect once every passed byte is forwarded. Unchanged words are not
    /// rewritten.
    fn set_passing(&self, d: &mut Dir<'_>, on: bool) -> io::Result<()> {
        let word = if on { CTRL_THROTTLE } else { 0 } | d.forwarded();
        if word != d.ctrl {
            self.bpf.set_ctrl(d.src_cookie, word)?;
            d.ctrl = word;
        }
        Ok(())
    }
}

impl<'a> Dir<'a> {
    /// A spliced direction; measures `dst`'s counter offset, so call it before `dst`
    /// enters the maps (when the daemon is the only writer).
    fn new(
        dir: u32,
        src: &'a TcpStream,
        dst: &'a TcpStream,
        src_cookie: u64,
        written: u64,
        traffic: &'a super::Traffic,
    ) -> io::Result<Self> {
        let offset = sys::send_progress(dst.as_raw_fd())?
            .enqueued()
            .saturating_sub(written);
        let (flag, stat) = if dir == DIR_CLIENT_TO_SERVER {
            (CONN_THROTTLED_C2S, DaemonStat::CopiedBytesC2s)
        } else {
            (CONN_THROTTLED_S2C, DaemonStat::CopiedBytesS2c)
        };
        Ok(Self {
            dir,
            src,
            dst,
            src_cookie,
            written,
            offset,
            consumed: 0,
            traffic,
            counted: 0,
            ctrl: 0,
            pending: None,
            readable: false,
            again: false,
            state: DirState::Spliced,
            flag,
            stat,
        })
    }

    /// Passed bytes read from `src` and written to `dst`.
    fn forwarded(&self) -> u64 {
        self.consumed - self.pending.as_ref().map_or(0, |p| p.len() as u64)
    }

    /// Whether to wait for `src` readiness (EOF, an error, or passed bytes): only while
    /// throttled. A spliced socket turns readable with every skb the program
    /// redirects, which would wake the task per message; its FIN and passed bytes
    /// come as events from the program instead, its errors through
    /// [`Dir::watch_errors`]. Not once it fired: readiness stays set until a read
    /// reaches `EAGAIN`.
    fn watch_readable(&self) -> bool {
        !self.readable && self.state == DirState::Throttled
    }

    /// Whether to wait for an error (a reset) on `src` while spliced.
    fn watch_errors(&self) -> bool {
        !self.readable && self.state == DirState::Spliced
    }

    /// Whether the direction waits on something the kernel does not signal: the
    /// peer's lag (throttled), redirected bytes reaching the peer's send queue.
    fn polled(&self) -> bool {
        matches!(self.state, DirState::Throttled | DirState::Eof)
            || (self.state == DirState::Spliced && (self.readable || self.pending.is_some()))
    }
}

/// What draining one side at hand-off found.
enum Drained {
    /// `src` went quiet after this many bytes, all written to `dst`.
    Quiet(u64),
    /// EOF, a full `dst`, or a sender past [`HANDOFF_LIMIT`]: the copy plane continues,
    /// starting with these bytes read but not yet written.
    Busy(Vec<u8>),
}

/// Reads `src` until `EAGAIN`, writing everything to `dst`, without ever waiting: a
/// blocking write here, with the other direction unread, can deadlock against a peer
/// that echoes.
fn drain(src: &TcpStream, dst: &TcpStream) -> io::Result<Drained> {
    let mut total = 0u64;
    loop {
        match move_once_now(src, dst)? {
            Moved::Idle => return Ok(Drained::Quiet(total)),
            Moved::Eof => return Ok(Drained::Busy(Vec::new())),
            Moved::Bytes { read, rest: None } => {
                total += read as u64;
                if total > HANDOFF_LIMIT {
                    return Ok(Drained::Busy(Vec::new()));
                }
            }
            Moved::Bytes {
                rest: Some(rest), ..
            } => return Ok(Drained::Busy(rest)),
        }
    }
}
