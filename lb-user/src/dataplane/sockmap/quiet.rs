//! A spliced pair's sockets, kept from waking the daemon for every skb.
//!
//! The program's verdict ends with the socket's own `data_ready`, which wakes every
//! epoll instance watching the socket for input (`EPOLLIN`, and `EPOLLPRI`: both are
//! in the wake-up's key). The runtime watches every `TcpStream` for input, so while a
//! pair was spliced its worker thread woke from `epoll_wait` once per redirected skb,
//! with no task to run (measured, W2: 300,000 wake-ups for 400,000 messages, and
//! 25-27 CPU-s per million messages against 17-20 without them).
//!
//! So while spliced, each socket's `TcpStream` is registered with a reactor nobody
//! waits on ([`dormant`]), and the daemon's reactor watches the socket only for room
//! to write (and for errors and hang-ups, which epoll always reports): a wake-up key
//! of input alone matches nothing there. Readability is watched only while a
//! direction asks for it (throttled). Writes go out as plain `send` calls, since the
//! runtime tracks no readiness for these sockets. When the pair leaves the splice for
//! the copy plane or an eviction, the streams go back to the daemon's reactor before
//! anything else touches them; a pair that ends closes them where they are.
//!
//! Moving a pair's streams costs about 10 system calls each way (duplicates,
//! registrations, closes), as much as a short session's whole splice. So a pair starts
//! loud, watched through its own streams in the daemon's reactor, and goes quiet
//! once it has lived [`HUSH_AFTER`]: until then its worker thread wakes for every
//! skb (the task does not), after that never.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{Mutex, OnceLock},
    time::Duration,
};

use tokio::{
    io::{Interest, Ready, unix::AsyncFd},
    net::TcpStream,
    runtime::{Handle, Runtime},
};

use crate::dataplane::Pair;

/// How long a spliced pair stays loud (see the module's text): a second of wake-ups
/// per skb against 20 system calls that a session shorter than that never pays.
pub(super) const HUSH_AFTER: Duration = Duration::from_secs(1);

/// How often the dormant reactor is turned: it frees what deregistered sockets left
/// (the runtime releases a registration only when its driver turns).
const TURN_EVERY: Duration = Duration::from_secs(1);

/// The reactor the streams of spliced pairs are registered with: a runtime that no
/// thread waits on, but for a short turn every [`TURN_EVERY`]. Started by [`prepare`]
/// or at the first splice, in the process that carries connections (a worker, after
/// its fork).
fn dormant() -> io::Result<&'static Handle> {
    static DORMANT: OnceLock<Handle> = OnceLock::new();
    static STARTING: Mutex<()> = Mutex::new(());
    if let Some(h) = DORMANT.get() {
        return Ok(h);
    }
    let _one = STARTING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = DORMANT.get() {
        return Ok(h);
    }
    let rt: Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("mqttlb-dormant".into())
        .spawn(move || {
            loop {
                std::thread::sleep(TURN_EVERY);
                rt.block_on(async { tokio::time::sleep(Duration::from_millis(1)).await });
            }
        })?;
    Ok(DORMANT.get_or_init(|| handle))
}

/// Starts the dormant reactor now (with the plane's event loop, once the daemon
/// serves: after any privilege drop, which wants one thread), so that its
/// descriptors and thread are there from the start rather than appearing at the
/// first splice; a failure here is retried at each splice (and aborts that pair).
pub(super) fn prepare() {
    if let Err(e) = dormant() {
        tracing::warn!(error = %e, "cannot start the reactor for spliced sockets; will retry");
    }
}

/// Registers `s` with `handle`'s reactor (`None`: the current runtime's) in its place:
/// a duplicate of the socket is registered first, so a failure leaves `s` as it was.
fn rehome(s: &mut TcpStream, handle: Option<&Handle>) -> io::Result<()> {
    // SAFETY: dup of a descriptor we own; the result is checked and then owned.
    let fd = unsafe { libc::fcntl(s.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let std = std::net::TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let moved = match handle {
        Some(h) => {
            let _in = h.enter();
            TcpStream::from_std(std)?
        }
        None => TcpStream::from_std(std)?,
    };
    // The old stream leaves its reactor and closes its descriptor; the socket lives on.
    drop(std::mem::replace(s, moved));
    Ok(())
}

/// One warning a second at most about pairs that cannot go quiet (its own: the
/// accept loop's warnings under the same shortage of descriptors would hide it).
pub(super) static HUSH_FAILED_LOG: std::sync::LazyLock<crate::limits::LogOnce> =
    std::sync::LazyLock::new(|| crate::limits::LogOnce::new(Duration::from_secs(1)));

/// Why [`Quiet::hush`] failed.
pub(super) struct HushFailed {
    pub(super) error: io::Error,
    /// A stream is still with the dormant reactor, where nothing wakes for it: the
    /// pair cannot be watched at all.
    pub(super) stranded: bool,
}

/// A socket descriptor owned by the pair, watched here.
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The daemon's watch over a spliced pair's sockets (client, server). Loud at first:
/// through the pair's own streams. Quiet after [`Quiet::hush`]: room to write and
/// errors always, input while a direction is throttled. Drop it (or
/// [`Quiet::wake`]) before the pair's sockets are closed.
pub(super) struct Quiet {
    fds: [RawFd; 2],
    /// `None` while loud, and after a failed change of interest (the pair is then
    /// aborted).
    watch: [Option<AsyncFd<Fd>>; 2],
    reading: [bool; 2],
    hushed: bool,
}

fn watch(fd: RawFd, reading: bool) -> io::Result<AsyncFd<Fd>> {
    let interest = if reading {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::WRITABLE
    };
    // SAFETY: `fd` is a pair's socket, which stays open until the watch is dropped:
    // [`Quiet::wake`] drops it before a stream is moved, and a `Quiet` lives only
    // inside the pair's own splice (see `SockmapPlane::quietly`).
    unsafe { AsyncFd::register_with_interest(Fd(fd), interest) }
        .map_err(|e| io::Error::other(e.to_string()))
}

impl Quiet {
    /// A loud watch: the pair's streams stay where they are.
    pub(super) fn loud(pair: &Pair) -> Self {
        Self {
            fds: [pair.client.as_raw_fd(), pair.server.as_raw_fd()],
            watch: [None, None],
            reading: [false; 2],
            hushed: false,
        }
    }

    /// Moves the pair's streams to the dormant reactor and watches them here. A
    /// failure (out of descriptors, most likely) leaves the watch loud and the streams
    /// where they were, unless a stream already moved could not be put back
    /// ([`HushFailed::stranded`]).
    pub(super) fn hush(&mut self, pair: &mut Pair) -> Result<(), HushFailed> {
        let failed = |error, stranded| HushFailed { error, stranded };
        let dormant = dormant().map_err(|e| failed(e, false))?;
        rehome(&mut pair.client, Some(dormant)).map_err(|e| failed(e, false))?;
        if let Err(e) = rehome(&mut pair.server, Some(dormant)) {
            return Err(failed(e, rehome(&mut pair.client, None).is_err()));
        }
        let fds = [pair.client.as_raw_fd(), pair.server.as_raw_fd()];
        let watched = watch(fds[0], false).and_then(|c| Ok([Some(c), Some(watch(fds[1], false)?)]));
        match watched {
            Ok(watch) => {
                *self = Self {
                    fds,
                    watch,
                    reading: [false; 2],
                    hushed: true,
                };
                Ok(())
            }
            Err(e) => {
                // Both put back, whether or not the first could be.
                let client = rehome(&mut pair.client, None).is_err();
                let server = rehome(&mut pair.server, None).is_err();
                Err(failed(e, client || server))
            }
        }
    }

    /// Whether the pair's sockets are quiet.
    pub(super) fn hushed(&self) -> bool {
        self.hushed
    }

    /// Ends the watch and moves the streams back to the daemon's reactor (if they
    /// had left it).
    pub(super) fn wake(self, pair: &mut Pair) -> io::Result<()> {
        let hushed = self.hushed;
        // One registration per descriptor and reactor: the watch leaves first.
        drop(self);
        if !hushed {
            return Ok(());
        }
        rehome(&mut pair.client, None)?;
        rehome(&mut pair.server, None)
    }

    /// Watches `side` (0 client, 1 server) for input too, or no more.
    /// (A loud watch always has input at hand.)
    pub(super) fn read(&mut self, side: usize, on: bool) -> io::Result<()> {
        if !self.hushed || (self.reading[side] == on && self.watch[side].is_some()) {
            return Ok(());
        }
        self.watch[side] = None;
        self.watch[side] = Some(watch(self.fds[side], on)?);
        self.reading[side] = on;
        Ok(())
    }

    fn side(&self, side: usize) -> io::Result<&AsyncFd<Fd>> {
        self.watch[side]
            .as_ref()
            .ok_or_else(|| io::Error::other("spliced socket not watched"))
    }

    /// Waits until `side` (its stream: `stream`) is ready for one of `interest`
    /// (input, room to write, an error) and says which: one future per socket, where
    /// one per kind of readiness made every spliced pair's waiting state larger (about
    /// 1.6 KB, measured). The input and room it reports are cleared, so the caller
    /// reads or writes until `EAGAIN`; an error stays, so that the read that follows
    /// fails with it.
    pub(super) async fn ready(
        &self,
        side: usize,
        stream: &TcpStream,
        interest: Interest,
    ) -> io::Result<Ready> {
        if !self.hushed {
            let ready = stream.ready(interest).await?;
            // A closure that finds nothing clears what the runtime reported.
            for (r, i) in [
                (Ready::READABLE, Interest::READABLE),
                (Ready::WRITABLE, Interest::WRITABLE),
            ] {
                if !(ready & r).is_empty() {
                    let _ = stream.try_io(i, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
                }
            }
            return Ok(ready);
        }
        let mut guard = self.side(side)?.ready(interest).await?;
        let ready = guard.ready();
        guard.clear_ready_matching(Ready::READABLE | Ready::WRITABLE);
        Ok(ready)
    }
}
