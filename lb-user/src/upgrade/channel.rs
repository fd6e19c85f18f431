//! The old and the new process of a hot upgrade talk over one `AF_UNIX`
//! `SOCK_SEQPACKET` pair: one message per [`Message`], descriptors beside it
//! (`SCM_RIGHTS`). A message is a little-endian `u32` length, that many bytes of JSON,
//! then raw bytes (a connection's pending bytes) the JSON gives the lengths of.
//! Blocking calls: each side runs them on a thread of its own.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use super::Message;

/// Largest message: a connection's state and up to two reads' worth of pending
/// bytes (64 KiB each) fit well under it.
const MAX_MESSAGE: usize = 1 << 20;
/// Descriptors one message carries at most (the kernel's `SCM_MAX_FD` is 253).
pub(super) const MAX_FDS: usize = 200;

/// One end of the channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Channel {
    /// A connected pair: this process's end, and the end for the new process
    /// (close-on-exec cleared when it is started).
    pub fn pair() -> io::Result<(Self, OwnedFd)> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid two-element array the kernel fills.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        for fd in [&a, &b] {
            // Room for the largest message; the forced size needs CAP_NET_ADMIN, the
            // plain one is capped by net.core.wmem_max (enough for most).
            let size = (2 * MAX_MESSAGE) as libc::c_int;
            if crate::sys::setsockopt_int(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                size,
            )
            .is_err()
            {
                let _ = crate::sys::setsockopt_int(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    size,
                );
            }
        }
        Ok((Self { fd: a }, b))
    }

    /// The channel on a descriptor inherited from the old process.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Sends `msg`, then `blobs` as its raw bytes, with `fds`.
    pub fn send(&self, msg: &Message, blobs: &[&[u8]], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let json = serde_json::to_vec(msg).map_err(io::Error::other)?;
        let mut bytes =
            Vec::with_capacity(4 + json.len() + blobs.iter().map(|b| b.len()).sum::<usize>());
        bytes.extend_from_slice(&(json.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&json);
        for b in blobs {
            bytes.extend_from_slice(b);
        }
        if bytes.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "upgrade message too large",
            ));
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let space = cmsg_space(raw.len());
        let mut control = vec![0u8; space];
        // SAFETY: msghdr is plain data; every pointer set below outlives the call.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        if !raw.is_empty() {
            hdr.msg_control = control.as_mut_ptr().cast();
            hdr.msg_controllen = space as _;
            // SAFETY: the control buffer is CMSG_SPACE(n fds) long, so the first
            // header and its data fit.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&hdr);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN((raw.len() * size_of::<RawFd>()) as u32) as _;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(cmsg),
                    raw.len() * size_of::<RawFd>(),
                );
            }
        }
        loop {
            // SAFETY: `hdr` describes valid buffers; the socket is ours.
            let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Receives one message, its raw bytes and its descriptors, waiting at most
    /// `wait` (`None`: for ever). The other side gone is `UnexpectedEof`.
    pub fn recv(&self, wait: Option<Duration>) -> io::Result<(Message, Vec<u8>, Vec<OwnedFd>)> {
        let tv = wait.map_or(
            libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            |w| libc::timeval {
                tv_sec: w.as_secs() as libc::time_t,
                tv_usec: libc::suseconds_t::from(w.subsec_micros() as i32),
            },
        );
        // SAFETY: `tv` is a valid timeval for SO_RCVTIMEO.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut bytes = vec![0u8; MAX_MESSAGE];
        let mut iov = libc::iovec {
            iov_base: bytes.as_mut_ptr().cast(),
            iov_len: bytes.len(),
        };
        let space = cmsg_space(MAX_FDS);
        let mut control = vec![0u8; space];
        // SAFETY: msghdr is plain data; every pointer set below outlives the call.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = space as _;
        let n = loop {
            // SAFETY: `hdr` describes valid buffers; the socket is ours.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"));
                }
                _ => return Err(e),
            }
        };
        let fds = received_fds(&hdr);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other process is gone",
            ));
        }
        if hdr.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "upgrade message truncated",
            ));
        }
        bytes.truncate(n);
        let len = bytes
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .filter(|&len| 4 + len <= n)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "upgrade message malformed")
            })?;
        let msg: Message = serde_json::from_slice(&bytes[4..4 + len])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        bytes.drain(..4 + len);
        Ok((msg, bytes, fds))
    }
}

/// `CMSG_SPACE` for `n` descriptors.
fn cmsg_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    unsafe { libc::CMSG_SPACE((n.max(1) * size_of::<RawFd>()) as u32) as usize }
}

/// The descriptors `hdr` carries, owned from here on.
fn received_fds(hdr: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: walking the control messages recvmsg filled in, within its length.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    fds
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn a_message_its_bytes_and_its_descriptors_arrive_whole() {
        let (a, b) = Channel::pair().expect("pair");
        let b = Channel::from_fd(b);
        let (r, w) = std::os::unix::net::UnixStream::pair().expect("stream pair");
        let msg = Message::Done { handed: 3, kept: 1 };
        a.send(&msg, &[b"ab", b"cde"], &[r.as_fd(), w.as_fd()])
            .expect("send");
        let (got, bytes, fds) = b.recv(Some(Duration::from_secs(1))).expect("recv");
        assert!(matches!(got, Message::Done { handed: 3, kept: 1 }));
        assert_eq!(bytes, b"abcde");
        assert_eq!(fds.len(), 2);
        // The descriptors are the same sockets: a byte written through one copy
        // arrives through the original's peer.
        let mut w2 = std::os::unix::net::UnixStream::from(fds.into_iter().nth(1).expect("fd"));
        std::io::Write::write_all(&mut w2, b"x").expect("write");
        let mut buf = [0u8; 1];
        std::io::Read::read_exact(&mut &r, &mut buf).expect("read");
        assert_eq!(&buf, b"x");
        drop(a);
        let gone = b
            .recv(Some(Duration::from_secs(1)))
            .expect_err("peer closed");
        assert_eq!(gone.kind(), io::ErrorKind::UnexpectedEof);
    }
}
