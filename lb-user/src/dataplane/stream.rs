//! The userspace relay for a WebSocket terminated by mqttlb in front of a plain MQTT
//! server (frames unwrapped and wrapped): neither the sockmap nor the copy plane
//! (which move bytes unchanged between two sockets) can carry it. TLS clients have
//! their own relay ([`super::tls`]).
//!
//! Each direction copies through a 16 KiB buffer; a half-close is forwarded after
//! every byte before it; an error on either side resets both TCP connections;
//! `idle_timeout` closes a connection with no bytes either way. TCP (and TLS) flow
//! control bound memory when a side stops reading.

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lb_common::DaemonStat;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{Direction, Outcome, Traffic};
use crate::{
    stats::Stats,
    sys,
    ws::{CloseCode, Opcode},
};

/// Buffer per direction.
const BUF: usize = 16 * 1024;

/// Runs `both` (both directions of a relay) to its end, or until neither direction
/// moved a byte for `idle` (`last`: milliseconds since `epoch` of the last byte). An
/// error resets both TCP connections (`fds`) rather than let either side believe the
/// stream ended.
async fn until_idle(
    both: impl std::future::Future<Output = io::Result<()>>,
    last: &AtomicU64,
    epoch: Instant,
    idle: Duration,
    fds: [RawFd; 2],
    stats: &Stats,
) -> Outcome {
    tokio::pin!(both);
    loop {
        let since = Duration::from_millis(last.load(Ordering::Relaxed));
        let deadline = epoch + since + idle;
        tokio::select! {
            r = &mut both => {
                return match r {
                    Ok(()) => {
                        stats.add(DaemonStat::HalfClosed, 2);
                        Outcome::Closed
                    }
                    Err(e) => {
                        for fd in fds {
                            let _ = sys::set_linger_zero(fd);
                        }
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

/// `e` with the operation that met it (the kind is kept).
fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// What bounds a terminated WebSocket.
#[derive(Debug, Clone, Copy)]
pub struct WsLimits {
    /// No bytes either way for this long closes the connection.
    pub idle: Duration,
    /// Largest client data frame (the listener's `max_frame_size`).
    pub max_frame: u64,
}

/// Carries a WebSocket client to a plain MQTT server, terminating the WebSocket:
/// client frames are unmasked to the server as they arrive (`pending`: client bytes
/// already read, the start of the next frames), server bytes go back in binary frames,
/// pings are answered, the client's close frame is answered (once) and ends the
/// client-to-server direction (FIN), the server's FIN becomes a close frame (1000)
/// unless one was sent already. A frame against the protocol (text, unmasked, reserved
/// bits, a control frame over 125 bytes) or over `max_frame` ends both directions at
/// once and resets both connections.
pub async fn ws_terminate<C: AsyncRead + AsyncWrite + Unpin>(
    client: C,
    client_fd: RawFd,
    pending: Vec<u8>,
    server: TcpStream,
    limits: WsLimits,
    traffic: Arc<Traffic>,
    stats: &Stats,
) -> Outcome {
    stats.inc(DaemonStat::Copied);
    let last = AtomicU64::new(0);
    let ws = WsShared {
        stats,
        traffic: &traffic,
        last: &last,
        epoch: Instant::now(),
        server_done: AtomicBool::new(false),
    };
    let server_fd = server.as_raw_fd();
    let (cr, cw) = tokio::io::split(client);
    let (sr, sw) = server.into_split();
    // Control frames the client-to-server side owes the client (pongs, the close reply).
    let (ctl_tx, ctl_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let up = ws_client_to_server(&ws, cr, sw, pending, limits.max_frame, ctl_tx);
    let down = ws_server_to_client(&ws, sr, cw, ctl_rx);
    // The first error ends both directions: the other must not wait for its own end.
    let both = async { tokio::try_join!(up, down).map(drop) };
    until_idle(
        both,
        &last,
        ws.epoch,
        limits.idle,
        [client_fd, server_fd],
        stats,
    )
    .await
}

/// What both directions of a terminated WebSocket share.
struct WsShared<'a> {
    stats: &'a Stats,
    traffic: &'a Traffic,
    /// Milliseconds since `epoch` of the last byte read either way.
    last: &'a AtomicU64,
    epoch: Instant,
    /// The server finished and the client got its close frame: the WebSocket is over,
    /// and a client that resets rather than closes ends it cleanly all the same.
    server_done: AtomicBool,
}

impl WsShared<'_> {
    /// Records activity (for the idle timeout).
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }
}

/// Client frames unmasked to the server as they arrive; pings answered and the close
/// frame answered (through `ctl`, written by the other direction), which ends this
/// direction with a FIN to the server.
async fn ws_client_to_server(
    ws: &WsShared<'_>,
    mut client: impl AsyncRead + Unpin,
    mut server: impl AsyncWrite + Unpin,
    pending: Vec<u8>,
    max_frame: u64,
    ctl: tokio::sync::mpsc::Sender<Vec<u8>>,
) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut frames = crate::ws::FrameStream::new(max_frame);
    let mut buf = pending;
    let mut out = Vec::with_capacity(BUF);
    let mut chunk = vec![0u8; BUF];
    loop {
        loop {
            let (used, control) = frames.decode(&buf, &mut out).map_err(|e| {
                ws.stats.inc(DaemonStat::WsBadFrames);
                io::Error::new(io::ErrorKind::InvalidData, e)
            })?;
            buf.drain(..used);
            if !out.is_empty() {
                server
                    .write_all(&out)
                    .await
                    .map_err(|e| context(e, "server write"))?;
                ws.traffic.add(Direction::ClientToServer, out.len() as u64);
                ws.stats.add(DaemonStat::CopiedBytesC2s, out.len() as u64);
                out.clear();
            }
            let Some(control) = control else { break };
            match control.opcode {
                Opcode::Ping => {
                    let pong = crate::ws::control_frame(Opcode::Pong, &control.payload);
                    let _ = ctl.send(pong).await;
                }
                Opcode::Close => {
                    let reply = crate::ws::control_frame(Opcode::Close, &control.payload);
                    let _ = ctl.send(reply).await;
                    return server.shutdown().await;
                }
                _ => {}
            }
        }
        let n = match client.read(&mut chunk).await {
            // A TLS client may close without close_notify: the end all the same.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(_) if ws.server_done.load(Ordering::Relaxed) => 0,
            r => r.map_err(|e| context(e, "client read"))?,
        };
        if n == 0 {
            return server.shutdown().await;
        }
        ws.touch();
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Server bytes to the client in binary frames, with the control frames the other
/// direction owes; the server's FIN becomes a close frame (1000) unless one was sent.
async fn ws_server_to_client(
    ws: &WsShared<'_>,
    mut server: impl AsyncRead + Unpin,
    mut client: impl AsyncWrite + Unpin,
    mut ctl: tokio::sync::mpsc::Receiver<Vec<u8>>,
) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut chunk = vec![0u8; BUF];
    let mut ctl_open = true;
    // A close frame went to the client (the reply to its own): no second one.
    let mut closed = false;
    loop {
        tokio::select! {
            frame = ctl.recv(), if ctl_open => match frame {
                Some(frame) => {
                    closed |= frame.first() == Some(&(0x80 | Opcode::Close as u8));
                    client.write_all(&frame).await.map_err(|e| context(e, "client write"))?;
                }
                None => ctl_open = false,
            },
            r = server.read(&mut chunk) => {
                let n = r.map_err(|e| context(e, "server read"))?;
                if n == 0 {
                    // The server is done: close the WebSocket. The client may be
                    // gone already (it closed first), which is no error.
                    if !closed {
                        let close = crate::ws::close_frame(CloseCode::Normal);
                        let _ = client.write_all(&close).await;
                    }
                    let _ = client.shutdown().await;
                    ws.server_done.store(true, Ordering::Relaxed);
                    return Ok(());
                }
                ws.touch();
                ws.traffic.add(Direction::ServerToClient, n as u64);
                ws.stats.add(DaemonStat::CopiedBytesS2c, n as u64);
                client
                    .write_all(&crate::ws::binary_frame(&chunk[..n]))
                    .await
                    .map_err(|e| context(e, "client write"))?;
            }
        }
    }
}
