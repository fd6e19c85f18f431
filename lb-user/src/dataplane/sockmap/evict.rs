//! Evicting a spliced MQTT 5 connection: the server's direction is pulled back to
//! the daemon (the pass bit), and the program ends the stream at the next packet
//! boundary (it follows the server's packets for sockets entered with
//! `SOCK_TRACK_MQTT`): `evict_end` says how many passed bytes come before it, later
//! skbs are dropped. The daemon forwards exactly those bytes after every redirected
//! one, then writes the DISCONNECT itself.

use std::{io, os::fd::AsRawFd, time::Instant};

use lb_common::{CTRL_EVICT, CTRL_THROTTLE, DIR_SERVER_TO_CLIENT, DaemonStat, SOCK_EVICT_CUT};

use super::{
    SockmapPlane,
    direction::{Dir, DirState},
};
use crate::{
    dataplane::{Direction, POLL_MAX, POLL_MIN, Pair, evict},
    mqtt::boundary::Boundary,
    sys,
};

/// Bytes read from the server socket per step.
const CHUNK: usize = 64 * 1024;

impl SockmapPlane {
    /// Tells the client of an evicted pair (still in the maps) to use another server,
    /// within `deadline`; false when it cannot be done exactly (a stream that is not
    /// MQTT, a server that stops mid-packet, a client that does not read): the
    /// caller then just closes.
    pub(super) async fn tell_evicted(
        &self,
        pair: &Pair,
        dirs: &mut [Dir<'_>; 2],
        deadline: Instant,
    ) -> bool {
        let Some(disconnect) = pair.disconnect.as_deref() else {
            return false;
        };
        let d = &mut dirs[DIR_SERVER_TO_CLIENT as usize];
        if pair.boundary.is_none() || !matches!(d.state, DirState::Spliced | DirState::Throttled) {
            return false;
        }
        let told = tokio::time::timeout_at(deadline.into(), async {
            let Some(end) = self.cut_at_boundary(pair, d).await? else {
                return io::Result::Ok(false);
            };
            self.forward_passed(d, end).await?;
            evict::write_all(&pair.client, &mut disconnect.to_vec()).await?;
            Ok(true)
        })
        .await;
        if !matches!(told, Ok(Ok(true))) {
            tracing::debug!(id = pair.id, outcome = ?told, "evicted spliced pair closed without DISCONNECT");
            return false;
        }
        self.count_redirected(d);
        self.stats.inc(DaemonStat::EvictedDisconnect);
        true
    }

    /// Pulls the server's direction back to the daemon and asks the program to end it
    /// at the next packet boundary; forwards passed bytes while it waits. Returns how
    /// many passed bytes come before the end, or None when the stream cannot be cut
    /// (not MQTT).
    async fn cut_at_boundary(&self, pair: &Pair, d: &mut Dir<'_>) -> io::Result<Option<u64>> {
        d.ctrl = CTRL_THROTTLE | CTRL_EVICT | d.forwarded();
        self.bpf.set_ctrl(d.src_cookie, d.ctrl)?;
        // A verdict runs under the server socket's lock; TCP_INFO takes it, so once
        // it returns no verdict that missed the bits is still running: every later
        // skb is passed, and one that starts at a boundary is dropped whole.
        sys::send_progress(pair.server.as_raw_fd())?;
        loop {
            let s = self.bpf.sock(d.src_cookie)?;
            if s.flags & SOCK_EVICT_CUT != 0 {
                // Written before the flag.
                return Ok(Some(self.bpf.sock(d.src_cookie)?.evict_end));
            }
            let at = Boundary::from_raw(s.mqtt);
            if at.at_boundary() {
                // At a boundary when the bits took effect: nothing more is passed.
                return Ok(Some(s.passed));
            }
            if at.broken() {
                return Ok(None);
            }
            // Mid-packet: the program cuts where the packet ends; what it passed
            // before that (a count without the cut skb, see the program) goes on.
            let moved = self.forward_passed(d, s.passed).await?;
            if !moved {
                tokio::time::sleep(POLL_MIN).await;
            }
        }
    }

    /// Forwards passed bytes up to `end` (counted like `passed`), after every
    /// redirected byte has reached the client's send queue; true when bytes moved.
    async fn forward_passed(&self, d: &mut Dir<'_>, end: u64) -> io::Result<bool> {
        let mut wait = POLL_MIN;
        while !self.arrived(d)? {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(POLL_MAX);
        }
        if let Some(mut p) = d.pending.take() {
            // Counted once enqueued (`Dir::seen` relies on it).
            let n = p.len() as u64;
            evict::write_all(d.dst, &mut p).await?;
            d.written += n;
        }
        let mut buf = vec![0; CHUNK];
        let start = d.consumed;
        while d.consumed < end {
            let want = (end - d.consumed).min(CHUNK as u64) as usize;
            let n = match sys::recv_now(d.src.as_raw_fd(), &mut buf[..want]) {
                Ok(0) => return Err(io::Error::other("server closed before the cut")),
                Ok(n) => n,
                // Passed skbs can wait on the psock backlog on their way to the
                // socket's queue.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(POLL_MIN).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            evict::write_all(d.dst, &mut buf[..n].to_vec()).await?;
            d.consumed += n as u64;
            d.written += n as u64;
            self.stats.add(d.stat, n as u64);
            d.traffic.add(Direction::ServerToClient, n as u64);
        }
        Ok(d.consumed > start)
    }
}
