//! One direction of a spliced pair: its state machine (spliced, throttled, EOF,
//! done), the pump that forwards passed bytes, and the lag and arrival checks against
//! the peer's send counters.

use std::{
    io,
    os::fd::AsRawFd,
    sync::atomic::{AtomicU64, Ordering},
};

use lb_common::{
    CONN_THROTTLED_C2S, CONN_THROTTLED_S2C, CTRL_EVICT, CTRL_THROTTLE, DIR_CLIENT_TO_SERVER,
    DIR_SERVER_TO_CLIENT, DaemonStat,
};
use tokio::net::TcpStream;

use super::{Cookies, HIGH_WATER, LOW_WATER, PUMP_BUDGET, SockmapPlane};
use crate::{
    dataplane::{
        Direction, Pair,
        copy::{Moved, move_once_raw, write_pending_raw},
    },
    sys,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) enum DirState {
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
pub(super) struct Dir<'a> {
    pub(super) dir: u32,
    pub(super) src: &'a TcpStream,
    pub(super) dst: &'a TcpStream,
    pub(super) src_cookie: u64,
    /// Bytes the daemon wrote to `dst` itself (before the splice, and passed bytes
    /// forwarded since).
    pub(super) written: u64,
    /// What `dst`'s send counters read above the data bytes written (its SYN, for a
    /// socket that connected), measured at hand-off.
    pub(super) offset: u64,
    /// Passed bytes read from `src` (what the `ctrl` word reports once written).
    pub(super) consumed: u64,
    /// The server's byte counters.
    pub(super) traffic: &'a crate::dataplane::Traffic,
    /// Redirected bytes already added to `traffic` (passed bytes are added as the
    /// task forwards them).
    pub(super) counted: u64,
    /// The `ctrl` word last written.
    pub(super) ctrl: u64,
    /// A floor under `dst`'s enqueued bytes less `written`, from the last read of its
    /// send counters (at first `offset`: the daemon's own writes are enqueued when
    /// `send` returns). Enqueued bytes only grow, and `written` grows by what the
    /// daemon enqueues, so the floor holds until the next read; a check it answers
    /// needs no system call (three for a read). Atomic only so that a shared `Dir`
    /// can be checked from a copy plane's gate.
    pub(super) seen: AtomicU64,
    /// Read from `src`, not yet taken by `dst`.
    pub(super) pending: Option<Vec<u8>>,
    /// `src` signalled readable and has not been read to `EAGAIN` since.
    pub(super) readable: bool,
    /// The last pump stopped at its budget with bytes left: pump again at once.
    pub(super) again: bool,
    pub(super) state: DirState,
    pub(super) flag: u32,
    pub(super) stat: DaemonStat,
}

impl SockmapPlane {
    /// Whether every byte redirected in direction `d` is in its peer's send queue.
    /// What follows writes to the peer or shuts it down, which reports an error the
    /// peer has; only when the send counters must be read is the error looked at here
    /// first (a reset peer's counters stand still).
    pub(super) fn arrived(&self, d: &Dir<'_>) -> io::Result<bool> {
        let redirected = self.bpf.redirected(d.src_cookie).unwrap_or(0);
        if d.floor_covers(redirected, 0) {
            return Ok(true);
        }
        if let Some(e) = d.dst.take_error()? {
            return Err(e);
        }
        Ok(d.lag(redirected, 0)? == 0)
    }

    /// Whether more than `limit` bytes redirected in direction `d` are not in the
    /// peer's send queue yet: they wait on the peer's psock backlog, the one queue the
    /// kernel does not bound (the send queue itself is bounded by the peer's send
    /// buffer). A peer whose receiver stops reading fills its send queue, then this
    /// backlog grows.
    pub(super) fn lag_above(&self, d: &Dir<'_>, limit: u64) -> io::Result<bool> {
        let redirected = self.bpf.redirected(d.src_cookie).unwrap_or(0);
        Ok(d.lag(redirected, limit)? > limit)
    }

    /// Adds the bytes direction `d` redirected since the last call to the server's
    /// traffic counters (so `ctl backends` moves while the pair lives: the task runs at
    /// every lag event, i.e. every `lag_check_step` bytes, and every idle sample).
    pub(super) fn count_redirected(&self, d: &mut Dir<'_>) -> u64 {
        let redirected = self.bpf.redirected(d.src_cookie).unwrap_or(d.counted);
        if redirected > d.counted {
            let n = redirected - d.counted;
            d.traffic.add_later(Direction::of(d.dir as usize), n);
            let stat = if d.dir == DIR_CLIENT_TO_SERVER {
                DaemonStat::SplicedBytesC2s
            } else {
                DaemonStat::SplicedBytesS2c
            };
            self.stats.add(stat, n);
            d.counted = redirected;
        }
        d.counted
    }

    /// Moves one direction's state machine forward; true when something changed.
    pub(super) fn advance(&self, id: u32, d: &mut Dir<'_>, lag_event: bool) -> io::Result<bool> {
        match d.state {
            DirState::Spliced if lag_event && self.lag_above(d, HIGH_WATER)? => {
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
                if self.lag_above(d, LOW_WATER)? {
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
                if tracing::enabled!(tracing::Level::DEBUG) {
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
                }
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
    pub(super) fn pump(&self, d: &mut Dir<'_>) -> io::Result<bool> {
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
                let all = write_pending_raw(d.dst.as_raw_fd(), p)?;
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
            match move_once_raw(d.src.as_raw_fd(), d.dst.as_raw_fd())? {
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
                Moved::Bytes { read, rest, .. } => {
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
    pub(super) fn set_passing(&self, d: &mut Dir<'_>, on: bool) -> io::Result<()> {
        // An eviction's bit stays (see `evict`).
        let word = if on { CTRL_THROTTLE } else { 0 } | d.forwarded() | (d.ctrl & CTRL_EVICT);
        if word != d.ctrl {
            self.bpf.set_ctrl(d.src_cookie, word)?;
            d.ctrl = word;
        }
        Ok(())
    }
}

/// A direction's state machine as a hot upgrade passes it on (see [`Dir`]).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct DirStopped {
    written: u64,
    offset: u64,
    consumed: u64,
    counted: u64,
    ctrl: u64,
    state: DirState,
    /// Read, not yet written (travels beside the state).
    #[serde(skip)]
    pub(super) pending: Vec<u8>,
}

impl DirStopped {
    /// The state as it stands, its unwritten bytes moved out (a pair's loop keeps its
    /// directions' state in place between the steps of its life).
    pub(super) fn take(&mut self) -> Self {
        Self {
            pending: std::mem::take(&mut self.pending),
            ..*self
        }
    }
}

impl<'a> Dir<'a> {
    /// The state to pass on; the direction is done with here.
    pub(super) fn stop(&mut self) -> DirStopped {
        DirStopped {
            written: self.written,
            offset: self.offset,
            consumed: self.consumed,
            counted: self.counted,
            ctrl: self.ctrl,
            state: self.state,
            pending: self.pending.take().unwrap_or_default(),
        }
    }

    /// Both directions of `pair` resumed from a hot upgrade's old process.
    pub(super) fn resumed_both(
        pair: &'a Pair,
        cookies: Cookies,
        [c2s, s2c]: [DirStopped; 2],
    ) -> [Self; 2] {
        let (client, server) = (&pair.client, &pair.server);
        [
            Self::resumed(
                (DIR_CLIENT_TO_SERVER, cookies.client),
                client,
                server,
                &pair.traffic,
                c2s,
            ),
            Self::resumed(
                (DIR_SERVER_TO_CLIENT, cookies.server),
                server,
                client,
                &pair.traffic,
                s2c,
            ),
        ]
    }

    /// A direction resumed from a hot upgrade's old process (see [`DirStopped`]).
    fn resumed(
        (dir, src_cookie): (u32, u64),
        src: &'a TcpStream,
        dst: &'a TcpStream,
        traffic: &'a crate::dataplane::Traffic,
        s: DirStopped,
    ) -> Self {
        let (flag, stat) = Self::flag_and_stat(dir);
        Self {
            dir,
            src,
            dst,
            src_cookie,
            written: s.written,
            offset: s.offset,
            consumed: s.consumed,
            traffic,
            counted: s.counted,
            ctrl: s.ctrl,
            seen: AtomicU64::new(s.offset),
            pending: (!s.pending.is_empty()).then_some(s.pending),
            readable: true,
            again: false,
            state: s.state,
            flag,
            stat,
        }
    }

    fn flag_and_stat(dir: u32) -> (u32, DaemonStat) {
        if dir == DIR_CLIENT_TO_SERVER {
            (CONN_THROTTLED_C2S, DaemonStat::CopiedBytesC2s)
        } else {
            (CONN_THROTTLED_S2C, DaemonStat::CopiedBytesS2c)
        }
    }

    /// Both directions of `pair` and its cookies; measures the send counters'
    /// offsets, so call it before the sockets enter the maps.
    pub(super) fn both(pair: &'a Pair) -> io::Result<(Cookies, [Self; 2])> {
        let cookies = Cookies {
            client: sys::socket_cookie(pair.client.as_raw_fd())?,
            server: sys::socket_cookie(pair.server.as_raw_fd())?,
        };
        let c2s = Self::new(
            DIR_CLIENT_TO_SERVER,
            &pair.client,
            &pair.server,
            cookies.client,
            pair.written_to_server,
            &pair.traffic,
        )?;
        let s2c = Self::new(
            DIR_SERVER_TO_CLIENT,
            &pair.server,
            &pair.client,
            cookies.server,
            pair.written_to_client,
            &pair.traffic,
        )?;
        Ok((cookies, [c2s, s2c]))
    }

    /// A spliced direction; measures `dst`'s counter offset, so call it before `dst`
    /// enters the maps (when the daemon is the only writer).
    pub(super) fn new(
        dir: u32,
        src: &'a TcpStream,
        dst: &'a TcpStream,
        src_cookie: u64,
        written: u64,
        traffic: &'a crate::dataplane::Traffic,
    ) -> io::Result<Self> {
        let offset = sys::send_progress(dst.as_raw_fd())?
            .enqueued()
            .saturating_sub(written);
        let (flag, stat) = Self::flag_and_stat(dir);
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
            seen: AtomicU64::new(offset),
            pending: None,
            readable: false,
            again: false,
            state: DirState::Spliced,
            flag,
            stat,
        })
    }

    /// How many of the `redirected` bytes are not in `dst`'s send queue yet, exactly
    /// when that may be over `limit` (a read of the send counters), or 0 when the
    /// floor in [`Dir::seen`] already shows it is not (no read).
    fn lag(&self, redirected: u64, limit: u64) -> io::Result<u64> {
        if self.floor_covers(redirected, limit) {
            return Ok(0);
        }
        let target = self.offset + self.written + redirected;
        let enqueued = sys::send_progress(self.dst.as_raw_fd())?.enqueued();
        self.seen
            .fetch_max(enqueued.saturating_sub(self.written), Ordering::Relaxed);
        Ok(target.saturating_sub(enqueued))
    }

    /// Whether the floor in [`Dir::seen`] shows that no more than `limit` of the
    /// `redirected` bytes are missing from `dst`'s send queue.
    fn floor_covers(&self, redirected: u64, limit: u64) -> bool {
        self.offset + redirected <= self.seen.load(Ordering::Relaxed).saturating_add(limit)
    }

    /// Passed bytes read from `src` and written to `dst`.
    pub(super) fn forwarded(&self) -> u64 {
        self.consumed - self.pending.as_ref().map_or(0, |p| p.len() as u64)
    }

    /// Whether to wait for `src` readiness (EOF, an error, or passed bytes): only while
    /// throttled. A spliced socket turns readable with every skb the program
    /// redirects, which would wake the task per message; its FIN and passed bytes
    /// come as events from the program instead, its errors through
    /// [`Dir::watch_errors`]. Not once it fired (`readable`): the pump reads until
    /// `EAGAIN`, and [`super::quiet::Quiet::ready`] clears the readiness it took.
    pub(super) fn watch_readable(&self) -> bool {
        !self.readable && self.state == DirState::Throttled
    }

    /// Whether to wait for an error (a reset) on `src` while spliced.
    pub(super) fn watch_errors(&self) -> bool {
        !self.readable && self.state == DirState::Spliced
    }

    /// Whether the direction waits on something the kernel does not signal: the
    /// peer's lag (throttled), redirected bytes reaching the peer's send queue.
    pub(super) fn polled(&self) -> bool {
        matches!(self.state, DirState::Throttled | DirState::Eof)
            || (self.state == DirState::Spliced && (self.readable || self.pending.is_some()))
    }
}
