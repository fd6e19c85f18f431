//! The userspace data plane: readiness-driven copy through one per-thread scratch
//! buffer. An idle connection holds no buffer; a heap buffer exists only while a peer
//! has not taken all of a read (and then the direction stops reading, so TCP flow
//! control holds the sender back).

use std::{cell::RefCell, io, os::fd::AsRawFd, sync::Arc, time::Instant};

use lb_common::DaemonStat;
use tokio::net::TcpStream;

use super::{CarryFuture, DataPlane, Outcome, POLL_MAX, POLL_MIN, Pair, reset_both};
use crate::{stats::Stats, sys};

/// Size of the per-thread scratch buffer (64 KiB measured twice as fast as 8 KiB).
const SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
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
    pub async fn run(&self, pair: Pair) -> Outcome {
        self.run_handed_over(&pair, Handover::default()).await
    }

    /// Carries a pair, possibly one the sockmap plane hands over mid-stream. Resets both
    /// sockets on error; the caller closes them.
    pub async fn run_handed_over(&self, pair: &Pair, handover: Handover<'_>) -> Outcome {
        self.stats.inc(DaemonStat::Copied);
        let result = copy_both(pair, handover, &self.stats).await;
        if let Err(_) | Ok(Outcome::Aborted(_)) = &result {
            reset_both(pair);
        }
        result.unwrap_or_else(Outcome::Aborted)
    }
}

impl DataPlane for CopyPlane {
    fn name(&self) -> &'static str {
        "copy"
    }
    fn carry(&self, pair: Pair) -> CarryFuture<'_> {
        Box::pin(self.run(pair))
    }
}

/// State of a pair the sockmap plane hands over (the default: a fresh pair); directions
/// are indexed 0 = client to server, 1 = server to client.
#[derive(Default)]
pub struct Handover<'a> {
    /// Directions whose FIN was already forwarded: not read again (a second EOF would
    /// shut a socket that may be closed by now).
    pub finished: [bool; 2],
    /// Whether a direction may start: every byte the kernel redirected in it has
    /// reached its destination's send queue (writing earlier would reorder). Each
    /// direction waits for its own gate only, so one blocked direction cannot stall
    /// the other (on which it may depend: an echoing server).
    pub ready: Option<&'a (dyn Fn(usize) -> io::Result<bool> + Send + Sync)>,
    /// Bytes already read from a direction's source and not yet written.
    pub pending: [Vec<u8>; 2],
}

/// One direction of a copied connection.
struct Direction<'a> {
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
    gate: Option<&'a (dyn Fn(usize) -> io::Result<bool> + Send + Sync)>,
    index: usize,
    stat: DaemonStat,
}

impl Direction<'_> {
    /// Moves one read's worth of bytes, or finishes a pending write.
    /// Cancel-safe: state changes only after the awaits.
    async fn step(&mut self, stats: &Stats) -> io::Result<()> {
        if let Some(ready) = self.gate {
            let mut wait = POLL_MIN;
            while !ready(self.index)? {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(POLL_MAX);
            }
            self.gate = None;
        }
        if let Some(p) = &mut self.pending {
            self.dst.writable().await?;
            match self.dst.try_write(p) {
                Ok(n) if n == p.len() => self.pending = None,
                Ok(n) => {
                    p.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            return Ok(());
        }
        if self.probe {
            self.probe = false;
        } else {
            self.src.readable().await?;
        }
        let (src, dst) = (self.src, self.dst);
        let r = SCRATCH_BUF.with_borrow_mut(|buf| -> io::Result<Option<Option<Vec<u8>>>> {
            let n = match src.try_read(buf) {
                Ok(0) => return Ok(None),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(None)),
                Err(e) => return Err(io::Error::new(e.kind(), format!("read: {e}"))),
            };
            stats.add(self.stat, n as u64);
            match dst.try_write(&buf[..n]) {
                Ok(m) if m == n => Ok(Some(None)),
                Ok(m) => Ok(Some(Some(buf[m..n].to_vec()))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    Ok(Some(Some(buf[..n].to_vec())))
                }
                Err(e) => Err(e),
            }
        })?;
        match r {
            None => {
                // EOF: every byte before it is already in dst's send queue.
                sys::shutdown_write(dst.as_raw_fd()).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("{}: shutdown after EOF: {e}", self.stat.name()),
                    )
                })?;
                stats.inc(DaemonStat::HalfClosed);
                self.done = true;
            }
            Some(pending) => self.pending = pending,
        }
        Ok(())
    }
}

async fn copy_both(pair: &Pair, handover: Handover<'_>, stats: &Stats) -> io::Result<Outcome> {
    let Handover {
        finished,
        ready: gate,
        pending: [p0, p1],
    } = handover;
    let direction = |index: usize, src, dst, pending: Vec<u8>, stat| Direction {
        src,
        dst,
        pending: (!pending.is_empty()).then_some(pending),
        done: finished[index],
        probe: true,
        gate,
        index,
        stat,
    };
    let mut c2s = direction(
        0,
        &pair.client,
        &pair.server,
        p0,
        DaemonStat::CopiedBytesC2s,
    );
    let mut s2c = direction(
        1,
        &pair.server,
        &pair.client,
        p1,
        DaemonStat::CopiedBytesS2c,
    );
    let idle = pair.idle_timeout;
    let mut last = Instant::now();
    let sleep = tokio::time::sleep(idle);
    tokio::pin!(sleep);
    while !(c2s.done && s2c.done) {
        tokio::select! {
            r = c2s.step(stats), if !c2s.done => { r?; last = Instant::now(); }
            r = s2c.step(stats), if !s2c.done => { r?; last = Instant::now(); }
            () = &mut sleep => {
                if last.elapsed() >= idle {
                    return Ok(Outcome::IdleTimeout);
                }
                sleep.as_mut().reset((last + idle).into());
            }
        }
    }
    Ok(Outcome::Closed)
}
