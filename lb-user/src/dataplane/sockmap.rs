//! The in-kernel data plane: both sockets go into the sockhash maps and the verdict
//! program (`lb-ebpf/src/splice.bpf.c`) redirects each direction to the peer socket.
//! Userspace keeps one small task per pair that owns the kernel's traps:
//!
//! - **Queued bytes at hand-off.** Each side is read until `EAGAIN` and forwarded
//!   before insertion (a partly read skb would be forwarded again); whole skbs that
//!   arrive after that are flushed by a `MSG_PEEK` once the sockets are in the maps.
//! - **FIN.** The program drops the zero-length FIN skb (passing it can set EPIPE on
//!   the socket, see the program); the task sees `recv() == 0`
//!   and sends `shutdown(SHUT_WR)` to the peer only once the peer's send queue has taken
//!   every redirected byte (BPF byte counter against `tcpi_bytes_acked + SIOCOUTQ`).
//! - **No backpressure.** Every `lag_check_step` redirected bytes the program sends an
//!   event; when a direction's unacknowledged bytes pass [`HIGH_WATER`] its source socket
//!   leaves `sources` (TCP flow control applies again) until they fall to [`LOW_WATER`].
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
    CONN_THROTTLED_C2S, CONN_THROTTLED_S2C, ConnInfo, DIR_CLIENT_TO_SERVER, DIR_SERVER_TO_CLIENT,
    DaemonStat, EVENT_LAG_CHECK, EVENT_PEER_GONE, Event, SockInfo,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
    sync::Notify,
};

use super::{
    CarryFuture, DataPlane, Outcome, POLL_MAX, POLL_MIN, Pair,
    copy::{CopyPlane, Handover},
    reset_both,
};
use crate::{
    bpf::{Bpf, addr_bytes},
    stats::Stats,
    sys,
};

/// Unacknowledged bytes in one direction above which its source is throttled.
pub const HIGH_WATER: u64 = 4 << 20;
/// Unacknowledged bytes at or below which a throttled direction resumes.
pub const LOW_WATER: u64 = 1 << 20;
/// Redirected bytes between two lag checks (the program's `lag_check_step`).
pub const LAG_STEP: u64 = 1 << 20;
/// Bytes the hand-off may copy while waiting for a side to go quiet; past this the
/// connection stays on the copy plane rather than spin behind a sender that never
/// pauses.
const HANDOFF_LIMIT: u64 = 8 << 20;

/// Wakes a pair's task on events from the program.
#[derive(Default)]
struct Signal {
    notify: Notify,
    /// Bit per direction that asked for a lag check.
    lag: AtomicU32,
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

/// What the supervising loop decided.
enum Supervised {
    /// The pair is finished.
    Done(Outcome),
    /// The kernel refused to take a socket back: continue on the copy plane.
    Unsplice,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DirState {
    /// Bytes are redirected in-kernel.
    Spliced,
    /// Source out of `sources` until the peer catches up.
    Throttled,
    /// EOF seen; waiting for every redirected byte to reach the peer's send queue.
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
    /// Bytes the daemon wrote to `dst` itself (before the splice).
    written: u64,
    /// What `dst`'s send counters read above the data bytes written (its SYN, for a
    /// socket that connected), measured at hand-off.
    offset: u64,
    state: DirState,
    /// The last peek saw bytes parked in the source's own queue.
    parked: bool,
    flag: u32,
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

    /// Writes the daemon counters to the pinned `daemon_stats` map.
    pub fn publish(&self, stats: &Stats) {
        self.bpf.publish(stats);
    }

    /// Reads the program's ring buffer and wakes the pairs it names; runs for the life
    /// of the daemon.
    pub async fn run_events(self: Arc<Self>) -> io::Result<()> {
        let ring = self
            .bpf
            .events
            .lock()
            .expect("events lock")
            .take()
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
                    EVENT_PEER_GONE => signal.peer_gone.store(true, Ordering::Relaxed),
                    _ => continue,
                }
                signal.notify.notify_one();
            }
            guard.clear_ready();
        }
    }

    async fn run(&self, mut pair: Pair) -> Outcome {
        // 1. Hand-off: no partly read skb may stay in either receive queue.
        for to_server in [true, false] {
            let (src, dst) = if to_server {
                (&pair.client, &pair.server)
            } else {
                (&pair.server, &pair.client)
            };
            match drain(src, dst) {
                Ok(Drained::Quiet(n)) if to_server => pair.written_to_server += n,
                Ok(Drained::Quiet(n)) => pair.written_to_client += n,
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
            ),
            Dir::new(
                DIR_SERVER_TO_CLIENT,
                &pair.server,
                &pair.client,
                cookies.server,
                pair.written_to_client,
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
                self.stats.inc(DaemonStat::Spliced);
                self.stats.inc(DaemonStat::SplicedActive);
                for s in [&pair.client, &pair.server] {
                    // Errors surface in the loop below.
                    let _ = sys::peek(s.as_raw_fd());
                }
                let r = self.supervise(&pair, &mut dirs, &signal).await;
                self.stats.dec(DaemonStat::SplicedActive);
                r
            }
            Err(e) => {
                tracing::debug!(id = pair.id, error = %e, "sockmap refused the pair; copy plane");
                Supervised::Unsplice
            }
        };
        let outcome = match outcome {
            Supervised::Done(o) => {
                if matches!(o, Outcome::Aborted(_)) {
                    reset_both(&pair);
                }
                o
            }
            Supervised::Unsplice => {
                // No more redirects; the sockets stay in `targets` (their psocks hold
                // the kernel's transmit backlog) until the copy plane is done.
                for d in &dirs {
                    self.leave_sources(d.src_cookie);
                }
                self.stats.inc(DaemonStat::SpliceFallback);
                let ready = |i: usize| self.arrived(&dirs[i]);
                let handover = Handover {
                    finished: dirs.each_ref().map(|d| d.state == DirState::Done),
                    ready: Some(&ready),
                    pending: Default::default(),
                };
                self.copy.run_handed_over(&pair, handover).await
            }
        };
        // 4. Leave the maps (a finished pair has no redirected byte left in flight).
        self.remove(&pair, cookies);
        outcome
    }

    fn insert(&self, pair: &Pair, c: Cookies) -> Result<(), aya::maps::MapError> {
        let sock = |peer_cookie, dir| SockInfo {
            peer_cookie,
            conn_id: pair.id,
            dir,
            ..SockInfo::default()
        };
        {
            let mut socks = self.bpf.socks.lock().expect("socks lock");
            socks.insert(c.client, sock(c.server, DIR_CLIENT_TO_SERVER), 0)?;
            socks.insert(c.server, sock(c.client, DIR_SERVER_TO_CLIENT), 0)?;
        }
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
        self.bpf
            .conns
            .lock()
            .expect("conns lock")
            .insert(pair.id, info, 0)?;
        {
            let mut targets = self.bpf.targets.lock().expect("targets lock");
            targets.insert(c.client, pair.client.as_raw_fd(), 0)?;
            targets.insert(c.server, pair.server.as_raw_fd(), 0)?;
        }
        let mut sources = self.bpf.sources.lock().expect("sources lock");
        sources.insert(c.client, pair.client.as_raw_fd(), 0)?;
        sources.insert(c.server, pair.server.as_raw_fd(), 0)?;
        Ok(())
    }

    /// Takes a socket out of `sources`: its bytes are no longer redirected. Absent is
    /// fine.
    fn leave_sources(&self, cookie: u64) {
        let _ = self
            .bpf
            .sources
            .lock()
            .expect("sources lock")
            .remove(&cookie);
    }

    /// Removes every map entry of the pair; absent entries are fine.
    fn remove(&self, pair: &Pair, c: Cookies) {
        for cookie in [c.client, c.server] {
            self.leave_sources(cookie);
        }
        for cookie in [c.client, c.server] {
            let _ = self
                .bpf
                .targets
                .lock()
                .expect("targets lock")
                .remove(&cookie);
            let _ = self.bpf.socks.lock().expect("socks lock").remove(&cookie);
        }
        let _ = self.bpf.conns.lock().expect("conns lock").remove(&pair.id);
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

    /// Bytes redirected in direction `d` and not yet acknowledged by the peer's receiver.
    fn lag(&self, d: &Dir<'_>) -> io::Result<u64> {
        let redirected = self.bpf.redirected(d.src_cookie).unwrap_or(0);
        let acked = sys::send_progress(d.dst.as_raw_fd())?.acked;
        Ok((d.offset + d.written + redirected).saturating_sub(acked))
    }

    fn set_flag(&self, id: u32, flag: u32, on: bool) {
        let mut conns = self.bpf.conns.lock().expect("conns lock");
        if let Ok(mut info) = conns.get(&id, 0) {
            if on {
                info.flags |= flag;
            } else {
                info.flags &= !flag;
            }
            let _ = conns.insert(id, info, 0);
        }
    }

    /// Watches a spliced pair until it ends. Returns `Unsplice` if a throttled socket
    /// cannot go back into `sources`.
    async fn supervise(&self, pair: &Pair, dirs: &mut [Dir<'_>; 2], signal: &Signal) -> Supervised {
        let idle = pair.idle_timeout;
        let mut idle_at = Instant::now() + idle;
        let mut idle_bytes = (u64::MAX, u64::MAX);
        let mut wait = POLL_MIN;
        let watch = |d: &Dir<'_>| matches!(d.state, DirState::Spliced | DirState::Throttled);
        loop {
            if dirs.iter().all(|d| d.state == DirState::Done) {
                return Supervised::Done(Outcome::Closed);
            }
            let polling = dirs
                .iter()
                .any(|d| d.parked || matches!(d.state, DirState::Throttled | DirState::Eof));
            let deadline = if polling {
                (Instant::now() + wait).min(idle_at)
            } else {
                idle_at
            };
            let [d0, d1] = &mut *dirs;
            let (w0, w1) = (watch(d0), watch(d1));
            let event = tokio::select! {
                r = d0.src.readable(), if w0 => r.map(|()| Some(0)),
                r = d1.src.readable(), if w1 => r.map(|()| Some(1)),
                () = signal.notify.notified() => Ok(None),
                () = tokio::time::sleep_until(deadline.into()) => Ok(None),
            };
            let result = match event {
                Ok(Some(i)) => on_readable(&mut dirs[i]),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                tracing::debug!(id = pair.id, error = %e, states = ?dirs.iter().map(|d| d.state).collect::<Vec<_>>(), "source socket error");
                return Supervised::Done(Outcome::Aborted(e));
            }
            if signal.peer_gone.swap(false, Ordering::Relaxed) {
                return Supervised::Done(Outcome::Aborted(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "peer socket left the map",
                )));
            }
            let lag_bits = signal.lag.swap(0, Ordering::Relaxed);
            let mut changed = false;
            for d in dirs.iter_mut() {
                match self.advance(pair.id, d, lag_bits & (1 << d.dir) != 0) {
                    Ok(Some(c)) => changed |= c,
                    Ok(None) => {
                        tracing::debug!(
                            id = pair.id,
                            dir = d.dir,
                            "throttled socket cannot rejoin sources; copy plane"
                        );
                        return Supervised::Unsplice;
                    }
                    Err(e) => {
                        tracing::debug!(id = pair.id, dir = d.dir, error = %e, state = ?d.state, "advance error");
                        return Supervised::Done(Outcome::Aborted(e));
                    }
                }
            }
            wait = if changed {
                POLL_MIN
            } else {
                (wait * 2).min(POLL_MAX)
            };
            let now = Instant::now();
            if now >= idle_at {
                let bytes = (
                    self.bpf.redirected(dirs[0].src_cookie).unwrap_or(0),
                    self.bpf.redirected(dirs[1].src_cookie).unwrap_or(0),
                );
                if bytes == idle_bytes {
                    return Supervised::Done(Outcome::IdleTimeout);
                }
                idle_bytes = bytes;
                idle_at = now + idle;
            }
        }
    }

    /// Moves one direction's state machine forward. `Some(changed)`, or `None` when the
    /// pair must leave the sockmap.
    fn advance(&self, id: u32, d: &mut Dir<'_>, lag_event: bool) -> io::Result<Option<bool>> {
        match d.state {
            DirState::Spliced if lag_event && self.lag(d)? > HIGH_WATER => {
                self.leave_sources(d.src_cookie);
                self.set_flag(id, d.flag, true);
                self.stats.inc(DaemonStat::Throttled);
                d.state = DirState::Throttled;
                Ok(Some(true))
            }
            DirState::Spliced if d.parked => {
                // Bytes landed in the source's own queue: a peek makes the kernel run
                // the verdict over them.
                d.parked = false;
                let _ = sys::peek(d.src.as_raw_fd());
                Ok(Some(false))
            }
            DirState::Throttled if self.lag(d)? <= LOW_WATER => {
                let r = self.bpf.sources.lock().expect("sources lock").insert(
                    d.src_cookie,
                    d.src.as_raw_fd(),
                    0,
                );
                if r.is_err() {
                    // E.g. the source sent FIN while throttled (CLOSE_WAIT).
                    return Ok(None);
                }
                self.set_flag(id, d.flag, false);
                d.parked = false;
                let _ = sys::peek(d.src.as_raw_fd());
                d.state = DirState::Spliced;
                Ok(Some(true))
            }
            DirState::Eof if self.arrived(d)? => {
                sys::shutdown_write(d.dst.as_raw_fd())?;
                self.stats.inc(DaemonStat::HalfClosed);
                d.state = DirState::Done;
                Ok(Some(true))
            }
            _ => Ok(Some(false)),
        }
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
    ) -> io::Result<Self> {
        let offset = sys::send_progress(dst.as_raw_fd())?
            .enqueued()
            .saturating_sub(written);
        let flag = if dir == DIR_CLIENT_TO_SERVER {
            CONN_THROTTLED_C2S
        } else {
            CONN_THROTTLED_S2C
        };
        Ok(Self {
            dir,
            src,
            dst,
            src_cookie,
            written,
            offset,
            state: DirState::Spliced,
            parked: false,
            flag,
        })
    }
}

/// Handles readiness of a direction's source: EOF, parked bytes, or an error.
fn on_readable(d: &mut Dir<'_>) -> io::Result<()> {
    let fd = d.src.as_raw_fd();
    let mut parked = false;
    let r = d.src.try_io(Interest::READABLE, || match sys::peek(fd) {
        Ok(0) => Ok(()),
        Ok(_) => {
            // Bytes in our own queue (throttled, or not yet through the verdict):
            // clear readiness; the poll timer looks again.
            parked = true;
            Err(io::ErrorKind::WouldBlock.into())
        }
        Err(e) => Err(e),
    });
    match r {
        Ok(()) => {
            d.state = DirState::Eof;
            d.parked = false;
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            d.parked = parked && d.state == DirState::Spliced;
            Ok(())
        }
        Err(e) => Err(e),
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
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match src.try_read(&mut buf) {
            Ok(0) => return Ok(Drained::Busy(Vec::new())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Drained::Quiet(total)),
            Err(e) => return Err(e),
        };
        let written = match dst.try_write(&buf[..n]) {
            Ok(w) => w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        total += written as u64;
        if written < n || total > HANDOFF_LIMIT {
            return Ok(Drained::Busy(buf[written..n].to_vec()));
        }
    }
}
