//! The few socket and `bpf()` syscalls that std, tokio and aya do not wrap (or keep
//! private). Every `unsafe` block of the crate that talks to the kernel directly
//! lives here.

use std::{
    io, mem,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

/// `SO_COOKIE` (asm-generic/socket.h): a socket's 64-bit id, also seen by BPF.
const SO_COOKIE: libc::c_int = 57;
/// Offset of `tcpi_bytes_acked` in `struct tcp_info` (linux/tcp.h, stable since 4.1).
const TCPI_BYTES_ACKED_OFFSET: usize = 120;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The socket's cookie (the key of the sockhash maps).
pub fn socket_cookie(fd: RawFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes passed.
    check(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    })?;
    Ok(cookie)
}

/// How far a TCP socket's sending has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendProgress {
    /// `tcpi_bytes_acked` as the kernel reports it. Measured here: an actively opened
    /// socket counts its SYN as one acknowledged byte, an accepted one does not, so
    /// callers calibrate against a known byte count (see `dataplane::sockmap`).
    pub acked: u64,
    /// Bytes in the send queue, sent or not, not yet acknowledged (`SIOCOUTQ`).
    pub queued: u64,
}

impl SendProgress {
    /// Every byte ever handed to the socket for sending (acked or still queued).
    ///
    /// [`send_progress`] returns a consistent snapshot of the two values.
    pub fn enqueued(self) -> u64 {
        self.acked + self.queued
    }
}

/// Reads `tcpi_bytes_acked` and `SIOCOUTQ` as one consistent snapshot: the ACK count
/// is read before and after the queue length and the pair retried until they agree
/// (an ACK between the reads would otherwise skew the sum).
pub fn send_progress(fd: RawFd) -> io::Result<SendProgress> {
    loop {
        let before = bytes_acked(fd)?;
        let queued = outq(fd)?;
        if bytes_acked(fd)? == before {
            return Ok(SendProgress {
                acked: before,
                queued,
            });
        }
    }
}

fn bytes_acked(fd: RawFd) -> io::Result<u64> {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is valid for writes of `len` bytes; the kernel writes at most that.
    check(unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    })?;
    if (len as usize) < TCPI_BYTES_ACKED_OFFSET + 8 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "kernel tcp_info lacks tcpi_bytes_acked",
        ));
    }
    Ok(u64::from_ne_bytes(
        info[TCPI_BYTES_ACKED_OFFSET..][..8]
            .try_into()
            .expect("8 bytes"),
    ))
}

fn outq(fd: RawFd) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int to the pointer.
    check(unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) })?;
    Ok(queued.max(0) as u64)
}

/// `shutdown(fd, SHUT_WR)`: sends FIN after the queued bytes.
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor the caller owns.
    check(unsafe { libc::shutdown(fd, libc::SHUT_WR) }).map(drop)
}

/// Makes the next `close()` send RST instead of FIN (`SO_LINGER` with zero timeout).
pub fn set_linger_zero(fd: RawFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is a valid `struct linger` for the duration of the call.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// `setsockopt` of an `int` option.
pub fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `v` is a valid int for the duration of the call.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&raw const v).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Clears `FD_CLOEXEC` on `fd`, so that an `exec` keeps it open.
pub fn keep_on_exec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) }).map(drop)
}

/// Sets `SO_SNDBUF` and `SO_RCVBUF` to `bytes` (the kernel doubles them for its own
/// bookkeeping and stops autotuning them).
pub fn set_buffers(fd: RawFd, bytes: u32) -> io::Result<()> {
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        setsockopt_int(fd, libc::SOL_SOCKET, opt, bytes as libc::c_int)?;
    }
    Ok(())
}

/// `recv(MSG_PEEK | MSG_DONTWAIT)`: bytes waiting in the socket, left there.
pub fn peek(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    recv_flags(fd, buf, libc::MSG_PEEK | libc::MSG_DONTWAIT)
}

/// `recv(MSG_DONTWAIT)`: whatever the socket holds now, whatever the runtime last
/// saw of its readiness (a read that must not miss bytes whose readiness edge the
/// runtime has not processed yet).
pub fn recv_now(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    recv_flags(fd, buf, libc::MSG_DONTWAIT)
}

/// `send` without waiting (and without `SIGPIPE`).
pub fn send_now(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length for the duration of the call.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn recv_flags(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length for the duration of the call.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `IP_BIND_ADDRESS_NO_PORT`: a `bind()` to an address with port 0 defers the port
/// choice to `connect()`, so ports are shared between destinations (the 4-tuple must be
/// unique, not the port): each source address then serves ~60,000 connections per
/// server instead of ~60,000 in all.
pub fn set_bind_address_no_port(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `one` is a valid int for the duration of the call.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The index of network interface `name`.
pub fn interface_index(name: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the name"))?;
    // SAFETY: `name` is a valid C string for the duration of the call.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::new(io::ErrorKind::NotFound, "no such interface")),
        index => Ok(index),
    }
}

/// `bpf(cmd, attr)`: `attr` is the start of `union bpf_attr` as 32-bit words, the
/// rest zero. What the call returns (a descriptor for the commands that make one).
fn bpf(cmd: u32, words: &[u32]) -> io::Result<i64> {
    let mut attr = [0u32; 32];
    attr[..words.len()].copy_from_slice(words);
    // SAFETY: bpf() reads `size_of_val(&attr)` bytes of `attr`, which lives through
    // the call; the commands used here write nothing back into it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr.as_ptr(),
            mem::size_of_val(&attr),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A descriptor `bpf()` just made: ours alone.
fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// Makes (and closes) a one-entry array map: fails when the kernel refuses this
/// process BPF maps (no CAP_BPF, a seccomp filter without `bpf()`).
pub fn bpf_map_probe() -> io::Result<()> {
    use aya_obj::generated::{bpf_cmd, bpf_map_type};
    // map_type, key_size, value_size, max_entries.
    let array = bpf_map_type::BPF_MAP_TYPE_ARRAY as u32;
    bpf(bpf_cmd::BPF_MAP_CREATE as u32, &[array, 4, 4, 1]).map(|fd| drop(owned(fd)))
}

/// Attaches the XDP program `program` to interface `ifindex` with `flags` (its
/// `XDP_FLAGS_*` mode) as a BPF link: the program stays attached while a
/// descriptor of the link is open, in this process or in any other it was passed
/// to (a hot upgrade), and comes off when the last one closes.
pub fn xdp_link_create(program: BorrowedFd<'_>, ifindex: u32, flags: u32) -> io::Result<OwnedFd> {
    use aya_obj::generated::{bpf_attach_type, bpf_cmd};
    // prog_fd, target_ifindex, attach_type, flags.
    let words = [
        program.as_raw_fd() as u32,
        ifindex,
        bpf_attach_type::BPF_XDP as u32,
        flags,
    ];
    bpf(bpf_cmd::BPF_LINK_CREATE as u32, &words).map(owned)
}

/// Puts `program` in place of whatever program `link` runs, atomically: no packet
/// goes without one of the two.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    use aya_obj::generated::bpf_cmd;
    // link_fd, new_prog_fd, flags, old_prog_fd.
    let words = [link.as_raw_fd() as u32, program.as_raw_fd() as u32];
    bpf(bpf_cmd::BPF_LINK_UPDATE as u32, &words).map(drop)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        os::fd::AsRawFd,
    };

    use super::*;

    #[test]
    fn cookies_and_send_progress_on_real_sockets() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (mut b, _) = l.accept().expect("accept");
        let (ca, cb) = (
            socket_cookie(a.as_raw_fd()).expect("cookie"),
            socket_cookie(b.as_raw_fd()).expect("cookie"),
        );
        assert_ne!(ca, cb);
        assert!(ca != 0 && cb != 0);

        a.write_all(&[7u8; 1000]).expect("write");
        let mut buf = [0u8; 1000];
        b.read_exact(&mut buf).expect("read");
        // Loopback acknowledges at once, but give the ACK a moment.
        for _ in 0..100 {
            if send_progress(a.as_raw_fd()).expect("progress").queued == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // The connecting side counts its SYN as an acknowledged byte...
        assert_eq!(
            send_progress(a.as_raw_fd()).expect("progress"),
            SendProgress {
                acked: 1001,
                queued: 0
            }
        );
        // ...the accepting side does not.
        b.write_all(&[9u8; 300]).expect("write");
        let mut back = [0u8; 300];
        a.read_exact(&mut back).expect("read");
        for _ in 0..100 {
            if send_progress(b.as_raw_fd()).expect("progress").queued == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(
            send_progress(b.as_raw_fd()).expect("progress"),
            SendProgress {
                acked: 300,
                queued: 0
            }
        );

        // shutdown_write sends FIN after the queued bytes.
        a.write_all(b"xy").expect("write");
        shutdown_write(a.as_raw_fd()).expect("shutdown");
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).expect("read");
        assert_eq!(rest, b"xy");
    }
}
