//! The hand-off drain: no partly read skb may stay in either receive queue when the
//! sockets enter the maps, and a side that does not go quiet keeps the pair on the
//! copy plane.

use std::io;

use lb_common::DaemonStat;
use tokio::net::TcpStream;

use super::{HANDOFF_LIMIT, SockmapPlane};
use crate::{
    dataplane::{
        Direction, Outcome, Pair,
        copy::{Moved, move_once_now},
        reset_both,
    },
    mqtt::boundary::Boundary,
};

/// Why a hand-off drain did not leave both sides quiet.
pub(crate) enum Declined {
    /// A side did not go quiet (a sender past [`HANDOFF_LIMIT`], a peer that could not
    /// take a read at once, a FIN): the pair carries on copied, starting with these
    /// bytes read and not yet written (client to server, server to client).
    Busy([Vec<u8>; 2]),
    /// The pair failed; both sockets are reset.
    Failed(Outcome),
}

impl SockmapPlane {
    /// Reads each side until `EAGAIN`, writing it to the peer, so that the sockets can
    /// enter the maps; `Err` when they cannot (see [`Declined`]).
    pub(crate) fn drain_both(&self, pair: &mut Pair) -> Result<(), Declined> {
        for to_server in [true, false] {
            let (src, dst) = if to_server {
                (&pair.client, &pair.server)
            } else {
                (&pair.server, &pair.client)
            };
            // The server's packets are followed from here when an eviction may need
            // their boundaries.
            let boundary = if to_server {
                None
            } else {
                pair.boundary.as_mut()
            };
            let mut count = |n| {
                // Bytes written, or read for `dst` (what the plane after this counts
                // from).
                if to_server {
                    pair.written_to_server += n;
                    pair.traffic.add(Direction::ClientToServer, n);
                } else {
                    pair.written_to_client += n;
                    pair.traffic.add(Direction::ServerToClient, n);
                }
            };
            match drain(src, dst, boundary) {
                Ok(Drained::Quiet(n)) => count(n),
                Ok(Drained::Busy(rest, n)) => {
                    count(n);
                    tracing::debug!(
                        id = pair.id,
                        to_server,
                        "hand-off drain did not go quiet; copy plane"
                    );
                    self.stats.inc(DaemonStat::SpliceFallback);
                    let mut pending = [Vec::new(), Vec::new()];
                    pending[usize::from(!to_server)] = rest;
                    return Err(Declined::Busy(pending));
                }
                Err(e) => {
                    reset_both(pair);
                    return Err(Declined::Failed(Outcome::Aborted(e)));
                }
            }
        }
        Ok(())
    }
}

/// What draining one side at hand-off found.
enum Drained {
    /// `src` went quiet after this many bytes, all written to `dst`.
    Quiet(u64),
    /// EOF, a full `dst`, or a sender past [`HANDOFF_LIMIT`]: the copy plane continues,
    /// starting with these bytes read but not yet written; all this many read.
    Busy(Vec<u8>, u64),
}

/// Reads `src` until `EAGAIN`, writing everything to `dst`, without ever waiting: a
/// blocking write here, with the other direction unread, can deadlock against a peer
/// that echoes.
fn drain(
    src: &TcpStream,
    dst: &TcpStream,
    mut boundary: Option<&mut Boundary>,
) -> io::Result<Drained> {
    let mut total = 0u64;
    loop {
        match move_once_now(src, dst, boundary.as_deref_mut())? {
            Moved::Idle => return Ok(Drained::Quiet(total)),
            Moved::Eof => return Ok(Drained::Busy(Vec::new(), total)),
            Moved::Bytes {
                read, rest: None, ..
            } => {
                total += read as u64;
                if total > HANDOFF_LIMIT {
                    return Ok(Drained::Busy(Vec::new(), total));
                }
            }
            Moved::Bytes {
                read,
                rest: Some(rest),
                ..
            } => return Ok(Drained::Busy(rest, total + read as u64)),
        }
    }
}
