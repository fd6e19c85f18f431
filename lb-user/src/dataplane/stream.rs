//! The userspace relay for connections whose client side is not a plain TCP socket
//! (TLS): bytes are decrypted and encrypted in the process, so neither the sockmap nor
//! the copy plane (which moves bytes between two sockets) can carry them.
//!
//! Each direction copies through a 16 KiB buffer; a half-close is forwarded after
//! every byte before it (TLS: `close_notify`, then FIN); an error on either side
//! resets both TCP connections; `idle_timeout` closes a connection with no bytes
//! either way. TCP and TLS flow control bound memory when a side stops reading.

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use lb_common::DaemonStat;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{Outcome, Traffic};
use crate::{stats::Stats, sys};

/// Buffer per direction.
const BUF: usize = 16 * 1024;

/// Counts what is read from a stream (per server and daemon-wide) and when.
struct Metered<'a, S> {
    inner: S,
    dir: usize,
    stat: DaemonStat,
    traffic: &'a Traffic,
    stats: &'a Stats,
    /// Milliseconds since `epoch` of the last byte read either way.
    last: &'a AtomicU64,
    epoch: Instant,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.traffic.add(self.dir, n);
            self.stats.add(self.stat, n);
            self.last
                .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Carries `client` (whose TCP socket is `client_fd`) and `server` until both
/// directions are closed.
pub async fn relay<C: AsyncRead + AsyncWrite + Unpin>(
    client: C,
    client_fd: RawFd,
    server: TcpStream,
    idle: Duration,
    traffic: Arc<Traffic>,
    stats: &Stats,
) -> Outcome {
    stats.inc(DaemonStat::Copied);
    let epoch = Instant::now();
    let last = AtomicU64::new(0);
    let server_fd = server.as_raw_fd();
    let mut c = Metered {
        inner: client,
        dir: 0,
        stat: DaemonStat::CopiedBytesC2s,
        traffic: &traffic,
        stats,
        last: &last,
        epoch,
    };
    let mut s = Metered {
        inner: server,
        dir: 1,
        stat: DaemonStat::CopiedBytesS2c,
        traffic: &traffic,
        stats,
        last: &last,
        epoch,
    };
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut s, BUF, BUF);
    tokio::pin!(copy);
    loop {
        let since = Duration::from_millis(last.load(Ordering::Relaxed));
        let deadline = epoch + since + idle;
        tokio::select! {
            r = &mut copy => {
                return match r {
                    Ok(_) => {
                        stats.add(DaemonStat::HalfClosed, 2);
                        Outcome::Closed
                    }
                    Err(e) => {
                        // Reset both rather than let either side believe the stream ended.
                        let _ = sys::set_linger_zero(client_fd);
                        let _ = sys::set_linger_zero(server_fd);
                        Outcome::Aborted(e)
                    }
                };
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                if epoch.elapsed() >= Duration::from_millis(last.load(Ordering::Relaxed)) + idle {
                    return Outcome::IdleTimeout;
                }
            }
        }
    }
}
