//! The end of an evicted connection, shared by the planes that carry plain TCP:
//! the server's stream is followed to its next packet boundary, the client gets the
//! evacuation's DISCONNECT there (MQTT 5), then a lingering close.
//!
//! Bytes the client sends after the eviction are not forwarded: the server
//! connection closes with them (a packet cut in the middle never reaches a broker
//! whole, so it is dropped there, as on any network cut).

use std::{
    io,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use lb_common::DaemonStat;
use tokio::net::TcpStream;

use super::{Direction, Outcome, Traffic, copy::write_pending};
use crate::{mqtt::boundary::Boundary, stats::Stats, sys};

/// How long the server's stream may take to reach a packet boundary, and the client
/// to close after the DISCONNECT: past it the connection is just closed.
pub(crate) const EVICT_WAIT: Duration = Duration::from_secs(2);

/// Bytes read from the server per step while looking for the boundary.
const CHUNK: usize = 16 * 1024;

/// What an evicted connection still has to deliver to its client.
pub(crate) struct Tail<'a> {
    /// Bytes read from the server and not yet written to the client.
    pub pending: Option<Vec<u8>>,
    /// Where the server's stream stands once `pending` is written and `skip` more
    /// bytes are forwarded (`None`: not tracked, the client is not told).
    pub boundary: Option<Boundary>,
    /// Bytes still to come from the server before `boundary`'s position: forwarded
    /// as they are (a pair demoted from the splice knows where the stream stands only
    /// after the bytes the program passed).
    pub skip: u64,
    /// The DISCONNECT to write at the boundary (`None`: a 3.1.x client).
    pub disconnect: Option<&'a [u8]>,
}

/// Ends an evicted pair: the server's bytes up to the next packet boundary and the
/// DISCONNECT go to the client, within [`EVICT_WAIT`]; then the client's side is
/// shut down and read until it closes. The caller drops both sockets.
pub(crate) async fn finish(
    client: &TcpStream,
    server: &TcpStream,
    tail: Tail<'_>,
    traffic: &Traffic,
    stats: &Stats,
) -> Outcome {
    let deadline = Instant::now() + EVICT_WAIT;
    if let (Some(boundary), Some(disconnect)) = (tail.boundary, tail.disconnect) {
        let told = tokio::time::timeout_at(deadline.into(), async {
            let mut pending = tail.pending.unwrap_or_default();
            write_all(client, &mut pending).await?;
            let cut = to_boundary(client, server, (tail.skip, boundary), traffic, stats).await?;
            if cut {
                write_all(client, &mut disconnect.to_vec()).await?;
            }
            io::Result::Ok(cut)
        })
        .await;
        if let Ok(Ok(true)) = told {
            stats.inc(DaemonStat::EvictedDisconnect);
        }
    }
    linger_close(client, deadline).await;
    Outcome::Evicted
}

/// Copies the server's stream to the client up to its next packet boundary (after
/// `skip` bytes, where `boundary` starts); false when none can come (the server
/// closed, or its stream is not MQTT).
async fn to_boundary(
    client: &TcpStream,
    server: &TcpStream,
    (mut skip, mut boundary): (u64, Boundary),
    traffic: &Traffic,
    stats: &Stats,
) -> io::Result<bool> {
    let mut buf = vec![0; CHUNK];
    while skip > 0 || !boundary.at_boundary() {
        if skip == 0 && boundary.broken() {
            return Ok(false);
        }
        server.readable().await?;
        let want =
            usize::try_from(skip).map_or(CHUNK, |s| if s == 0 { CHUNK } else { s.min(CHUNK) });
        let n = match server.try_read(&mut buf[..want]) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let upto = if skip > 0 {
            skip -= n as u64;
            n
        } else {
            boundary.advance(&buf[..n]).unwrap_or(n)
        };
        let mut part = buf[..upto].to_vec();
        write_all(client, &mut part).await?;
        traffic.add(Direction::ServerToClient, upto as u64);
        stats.add(DaemonStat::CopiedBytesS2c, upto as u64);
        if upto < n {
            // A boundary inside the read: what follows it is not delivered.
            break;
        }
    }
    Ok(true)
}

/// Writes all of `bytes` to `dst`, waiting for room.
pub(crate) async fn write_all(dst: &TcpStream, bytes: &mut Vec<u8>) -> io::Result<()> {
    while !write_pending(dst, bytes)? {
        dst.writable().await?;
    }
    Ok(())
}

/// Sends FIN after everything written, then discards what the client still sends
/// until it closes or `deadline`: closing a socket with unread bytes would send a
/// reset that can destroy the DISCONNECT before the client reads it.
pub(crate) async fn linger_close(client: &TcpStream, deadline: Instant) {
    if sys::shutdown_write(client.as_raw_fd()).is_err() {
        return;
    }
    let _ = tokio::time::timeout_at(deadline.into(), async {
        let mut sink = [0u8; 4096];
        loop {
            client.readable().await?;
            match client.try_read(&mut sink) {
                Ok(0) => return io::Result::Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
}
