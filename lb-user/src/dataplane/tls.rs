//! The TLS relay: a client whose TLS mqttlb terminates, and its plain server. Two
//! relays, one state when a hot upgrade moves a connection between them:
//!
//! - [`relay`]: a connection handshaken here, through rustls. Each direction copies
//!   through a 16 KiB buffer of its own (not `copy_bidirectional`'s, which cannot be
//!   looked into): a hot upgrade takes what is in them, what rustls decrypted and was
//!   not read yet, what it encrypted and the socket did not take yet, the incomplete
//!   record it was fed ([`Tap`]) and the traffic keys, and the connection departs as
//!   [`Stopped`]. TLS 1.3 only: a TLS 1.2 connection stays with the old process.
//! - [`resume`]: a connection a hot upgrade moved in, through the record layer of
//!   [`crate::tls::records`]; it can depart again the same way.
//!
//! Both: a half-close is forwarded after every byte before it (`close_notify`, then
//! FIN); an error on either side resets both TCP connections; `idle_timeout` closes a
//! connection with no bytes either way; TCP and TLS flow control bound memory.

use std::{
    future::poll_fn,
    io,
    os::fd::AsRawFd,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use lb_common::DaemonStat;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{Carried, Direction, Outcome, Traffic};
use crate::{
    registry::Entry,
    stats::Stats,
    sys,
    tls::records::{Keys, Opened, Opener, Sealer, Tap},
};

/// Buffer per direction.
const BUF: usize = 16 * 1024;

/// A TLS client stream as the relay holds it.
pub type TlsClient = tokio_rustls::server::TlsStream<Tap<TcpStream>>;

/// Where a TLS connection stood when a hot upgrade moved it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stopped {
    /// Traffic keys and next sequence numbers.
    keys: Keys,
    /// The client's incomplete record (raw).
    #[serde(with = "b64")]
    raw_in: Vec<u8>,
    /// Client to server: plaintext not yet written to the server; server to client:
    /// records sealed and not yet written to the client (travel beside the state).
    #[serde(skip)]
    pub pending: [Vec<u8>; 2],
    /// A direction's end was read (the client's `close_notify`, the server's FIN).
    eof: [bool; 2],
    /// The `close_notify` to the client is sealed (in `pending[1]`, or written).
    close_sealed: bool,
    /// A direction's end was forwarded (FIN to the server; FIN to the client).
    done: [bool; 2],
}

/// Raw bytes as base64 in the state's JSON.
mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

/// What both relays need besides the streams.
pub struct Ctx<'a> {
    /// No bytes either way for this long closes the connection.
    pub idle: Duration,
    /// The connection's byte counters.
    pub traffic: Arc<Traffic>,
    /// Daemon counters.
    pub stats: &'a Stats,
    /// Its registry row (eviction, departure).
    pub entry: &'a Entry,
}

/// Activity for the idle timeout: milliseconds since `epoch` of the last byte.
struct Activity {
    epoch: Instant,
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }
    fn deadline(&self, idle: Duration) -> Instant {
        self.epoch + Duration::from_millis(self.last.load(Ordering::Relaxed)) + idle
    }
}

/// Counts `n` bytes read in direction `dir`.
fn count(ctx: &Ctx<'_>, activity: &Activity, dir: Direction, n: usize) {
    let stat = match dir {
        Direction::ClientToServer => DaemonStat::CopiedBytesC2s,
        Direction::ServerToClient => DaemonStat::CopiedBytesS2c,
    };
    ctx.traffic.add(dir, n as u64);
    ctx.stats.add(stat, n as u64);
    activity.touch();
}

/// What ended a relay's loop.
enum Stop {
    /// Both directions finished, or an error.
    Ended(io::Result<()>),
    Idle,
    Evicted,
    Depart,
}

/// Runs `both` until it ends, the connection idles for `ctx.idle`, is evicted, or
/// (when `departable`) a hot upgrade asks for it.
async fn run_until(
    both: impl std::future::Future<Output = io::Result<()>>,
    activity: &Activity,
    ctx: &Ctx<'_>,
    departable: bool,
) -> Stop {
    tokio::pin!(both);
    loop {
        let deadline = activity.deadline(ctx.idle);
        tokio::select! {
            r = &mut both => return Stop::Ended(r),
            () = tokio::time::sleep_until(deadline.into()) => {
                if Instant::now() >= activity.deadline(ctx.idle) {
                    return Stop::Idle;
                }
            }
            () = ctx.entry.evicted_or_departing(departable) => {
                return if ctx.entry.is_evicting() { Stop::Evicted } else { Stop::Depart };
            }
        }
    }
}

/// The outcome of a loop that ended; an error resets both TCP connections.
fn ended(stop: Stop, fds: [i32; 2], stats: &Stats) -> Outcome {
    match stop {
        Stop::Ended(Ok(())) => {
            stats.add(DaemonStat::HalfClosed, 2);
            Outcome::Closed
        }
        Stop::Ended(Err(e)) => {
            for fd in fds {
                let _ = sys::set_linger_zero(fd);
            }
            Outcome::Aborted(e)
        }
        Stop::Idle => Outcome::IdleTimeout,
        Stop::Evicted => Outcome::Evicted,
        Stop::Depart => unreachable!("handled by the caller"),
    }
}

/// One direction of [`relay`]: a buffer and how far its end has gone.
struct Half {
    buf: Box<[u8]>,
    /// `buf[pos..cap]` is read and not yet written.
    pos: usize,
    cap: usize,
    /// EOF read.
    eof: bool,
    /// Shutdown of the destination begun (TLS: `close_notify` queued).
    shutting: bool,
    /// Shutdown done.
    done: bool,
    /// Written since the last flush.
    unflushed: bool,
}

impl Half {
    fn new() -> Self {
        Self {
            buf: vec![0; BUF].into_boxed_slice(),
            pos: 0,
            cap: 0,
            eof: false,
            shutting: false,
            done: false,
            unflushed: false,
        }
    }

    /// Moves bytes from `src` to `dst` until both would block, or the direction is
    /// done (EOF forwarded). Cancel-safe: all state is in `self`.
    fn poll_copy<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        dst: &mut W,
        mut on_read: impl FnMut(usize),
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.pos == self.cap && !self.eof {
                let mut rb = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *src).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.eof = true;
                        } else {
                            on_read(n);
                            (self.pos, self.cap) = (0, n);
                        }
                    }
                    // A TLS client may close without close_notify: the end all the
                    // same.
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        self.eof = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        if self.unflushed {
                            ready!(Pin::new(&mut *dst).poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.cap {
                let n = ready!(Pin::new(&mut *dst).poll_write(cx, &self.buf[self.pos..self.cap]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.unflushed = true;
            }
            if self.eof {
                ready!(Pin::new(&mut *dst).poll_flush(cx))?;
                self.shutting = true;
                ready!(Pin::new(&mut *dst).poll_shutdown(cx))?;
                self.done = true;
            }
        }
    }
}

/// Carries a client handshaken here and its server until both directions are
/// closed, or a hot upgrade moves the connection ([`Outcome::Departed`]).
pub async fn relay(client: TlsClient, server: TcpStream, ctx: Ctx<'_>) -> Outcome {
    ctx.stats.inc(DaemonStat::Copied);
    let (mut client, mut server) = (client, server);
    let fds = [client.get_ref().0.get_ref().as_raw_fd(), server.as_raw_fd()];
    let departable =
        client.get_ref().1.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
    if !departable {
        // The record layer that carries a moved connection is TLS 1.3's.
        ctx.entry.stays();
    }
    let activity = Activity::new();
    let mut halves = [Half::new(), Half::new()];
    let stop = {
        let [c2s, s2c] = &mut halves;
        let both = poll_fn(|cx| {
            let up = c2s.poll_copy(cx, &mut client, &mut server, |n| {
                count(&ctx, &activity, Direction::ClientToServer, n);
            })?;
            let down = s2c.poll_copy(cx, &mut server, &mut client, |n| {
                count(&ctx, &activity, Direction::ServerToClient, n);
            })?;
            match (up, down) {
                (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
                _ => Poll::Pending,
            }
        });
        run_until(both, &activity, &ctx, departable).await
    };
    match stop {
        Stop::Depart => match stopped(client, &halves) {
            // `written` serves the splice's accounting: nothing for a TLS client.
            Ok((tcp, stopped)) => {
                super::departure_of((&tcp, &server), Carried::Tls(Box::new(stopped)), [0, 0])
            }
            Err(e) => {
                for fd in fds {
                    let _ = sys::set_linger_zero(fd);
                }
                Outcome::Aborted(e)
            }
        },
        stop => ended(stop, fds, ctx.stats),
    }
}

/// The state of a rustls relay stopped for a hot upgrade (see the module doc), and
/// the client's TCP stream.
fn stopped(client: TlsClient, halves: &[Half; 2]) -> io::Result<(TcpStream, Stopped)> {
    use std::io::Read as _;
    let (tap, mut conn) = client.into_inner();
    let [c2s, s2c] = halves;
    // Client to server: what the relay read and did not write, then what rustls
    // decrypted and the relay did not read.
    let mut to_server = c2s.buf[c2s.pos..c2s.cap].to_vec();
    let mut client_eof = c2s.eof;
    let mut chunk = [0u8; 4096];
    while !client_eof {
        match conn.reader().read(&mut chunk) {
            Ok(0) => client_eof = true,
            Ok(n) => to_server.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    // Server to client: records rustls sealed and the socket did not take, then the
    // relay's unwritten bytes sealed with the extracted keys.
    let mut to_client = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut to_client)?;
    }
    let mut keys = Keys::extract(conn).map_err(io::Error::other)?;
    let mut sealer = Sealer::new(keys.tx.clone())?;
    sealer.seal_data(&s2c.buf[s2c.pos..s2c.cap], &mut to_client)?;
    keys.tx = sealer.keys().clone();
    let (tcp, raw_in) = tap.into_parts();
    let state = Stopped {
        keys,
        raw_in,
        pending: [to_server, to_client],
        eof: [client_eof, s2c.eof],
        close_sealed: s2c.shutting,
        done: [c2s.done, s2c.done],
    };
    Ok((tcp, state))
}

/// One direction of [`resume`].
struct Way {
    /// Bytes for the destination (plaintext to the server; sealed records to the
    /// client).
    out: Vec<u8>,
    eof: bool,
    done: bool,
}

/// Carries on a TLS connection a hot upgrade moved in, from where `st` says, with the
/// record layer of [`crate::tls::records`].
pub async fn resume(client: TcpStream, server: TcpStream, st: Stopped, ctx: Ctx<'_>) -> Outcome {
    ctx.stats.inc(DaemonStat::Copied);
    let fds = [client.as_raw_fd(), server.as_raw_fd()];
    let Stopped {
        keys,
        raw_in,
        pending: [to_server, to_client],
        eof,
        mut close_sealed,
        done,
    } = st;
    let (mut opener, mut sealer) = match (Opener::new(keys.rx), Sealer::new(keys.tx)) {
        (Ok(o), Ok(s)) => (o, s),
        (Err(e), _) | (_, Err(e)) => return ended(Stop::Ended(Err(e)), fds, ctx.stats),
    };
    let mut inbound = raw_in;
    let mut ways = [
        Way {
            out: to_server,
            eof: eof[0],
            done: done[0],
        },
        Way {
            out: to_client,
            eof: eof[1],
            done: done[1],
        },
    ];
    let activity = Activity::new();
    let stop = {
        let [up, down] = &mut ways;
        let (opener, sealer, inbound) = (&mut opener, &mut sealer, &mut inbound);
        let close_sealed = &mut close_sealed;
        let both = async {
            let (ctx, activity) = (&ctx, &activity);
            let c2s = async {
                while !up.done {
                    step_up(&client, &server, up, (opener, inbound), (ctx, activity)).await?;
                }
                Ok::<_, io::Error>(())
            };
            let s2c = async {
                while !down.done {
                    step_down(
                        &server,
                        &client,
                        down,
                        (sealer, close_sealed),
                        (ctx, activity),
                    )
                    .await?;
                }
                Ok::<_, io::Error>(())
            };
            tokio::try_join!(c2s, s2c).map(drop)
        };
        run_until(both, &activity, &ctx, true).await
    };
    match stop {
        Stop::Depart => {
            let [up, down] = ways;
            let state = Stopped {
                keys: Keys {
                    tx: sealer.keys().clone(),
                    rx: opener.keys().clone(),
                },
                raw_in: inbound,
                pending: [up.out, down.out],
                eof: [up.eof, down.eof],
                close_sealed,
                done: [up.done, down.done],
            };
            super::departure_of((&client, &server), Carried::Tls(Box::new(state)), [0, 0])
        }
        stop => ended(stop, fds, ctx.stats),
    }
}

/// Client to server, one step: write what is owed, forward the end, or read and
/// open records. Cancel-safe: state changes only after the awaits.
async fn step_up(
    client: &TcpStream,
    server: &TcpStream,
    way: &mut Way,
    (opener, inbound): (&mut Opener, &mut Vec<u8>),
    (ctx, activity): (&Ctx<'_>, &Activity),
) -> io::Result<()> {
    if !way.out.is_empty() {
        server.writable().await?;
        write_some(server, &mut way.out)?;
        return Ok(());
    }
    if way.eof {
        sys::shutdown_write(server.as_raw_fd())?;
        way.done = true;
        return Ok(());
    }
    client.readable().await?;
    let mut chunk = [0u8; BUF];
    let n = match client.try_read(&mut chunk) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
        Err(e) => return Err(e),
    };
    if n == 0 {
        // Closed without close_notify: the end all the same.
        way.eof = true;
        return Ok(());
    }
    inbound.extend_from_slice(&chunk[..n]);
    while let Some(len) = Opener::complete(inbound)? {
        let mut record: Vec<u8> = inbound.drain(..len).collect();
        match opener.open(&mut record)? {
            Opened::Data(range) => {
                count(ctx, activity, Direction::ClientToServer, range.len());
                way.out.extend_from_slice(&record[range]);
            }
            Opened::CloseNotify => way.eof = true,
            Opened::Nothing => {}
        }
    }
    Ok(())
}

/// Server to client, one step: write what is owed, seal the end, or read and seal.
async fn step_down(
    server: &TcpStream,
    client: &TcpStream,
    way: &mut Way,
    (sealer, close_sealed): (&mut Sealer, &mut bool),
    (ctx, activity): (&Ctx<'_>, &Activity),
) -> io::Result<()> {
    if !way.out.is_empty() {
        client.writable().await?;
        write_some(client, &mut way.out)?;
        return Ok(());
    }
    if way.eof {
        if !*close_sealed {
            sealer.seal_close_notify(&mut way.out)?;
            *close_sealed = true;
        } else {
            // The client may be gone already (it closed first): no error.
            let _ = sys::shutdown_write(client.as_raw_fd());
            way.done = true;
        }
        return Ok(());
    }
    server.readable().await?;
    let mut chunk = [0u8; BUF];
    match server.try_read(&mut chunk) {
        Ok(0) => way.eof = true,
        Ok(n) => {
            count(ctx, activity, Direction::ServerToClient, n);
            sealer.seal_data(&chunk[..n], &mut way.out)?;
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Writes what `dst` takes of `out` now.
fn write_some(dst: &TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
    match dst.try_write(out) {
        Ok(n) => {
            out.drain(..n);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}
